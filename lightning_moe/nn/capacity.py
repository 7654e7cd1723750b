"""Expert capacity and token dropping.

Shape legend: ``N`` token copies, ``T`` tokens, ``K`` experts per token, ``E`` experts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_moe.nn.config import DROP_PRIORITIES


def expert_capacity(
    num_tokens: int | Tensor,
    top_k: int,
    num_experts: int,
    capacity_factor: float | None,
    absolute: int | None = None,
) -> int | Tensor | None:
    """Per-expert capacity in token copies: ``ceil(capacity_factor * num_tokens * top_k / num_experts)``.

    An absolute capacity overrides the factor. The result never exceeds ``num_tokens`` (an expert cannot
    receive a token twice), and is ``None`` (dropless) when neither is set. The product is rounded to six
    decimals before the ceiling, so float noise (``1.1 * 10 = 11.000000000000002``) does not add a slot.

    Args:
        num_tokens: Real (non-padding) tokens in the batch: an int, or a tensor of counts (one per capacity
            group), for which the capacity is computed on the tensor's device with the same float64 operations,
            so a count still on a GPU is never read back to the host.
        top_k: Experts per token.
        num_experts: Routed experts.
        capacity_factor: Capacity factor, or ``None``.
        absolute: Absolute capacity, or ``None``.

    Returns:
        An int for an int ``num_tokens``, an int64 tensor shaped like a tensor ``num_tokens``, or ``None``.
    """
    if absolute is None and capacity_factor is None:
        return None
    if capacity_factor is not None and not 0 < capacity_factor < math.inf:
        raise ValueError(f"capacity_factor={capacity_factor!r} is invalid: must be a finite number > 0, or None")
    if absolute is not None and absolute < 1:
        raise ValueError(f"absolute={absolute!r} is invalid: must be >= 1, or None")
    if top_k < 1 or num_experts < 1:
        raise ValueError(f"top_k={top_k} and num_experts={num_experts} are invalid: both must be >= 1")
    if isinstance(num_tokens, Tensor):
        tokens = num_tokens.to(torch.int64)
        if absolute is not None:
            return tokens.clamp(max=absolute)
        scaled = tokens.to(torch.float64) * capacity_factor * top_k / num_experts
        return torch.minimum(torch.ceil(torch.round(scaled * 1e6) / 1e6).to(torch.int64), tokens)
    if absolute is not None:
        return min(absolute, num_tokens)
    # The tensor branch's operations in the same order; round() on a float rounds half to even like torch.round.
    scaled = num_tokens * capacity_factor * top_k / num_experts
    return min(math.ceil(round(scaled * 1e6) / 1e6), num_tokens)


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
    if by not in DROP_PRIORITIES:
        raise ValueError(f"by={by!r} is invalid: must be one of {', '.join(map(repr, DROP_PRIORITIES))}")
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
    # A copy's rank in its slot is its distance from the slot's first copy. searchsorted, not bincount: the
    # latter reads the largest slot back to the host on CUDA.
    first_of_slot = torch.searchsorted(sorted_slot, sorted_slot)
    rank_sorted = torch.arange(num_copies, device=expert_ids_N.device) - first_of_slot
    rank_N = torch.empty_like(rank_sorted)
    rank_N[order_N[by_slot]] = rank_sorted
    if isinstance(capacity, Tensor):
        capacity = capacity[group_ids_N] if group_ids_N is not None else capacity
    return keep_N & (rank_N < capacity)
