"""Per-layer, per-expert load statistics: scalars, histograms and a layer-by-expert heatmap."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_moe.callbacks._utils import (
    StepBoundary,
    check_bool,
    check_int,
    log_scalars,
    moe_layers,
    reduce_sum,
    router_stats,
    tensorboard,
)
from lightning_moe.callbacks.heatmap import load_heatmap
from lightning_moe.nn.moe import MoEStats

AUX_TERMS = ("load_balance", "z_loss", "seq_balance")


class ExpertLoadMonitor(Callback):
    r"""Log how the router spreads tokens over the experts of every MoE layer.

    Counts from every training batch are summed over a window of ``logging_interval`` optimizer steps and over
    all ranks, then logged once at the window's last step. A window still open when training ends (``max_steps``
    not a multiple of ``logging_interval``) is logged at the last step too: its scalars are shares and ratios of
    the steps it holds, so a short window reads like a full one (its histogram holds its own, fewer, copies). It
    stays open, so a checkpoint saved at or after the end resumes it as an uninterrupted run would go on.

    Layers are numbered ``0..L-1`` in forward order (``pl_module.moe_layers``; the names are logged once as the
    text ``moe/layers``). For layer ``i``:

    - ``moe/layer_{i}/imbalance``: max over experts of the routed copies divided by their mean (1 = balanced).
    - ``moe/layer_{i}/cv``: coefficient of variation (population std / mean) of the routed copies.
    - ``moe/layer_{i}/entropy``: token-weighted mean router entropy (nats; ``log E`` is uniform).
    - ``moe/layer_{i}/drop_rate``: share of routed copies dropped for capacity.
    - ``moe/layer_{i}/dead_experts``: experts that received no copy in the whole window.
    - ``moe/layer_{i}/aux/{term}``: mean of each auxiliary loss the layer returned (unweighted).
    - ``moe/layer_{i}/load/expert_{e}`` and ``moe/layer_{i}/kept/expert_{e}``: share of the layer's routed copies
      sent to expert ``e`` before and after capacity dropping (the kept shares sum to ``1 - drop_rate``); only
      while all layers together have at most ``max_expert_scalars`` experts, so the number of tags stays
      bounded. Otherwise ``moe/layer_{i}/load_min`` and ``moe/layer_{i}/load_max`` summarise them.

    TensorBoard also gets a histogram ``moe/layer_{i}/routed`` per layer (bucket ``e`` holds expert ``e``'s
    routed copies) and the image ``moe/load_heatmap`` (rows layers, columns experts; blue starving, white
    balanced, red overloaded; see :func:`lightning_moe.callbacks.heatmap.load_heatmap`). Other loggers get the
    scalars only. The latest window's values are kept in :attr:`last_metrics` and its ``(L, E)`` routed loads
    in :attr:`last_load` (``E`` the largest expert count; NaN past the experts of a layer with fewer).

    Args:
        logging_interval: Optimizer steps per window (log every this many steps).
        max_expert_scalars: Largest ``layers * experts`` for which per-expert scalars are logged.
        log_histograms: Log the per-layer histograms (TensorBoard).
        log_heatmap: Log the heatmap image (TensorBoard).

    Raises:
        ValueError: If ``logging_interval`` is not an int >= 1, ``max_expert_scalars`` not an int >= 0, or a flag
            not a bool.

    Example::

        from lightning_moe.callbacks import ExpertLoadMonitor

        trainer = Trainer(callbacks=[ExpertLoadMonitor(logging_interval=50)])
    """

    def __init__(
        self,
        logging_interval: int = 50,
        max_expert_scalars: int = 64,
        log_histograms: bool = True,
        log_heatmap: bool = True,
    ) -> None:
        check_int("logging_interval", logging_interval, 1)
        check_int("max_expert_scalars", max_expert_scalars, 0)
        check_bool("log_histograms", log_histograms)
        check_bool("log_heatmap", log_heatmap)
        self.logging_interval = logging_interval
        self.max_expert_scalars = max_expert_scalars
        self.log_histograms = log_histograms
        self.log_heatmap = log_heatmap
        self.last_metrics: dict[str, float] = {}
        self.last_load: Tensor | None = None
        self._window: dict[str, Tensor] | None = None
        self._world_size = 1
        self._steps = StepBoundary()
        self._names_logged = False

    # -- accumulation ---------------------------------------------------------------------------------

    def _reset(self, experts_L: list[int]) -> None:
        # Layers may have different expert counts: rows are padded to the largest, "experts" says each row's.
        zeros = torch.zeros(len(experts_L), max(experts_L), dtype=torch.float64)
        self._window = {
            "routed": zeros.clone(),
            "kept": zeros.clone(),
            # Per layer: dropped, tokens, entropy * tokens, batches, then one sum and one count per aux term.
            "scalars": torch.zeros(len(experts_L), 4 + 2 * len(AUX_TERMS), dtype=torch.float64),
            "experts": torch.tensor(experts_L, dtype=torch.long),
        }

    def _add(self, stats: list[MoEStats]) -> None:
        experts_L = [s.tokens_per_expert.numel() for s in stats]
        if self._window is None or self._window.get("experts", torch.empty(0)).tolist() != experts_L:
            self._reset(experts_L)
        window = self._window
        for i, s in enumerate(stats):
            experts = s.tokens_per_expert.numel()
            window["routed"][i, :experts] += s.tokens_per_expert.detach().double().cpu()
            window["kept"][i, :experts] += s.kept_per_expert.detach().double().cpu()
            tokens = float(s.num_tokens)
            row = window["scalars"][i]
            row[0] += float(s.num_dropped)
            row[1] += tokens
            row[2] += float(s.router_entropy) * tokens
            row[3] += 1
            for j, term in enumerate(AUX_TERMS):
                if term in s.losses:
                    row[4 + 2 * j] += float(s.losses[term])
                    row[5 + 2 * j] += 1

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not moe_layers(pl_module):
            rank_zero_warn("ExpertLoadMonitor: the model has no MoE layer; nothing to log")
        self._steps.start(trainer)  # windows close when the step count moves on from here
        self._world_size = trainer.world_size
        if trainer.global_rank != 0:  # a restored window is summed over the ranks when it closes: keep one copy
            self._window = None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stats = router_stats(outputs)
        if stats is not None:
            self._add(stats)
        if not self._steps.crossed(trainer):
            return  # mid gradient accumulation: the window closes at optimizer steps only
        step = trainer.global_step
        if step % self.logging_interval == 0 and self._window is not None:
            self._emit(trainer, pl_module, step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        is_open = self._window is not None
        if trainer.world_size > 1:  # the window is summed over the ranks: every rank must take the same way
            is_open = trainer.strategy.reduce_boolean_decision(is_open, all=True)
        if is_open:
            window = self._window
            self._emit(trainer, pl_module, trainer.global_step)
            self._window = window  # still open: a resumed run adds its next steps to it

    # -- logging --------------------------------------------------------------------------------------

    def _emit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        window = self._window
        self._window = None
        device = pl_module.device
        routed_LE = reduce_sum(trainer, window["routed"].to(device)).cpu()
        kept_LE = reduce_sum(trainer, window["kept"].to(device)).cpu()
        scalars = reduce_sum(trainer, window["scalars"].to(device)).cpu()
        experts_L = window["experts"].tolist()
        per_expert = sum(experts_L) <= self.max_expert_scalars
        metrics: dict[str, float] = {}
        for i, num_experts in enumerate(experts_L):
            prefix = f"moe/layer_{i}"
            routed_E, kept_E, row = routed_LE[i, :num_experts], kept_LE[i, :num_experts], scalars[i]
            total = float(routed_E.sum())
            mean = total / num_experts
            share_E = routed_E / total if total > 0 else torch.zeros_like(routed_E)
            kept_share_E = kept_E / total if total > 0 else torch.zeros_like(kept_E)
            metrics[f"{prefix}/imbalance"] = float(routed_E.max()) / mean if mean > 0 else 0.0
            metrics[f"{prefix}/cv"] = float(routed_E.std(unbiased=False)) / mean if mean > 0 else 0.0
            metrics[f"{prefix}/entropy"] = float(row[2] / row[1]) if row[1] > 0 else 0.0
            metrics[f"{prefix}/drop_rate"] = float(row[0]) / total if total > 0 else 0.0
            metrics[f"{prefix}/dead_experts"] = float((routed_E == 0).sum())
            for j, term in enumerate(AUX_TERMS):
                if row[5 + 2 * j] > 0:
                    metrics[f"{prefix}/aux/{term}"] = float(row[4 + 2 * j] / row[5 + 2 * j])
            if per_expert:
                for e in range(num_experts):
                    metrics[f"{prefix}/load/expert_{e}"] = float(share_E[e])
                    metrics[f"{prefix}/kept/expert_{e}"] = float(kept_share_E[e])
            else:
                metrics[f"{prefix}/load_min"] = float(share_E.min())
                metrics[f"{prefix}/load_max"] = float(share_E.max())
        self.last_metrics = metrics
        total_L = routed_LE.sum(dim=1, keepdim=True)
        load_LE = torch.where(total_L > 0, routed_LE / total_L.clamp_min(1), 0.0).float()
        beyond_LE = torch.arange(load_LE.shape[1]) >= window["experts"][:, None]  # a layer with fewer experts
        self.last_load = load_LE.masked_fill(beyond_LE, math.nan)
        log_scalars(trainer, metrics, step)
        writer = tensorboard(trainer)
        if writer is None:
            return
        if not self._names_logged:
            names = [name for name, _ in moe_layers(pl_module)]
            table = "| layer | module |\n|---|---|\n" + "\n".join(f"| {i} | `{n}` |" for i, n in enumerate(names))
            writer.add_text("moe/layers", table, step)
            self._names_logged = True
        if self.log_histograms:
            for i, num_experts in enumerate(experts_L):
                _add_count_histogram(writer, f"moe/layer_{i}/routed", routed_LE[i, :num_experts].numpy(), step)
        if self.log_heatmap:
            writer.add_image("moe/load_heatmap", load_heatmap(self.last_load.numpy()), step, dataformats="HWC")

    @override
    def state_dict(self) -> dict[str, Any]:
        # The open window (this rank's counts; Lightning writes rank 0's state), and how many ranks added to it.
        return {"window": self._window, "window_world_size": self._world_size}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        window = state_dict.get("window")
        # A window of one process resumes whole (on rank 0 only, see on_train_start); one of several holds only
        # rank 0's share, and older files lack the count: the window starts afresh.
        whole = window is not None and "experts" in window and state_dict.get("window_world_size") == 1
        self._window = window if whole else None


def _add_count_histogram(writer: Any, tag: str, counts_E: np.ndarray, step: int) -> None:
    """A histogram whose bucket ``e`` (right edge ``e + 0.5``) holds expert ``e``'s count."""
    num_experts = len(counts_E)
    ids = np.arange(num_experts, dtype=np.float64)
    total = float(counts_E.sum())
    nonzero = ids[counts_E > 0]
    writer.add_histogram_raw(
        tag,
        min=float(nonzero.min()) if nonzero.size else 0.0,
        max=float(nonzero.max()) if nonzero.size else 0.0,
        num=total,
        sum=float((ids * counts_E).sum()),
        sum_squares=float((ids**2 * counts_E).sum()),
        bucket_limits=(ids + 0.5).tolist(),
        bucket_counts=counts_E.astype(np.float64).tolist(),
        global_step=step,
    )
