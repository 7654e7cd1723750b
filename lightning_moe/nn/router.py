"""Routers: token-choice top-k (softmax or sigmoid, group-limited, biased, jittered, random) and expert choice.

Shape legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``K`` experts per token, ``G`` expert groups,
``C`` tokens per expert (expert choice), ``N`` token copies (``T * K`` for token choice, ``E * C`` for
expert choice).

A router returns a :class:`Routing`: the flat list of token copies (which token goes to which expert with
what weight, and whether the copy is live), plus the router logits and the per-token expert distribution
the losses and statistics read. Router arithmetic runs in float32 (or float64 for float64 input) whatever
the input dtype; only the gate matmul may run in the compute dtype (``RouterConfig.gate_precision``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.nn.config import RouterConfig, check_token_mask


@dataclass
class Routing:
    """Where each token copy goes.

    Attributes:
        logits_TE: Router logits (float32 or float64).
        probs_TE: Per-token distribution over all experts (rows sum to one): the softmax of the logits, or
            the sigmoid scores divided by their sum. Read by the balance losses and the entropy.
        token_ids_N: Source token of each copy.
        expert_ids_N: Target expert of each copy.
        weights_N: Combine weight of each copy (router dtype).
        keep_N: Whether the copy is live (False for padding tokens and copies dropped by random routing;
            capacity dropping is applied later by the MoE layer).
        top_k: ``K`` for token choice, where copies are laid out ``(T, K)`` row-major; ``None`` for expert
            choice, where they are laid out ``(E, C)``.
    """

    logits_TE: Tensor
    probs_TE: Tensor
    token_ids_N: Tensor
    expert_ids_N: Tensor
    weights_N: Tensor
    keep_N: Tensor
    top_k: int | None


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    """Router arithmetic dtype: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_keeping_float32(module: nn.Module, names: tuple[str, ...], apply) -> nn.Module:
    """Run ``module._apply``-style conversion ``apply`` but keep the named floating buffers at least float32.

    Balancing state (the score-correction bias, the load counter) takes steps of ``gamma = 1e-3`` and counts
    past 256: in bfloat16 (``module.to(torch.bfloat16)``, Lightning's ``bf16-true``) the steps would round away
    and the counts be rounded, so those buffers follow the device moves but keep their float32 values, as
    Megatron-Core keeps its expert bias in float32.

    Args:
        module: The module whose ``_apply`` is being run.
        names: Buffer names to protect.
        apply: ``lambda: super()._apply(fn, recurse)`` of the caller.
    """
    originals = {name: getattr(module, name) for name in names}
    result = apply()
    for name, original in originals.items():
        converted = getattr(module, name)
        if original is None or converted is None or not converted.is_floating_point():
            continue
        if converted.element_size() < 4 and original.is_floating_point() and original.element_size() >= 4:
            setattr(module, name, original.to(device=converted.device, dtype=torch.float32))
    return result


def group_limited_mask(choice_TE: Tensor, n_group: int, topk_group: int, group_score: str) -> Tensor:
    """Mask of the experts inside each token's ``topk_group`` best groups (DeepSeek-V2/V3).

    Args:
        choice_TE: Selection scores.
        n_group: Number of equal, contiguous expert groups ``G``.
        topk_group: Groups kept per token.
        group_score: ``"max"``: a group scores its best expert; ``"top2_sum"``: the sum of its two best.

    Returns:
        Boolean ``(T, E)`` mask, True for experts in a chosen group.
    """
    num_tokens, num_experts = choice_TE.shape
    choice_TGX = choice_TE.view(num_tokens, n_group, num_experts // n_group)
    if group_score == "max":
        group_scores_TG = choice_TGX.amax(dim=-1)
    else:  # the best plus the best of the rest: a quarter of topk(2)'s time on (T, G, E / G)
        best_TG, best_ids_TG = choice_TGX.max(dim=-1)
        second_TG = choice_TGX.scatter(-1, best_ids_TG.unsqueeze(-1), float("-inf")).amax(dim=-1)
        group_scores_TG = best_TG + second_TG
    group_ids_TG = group_scores_TG.topk(topk_group, dim=-1).indices
    group_mask_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, group_ids_TG, True)
    return group_mask_TG.unsqueeze(-1).expand_as(choice_TGX).reshape(num_tokens, num_experts)


def random_routing_mask(weights_TK: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """GShard random routing: keep the largest-weight choice; keep each other with probability ``min(1, K * w_k)``.

    Weights are first normalised over the chosen experts, so for top-2 the second expert is kept with
    probability ``2 * g_2 / (g_1 + g_2)``, GShard's rule. The largest weight is the first choice, unless a
    selection-only bias (``score_bias``) put another expert first.

    Args:
        weights_TK: Chosen combine weights.
        generator: Optional random generator.

    Returns:
        Boolean ``(T, K)`` keep mask.
    """
    top_k = weights_TK.shape[-1]
    share_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    keep_prob_TK = (top_k * share_TK).clamp(max=1.0)
    keep_prob_TK.scatter_(1, weights_TK.argmax(dim=-1, keepdim=True), 1.0)
    uniform_TK = torch.rand(weights_TK.shape, generator=generator, device=weights_TK.device, dtype=share_TK.dtype)
    return uniform_TK < keep_prob_TK


class Router(nn.Module):
    """Token-choice top-k router or expert-choice router over ``E`` experts.

    Args:
        dim: Model width ``D``.
        config: Router config.

    Example::

        router = Router(64, RouterConfig(num_experts=8, top_k=2))
        routing = router(torch.randn(10, 64))
        routing.expert_ids_N.view(10, 2)  # each token's two experts
    """

    def __init__(self, dim: int, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        self.gate = nn.Linear(dim, config.num_experts, bias=False)
        # Selection-only correction bias (DeepSeek-V3); updated by the bias-balancing rule, never by SGD. At least
        # float32 also when built under a bfloat16 default dtype (Lightning's ``trainer.init_module()`` in bf16-true).
        dtype = router_dtype(torch.get_default_dtype())
        self.register_buffer("score_bias", torch.zeros(config.num_experts, dtype=dtype) if config.score_bias else None)
        self.reset_parameters()

    def _apply(self, fn, recurse: bool = True) -> Router:
        return apply_keeping_float32(self, ("score_bias",), lambda: super(Router, self)._apply(fn, recurse))

    def reset_parameters(self) -> None:
        """Re-initialise the router weight (normal with ``config.init_std``) and zero the bias."""
        nn.init.normal_(self.gate.weight, std=self.config.init_std)
        if self.score_bias is not None:
            self.score_bias.zero_()

    def logits(self, x_TD: Tensor) -> Tensor:
        """Router logits ``(T, E)`` in the router dtype, with training-only jitter on the input."""
        dtype = router_dtype(x_TD.dtype)
        if self.config.gate_precision == "compute":  # the matmul as autocast (or the input dtype) has it
            # The weight in the input's dtype: outside autocast F.linear needs both alike (a no-op when they are;
            # under autocast it casts both to its dtype anyway).
            return F.linear(self._jitter(x_TD), self.gate.weight.to(x_TD.dtype)).to(dtype)
        with torch.autocast(x_TD.device.type, enabled=False):  # float32 even under mixed precision
            return F.linear(self._jitter(x_TD.to(dtype)), self.gate.weight.to(dtype))

    def _jitter(self, x_TD: Tensor) -> Tensor:
        if not (self.training and self.config.jitter_eps > 0):
            return x_TD
        eps = self.config.jitter_eps
        return x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)

    def forward(
        self,
        x_TD: Tensor,
        mask_T: Tensor | None = None,
        capacity: int | None = None,
        live_capacity: Tensor | None = None,
    ) -> Routing:
        """Route tokens.

        Args:
            x_TD: Flattened tokens.
            mask_T: True for real tokens, False for padding (``None``: all real).
            capacity: Tokens per expert ``C``; required for expert choice, ignored for token choice.
            live_capacity: Expert choice only: the slots per expert that are used, as a tensor ``<= C`` that
                may stay on the device (with padding: the capacity of the real-token count). Each expert still
                picks its top ``C`` tokens, ``C`` a size known on the host; the slots past ``live_capacity``
                are marked dead in ``keep_N``. Since padding ranks last, the live slots hold the same tokens as
                a top-``live_capacity`` choice, without reading the count back to size it.

        Returns:
            The routing of every token copy.

        Raises:
            ValueError: If ``x_TD`` is not ``(T, D)``, ``mask_T`` not ``(T,)``, or expert choice gets no ``capacity``
                or one outside ``[0, T]``.
        """
        if x_TD.dim() != 2 or x_TD.shape[1] != self.gate.in_features:
            raise ValueError(f"x_TD.shape={tuple(x_TD.shape)} is invalid: expected (T, {self.gate.in_features})")
        check_token_mask("mask_T", mask_T)
        if mask_T is not None and mask_T.shape != x_TD.shape[:1]:
            raise ValueError(f"mask_T.shape={tuple(mask_T.shape)} is invalid: expected ({x_TD.shape[0]},)")
        if self.config.kind == "expert_choice":
            if capacity is None:
                raise ValueError("capacity=None is invalid: expert-choice routing needs the tokens per expert C")
            if not 0 <= capacity <= x_TD.shape[0]:
                raise ValueError(
                    f"capacity={capacity} is invalid: an expert takes each token at most once, so C must be in "
                    f"[0, {x_TD.shape[0]}] (the token count)"
                )
        mask_T = None if mask_T is None else mask_T.bool()
        logits_TE = self.logits(x_TD)
        if self.config.kind == "expert_choice":
            return self._expert_choice(logits_TE, mask_T, capacity, live_capacity)
        return self._token_choice(logits_TE, mask_T)

    def _scores(self, logits_TE: Tensor) -> tuple[Tensor, Tensor]:
        """Per-expert scores and the per-token distribution the losses read."""
        if self.config.score_func == "softmax":
            probs_TE = logits_TE.softmax(dim=-1)
            return probs_TE, probs_TE
        scores_TE = logits_TE.sigmoid()
        return scores_TE, scores_TE / scores_TE.sum(dim=-1, keepdim=True)

    def _token_choice(self, logits_TE: Tensor, mask_T: Tensor | None) -> Routing:
        cfg = self.config
        num_tokens, top_k = logits_TE.shape[0], cfg.top_k
        scores_TE, probs_TE = self._scores(logits_TE)

        # Selection uses the logits (top-k then softmax) or the scores, plus the correction bias.
        choice_TE = logits_TE if cfg.softmax_after_topk else scores_TE
        if self.score_bias is not None:
            choice_TE = choice_TE + self.score_bias.to(choice_TE.dtype)
        if cfg.n_group > 1:
            in_groups_TE = group_limited_mask(choice_TE.detach(), cfg.n_group, cfg.topk_group, cfg.group_score)
            choice_TE = choice_TE.masked_fill(~in_groups_TE, float("-inf"))
        expert_ids_TK = choice_TE.topk(top_k, dim=-1).indices

        # Weights never see the bias.
        if cfg.softmax_after_topk and cfg.score_func == "softmax":
            weights_TK = logits_TE.gather(1, expert_ids_TK).softmax(dim=-1)
        else:
            weights_TK = scores_TE.gather(1, expert_ids_TK)
        if cfg.normalize_topk:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if cfg.routed_scaling_factor != 1.0:
            weights_TK = weights_TK * cfg.routed_scaling_factor

        keep_TK = torch.ones_like(expert_ids_TK, dtype=torch.bool)
        if mask_T is not None:
            keep_TK = keep_TK & mask_T.view(num_tokens, 1)
        if self.training and cfg.random_routing and top_k > 1:
            keep_TK = keep_TK & random_routing_mask(weights_TK.detach())

        token_ids_N = torch.arange(num_tokens, device=logits_TE.device).repeat_interleave(top_k)
        return Routing(
            logits_TE=logits_TE,
            probs_TE=probs_TE,
            token_ids_N=token_ids_N,
            expert_ids_N=expert_ids_TK.reshape(-1),
            weights_N=weights_TK.reshape(-1),
            keep_N=keep_TK.reshape(-1),
            top_k=top_k,
        )

    def _expert_choice(
        self, logits_TE: Tensor, mask_T: Tensor | None, capacity: int, live_capacity: Tensor | None
    ) -> Routing:
        cfg = self.config
        num_tokens, num_experts = logits_TE.shape
        scores_TE, probs_TE = self._scores(logits_TE)
        choice_ET = scores_TE.detach().t()
        if mask_T is not None:
            choice_ET = choice_ET.masked_fill(~mask_T.view(1, num_tokens), float("-inf"))
        token_ids_EC = choice_ET.topk(capacity, dim=-1).indices
        weights_EC = scores_TE.t().gather(1, token_ids_EC)
        if cfg.routed_scaling_factor != 1.0:
            weights_EC = weights_EC * cfg.routed_scaling_factor
        expert_ids_N = torch.arange(num_experts, device=logits_TE.device).repeat_interleave(capacity)
        keep_N = torch.ones_like(expert_ids_N, dtype=torch.bool)
        if mask_T is not None:
            keep_N = mask_T[token_ids_EC.reshape(-1)]
        if live_capacity is not None:
            slot_C = torch.arange(capacity, device=logits_TE.device)
            keep_N = keep_N & (slot_C < live_capacity.to(slot_C.device)).repeat(num_experts)
        return Routing(
            logits_TE=logits_TE,
            probs_TE=probs_TE,
            token_ids_N=token_ids_EC.reshape(-1),
            expert_ids_N=expert_ids_N,
            weights_N=weights_EC.reshape(-1),
            keep_N=keep_N,
            top_k=None,
        )
