"""Rotary position embeddings (RoPE), with the frequency-scaling variants the zoo presets need.

Shape legend: ``B`` batch, ``H`` heads, ``T`` positions, ``R`` rotary dims (even).

Rotation uses the "rotate half" layout of Hugging Face's LLaMA-family code (the first and second halves
of the rotary dims form the pairs), so checkpoints converted from there need no permutation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_moe.nn.config import check_field_types

ROPE_SCALINGS = ("none", "yarn")


@dataclass
class RopeConfig:
    """Rotary embedding settings.

    Args:
        theta: Base of the inverse frequencies.
        scaling: ``"none"`` or ``"yarn"`` (DeepSeek-V2/V3 context extension).
        factor: YaRN: context extension factor.
        original_max_position: YaRN: the pre-extension context length.
        beta_fast: YaRN: high-frequency boundary (rotations).
        beta_slow: YaRN: low-frequency boundary (rotations).
        mscale: YaRN: attention magnitude scale coefficient.
        mscale_all_dim: YaRN: the same for all dims (DeepSeek); the cos/sin factor is
            ``yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)``.
    """

    theta: float = 10000.0
    scaling: str = "none"
    factor: float = 1.0
    original_max_position: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.scaling not in ROPE_SCALINGS:
            allowed = ", ".join(map(repr, ROPE_SCALINGS))
            raise ValueError(f"scaling={self.scaling!r} is invalid: must be one of {allowed}")
        if self.theta <= 0:
            raise ValueError(f"theta={self.theta!r} is invalid: must be > 0")
        if self.factor < 1.0:
            raise ValueError(f"factor={self.factor!r} is invalid: must be >= 1")
        if self.scaling == "yarn":
            if self.theta <= 1:
                raise ValueError(f"theta={self.theta!r} is invalid with scaling='yarn': must be > 1")
            if self.original_max_position < 1:
                raise ValueError(f"original_max_position={self.original_max_position!r} is invalid: must be >= 1")
            if not self.beta_fast > self.beta_slow > 0:
                raise ValueError(
                    f"beta_fast={self.beta_fast!r} is invalid with beta_slow={self.beta_slow!r}: YaRN needs "
                    "beta_fast > beta_slow > 0"
                )


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1 * mscale * ln(factor) + 1`` (1 for ``factor <= 1``)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(dim: int, cfg: RopeConfig) -> tuple[Tensor, float]:
    pos_freqs = cfg.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (cfg.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(cfg.original_max_position / (rotations * 2 * math.pi))) / (2 * math.log(cfg.theta))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    if cfg.mscale_all_dim:
        scale = yarn_mscale(cfg.factor, cfg.mscale) / yarn_mscale(cfg.factor, cfg.mscale_all_dim)
    else:
        scale = yarn_mscale(cfg.factor)
    return inv_freq, scale


def rope_cos_sin(
    positions_BT: Tensor, dim: int, cfg: RopeConfig, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Cos and sin tables for the given positions.

    Args:
        positions_BT: Integer positions, ``(B, T)`` or ``(T,)``.
        dim: Rotary dims ``R``.
        cfg: Rotary settings.
        dtype: Output dtype.

    Returns:
        ``cos`` and ``sin``, each ``(B, T, R)`` (or ``(T, R)``), already multiplied by YaRN's scale.
    """
    if cfg.scaling == "yarn":
        inv_freq, scale = _yarn_inv_freq(dim, cfg)
    else:
        inv_freq, scale = 1.0 / (cfg.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)), 1.0
    freqs = positions_BT.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions_BT.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim's halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHTR: Tensor, cos_BTR: Tensor, sin_BTR: Tensor) -> Tensor:
    """Rotate ``(B, H, T, R)`` queries or keys by position."""
    cos, sin = cos_BTR.unsqueeze(-3), sin_BTR.unsqueeze(-3)
    return x_BHTR * cos + rotate_half(x_BHTR) * sin


def apply_rope_interleaved(x_BHTR: Tensor, cos_BTR: Tensor, sin_BTR: Tensor) -> Tensor:
    """Rotate ``(B, H, T, R)`` queries or keys whose rotary pairs are interleaved ``(x0, x1), (x2, x3), ...``.

    DeepSeek-V2/V3 checkpoints lay rotary dims out this way. The output is de-interleaved: the rotated even
    dims, then the rotated odd dims (Hugging Face's ``apply_rotary_pos_emb_interleave``). Queries and keys get
    the same permutation, so attention scores equal those of the interleaved (complex-number) rotation.

    Args:
        x_BHTR: Queries or keys with interleaved rotary pairs.
        cos_BTR: Cos table from :func:`rope_cos_sin` (``cat(freqs, freqs)`` layout; its first half is used).
        sin_BTR: Sin table, likewise.
    """
    half = cos_BTR.shape[-1] // 2
    cos, sin = cos_BTR[..., :half].unsqueeze(-3), sin_BTR[..., :half].unsqueeze(-3)
    even, odd = x_BHTR[..., 0::2], x_BHTR[..., 1::2]
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
