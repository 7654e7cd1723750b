"""Load-balancing losses and the auxiliary-loss-free bias rule, as pure functions.

Shape legend: ``T`` tokens, ``E`` experts, ``K`` experts per token, ``B`` sequences, ``S`` positions.

Every function takes an optional mask (True for real tokens) so padding counts in no loss. The losses
read only router outputs, so their gradients reach the router and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_moe.nn.config import check_token_mask


def _mask_or_ones(mask: Tensor | None, shape: torch.Size, device: torch.device) -> Tensor:
    check_token_mask("mask", mask)
    if mask is not None and mask.numel() != shape.numel():
        raise ValueError(f"mask.shape={tuple(mask.shape)} is invalid: expected {tuple(shape)}, one entry per token")
    return torch.ones(shape, dtype=torch.bool, device=device) if mask is None else mask.reshape(shape).bool()


def _check_choices(probs: Tensor, expert_ids: Tensor, shapes: str) -> None:
    """Raise unless ``expert_ids`` are the choices of ``probs``' tokens: ``shapes`` ``(T, K)``/``(B, S, K)``."""
    dims = 2 if shapes == "TK" else 3
    if probs.dim() != dims or expert_ids.dim() != dims or expert_ids.shape[:-1] != probs.shape[:-1]:
        expected = "(T, K) for probs (T, E)" if dims == 2 else "(B, S, K) for probs (B, S, E)"
        raise ValueError(
            f"expert_ids.shape={tuple(expert_ids.shape)} is invalid with probs.shape={tuple(probs.shape)}: expected "
            f"{expected}"
        )


def expert_counts(expert_ids_TK: Tensor, num_experts: int, mask_T: Tensor | None = None) -> Tensor:
    """Token copies routed to each expert, ``(E,)`` float, padding excluded."""
    mask_T = _mask_or_ones(mask_T, expert_ids_TK.shape[:1], expert_ids_TK.device)
    weights_TK = mask_T.unsqueeze(-1).expand_as(expert_ids_TK).to(torch.float32)
    counts = torch.zeros(num_experts, dtype=torch.float32, device=expert_ids_TK.device)
    return counts.index_add_(0, expert_ids_TK.reshape(-1), weights_TK.reshape(-1))


def load_balancing_loss(
    probs_TE: Tensor,
    expert_ids_TK: Tensor,
    mask_T: Tensor | None = None,
    reduce_counts: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Switch/GShard load-balancing loss of one layer.

    ``L = E * sum_i f_i * P_i`` where ``f_i`` is the fraction of the ``T * K`` token copies routed to expert
    ``i`` and ``P_i`` the mean router probability of expert ``i`` over the ``T`` tokens. It is 1 when
    routing is uniform and at most ``E / K``, reached when every token goes to the same ``K`` experts (``E``
    for top-1). (Hugging Face's Mixtral/Qwen loss is ``K`` times this: it divides the counts by ``T`` rather
    than ``T * K``.) ``f`` is not differentiable; the gradient flows through ``P`` into the router.

    Args:
        probs_TE: Per-token distribution over experts (softmax, or normalised sigmoid scores).
        expert_ids_TK: Chosen experts per token.
        mask_T: True for real tokens.
        reduce_counts: Sums a tensor over the data-parallel ranks (set by a parallel strategy). Then ``f``
            counts the copies of the global batch, and the mean of the per-rank losses over equally sized
            ranks is the global batch's loss.

    Returns:
        Scalar loss.
    """
    _check_choices(probs_TE, expert_ids_TK, "TK")
    num_experts = probs_TE.shape[-1]
    mask_T = _mask_or_ones(mask_T, probs_TE.shape[:1], probs_TE.device)
    num_tokens = mask_T.sum().clamp_min(1)
    counts_E = expert_counts(expert_ids_TK, num_experts, mask_T)
    total_copies = mask_T.sum().to(torch.float32) * expert_ids_TK.shape[-1]
    if reduce_counts is not None:
        reduced = reduce_counts(torch.cat([counts_E, total_copies.view(1)]))
        counts_E, total_copies = reduced[:-1], reduced[-1]
    f_E = counts_E / total_copies.clamp_min(1)
    # where, not a product: a padding token's scores may be non-finite (0 * nan is nan)
    p_E = torch.where(mask_T.unsqueeze(-1), probs_TE, 0).sum(dim=0) / num_tokens
    return num_experts * (f_E.to(p_E.dtype) * p_E).sum()


def sequence_balance_loss(probs_BSE: Tensor, expert_ids_BSK: Tensor, mask_BS: Tensor | None = None) -> Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over sequences.

    Per sequence of ``S`` real tokens: ``f_i = E / (K * S) * count_i`` and ``P_i = mean_t s'_{i,t}`` with
    ``s'`` the per-token normalised scores; ``L_seq = sum_i f_i * P_i`` (1 when balanced). Sequences
    without real tokens are left out of the mean.

    Args:
        probs_BSE: Per-token distribution over experts.
        expert_ids_BSK: Chosen experts per token.
        mask_BS: True for real tokens.

    Returns:
        Scalar loss.
    """
    _check_choices(probs_BSE, expert_ids_BSK, "BSK")
    batch, seq, num_experts = probs_BSE.shape
    top_k = expert_ids_BSK.shape[-1]
    mask_BS = _mask_or_ones(mask_BS, probs_BSE.shape[:2], probs_BSE.device)
    probs_BSE = probs_BSE.to(torch.promote_types(probs_BSE.dtype, torch.float32))  # bf16 counts stop at 256
    onehot_counts_BE = torch.zeros(batch, num_experts, dtype=probs_BSE.dtype, device=probs_BSE.device)
    copies_BSK = mask_BS.unsqueeze(-1).expand_as(expert_ids_BSK).to(probs_BSE.dtype)
    onehot_counts_BE.scatter_add_(1, expert_ids_BSK.reshape(batch, seq * top_k), copies_BSK.reshape(batch, seq * top_k))
    tokens_B = mask_BS.sum(dim=1)
    denom_B = tokens_B.clamp_min(1).to(probs_BSE.dtype)
    f_BE = onehot_counts_BE * num_experts / (top_k * denom_B.unsqueeze(-1))
    p_BE = torch.where(mask_BS.unsqueeze(-1), probs_BSE, 0).sum(dim=1) / denom_B.unsqueeze(-1)
    per_seq_B = (f_BE * p_BE).sum(dim=-1)
    has_tokens_B = tokens_B > 0
    return (per_seq_B * has_tokens_B).sum() / has_tokens_B.sum().clamp_min(1)


def router_z_loss(logits_TE: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss: ``mean_t (logsumexp_i logits_{t,i})^2`` over real tokens.

    Keeps router logits small so the softmax stays numerically stable.

    Args:
        logits_TE: Router logits, ``(T, E)`` or with more leading dims (``(B, S, E)``, as ``transformers``' Switch
            takes them): one row per token.
        mask_T: True for real tokens, shaped like ``logits_TE`` without its last dim (or flat).

    Returns:
        Scalar loss.
    """
    mask_T = _mask_or_ones(mask_T, logits_TE.shape[:-1], logits_TE.device).reshape(-1)
    z_T = torch.logsumexp(logits_TE, dim=-1).reshape(-1)
    return torch.where(mask_T, z_T.square(), 0).sum() / mask_T.sum().clamp_min(1)


def router_entropy(probs_TE: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """Mean entropy (nats) of the per-token expert distribution over real tokens; ``log E`` is uniform.

    Args:
        probs_TE: Per-token distributions, ``(T, E)`` or with more leading dims (``(B, S, E)``).
        mask_T: True for real tokens, shaped like ``probs_TE`` without its last dim (or flat).

    Returns:
        Scalar mean entropy.
    """
    mask_T = _mask_or_ones(mask_T, probs_TE.shape[:-1], probs_TE.device).reshape(-1)
    entropy_T = -(probs_TE * probs_TE.clamp_min(1e-30).log()).sum(dim=-1).reshape(-1)
    return torch.where(mask_T, entropy_T, 0).sum() / mask_T.sum().clamp_min(1)


def bias_update(bias_E: Tensor, load_E: Tensor, gamma: float) -> Tensor:
    """DeepSeek-V3 auxiliary-loss-free balancing step: ``b_i + gamma * sign(mean(load) - load_i)``.

    Under-loaded experts get a higher selection bias, over-loaded ones a lower one.

    Args:
        bias_E: Current score-correction bias.
        load_E: Token copies each expert received since the last update.
        gamma: Bias update speed.

    Returns:
        The new bias (a new tensor; the input is unchanged).
    """
    load_E = load_E.to(bias_E.dtype)
    return bias_E + gamma * torch.sign(load_E.mean() - load_E)
