"""Detect collapsing routers (starving experts, a dominant expert, low entropy) and warn, stop or revive."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.distributed.tensor import DTensor
from typing_extensions import override

from lightning_moe.callbacks._utils import (
    StepBoundary,
    check_int,
    log_scalars,
    moe_layers,
    reduce_sum,
    router_stats,
    tensorboard,
)
from lightning_moe.nn.config import is_number
from lightning_moe.nn.moe import MoELayer
from lightning_moe.strategies.expert_parallel import ExpertParallelStrategy

ACTIONS = ("warn", "stop", "revive")


class ExpertCollapseDetector(Callback):
    r"""Watch every MoE layer's routing and act when it collapses.

    After every optimizer step the routed copies of that step (summed over gradient-accumulation micro-batches
    and over all ranks) are checked; a condition that holds for ``patience`` steps in a row is a collapse:

    - **starving expert**: the expert's share of tokens is below ``min_load`` times the balanced share, the
      layer's routed copies per token over ``E`` (``top_k / E`` when no copy is dropped; an expert that gets
      nothing is dead);
    - **dominant expert**: one expert receives more than ``max_share`` of the tokens (set ``None`` to ignore);
    - **low entropy**: the layer's mean router entropy is below ``min_entropy`` times ``log E`` (``None``
      ignores it).

    Expert-choice layers give every expert its capacity of tokens, so only their entropy is watched.

    What happens then is ``action``:

    - ``"warn"``: a warning naming layer, expert(s), reason and step;
    - ``"stop"``: the warning, then ``trainer.should_stop = True`` (like ``EarlyStopping``);
    - ``"revive"``: the warning, then each starving expert is re-initialised from a live expert of its layer (the
      most loaded first, one donor per dead expert in turn) plus Gaussian noise (``noise`` times each weight's
      std): its stacked expert weights and its router row are copied from the donor and perturbed, its
      score-correction bias is set to the donor's, and the optimizer state of those slices (Adam moments and any
      other per-parameter tensor) is zeroed. The revived expert starts by sharing the donor's tokens and drifts
      away as the noise and gradients separate them. Dominant-expert and low-entropy collapses are warned about
      only (there is no dead expert to revive). The noise comes from a generator seeded with ``seed``, the step,
      the layer and the expert, so every rank
      revives identically.

    Every event is appended to :attr:`events` (``{"step", "layer", "name", "experts", "reason", "action"}``),
    saved in checkpoints, counted in the scalar ``collapse/events`` and written as TensorBoard text
    ``collapse/events``.

    Args:
        action: ``"warn"``, ``"stop"`` or ``"revive"``.
        patience: Consecutive optimizer steps a condition must hold.
        min_load: Starving threshold, relative to the balanced share (0.1: a tenth of a fair share).
        max_share: Largest share of tokens one expert may take, or ``None``.
        min_entropy: Smallest router entropy as a fraction of ``log E``, or ``None``.
        noise: Relative std of the noise added to the donor's weights when reviving.
        seed: Seed of the revival noise.

    Raises:
        ValueError: If an argument is out of range or of the wrong type.

    Example::

        from lightning_moe.callbacks import ExpertCollapseDetector

        trainer = Trainer(callbacks=[ExpertCollapseDetector(action="revive", patience=50)])
    """

    def __init__(
        self,
        action: str = "warn",
        patience: int = 100,
        min_load: float = 0.1,
        max_share: float | None = 0.9,
        min_entropy: float | None = None,
        noise: float = 0.01,
        seed: int = 0,
    ) -> None:
        if action not in ACTIONS:
            raise ValueError(f"action={action!r} is invalid: must be one of {', '.join(map(repr, ACTIONS))}")
        check_int("patience", patience, 1)
        if not (is_number(min_load) and 0.0 <= min_load < 1.0):
            raise ValueError(f"min_load={min_load!r} is invalid: must be in [0, 1)")
        if max_share is not None and not (is_number(max_share) and 0.0 < max_share <= 1.0):
            raise ValueError(f"max_share={max_share!r} is invalid: must be in (0, 1] or None")
        if min_entropy is not None and not (is_number(min_entropy) and 0.0 < min_entropy < 1.0):
            raise ValueError(f"min_entropy={min_entropy!r} is invalid: must be in (0, 1) or None")
        if not (is_number(noise) and noise >= 0):
            raise ValueError(f"noise={noise!r} is invalid: must be a finite number >= 0")
        check_int("seed", seed)
        self.action = action
        self.patience = patience
        self.min_load = min_load
        self.max_share = max_share
        self.min_entropy = min_entropy
        self.noise = noise
        self.seed = seed
        self.events: list[dict[str, Any]] = []
        # Per layer: consecutive steps each expert starved (E,), one expert dominated, the entropy was low.
        self._starving: list[Tensor] = []
        self._dominant: list[int] = []
        self._low_entropy: list[int] = []
        # Counts since the last optimizer step: per layer (E,) routed copies, tokens, entropy * tokens.
        self._routed: list[Tensor] | None = None
        self._tokens: Tensor | None = None
        self._steps = StepBoundary()

    def check_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse what this callback cannot do: at train start, and from the CLI before any data work.

        Raises:
            ValueError: For ``action="revive"`` with sharded experts (``ExpertParallelStrategy``).
        """
        sharded = isinstance(trainer.strategy, ExpertParallelStrategy) or any(
            isinstance(layer.experts.w1, DTensor) for _, layer in moe_layers(pl_module)
        )
        if self.action == "revive" and sharded:
            raise ValueError(
                "action='revive' is invalid with sharded experts (ExpertParallelStrategy): reviving copies whole "
                "expert weights between ranks' shards, which is not supported; use 'warn' or 'stop'"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not moe_layers(pl_module):
            rank_zero_warn("ExpertCollapseDetector: the model has no MoE layer; nothing to watch")
        self.check_setup(trainer, pl_module)
        self._steps.start(trainer)  # windows close when the step count moves on from here

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stats = router_stats(outputs)
        if stats is not None:
            if self._routed is None:
                self._routed = [torch.zeros_like(s.tokens_per_expert, dtype=torch.float64) for s in stats]
                self._tokens = torch.zeros(len(stats), 2, dtype=torch.float64, device=stats[0].num_tokens.device)
            for i, s in enumerate(stats):
                self._routed[i] += s.tokens_per_expert.double()
                tokens = s.num_tokens.double()
                self._tokens[i, 0] += tokens
                self._tokens[i, 1] += s.router_entropy.double() * tokens
        crossed = self._steps.crossed(trainer)  # every batch end: a step of skipped batches still moves the boundary
        if self._routed is None or not crossed:
            return
        routed, tokens = self._routed, self._tokens
        self._routed = self._tokens = None
        self._check(trainer, pl_module, routed, tokens)

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, routed: list[Tensor], tokens: Tensor) -> None:
        layers = moe_layers(pl_module)
        flat = reduce_sum(trainer, torch.cat([*routed, tokens.reshape(-1)]))
        sizes = [r.numel() for r in routed]
        routed = list(flat[: sum(sizes)].split(sizes))
        tokens = flat[sum(sizes) :].view(-1, 2)
        if len(self._starving) != len(routed):
            self._starving = [torch.zeros(n, dtype=torch.long) for n in sizes]
            self._dominant = [0] * len(routed)
            self._low_entropy = [0] * len(routed)
        step = trainer.global_step
        new_events = []
        for i, (routed_E, (num_tokens, entropy_sum)) in enumerate(zip(routed, tokens.tolist(), strict=True)):
            if num_tokens <= 0:
                continue
            name, layer = layers[i] if i < len(layers) else (f"layer_{i}", None)
            num_experts = routed_E.numel()
            share_E = (routed_E / num_tokens).cpu()
            # Expert choice gives every expert its capacity of tokens: its loads say nothing about collapse.
            by_load = layer is None or layer.config.router.kind != "expert_choice"
            # The balanced share: the layer's copies per token spread evenly (top_k / E without dropped copies).
            starving_E = share_E < self.min_load * float(share_E.mean())
            if not by_load:
                starving_E = torch.zeros_like(starving_E)
            self._starving[i] = torch.where(starving_E, self._starving[i] + 1, 0)
            dominant = by_load and self.max_share is not None and float(share_E.max()) > self.max_share
            self._dominant[i] = self._dominant[i] + 1 if dominant else 0
            low = self.min_entropy is not None and entropy_sum / num_tokens < self.min_entropy * math.log(num_experts)
            self._low_entropy[i] = self._low_entropy[i] + 1 if low else 0

            collapsed = (self._starving[i] >= self.patience).nonzero().flatten().tolist()
            if collapsed:
                new_events.append(self._event(step, i, name, collapsed, "starving"))
            if self._dominant[i] >= self.patience:
                new_events.append(self._event(step, i, name, [int(share_E.argmax())], "dominant"))
                self._dominant[i] = 0
            if self._low_entropy[i] >= self.patience:
                new_events.append(self._event(step, i, name, [], "low_entropy"))
                self._low_entropy[i] = 0
            if collapsed:
                if self.action == "revive" and layer is not None:
                    # Donors: the live experts (none starving, so not the collapsed ones) from the most loaded down,
                    # one per dead expert, round robin. With min_load < 1 the most loaded one is always live.
                    donors = [e for e in share_E.argsort(descending=True).tolist() if not starving_E[e]]
                    for j, expert in enumerate(collapsed if donors else []):
                        self._revive(trainer, layer, i, expert, donors[j % len(donors)], step)
                self._starving[i][collapsed] = 0
        if not new_events:
            return
        self.events.extend(new_events)
        log_scalars(trainer, {"collapse/events": float(len(self.events))}, step)
        writer = tensorboard(trainer)
        for event in new_events:
            message = (
                f"ExpertCollapseDetector: {event['reason']} collapse in MoE layer {event['layer']} ({event['name']}), "
                f"experts {event['experts']}, at step {event['step']}; action: {event['action']}"
            )
            rank_zero_warn(message)
            if writer is not None:
                writer.add_text("collapse/events", message, step)
        if self.action == "stop":
            trainer.should_stop = True

    def _event(self, step: int, index: int, name: str, experts: list[int], reason: str) -> dict[str, Any]:
        action = self.action if (reason == "starving" or self.action != "revive") else "warn"
        return {"step": step, "layer": index, "name": name, "experts": experts, "reason": reason, "action": action}

    @torch.no_grad()
    def _revive(self, trainer: pl.Trainer, layer: MoELayer, index: int, expert: int, donor: int, step: int) -> None:
        """Copy the donor expert (weights, router row, bias) into ``expert`` with noise; zero its optimizer state."""
        mixed = ((self.seed * 1_000_003 + step) * 1009 + index) * 1009 + expert
        generator = torch.Generator().manual_seed(mixed % 2**63)  # manual_seed takes 64 bits; large seeds overflow
        touched: list[torch.nn.Parameter] = []
        params = [p for p in layer.experts.parameters(recurse=False) if p.dim() >= 1]
        params.append(layer.router.gate.weight)
        for param in params:
            source = param.data[donor]
            scale = self.noise * float(source.float().std()) if source.numel() > 1 else 0.0
            noise = torch.randn(source.shape, generator=generator, dtype=torch.float32) * scale
            param.data[expert] = source + noise.to(device=source.device, dtype=source.dtype)
            touched.append(param)
        if layer.router.score_bias is not None:
            layer.router.score_bias[expert] = layer.router.score_bias[donor]
        for optimizer in trainer.optimizers:
            for param in touched:
                for value in optimizer.state.get(param, {}).values():
                    if isinstance(value, Tensor) and value.shape == param.shape:
                        value[expert] = 0

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "events": list(self.events),
            "starving": [s.clone() for s in self._starving],
            "dominant": list(self._dominant),
            "low_entropy": list(self._low_entropy),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.events = list(state_dict.get("events", []))
        self._starving = [s.clone() for s in state_dict.get("starving", [])]
        self._dominant = list(state_dict.get("dominant", []))
        self._low_entropy = list(state_dict.get("low_entropy", []))
