"""Cross-entropy of a linear layer's output (the LM head), chunk by chunk, without the full logits.

Shape legend: ``N`` positions, ``D`` model width, ``V`` vocabulary, ``C`` positions in a chunk.

A language model's loss usually materialises the ``(N, V)`` logits, their float32 copy, the log-softmax
and, in the backward, the gradients of each: several times the model's hidden states, and at the start of
the backward, where a training step's memory peaks. :func:`linear_cross_entropy` computes the logits of
``C`` positions at a time, their loss and, while they are in cache, their gradients with respect to the
hidden states and the head's weight; the backward only scales those by the incoming gradient. What stays
alive is ``(N, D)`` and ``(V, D)`` gradients and one chunk of logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_moe.nn.router import router_dtype

CHUNK_BYTES = 8 * 2**20  # float32 logits per chunk: 256 positions of an 8192-token vocabulary
MIN_CHUNK = 128  # the weight is read once per chunk: fewer rows than this would be bound by that read


def default_chunk_size(vocab_size: int, loss_dtype: torch.dtype = torch.float32) -> int:
    """Positions per chunk: ``CHUNK_BYTES`` of logits, at least ``MIN_CHUNK`` positions."""
    return max(MIN_CHUNK, CHUNK_BYTES // (vocab_size * torch.finfo(loss_dtype).bits // 8))


def linear_cross_entropy(
    x_ND: Tensor,
    weight_VD: Tensor,
    targets_N: Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> Tensor:
    """Mean cross-entropy of ``x_ND @ weight_VD.T`` against ``targets_N``, computed chunk by chunk.

    The same value and gradients as ``F.cross_entropy(F.linear(x, weight).float(), targets)`` (to rounding:
    the head's weight gradient is summed over chunks in float32), in the same precision: under autocast the
    matmuls run in the autocast dtype and the softmax in float32; float64 stays float64. The gradients are
    computed in the forward, when gradients are needed at all (not under ``torch.no_grad``).

    Args:
        x_ND: Hidden states, any leading shape ``(..., D)``.
        weight_VD: The head's weight ``(V, D)`` (as ``nn.Linear`` holds it; no bias).
        targets_N: Target token ids, the leading shape of ``x_ND``; ``ignore_index`` positions count in neither
            the sum nor the mean (all ignored: a NaN loss and zero gradients, as ``F.cross_entropy``).
        ignore_index: Target value that marks a position without a loss.
        chunk_size: Positions per chunk (``None``: :func:`default_chunk_size`).

    Returns:
        The scalar mean loss, in float32 (float64 for float64 inputs).

    Raises:
        ValueError: If the shapes do not match, ``chunk_size`` is not positive, or ``targets_N`` are not integers or
            (on the CPU) hold an id outside the vocabulary other than ``ignore_index``.

    Example::

        loss = linear_cross_entropy(hidden_BTD, model.lm_head.weight, targets_BT)
    """
    if weight_VD.dim() != 2 or x_ND.shape[-1] != weight_VD.shape[1]:
        raise ValueError(
            f"weight_VD.shape={tuple(weight_VD.shape)} is invalid: expected (V, {x_ND.shape[-1]}) for x of shape "
            f"{tuple(x_ND.shape)}"
        )
    if targets_N.shape != x_ND.shape[:-1]:
        raise ValueError(
            f"targets_N.shape={tuple(targets_N.shape)} is invalid: expected {tuple(x_ND.shape[:-1])}, the leading "
            f"shape of x"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} is invalid: expected a positive number of positions or None")
    if targets_N.is_floating_point() or targets_N.is_complex() or targets_N.dtype == torch.bool:
        raise ValueError(f"targets_N.dtype={targets_N.dtype} is invalid: expected integer token ids")
    if targets_N.device.type == "cpu":  # reading the values back would wait for a GPU: checked on the CPU only
        vocab, ids_N = weight_VD.shape[0], targets_N.long()  # in int64: uint8 would compare with vocab % 256
        outside = (ids_N != ignore_index) & ((ids_N < 0) | (ids_N >= vocab))
        if outside.any():
            raise ValueError(
                f"targets_N holds {int(ids_N[outside][0])}, which is invalid: expected token ids in [0, {vocab}) "
                f"or ignore_index={ignore_index}"
            )
    device_type = x_ND.device.type
    autocast = torch.is_autocast_enabled(device_type) and x_ND.dtype != torch.float64
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast else x_ND.dtype
    loss_dtype = router_dtype(x_ND.dtype)
    chunk = chunk_size or default_chunk_size(weight_VD.shape[0], loss_dtype)
    targets_N = targets_N.reshape(-1).long()  # gather's index: any integer dtype F.cross_entropy takes (uint8 too)
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(
            x_ND.reshape(-1, x_ND.shape[-1]), weight_VD, targets_N, ignore_index, chunk, compute_dtype
        )


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients in one chunked pass; the backward scales the saved gradients."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x_ND: Tensor,
        weight_VD: Tensor,
        targets_N: Tensor,
        ignore_index: int,
        chunk: int,
        compute_dtype: torch.dtype,
    ) -> Tensor:
        loss_dtype = router_dtype(x_ND.dtype)
        needs_x, needs_w = ctx.needs_input_grad[:2]
        xc_ND, wc_VD = x_ND.to(compute_dtype), weight_VD.to(compute_dtype)
        valid_N = targets_N != ignore_index
        safe_N1 = torch.where(valid_N, targets_N, 0).unsqueeze(1)
        grad_x_ND = torch.empty_like(xc_ND) if needs_x else None
        grad_w_VD = torch.zeros(weight_VD.shape, dtype=loss_dtype, device=weight_VD.device) if needs_w else None
        loss_sum = torch.zeros((), dtype=loss_dtype, device=x_ND.device)
        for start in range(0, x_ND.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits_CV = (xc_ND[rows] @ wc_VD.T).to(loss_dtype)
            # The (log-)softmax kernels, not logsumexp or exp_(logits - lse): with widely spread logits most
            # terms are subnormal, and a plain exp_ writing subnormals ran ~30x slower on x86 (a step of the
            # Switch-like model, whose logits spread widely: 6% slower than from the whole logits).
            nll_C = torch.log_softmax(logits_CV, dim=1).gather(1, safe_N1[rows]).squeeze(1).neg_()
            loss_sum += torch.where(valid_N[rows], nll_C, 0).sum()
            if not (needs_x or needs_w):
                continue
            # d(loss_sum)/d(logits) = softmax - one_hot(target), zero on ignored rows.
            grad_CV = torch.softmax(logits_CV, dim=1)
            del logits_CV
            grad_CV.scatter_add_(1, safe_N1[rows], torch.full_like(nll_C, -1.0).unsqueeze(1))
            grad_CV.mul_(valid_N[rows].unsqueeze(1))
            grad_CV = grad_CV.to(compute_dtype)
            if grad_x_ND is not None:
                torch.mm(grad_CV, wc_VD, out=grad_x_ND[rows])
            if grad_w_VD is not None:
                if compute_dtype == loss_dtype:
                    grad_w_VD.addmm_(grad_CV.T, xc_ND[rows])
                else:  # a bf16 product, summed over chunks in float32
                    grad_w_VD += grad_CV.T @ xc_ND[rows]
        count = valid_N.sum().to(loss_dtype)
        ctx.save_for_backward(grad_x_ND, grad_w_VD, count)
        ctx.dtypes = (x_ND.dtype, weight_VD.dtype)
        return loss_sum / count

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor
    ) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: the gradients were computed in the forward, without a graph
            raise RuntimeError("linear_cross_entropy has no second derivatives: create_graph=True is unsupported")
        grad_x_ND, grad_w_VD, count = ctx.saved_tensors
        scale = grad_loss / count.clamp(min=1)  # every target ignored: zero gradients, as F.cross_entropy
        x_dtype, w_dtype = ctx.dtypes
        grad_x = None if grad_x_ND is None else grad_x_ND.to(x_dtype) * scale
        grad_w = None if grad_w_VD is None else (grad_w_VD * scale).to(w_dtype)
        return grad_x, grad_w, None, None, None, None
