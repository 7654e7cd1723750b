"""DeepSeek-V3 auxiliary-loss-free load balancing: nudge each router's selection bias towards balance."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_moe.callbacks._utils import log_scalars, moe_layers, reduce_sum
from lightning_moe.nn.losses import bias_update
from lightning_moe.nn.moe import MoELayer


class LoadBalancingBias(Callback):
    r"""Update every router's score-correction bias from the load since the last optimizer step.

    DeepSeek-V3 (Liu et al. 2024, section 2.1.2) balances experts without an auxiliary loss: a per-expert bias
    is added to the routing scores for *selection only*, and after each step
    ``b_i += gamma * sign(mean_load - load_i)`` raises the bias of under-loaded experts and lowers that of
    over-loaded ones.

    The load is each layer's ``tokens_per_expert`` buffer, which every training forward adds to: in
    ``on_before_optimizer_step`` it holds all micro-batches of a gradient-accumulation cycle, and it is summed
    over all ranks, so every rank applies the same bias and the update is the same as one large batch on one
    device. The buffer is then reset. Layers whose router has no score bias (``RouterConfig.score_bias=False``)
    are skipped; at least one must have it.

    The bias moves once per *applied* optimizer step (of the first optimizer), right after it: a step that is
    skipped (``nan_policy="skip"`` on a non-finite loss or gradient, or a float16 loss scaler that found an inf
    gradient) leaves the bias and :attr:`updates` as they were, and its load is dropped, like the rest of the
    skipped batch. A step is applied when the optimizer's ``step`` ran (the scaler does not call it on an inf),
    some parameter had a gradient, and the scaler set no ``found_inf`` for an optimizer that skips by itself.

    Every ``trainer.log_every_n_steps`` steps it logs ``bias/layer_{i}/imbalance`` (max / mean of the load the
    update used) and ``bias/layer_{i}/max_abs`` (largest absolute bias).

    Args:
        gamma: Bias update speed; ``None`` takes the model config's ``bias_update_speed`` (DeepSeek-V3: 0.001).

    Raises:
        ValueError: If ``gamma`` is not positive.
        MisconfigurationException: At fit start, if no router has a score bias or ``gamma`` is ``None`` and the
            model config sets no positive ``bias_update_speed``.

    Example::

        from lightning_moe.callbacks import LoadBalancingBias

        model = CausalLMModule(arch="deepseek-tiny", load_balance_coef=0.0)
        trainer = Trainer(callbacks=[LoadBalancingBias(gamma=1e-3)])
    """

    def __init__(self, gamma: float | None = None) -> None:
        if gamma is not None and (
            isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma < math.inf
        ):
            raise ValueError(f"gamma={gamma!r} is invalid: must be > 0, or None for the model's bias_update_speed")
        self.gamma = gamma
        self.updates = 0
        self._gamma: float = gamma or 0.0
        self._trainer: pl.Trainer | None = None
        self._pending: list[tuple[int, MoELayer, Tensor]] | None = None  # loads of the step under way
        self._hook: RemovableHandle | None = None

    def _layers(self, pl_module: pl.LightningModule) -> list[tuple[int, MoELayer]]:
        return [(i, layer) for i, (_, layer) in enumerate(moe_layers(pl_module)) if layer.router.score_bias is not None]

    def check_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse a model this callback cannot balance: at fit start, and from the CLI before any data work.

        Raises:
            MisconfigurationException: If no router has a score bias, or ``gamma`` is ``None`` and the model config
                sets no positive ``bias_update_speed``.
        """
        if not self._layers(pl_module):
            raise MisconfigurationException(
                "LoadBalancingBias needs routers with a score-correction bias: no MoE layer has "
                "RouterConfig.score_bias=True (e.g. use a DeepSeek-V3 style preset)"
            )
        if self.gamma is None:
            speed = getattr(getattr(pl_module, "config", None), "bias_update_speed", 0.0) or 0.0
            if speed <= 0:
                raise MisconfigurationException(
                    "LoadBalancingBias(gamma=None) takes the model config's bias_update_speed, which is not set; "
                    "pass gamma"
                )
            self._gamma = float(speed)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_setup(trainer, pl_module)
        for _, layer in self._layers(pl_module):
            layer.tokens_per_expert.zero_()  # drop counts from forwards before training (e.g. a sanity check)
        self._remove_hook()
        self._trainer, self._pending = trainer, None
        if trainer.optimizers:
            self._hook = trainer.optimizers[0].register_step_post_hook(self._after_step)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hook()
        self._trainer, self._pending = None, None

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @override
    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if optimizer is not trainer.optimizers[0]:
            return  # one update per step, also with several optimizers
        layers = self._layers(pl_module)
        if not layers:
            return
        # Summed over the ranks here, where every rank is (whether the step is applied is known only after it).
        sizes = [layer.tokens_per_expert.numel() for _, layer in layers]
        loads = reduce_sum(trainer, torch.cat([layer.tokens_per_expert for _, layer in layers])).split(sizes)
        self._pending = [(i, layer, load_E.clone()) for (i, layer), load_E in zip(layers, loads, strict=True)]
        for _, layer in layers:
            layer.tokens_per_expert.zero_()

    @torch.no_grad()
    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer step post-hook: update the bias from the pending load if the step changed the weights."""
        pending, trainer, self._pending = self._pending, self._trainer, None
        if pending is None or trainer is None:
            return
        found_inf = getattr(optimizer, "found_inf", None)  # set by GradScaler for optimizers that skip themselves
        if found_inf is not None and bool(found_inf):
            return
        if all(p.grad is None for group in optimizer.param_groups for p in group["params"]):
            return  # nan_policy="skip" dropped the gradients, or the batch had no loss
        metrics: dict[str, float] = {}
        step = trainer.global_step + 1  # the trainer counts this step once the optimizer returns
        log_now = step % max(1, trainer.log_every_n_steps) == 0
        for i, layer, load_E in pending:
            bias_E = layer.router.score_bias
            bias_E.copy_(bias_update(bias_E, load_E, self._gamma))
            if log_now:
                mean = float(load_E.float().mean())
                metrics[f"bias/layer_{i}/imbalance"] = float(load_E.max()) / mean if mean > 0 else 0.0
                metrics[f"bias/layer_{i}/max_abs"] = float(bias_E.abs().max())
        self.updates += 1
        if log_now:
            log_scalars(trainer, metrics, step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "gamma": self._gamma}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = int(state_dict.get("updates", 0))
