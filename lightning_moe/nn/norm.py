"""Normalisation layers: RMSNorm (T5/LLaMA style, computed in float32) and a factory by name."""

from __future__ import annotations

import torch
from torch import Tensor, nn

NORMS = ("rmsnorm", "layernorm")


class RMSNorm(nn.Module):
    """Root-mean-square norm: ``w * x / sqrt(mean(x^2) + eps)``, computed in float32 (T5's LayerNorm), or float64.

    Args:
        dim: Normalised width.
        eps: Added to the mean square.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise the last dim of ``x``."""
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # float64 stays float64
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def reset_parameters(self) -> None:
        """Set the weight to ones."""
        nn.init.ones_(self.weight)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """A norm layer by name: ``"rmsnorm"`` or ``"layernorm"`` (with bias).

    Raises:
        ValueError: For an unknown kind.
    """
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"norm={kind!r} is invalid: must be one of {', '.join(map(repr, NORMS))}")
