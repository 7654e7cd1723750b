"""The MoE feed-forward layer: router + capacity + dispatch + experts + shared experts.

Shape legend: ``B`` sequences, ``S`` positions, ``T = B * S`` tokens, ``D`` model width, ``E`` experts,
``K`` experts per token, ``N`` token copies.

The layer returns its output and a :class:`MoEStats` record as a value. The only running state is the
``tokens_per_expert`` buffer that training forwards add to, for the auxiliary-loss-free bias update; eval
forwards leave it alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_moe.nn import losses
from lightning_moe.nn.capacity import capacity_keep_mask, expert_capacity, priority_order
from lightning_moe.nn.config import MoEConfig, check_token_mask
from lightning_moe.nn.dispatch import Dispatcher, GroupedDispatcher, LoopDispatcher
from lightning_moe.nn.experts import GroupedExperts
from lightning_moe.nn.ffn import FeedForward
from lightning_moe.nn.router import Router, apply_keeping_float32, router_dtype


@dataclass
class MoEStats:
    """What one MoE layer did in one forward.

    Attributes:
        tokens_per_expert: ``(E,)`` live token copies routed to each expert before capacity dropping.
        kept_per_expert: ``(E,)`` copies each expert actually computed.
        num_dropped: Copies dropped for capacity (scalar).
        num_tokens: Real (non-padding) tokens (scalar).
        router_entropy: Mean entropy of the per-token expert distribution (scalar, nats).
        losses: Unweighted auxiliary loss terms, differentiable into the router: ``"load_balance"``
            (token choice), ``"z_loss"``, and ``"seq_balance"`` (token choice, ``(B, S, D)`` input).
        expert_ids: ``(T, K)`` experts each token chose (token choice; ``-1`` for padding and copies dropped
            by random routing), for callbacks that look at which tokens go where; ``None`` for expert choice.
        sequence_tokens_per_expert: ``(B, E)`` live copies routed to each expert by each sequence before capacity
            dropping, where capacity is counted per sequence (``capacity_scope="sequence"``, token choice,
            ``(B, S, D)`` input); else ``None``.
        sequence_num_tokens: ``(B,)`` real tokens of each sequence, alongside ``sequence_tokens_per_expert``.
    """

    tokens_per_expert: Tensor
    kept_per_expert: Tensor
    num_dropped: Tensor
    num_tokens: Tensor
    router_entropy: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    expert_ids: Tensor | None = None
    sequence_tokens_per_expert: Tensor | None = None
    sequence_num_tokens: Tensor | None = None

    def detach(self) -> MoEStats:
        """A copy without autograd history (for logging and callbacks)."""
        return dataclasses.replace(
            self,
            losses={name: value.detach() for name, value in self.losses.items()},
            router_entropy=self.router_entropy.detach(),
        )


class MoELayer(nn.Module):
    """Mixture-of-experts FFN built from the shared blocks.

    Args:
        config: The layer config.

    Example::

        layer = MoELayer(MoEConfig(dim=64, router=RouterConfig(num_experts=8, top_k=2),
                                   experts=ExpertsConfig(hidden_dim=128)))
        y, stats = layer(torch.randn(2, 16, 64))
        loss = y.pow(2).mean() + 0.01 * stats.losses["load_balance"]
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        num_experts = config.num_experts
        self.router = Router(config.dim, config.router)
        self.experts = GroupedExperts(config.dim, num_experts, config.experts)
        self.shared_experts: FeedForward | None = None
        self.shared_gate: nn.Linear | None = None
        if config.shared_hidden_dim > 0:
            act, gated = config.experts.activation, config.experts.gated
            self.shared_experts = FeedForward(config.dim, config.shared_hidden_dim, act, gated)
            if config.shared_gate:
                self.shared_gate = nn.Linear(config.dim, 1, bias=False)
        self.dispatcher: Dispatcher = GroupedDispatcher() if config.dispatch == "grouped" else LoopDispatcher()
        # Sums a tensor over data-parallel ranks; a parallel strategy sets it so the load-balancing loss
        # sees the global batch's loads. The layer itself never talks to other processes.
        self.reduce_counts: Callable[[Tensor], Tensor] | None = None
        # At least float32 under any default dtype (see apply_keeping_float32): bfloat16 rounds counts past 256.
        counts_E = torch.zeros(num_experts, dtype=router_dtype(torch.get_default_dtype()))
        self.register_buffer("tokens_per_expert", counts_E, persistent=False)

    def _apply(self, fn, recurse: bool = True) -> MoELayer:
        # The load counter stays float32 under .to(bfloat16): see apply_keeping_float32.
        return apply_keeping_float32(self, ("tokens_per_expert",), lambda: super(MoELayer, self)._apply(fn, recurse))

    def capacity(self, num_tokens: int | Tensor) -> int | Tensor | None:
        """Per-expert capacity for ``num_tokens`` real tokens in the current mode (``None``: dropless).

        A tensor of token counts gives a tensor of capacities, computed where the counts are.
        """
        cfg = self.config
        factor = cfg.capacity_factor
        if not self.training and cfg.eval_capacity_factor is not None:
            factor = cfg.eval_capacity_factor
        return expert_capacity(num_tokens, cfg.router.top_k, cfg.num_experts, factor, cfg.expert_capacity)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, MoEStats]:
        """Route, dispatch and combine.

        Args:
            x: ``(B, S, D)`` or ``(T, D)`` tokens.
            mask: True for real tokens, False for padding, shaped like ``x`` without its last dim. Padding
                tokens get a zero output and count in no statistic or loss.

        Returns:
            The ``x``-shaped output and the layer's statistics.

        Raises:
            ValueError: If ``x`` or ``mask`` has the wrong shape (``x`` must be ``(B, S, D)`` where capacity is counted
                per sequence), or ``x`` a dtype other than the weights' outside autocast.
        """
        cfg = self.config
        if x.dim() not in (2, 3) or x.shape[-1] != cfg.dim:
            raise ValueError(f"x.shape={tuple(x.shape)} is invalid: expected (B, S, {cfg.dim}) or (T, {cfg.dim})")
        # The router's weight: a parallel wrapper (FSDP2 with param_dtype) casts it with the layer's block, the
        # experts (their own group) only when their forward starts.
        weight_dtype = self.router.gate.weight.dtype
        if x.dtype != weight_dtype and not (torch.is_autocast_enabled(x.device.type) and x.is_floating_point()):
            raise ValueError(
                f"x.dtype={x.dtype} is invalid: the layer's weights are {weight_dtype}; pass {weight_dtype} input, "
                "convert the layer with .to(dtype), or run the forward under torch.autocast"
            )
        check_token_mask("mask", mask)
        if cfg.capacity_scope == "sequence" and not cfg.dropless and x.dim() != 3:
            raise ValueError(
                f"x.shape={tuple(x.shape)} is invalid with capacity_scope='sequence': capacity is counted per "
                f"sequence, so the input must be (B, S, {cfg.dim})"
            )
        if mask is not None and mask.shape != x.shape[:-1]:
            raise ValueError(f"mask.shape={tuple(mask.shape)} is invalid: expected {tuple(x.shape[:-1])}")
        x_TD = x.reshape(-1, cfg.dim)
        mask_T = None if mask is None else mask.reshape(-1).bool()
        if mask_T is not None:  # padding may hold anything (nan from a fully masked attention row): read zeros
            x_TD = torch.where(mask_T.unsqueeze(-1), x_TD, 0)
        # With padding the capacity comes from the real token count, kept on the device (no wait for a GPU).
        # Expert choice sizes its top-k with the capacity of all tokens and uses only the live slots.
        num_tokens: int | Tensor = x_TD.shape[0]
        if torch.compiler.is_compiling() and cfg.router.kind != "expert_choice":
            # From a tensor, the capacity factor enters the graph as an input; from an int it would be a constant
            # guarded on, and each factor a callback sets (CapacityFactorTuner) would compile the layer again.
            num_tokens = torch.tensor(num_tokens, device=x.device)
        capacity = self.capacity(num_tokens)
        live_capacity = None
        if capacity is not None and mask_T is not None:
            if cfg.router.kind == "expert_choice":
                live_capacity = self.capacity(mask_T.sum())
            else:
                capacity = self.capacity(mask_T.sum())

        routing = self.router(x_TD, mask_T, capacity, live_capacity)
        keep_N = routing.keep_N
        if capacity is not None and routing.top_k is not None:
            order_N = priority_order(routing.weights_N, routing.top_k, cfg.drop_priority)
            group_ids_N = None
            if cfg.capacity_scope == "sequence" and x.dim() == 3:
                batch, seq = x.shape[:2]
                group_ids_N = routing.token_ids_N // seq
                real_B = torch.full((batch,), seq, device=x.device)
                if mask_T is not None:
                    real_B = mask_T.view(batch, seq).sum(1)
                capacity = self.capacity(real_B)
            kept_N = capacity_keep_mask(routing.expert_ids_N, keep_N, order_N, capacity, cfg.num_experts, group_ids_N)
        else:
            kept_N = keep_N
        dispatch = _dispatch_eagerly if self.dispatcher.reads_host_values(x_TD, self.experts) else _dispatch
        out_TD = dispatch(
            self.dispatcher, x_TD, routing.token_ids_N, routing.expert_ids_N, routing.weights_N, kept_N, self.experts
        )

        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_gate is not None:
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            if mask_T is not None:
                shared_TD = shared_TD * mask_T.unsqueeze(-1).to(shared_TD.dtype)
            out_TD = out_TD + shared_TD

        stats = self._stats(x, routing, keep_N, kept_N, mask_T)
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += stats.tokens_per_expert.to(self.tokens_per_expert.dtype)
        return out_TD.view_as(x), stats

    def _stats(
        self,
        x: Tensor,
        routing,
        keep_N: Tensor,
        kept_N: Tensor,
        mask_T: Tensor | None,
    ) -> MoEStats:
        num_experts = self.config.num_experts
        zeros_E = torch.zeros(num_experts, dtype=torch.float32, device=x.device)
        expert_ids_N = routing.expert_ids_N.detach()
        routed_E = zeros_E.index_add(0, expert_ids_N, keep_N.to(torch.float32))
        kept_E = zeros_E.index_add(0, expert_ids_N, kept_N.to(torch.float32))
        aux = {"z_loss": losses.router_z_loss(routing.logits_TE, mask_T)}
        if routing.top_k is not None:
            expert_ids_TK = expert_ids_N.view(-1, routing.top_k)
            aux["load_balance"] = losses.load_balancing_loss(
                routing.probs_TE, expert_ids_TK, mask_T, self.reduce_counts
            )
            if x.dim() == 3:
                batch, seq = x.shape[:2]
                aux["seq_balance"] = losses.sequence_balance_loss(
                    routing.probs_TE.view(batch, seq, num_experts),
                    expert_ids_TK.view(batch, seq, routing.top_k),
                    None if mask_T is None else mask_T.view(batch, seq),
                )
        per_sequence = {}
        if self.config.capacity_scope == "sequence" and x.dim() == 3 and routing.top_k is not None:
            batch, seq = x.shape[:2]
            slots_N = (routing.token_ids_N // seq) * num_experts + expert_ids_N
            routed_BE = torch.zeros(batch * num_experts, dtype=torch.float32, device=x.device)
            routed_BE = routed_BE.index_add(0, slots_N, keep_N.to(torch.float32)).view(batch, num_experts)
            real_B = torch.full((batch,), seq, device=x.device) if mask_T is None else mask_T.view(batch, seq).sum(1)
            per_sequence = {"sequence_tokens_per_expert": routed_BE, "sequence_num_tokens": real_B}
        x_numel = x.shape[:-1].numel()
        return MoEStats(
            tokens_per_expert=routed_E,
            kept_per_expert=kept_E,
            num_dropped=(routed_E.sum() - kept_E.sum()).long(),
            num_tokens=torch.full((), x_numel, device=x.device) if mask_T is None else mask_T.sum(),
            router_entropy=losses.router_entropy(routing.probs_TE.detach(), mask_T),
            losses=aux,
            expert_ids=None if routing.top_k is None else torch.where(keep_N, expert_ids_N, -1).view(-1, routing.top_k),
            **per_sequence,
        )

    @torch.no_grad()
    def update_bias(self, gamma: float) -> None:
        """Apply the auxiliary-loss-free bias rule to the router's score bias and reset the load counter.

        Args:
            gamma: Bias update speed.

        Raises:
            ValueError: If the router has no score bias (``RouterConfig.score_bias`` is False) or ``gamma`` is not
                a positive number.
        """
        if self.router.score_bias is None:
            raise ValueError("router.score_bias=False is invalid for update_bias: enable RouterConfig.score_bias")
        if not (isinstance(gamma, (int, float)) and 0 < gamma < math.inf):
            raise ValueError(f"gamma={gamma!r} is invalid: must be a finite number > 0")
        self.router.score_bias.copy_(losses.bias_update(self.router.score_bias, self.tokens_per_expert, gamma))
        self.tokens_per_expert.zero_()


def _dispatch(dispatcher: Dispatcher, *args: Tensor | GroupedExperts) -> Tensor:
    return dispatcher(*args)


# A dispatch that reads its expert loads on the host would recompile for every new load under torch.compile; it runs
# outside the compiled graph (see lightning_moe.nn.compile).
_dispatch_eagerly = torch.compiler.disable(_dispatch)
