"""T5 span corruption (Raffel et al. 2020): the denoising objective the Switch Transformer trains on.

A sequence of ``L`` tokens gets ``round(L * noise_density)`` noise tokens in ``round(noise / mean_span_length)``
spans at random places. The input keeps the other tokens and replaces each noise span by one sentinel; the
target lists each sentinel followed by the tokens it replaced. Sentinels count down from ``first_sentinel``
(T5's ``<extra_id_0>`` is the last vocabulary entry). Every row of a batch gets the same number of spans, so
inputs and targets stack into rectangular tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_span_settings(noise_density: float, mean_span_length: float) -> None:
    """Raise unless ``noise_density`` is in (0, 1) and ``mean_span_length`` is a finite number >= 1."""
    if not (isinstance(noise_density, (int, float)) and 0.0 < noise_density < 1.0):
        raise ValueError(f"noise_density={noise_density!r} is invalid: must be in (0, 1)")
    if not (
        isinstance(mean_span_length, (int, float))
        and not isinstance(mean_span_length, bool)
        and 1 <= mean_span_length < math.inf
    ):
        raise ValueError(f"mean_span_length={mean_span_length!r} is invalid: must be a finite number >= 1")


def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """``(noise tokens, spans)`` for a sequence of ``length`` tokens."""
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_span_length), 1)
    return num_noise, num_spans


def _segment_lengths(total: int, segments: int, generator: torch.Generator) -> list[int]:
    """Split ``total`` items into ``segments`` non-empty runs at random cut points."""
    cuts = (torch.randperm(total - 1, generator=generator)[: segments - 1] + 1).sort().values.tolist()
    bounds = [0, *cuts, total]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def span_corruption(
    tokens_BL: Tensor,
    first_sentinel: int,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Corrupt each row of ``tokens_BL``.

    Args:
        tokens_BL: Token ids.
        first_sentinel: Id of the first sentinel; span ``i`` uses ``first_sentinel - i``.
        noise_density: Share of tokens to mask.
        mean_span_length: Mean length of a masked span.
        generator: Random generator (a seeded one makes the corruption repeatable).

    Returns:
        ``inputs_BI`` with ``I = L - noise + spans`` and ``targets_BJ`` with ``J = noise + spans``.

    Raises:
        ValueError: For tokens that are not ``(B, L)``, a sequence too short to corrupt, bad densities, or a
            ``first_sentinel`` too small for the spans (their ids must stay >= 0).
    """
    if tokens_BL.dim() != 2:
        raise ValueError(f"tokens_BL of shape {tuple(tokens_BL.shape)} is invalid: span corruption takes (B, L) rows")
    batch, length = tokens_BL.shape
    if length < 2:
        raise ValueError(f"sequence length {length} is invalid for span corruption: need at least 2 tokens")
    check_span_settings(noise_density, mean_span_length)
    num_noise, num_spans = span_counts(length, noise_density, mean_span_length)
    num_spans = min(num_spans, num_noise, length - num_noise)
    if isinstance(first_sentinel, bool) or not isinstance(first_sentinel, int) or first_sentinel < num_spans - 1:
        raise ValueError(
            f"first_sentinel={first_sentinel!r} is invalid: must be an int >= {num_spans - 1}, as {num_spans} spans "
            f"of {length} tokens take the ids first_sentinel down to first_sentinel - {num_spans - 1}"
        )
    generator = generator if generator is not None else torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    inputs, targets = [], []
    for row in tokens_BL.tolist():
        noise_lengths = _segment_lengths(num_noise, num_spans, generator)
        keep_lengths = _segment_lengths(length - num_noise, num_spans, generator)
        inp, tgt, pos = [], [], 0
        for span, (keep, noise) in enumerate(zip(keep_lengths, noise_lengths, strict=True)):
            inp += row[pos : pos + keep]
            pos += keep
            inp.append(first_sentinel - span)
            tgt.append(first_sentinel - span)
            tgt += row[pos : pos + noise]
            pos += noise
        inputs.append(inp)
        targets.append(tgt)
    device = tokens_BL.device
    return torch.tensor(inputs, device=device), torch.tensor(targets, device=device)
