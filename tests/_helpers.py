"""Tiny seeded Mixtral modules, quiet CPU trainers and the README's learning-rate schedule for the top-level tests."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import lightning as L
import pytest
import torch
import torch._dynamo
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_moe.module import CausalLMModule

# Lightning's advice that tiny CPU runs do not need: more loader workers, its hosted logger, an unused GPU.
QUIET = pytest.mark.filterwarnings("ignore:.*(does not have many workers|LitLogger|litlogger|GPU avail).*")


def seeded_mixtral(*, overrides: dict[str, Any], **kwargs: Any) -> CausalLMModule:
    """A ``mixtral-tiny`` module with ``overrides``, its weights drawn after ``torch.manual_seed(0)``."""
    torch.manual_seed(0)
    return CausalLMModule(arch="mixtral-tiny", overrides=overrides, **kwargs)


def quiet_trainer(callbacks: Iterable[Callback] = (), **kwargs: Any) -> L.Trainer:
    """A CPU ``Trainer``: no logger, progress bar, model summary, sanity check; validation, checkpoints if asked."""
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("limit_val_batches", 0)
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        **kwargs,
    )


def compiled_graphs() -> int:
    """Graphs ``torch.compile`` has compiled since dynamo's last reset (each recompilation adds one)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def batch_loader(batches: Sequence[torch.Tensor]) -> DataLoader:
    """The given batches, in order, as they are."""
    return DataLoader(batches, batch_size=None, shuffle=False)


def lr_schedule(step: int, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """README: linear warmup, then cosine decay to ``lr * min_lr_ratio`` over the run's ``total`` optimizer steps."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
