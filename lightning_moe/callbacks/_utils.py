"""Helpers the MoE callbacks share: MoE layers, optimizer-step boundaries, sums over ranks, TensorBoard."""

from __future__ import annotations

from numbers import Integral
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lightning_moe.nn.moe import MoELayer, MoEStats
from lightning_moe.strategies.checkpoint import clean_name


def moe_layers(pl_module: pl.LightningModule) -> list[tuple[str, MoELayer]]:
    """The module's MoE layers with their names, in forward order (the order of ``router_stats``).

    The names are those of the state dict, without the prefixes of wrappers (activation checkpointing,
    ``torch.compile``), so what callbacks key by name (and save in checkpoints) is the same with or without them.
    """
    layers = getattr(pl_module, "moe_layers", None)
    if layers is None:
        layers = [(name, m) for name, m in pl_module.named_modules() if isinstance(m, MoELayer)]
    return [(clean_name(name), layer) for name, layer in layers]


def check_int(name: str, value: Any, minimum: int | None = None) -> None:
    """Raise ``ValueError`` naming the argument unless ``value`` is an int (not a bool) and at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or (minimum is not None and value < minimum):
        allowed = "an int" if minimum is None else f"an int >= {minimum}"
        raise ValueError(f"{name}={value!r} is invalid: must be {allowed}")


def check_bool(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming the argument unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is invalid: must be True or False")


def router_stats(outputs: Any) -> list[MoEStats] | None:
    """The per-layer statistics a training or validation step returned, or ``None`` (skipped batch)."""
    if isinstance(outputs, dict):
        stats = outputs.get("router_stats")
        if stats:
            return list(stats)
    return None


class StepBoundary:
    """Finds the end of each optimizer step among the batch ends.

    With gradient accumulation Lightning calls ``on_train_batch_end`` for every micro-batch, and
    ``trainer.global_step`` moves on only when the optimizer steps; a callback that sums statistics over a
    window closes it at the first batch end after the step count moved on.
    """

    def __init__(self) -> None:
        self.seen_step = -1

    def start(self, trainer: pl.Trainer) -> None:
        """Count from the trainer's current step (call from ``on_train_start``; resumed runs start late)."""
        self.seen_step = trainer.global_step

    def crossed(self, trainer: pl.Trainer) -> bool:
        """True once per optimizer step: at the first call after ``trainer.global_step`` moved on."""
        if trainer.global_step == self.seen_step:
            return False
        self.seen_step = trainer.global_step
        return True


def reduce_sum(trainer: pl.Trainer, tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks (a no-op on one device); every rank gets the same result."""
    if trainer.world_size <= 1:
        return tensor
    return trainer.strategy.reduce(tensor.clone(), reduce_op="sum")


def tensorboard(trainer: pl.Trainer) -> Any | None:
    """The ``SummaryWriter`` of the first TensorBoard logger on rank zero, else ``None``."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Send scalars to every logger (loggers write on rank zero only)."""
    if not metrics:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def as_float(value: Tensor | float) -> float:
    """A plain float from a 0-d tensor or a number."""
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)
