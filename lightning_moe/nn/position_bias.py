"""T5-style bucketed relative position bias (Raffel et al. 2020, "Exploring the Limits of Transfer Learning").

Shape legend: ``H`` heads, ``T`` query positions, ``S`` key positions.

Each (query, key) pair gets the bucket of its relative position ``key - query``: small distances have a
bucket each, larger ones share logarithmically wider buckets up to ``max_distance``, and everything beyond
shares the last bucket. A learned ``(num_buckets, H)`` table turns buckets into an additive per-head bias.
Encoders use bidirectional buckets (half the buckets for keys after the query), decoders unidirectional
ones (keys after the query all fall in bucket 0; the causal mask hides them anyway). The bucketing follows
Mesh TensorFlow's ``_relative_position_bucket`` as used by T5 and Switch Transformers, float32 logarithm
included, so bucket boundaries agree exactly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def relative_position_bucket(
    relative_position: Tensor, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> Tensor:
    """Bucket index of each relative position ``key - query``.

    Args:
        relative_position: Integer tensor of ``key_position - query_position``.
        bidirectional: Separate buckets for keys after the query (encoders); else keys after the query all
            map to bucket 0 (decoders).
        num_buckets: Number of buckets (half of them per direction when bidirectional).
        max_distance: Distances at or beyond this share the last bucket.

    Returns:
        Long tensor shaped like ``relative_position`` with values in ``[0, num_buckets)``.
    """
    buckets = torch.zeros_like(relative_position, dtype=torch.long)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp_min(0)
    # Half of the buckets are exact distances; the rest grow logarithmically up to max_distance.
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # Clamp only to keep log() finite; small distances take the exact branch below.
    scaled = torch.log(distance.clamp_min(max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    log_bucket = (max_exact + (scaled * (num_buckets - max_exact)).long()).clamp_max(num_buckets - 1)
    return buckets + torch.where(is_small, distance.long(), log_bucket)


class RelativePositionBias(nn.Module):
    """Learned per-head additive attention bias from bucketed relative positions, shared by all layers.

    Args:
        num_heads: Attention heads ``H``.
        num_buckets: Relative-position buckets.
        max_distance: Distance from which all positions share the last bucket.
        bidirectional: Encoder (True) or decoder (False) bucketing.

    Example::

        bias = RelativePositionBias(num_heads=8, bidirectional=False)
        bias(16, 16).shape  # (8, 16, 16)
    """

    def __init__(self, num_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True):
        super().__init__()
        if num_buckets < 2 or (bidirectional and num_buckets < 4):
            raise ValueError(f"num_buckets={num_buckets!r} is invalid: must be >= 2 (>= 4 when bidirectional)")
        exact = (num_buckets // 2 if bidirectional else num_buckets) // 2  # distances with a bucket each
        if max_distance <= exact:
            raise ValueError(
                f"max_distance={max_distance!r} is invalid: must be > {exact}, the distances with a bucket of their "
                f"own ({num_buckets} buckets{', half per direction' if bidirectional else ''}, half of them exact)"
            )
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, query_len: int, key_len: int, offset: int = 0) -> Tensor:
        """The ``(H, T, S)`` bias for ``T = query_len`` queries at positions ``offset + 0..T-1`` and ``S`` keys."""
        device = self.embedding.weight.device
        query_T1 = torch.arange(query_len, device=device).view(-1, 1) + offset
        key_1S = torch.arange(key_len, device=device).view(1, -1)
        buckets_TS = relative_position_bucket(
            key_1S - query_T1, self.bidirectional, self.num_buckets, self.max_distance
        )
        return self.embedding(buckets_TS).permute(2, 0, 1)
