"""Expert capacity and token dropping.

Shape legend: ``N`` token copies, ``T`` tokens, ``K`` experts per token, ``E`` experts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def expert_capacity(
    num_tokens: int,
    top_k: int,
    num_experts: int,
    capacity_factor: float | None,
    absolute: int | None = None,
) -> int | None:
    """Per-expert capacity in token copies: ``ceil(capacity_factor * num_tokens * top_k / num_experts)``.

    An absolute capacity overrides the factor. The result never exceeds ``num_tokens`` (an expert cannot
    receive a token twice), and is ``None`` (dropless) when neither is set.

    Args:
        num_tokens: Real (non-padding) tokens in the batch.
        top_k: Experts per token.
        num_experts: Routed experts.
        capacity_factor: Capacity factor, or ``None``.
        absolute: Absolute capacity, or ``None``.
    """
    if absolute is not None:
        capacity = absolute
    elif capacity_factor is not None:
        # Round away float noise first: 1.1 * 10 is 11.000000000000002 and must give 11, not 12.
        capacity = math.ceil(round(capacity_factor * num_tokens * top_k / num_experts, 6))
    else:
        return None
    return min(capacity, num_tokens)


def priority_order(weights_N: Tensor, top_k: int | None, by: str) -> Tensor:
    """Permutation of the copies from highest to lowest priority.

    Args:
        weights_N: Router weights of the copies, laid out ``(T, K)`` row-major when ``top_k`` is given.
        top_k: ``K`` for token choice; ``None`` keeps the given order as the position order.
        by: ``"position"``: all first choices (earliest token first), then all second choices, ...;
            ``"weight"``: highest router weight first, ties by position.

    Returns:
        Indices into the copies, highest priority first.
    """
    num_copies = weights_N.shape[0]
    order_N = torch.arange(num_copies, device=weights_N.device)
    if top_k is not None:
        order_N = order_N.view(-1, top_k).t().reshape(-1)  # (K, T): choice rank first, then position
    if by == "weight":
        order_N = order_N[torch.argsort(weights_N.detach()[order_N], descending=True, stable=True)]
    return order_N


def capacity_keep_mask(
    expert_ids_N: Tensor,
    keep_N: Tensor,
    order_N: Tensor,
    capacity: int | Tensor,
    num_experts: int,
    group_ids_N: Tensor | None = None,
) -> Tensor:
    """Keep at most ``capacity`` live copies per expert (per group), dropping the lowest-priority ones.

    Args:
        expert_ids_N: Target expert of each copy.
        keep_N: Live copies before capacity (padding and random-routing drops are False and take no slot).
        order_N: Copies from highest to lowest priority (see :func:`priority_order`).
        capacity: Slots per expert, or a ``(G,)`` tensor of slots per expert in each group.
        num_experts: Routed experts ``E``.
        group_ids_N: Capacity group of each copy (e.g. its sequence); ``None``: one group.

    Returns:
        The new keep mask.
    """
    num_copies = expert_ids_N.shape[0]
    # Dead copies go to a sentinel expert E so they occupy no slot; groups get disjoint key ranges.
    slot_N = torch.where(keep_N, expert_ids_N, num_experts)
    if group_ids_N is not None:
        slot_N = group_ids_N * (num_experts + 1) + slot_N
    ordered_slot = slot_N[order_N]
    by_slot = torch.argsort(ordered_slot, stable=True)
    sorted_slot = ordered_slot[by_slot]
    counts = torch.bincount(sorted_slot, minlength=int(slot_N.max()) + 1 if num_copies else 1)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(num_copies, device=expert_ids_N.device) - starts[sorted_slot]
    rank_N = torch.empty_like(rank_sorted)
    rank_N[order_N[by_slot]] = rank_sorted
    if isinstance(capacity, Tensor):
        capacity = capacity[group_ids_N] if group_ids_N is not None else capacity
    return keep_N & (rank_N < capacity)
