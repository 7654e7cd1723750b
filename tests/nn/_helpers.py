"""Random configurations for the routing tests, drawn from a seeded generator (the same seed, the same config)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

from lightning_moe.nn import RouterConfig

T = TypeVar("T")


def pick(gen: torch.Generator, options: Sequence[T]) -> T:
    """One of ``options``, drawn uniformly from ``gen``."""
    return options[int(torch.randint(len(options), (1,), generator=gen))]


def random_router_config(
    gen: torch.Generator, group_counts: Sequence[int] = (1, 2, 4), random_routing: bool = False
) -> RouterConfig:
    """A token-choice router of ``n_group`` (one of ``group_counts``) groups of 2 or 3 experts, with any valid
    ``topk_group`` and ``top_k``, softmax or sigmoid scores, normalised or not, scaled or not, biased or not, and
    (``random_routing=True``) GShard's random routing drawn too; weights initialised with std 1."""
    n_group, per_group = pick(gen, list(group_counts)), pick(gen, [2, 3])
    topk_group = pick(gen, list(range(1, n_group + 1)))
    top_k = pick(gen, list(range(1, topk_group * per_group + 1)))
    score_func = pick(gen, ["softmax", "sigmoid"])
    return RouterConfig(
        num_experts=n_group * per_group,
        top_k=top_k,
        score_func=score_func,
        softmax_after_topk=score_func == "softmax" and top_k > 1 and pick(gen, [False, True]),
        normalize_topk=top_k > 1 and pick(gen, [False, True]),
        routed_scaling_factor=pick(gen, [1.0, 2.5]),
        n_group=n_group,
        topk_group=topk_group,
        group_score=pick(gen, ["max", "top2_sum"]),
        score_bias=pick(gen, [False, True]),
        random_routing=random_routing and top_k > 1 and pick(gen, [False, True]),
        init_std=1.0,
    )
