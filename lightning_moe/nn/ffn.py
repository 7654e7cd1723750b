"""Dense feed-forward networks (MLP, GEGLU, SwiGLU) and the activations the experts share."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.nn.config import ACTIVATIONS

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
}


# d act(h) / dh applied to an incoming gradient: (grad, h) -> grad * act'(h). Used by the fused expert
# backward, which recomputes the activation instead of keeping autograd's intermediates.
_ACTIVATION_GRADS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "relu": lambda grad, h: torch.ops.aten.threshold_backward(grad, h, 0),
    "gelu": lambda grad, h: torch.ops.aten.gelu_backward(grad, h, approximate="none"),
    "gelu_tanh": lambda grad, h: torch.ops.aten.gelu_backward(grad, h, approximate="tanh"),
    "silu": lambda grad, h: torch.ops.aten.silu_backward(grad, h),
}


def activation_grad_fn(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """``(grad, h) -> grad * act'(h)`` for the activation called ``name`` (see :func:`activation_fn`)."""
    activation_fn(name)
    return _ACTIVATION_GRADS[name]


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The activation called ``name``.

    Raises:
        ValueError: For an unknown name.
    """
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation={name!r} is invalid: must be one of {', '.join(map(repr, ACTIVATIONS))}")
    return _ACTIVATIONS[name]


class FeedForward(nn.Module):
    """Dense FFN: ``w2(act(w1 x) * w3 x)`` when gated (SwiGLU/GEGLU), else ``w2(act(w1 x))``.

    The dense-model FFN, the shared expert, and the dense-equivalent baseline of the benchmarks.

    Args:
        dim: Model width ``D``.
        hidden_dim: Hidden width ``F``.
        activation: ``"relu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"silu"``.
        gated: Gated linear unit.
        bias: Bias terms on the projections.
    """

    def __init__(self, dim: int, hidden_dim: int, activation: str = "silu", gated: bool = True, bias: bool = False):
        super().__init__()
        self.act = activation_fn(activation)
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias) if gated else None
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the FFN to ``(..., D)`` input."""
        h = self.act(self.w1(x))
        if self.w3 is not None:
            h = h * self.w3(x)
        return self.w2(h)
