"""Hold the dropped-token rate at a target with the least capacity, by tuning each layer's capacity factor."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_moe.callbacks._utils import (
    StepBoundary,
    check_bool,
    check_int,
    log_scalars,
    moe_layers,
    router_stats,
)
from lightning_moe.nn.capacity import expert_capacity
from lightning_moe.nn.config import is_number
from lightning_moe.nn.moe import MoELayer


class CapacityFactorTuner(Callback):
    r"""Tune the training capacity factor of every MoE layer that has one.

    Token-choice routing does not depend on the capacity, so the routed counts of a batch tell exactly how many
    copies any capacity factor would have dropped. Every ``interval`` optimizer steps the tuner replays the
    window's batches (from every rank) to find, per layer, the smallest factor in ``[min_factor, max_factor]``
    whose drop rate over the window is at most ``target_drop_rate``, and moves the layer's factor towards it:
    ``factor <- smoothing * factor + (1 - smoothing) * needed`` (up at once if the current factor drops too
    much and ``fast_up`` is set). Layers that are dropless, use an absolute ``expert_capacity`` or route by
    expert choice are left alone.

    Each layer gets its own copy of its :class:`~lightning_moe.nn.config.MoEConfig` first (zoo builds share one
    config object between layers). The factors are logged as ``capacity/layer_{i}/factor`` next to the
    window's actual ``capacity/layer_{i}/drop_rate``, kept in :attr:`factors` (module name -> factor) and saved
    in checkpoints; on resume they are applied again before training continues (also where the strategy restores
    callback states after ``on_fit_start``, as FSDP and ``ExpertParallelStrategy`` do). Per-sequence capacity
    (``capacity_scope="sequence"``) is replayed sequence by sequence, from each sequence's routed counts.

    Args:
        target_drop_rate: Largest acceptable share of dropped token copies (0.01 = 1%).
        min_factor: Lower bound of the factor.
        max_factor: Upper bound of the factor.
        interval: Optimizer steps between adjustments.
        smoothing: Weight of the old factor in each move, in ``[0, 1)``; 0 jumps to the estimate.
        fast_up: Raise the factor to the estimate at once when the window dropped more than the target.
        tune_eval: Also set ``eval_capacity_factor`` to the tuned factor (otherwise it is left as configured).

    Raises:
        ValueError: If an argument is out of range or of the wrong type.

    Example::

        from lightning_moe.callbacks import CapacityFactorTuner

        trainer = Trainer(callbacks=[CapacityFactorTuner(target_drop_rate=0.01, interval=20)])
    """

    def __init__(
        self,
        target_drop_rate: float = 0.01,
        min_factor: float = 1.0,
        max_factor: float = 4.0,
        interval: int = 20,
        smoothing: float = 0.8,
        fast_up: bool = True,
        tune_eval: bool = False,
    ) -> None:
        if not (is_number(target_drop_rate) and 0.0 <= target_drop_rate < 1.0):
            raise ValueError(f"target_drop_rate={target_drop_rate!r} is invalid: must be in [0, 1)")
        if not (is_number(min_factor) and min_factor > 0):
            raise ValueError(f"min_factor={min_factor!r} is invalid: must be a finite number > 0")
        if not (is_number(max_factor) and max_factor >= min_factor):
            raise ValueError(f"max_factor={max_factor!r} is invalid: must be >= min_factor ({min_factor}) and finite")
        check_int("interval", interval, 1)
        if not (is_number(smoothing) and 0.0 <= smoothing < 1.0):
            raise ValueError(f"smoothing={smoothing!r} is invalid: must be in [0, 1)")
        check_bool("fast_up", fast_up)
        check_bool("tune_eval", tune_eval)
        self.target_drop_rate = target_drop_rate
        self.min_factor = min_factor
        self.max_factor = max_factor
        self.interval = interval
        self.smoothing = smoothing
        self.fast_up = fast_up
        self.tune_eval = tune_eval
        self.factors: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        # Per tuned layer index: this window's batches (or, with per-sequence capacity, sequences) as rows of
        # (num_tokens, routed copies per expert...).
        self._batches: dict[int, list[Tensor]] = {}
        self._world_size = 1
        self._steps = StepBoundary()
        self._layers: dict[str, MoELayer] = {}  # the tuned layers of the fit under way, by name

    def _tuned(self, pl_module: pl.LightningModule) -> list[tuple[int, str, MoELayer]]:
        return [
            (i, name, layer)
            for i, (name, layer) in enumerate(moe_layers(pl_module))
            if layer.config.capacity_factor is not None
            and layer.config.expert_capacity is None
            and layer.config.router.kind == "token_choice"
        ]

    def _attach(self, pl_module: pl.LightningModule, record: bool) -> list[tuple[int, str, MoELayer]]:
        """Give each tuned layer its own config and its factor restored from a checkpoint.

        ``record``: note the configured factor of a layer the checkpoint has none for.
        """
        tuned = self._tuned(pl_module)
        self._layers = {}
        for _, name, layer in tuned:
            layer.config = copy.copy(layer.config)  # one config per layer: zoo builds share one object
            self._layers[name] = layer
            if name in self.factors:  # restored from a checkpoint
                self._apply(layer, self.factors[name])
            elif record:
                self.factors[name] = float(layer.config.capacity_factor)
        return tuned

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._world_size = trainer.world_size
        if not self._attach(pl_module, record=True):
            rank_zero_warn("CapacityFactorTuner: no MoE layer has a capacity_factor (dropless model); nothing to tune")

    def _on_eval_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # validate, test and predict from a checkpoint run at the factors it holds, as the fit's validations did
        # (the layers' factors live in their configs, which the module's weights do not carry).
        if trainer.state.fn != TrainerFn.FITTING:
            self._attach(pl_module, record=False)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._on_eval_start(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._on_eval_start(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._on_eval_start(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._layers = {}

    def _apply(self, layer: MoELayer, factor: float) -> None:
        layer.config.capacity_factor = factor
        if self.tune_eval:
            layer.config.eval_capacity_factor = factor

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._steps.start(trainer)  # windows close when the step count moves on from here
        if trainer.world_size > 1:  # a restored window (here after any restore order) is one process's rows
            self._batches = {}

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stats = router_stats(outputs)
        tuned = self._tuned(pl_module)
        if stats is not None:
            for i, _, _ in tuned:
                s = stats[i]
                if s.sequence_tokens_per_expert is not None:  # capacity per sequence: one row per sequence
                    tokens, routed = s.sequence_num_tokens.reshape(-1, 1), s.sequence_tokens_per_expert
                else:
                    tokens, routed = s.num_tokens.reshape(1, 1), s.tokens_per_expert.reshape(1, -1)
                rows = torch.cat([tokens.double(), routed.double()], dim=1)
                self._batches.setdefault(i, []).extend(rows.unbind(0))
        if not self._steps.crossed(trainer):
            return
        if trainer.global_step % self.interval == 0 and self._batches:
            self._update(trainer, pl_module, tuned)

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tuned: list[tuple[int, str, MoELayer]]):
        batches, self._batches = self._batches, {}
        step = trainer.global_step
        metrics: dict[str, float] = {}
        for i, name, layer in tuned:
            if i not in batches:
                continue
            rows = torch.stack(batches[i])
            if trainer.world_size > 1:  # every rank's batches, so all ranks choose the same factor
                rows = _gather_rows(pl_module, rows)
            rows = rows.cpu()
            top_k, num_experts = layer.config.router.top_k, layer.config.num_experts
            current = float(layer.config.capacity_factor)
            rate = drop_rate(rows, current, top_k, num_experts)
            needed = smallest_factor(rows, self.target_drop_rate, top_k, num_experts, self.min_factor, self.max_factor)
            if self.fast_up and rate > self.target_drop_rate and needed > current:
                new = needed
            else:
                new = self.smoothing * current + (1 - self.smoothing) * needed
            new = min(self.max_factor, max(self.min_factor, new))
            self._apply(layer, new)
            self.factors[name] = new
            metrics[f"capacity/layer_{i}/factor"] = new
            metrics[f"capacity/layer_{i}/drop_rate"] = rate
            self.history.append({"step": step, "layer": i, "drop_rate": rate, "factor": new})
        log_scalars(trainer, metrics, step)

    @override
    def state_dict(self) -> dict[str, Any]:
        # The open window too, so a resumed run's next update sees the same rows (this rank's only: see below).
        window = {i: torch.stack(rows) for i, rows in self._batches.items() if rows}
        return {"factors": dict(self.factors), "history": list(self.history), "window": window,
                "window_world_size": self._world_size}  # fmt: skip

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.factors = dict(state_dict.get("factors", {}))
        self.history = list(state_dict.get("history", []))
        # Strategies that restore after setup (FSDP, ExpertParallelStrategy) call this after on_fit_start.
        for name, layer in self._layers.items():
            if name in self.factors:
                self._apply(layer, self.factors[name])
            else:
                self.factors[name] = float(layer.config.capacity_factor)
        # A window of one process resumes in one process; with several, each rank's rows would be needed (the
        # file holds rank 0's), so the resumed window starts empty there (see on_train_start).
        window = state_dict.get("window") or {}
        if state_dict.get("window_world_size") == 1:
            self._batches = {int(i): list(rows.unbind(0)) for i, rows in window.items()}


def drop_rate(rows: Tensor, factor: float, top_k: int, num_experts: int) -> float:
    """Share of routed copies a capacity factor drops over batches.

    Args:
        rows: ``(rows, 1 + E)``: each batch's (or, with per-sequence capacity, each sequence's) real-token count,
            followed by its routed copies per expert.
        factor: Capacity factor.
        top_k: Experts per token.
        num_experts: Experts ``E``.

    Returns:
        Dropped copies over routed copies (0 when nothing was routed).
    """
    routed = float(rows[:, 1:].sum())
    if routed <= 0:
        return 0.0
    capacity = torch.tensor(
        [expert_capacity(int(n), top_k, num_experts, factor, None) for n in rows[:, 0].tolist()], dtype=rows.dtype
    )
    dropped = (rows[:, 1:] - capacity[:, None]).clamp_min(0).sum()
    return float(dropped) / routed


def smallest_factor(
    rows: Tensor, target: float, top_k: int, num_experts: int, low: float, high: float, tol: float = 1e-3
) -> float:
    """Smallest factor in ``[low, high]`` whose :func:`drop_rate` over ``rows`` is at most ``target``.

    Bisection (the drop rate never grows with the factor); ``high`` if no factor in range reaches the target.
    """
    if drop_rate(rows, low, top_k, num_experts) <= target:
        return low
    if drop_rate(rows, high, top_k, num_experts) > target:
        return high
    for _ in range(max(1, math.ceil(math.log2((high - low) / tol)))):
        mid = (low + high) / 2
        if drop_rate(rows, mid, top_k, num_experts) <= target:
            high = mid
        else:
            low = mid
    return high


def _gather_rows(pl_module: pl.LightningModule, rows: Tensor) -> Tensor:
    """Every rank's ``(N_r, C)`` rows, concatenated in rank order, also where the ranks hold different ``N_r``.

    Per-sequence rows differ in number where the ranks' batches do (an uneven last batch); ``all_gather`` needs one
    shape, so each rank's rows are padded to the largest count and cut back after the gather.
    """
    counts = pl_module.all_gather(torch.tensor(rows.shape[0], device=rows.device)).reshape(-1).tolist()
    padded = rows.new_zeros(max(counts), rows.shape[1])
    padded[: rows.shape[0]] = rows
    gathered = pl_module.all_gather(padded)  # (world, most, C)
    return torch.cat([gathered[r, :count] for r, count in enumerate(counts)])
