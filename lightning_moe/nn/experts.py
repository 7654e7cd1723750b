"""Routed experts with stacked weights, computed expert by expert over expert-sorted token copies.

Shape legend: ``T`` tokens, ``N`` token copies sorted by expert, ``E`` experts, ``D`` model width, ``F``
expert hidden width, ``M`` copies of one expert.

The weights of all experts live in three stacked tensors (``w1``/``w3``: ``(E, D, F)``, ``w2``:
``(E, F, D)``) rather than a ModuleList of Linears: the grouped path slices them without Python-level
modules, the expert-parallel strategy shards them on dim 0, and checkpoints stay small in key count.

The grouped computation is one autograd function with a hand-written backward. For each expert it gathers
that expert's ``M`` rows, runs the MLP on them, scales by the routing weights and adds the result into the
output rows, all in cache-sized blocks: no ``(N, D)`` gathered input or ``(N, D)`` expert output is ever
materialised, and only the ``(N, F)`` pre-activations are kept for backward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_moe.nn.config import ExpertsConfig
from lightning_moe.nn.ffn import activation_fn, activation_grad_fn

# Row multiple of each expert's block for low-precision matmuls on the CPU (see GroupedExperts.padded_counts).
ROW_ALIGNMENT = 16
# Batching experts (see expert_batches, padded_counts): the most rows one bmm batch takes (bounds the batch's
# temporaries), and when the dispatcher pads neighbouring experts to one row count: only blocks of at most
# PAD_MAX_ROWS rows (bmm over experts pays for small per-expert matmuls, ~1.45x at 64 rows on 2 cores, and
# little for large ones) and at most PAD_MAX_WASTE extra rows.
BATCH_MAX_ROWS = 4096
# ... and, when the kernel casts the weights, at most this many bytes of weights per matmul (bounds the block of
# weight gradients converted at once, so that it comes from the heap rather than from fresh pages).
BATCH_MAX_WEIGHT_BYTES = 4 * 2**20
PAD_MAX_ROWS = 512
PAD_MAX_WASTE = 0.25
# When the runs are formed by load (see GroupedExperts.padded_counts): experts per run, and the largest blocks
# padded (bf16 with kept memory: batching 1024-row blocks measured 3-9% faster layers, DeepSeek- and Qwen-like).
PAD_GROUP = 4
PAD_MAX_ROWS_BY_LOAD = 2048
# The input dtypes torch._grouped_mm takes (kernel="grouped_mm").
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class GradBuffers:
    """Memory for the expert weight gradients, reused across steps once nothing else holds it.

    A fresh multi-megabyte CPU allocation comes back from the OS as untouched pages, and filling them costs
    page faults: ~4 GB/s here against ~26 GB/s for memory already mapped. With ``zero_grad(set_to_none=True)``
    every backward writes the full ``(E, D, F)`` gradients into fresh memory: at 256 experts of hidden 512,
    about 40% of the time the layer gains over 8 experts. The fused kernel therefore writes each gradient into a buffer
    kept here and returns an alias of it. A buffer is reused only when no tensor outside this object
    shares its memory (storage use count), so a gradient still held as ``.grad`` (accumulation over
    micro-batches, ``set_to_none=False``) or by anyone else gets fresh memory, as without the buffers.

    The price is memory where the gradients would otherwise be freed before the peak: with a loop that zeroes
    the gradients after the optimizer step, the next forward's activations come on top of the kept memory
    and the peak grows by up to the expert gradients' size. Lightning zeroes them between the forward and the
    backward, so the previous step's gradients are alive during the forward anyway; only the start of the
    backward holds more than without the buffers. Under CPU autocast the fused kernel casts the weights to the
    compute dtype on kept memory too, and converts each block of their gradients to the weights' dtype as it
    computes it (no low-precision gradient of the whole weight): the low-precision copy of the weights then
    stays between steps (half the float32 weights' size for bfloat16). Only CPU tensors are kept
    (CUDA's caching allocator already reuses memory). Needs ``torch._C._storage_Use_Count``; without it
    nothing is reused. Turned on by :func:`reuse_expert_grad_memory` (``CausalLMModule`` does so by default).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, tuple[Tensor, int]] = {}

    @staticmethod
    def _use_count(tensor: Tensor) -> int:
        return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)

    def empty_like(self, key: str, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """An uninitialised tensor shaped like ``like``, on the memory kept under ``key`` when it is free.

        Args:
            key: Name of the kept memory.
            like: Shape, device (and dtype) of the result.
            dtype: The result's dtype (default: ``like``'s).
        """
        dtype = like.dtype if dtype is None else dtype
        if not hasattr(torch._C, "_storage_Use_Count") or like.device.type != "cpu":
            return torch.empty_like(like, dtype=dtype)
        kept = self._buffers.get(key)
        if kept is not None:
            buffer, alone = kept
            free = self._use_count(buffer) == alone
            if free and buffer.shape == like.shape and buffer.dtype == dtype and buffer.device == like.device:
                return buffer.detach()
        # A normal tensor even when first asked for under torch.inference_mode (a validation before the first
        # training step): an inference tensor could be neither written nor saved for backward outside that mode.
        with torch.inference_mode(False):
            buffer = torch.empty_like(like, dtype=dtype, memory_format=torch.contiguous_format)
        self._buffers[key] = (buffer, self._use_count(buffer))
        return buffer.detach()

    @property
    def nbytes(self) -> int:
        """Bytes of memory kept now (for memory accounting: it exists between steps, outside any step's peak)."""
        return sum(buffer.nbytes for buffer, _ in self._buffers.values())

    def clear(self) -> None:
        """Release the kept memory."""
        self._buffers.clear()

    def __getstate__(self) -> dict:
        return {"_buffers": {}}  # memory, not state: never pickled or deep-copied


def _counts_list(counts_E: Tensor | list[int]) -> list[int]:
    return counts_E.tolist() if isinstance(counts_E, Tensor) else [int(c) for c in counts_E]


def expert_batches(
    counts: list[int], max_rows: int = BATCH_MAX_ROWS, max_experts: int | None = None, experts: list[int] | None = None
) -> list[tuple[int, int, int, int]]:
    """Split the experts into batches the fused kernel runs with one ``bmm`` per matmul.

    A batch is a run of consecutive experts with the same non-zero row count (their rows are adjacent in
    the expert-sorted copies), of at most ``max_rows`` rows and ``max_experts`` experts; an expert whose count
    differs from its neighbours' is a batch of one. With ``experts`` (the expert index at each position), a
    batch's indices must also increase in equal steps, so that its stacked weights are one strided view.

    Returns:
        ``(first position, number of experts, rows per expert, first row)`` per batch; empty experts are in none.
    """
    batches: list[tuple[int, int, int, int]] = []
    row = 0
    for place, count in enumerate(counts):
        last = batches[-1] if batches else None
        joins = bool(count and last and last[2] == count and last[0] + last[1] == place)
        joins = joins and (last[1] + 1) * count <= max_rows and (max_experts is None or last[1] < max_experts)
        if joins and experts is not None:
            step = experts[place] - experts[place - 1]
            joins = step > 0 and (last[1] == 1 or step == experts[last[0] + 1] - experts[last[0]])
        if joins:
            batches[-1] = (last[0], last[1] + 1, count, last[3])
        elif count:
            batches.append((place, 1, count, row))
        row += count
    return batches


def padded_counts(
    counts: list[int], align: int = 1, group: int = 1, by_load: bool = False, max_rows: int | None = None
) -> list[int]:
    """Per-expert row counts after padding blocks with weight-zero copies (see ``pad_expert_blocks``).

    Every count is rounded up to a multiple of ``align``; then, with ``group > 1``, each run of ``group``
    experts whose largest count is at most :data:`PAD_MAX_ROWS` is padded to that largest count when this
    adds at most :data:`PAD_MAX_WASTE` of the run's rows, so the kernel runs the run as one batch. The runs
    are of neighbouring experts, or with ``by_load`` of experts taken in order of their counts (smallest
    first, ties by index; the copies then go in :func:`batch_order`), up to :data:`PAD_MAX_ROWS_BY_LOAD`
    rows: their loads are nearly equal, so the padding is small, but their weights are not adjacent (the
    kernel casts them in that order, or reads a pair as one strided view). An expert without copies is left out
    of its run and stays empty.

    Args:
        counts: Copies per expert.
        align: Row multiple (1: none).
        group: Experts per padded run (1: no runs).
        by_load: Form the runs in order of the counts rather than of the expert indices.
        max_rows: Largest count a run pads to (``None``: :data:`PAD_MAX_ROWS_BY_LOAD` by load, else
            :data:`PAD_MAX_ROWS`).
    """
    padded = [-(-count // align) * align for count in counts]
    if max_rows is None:
        max_rows = PAD_MAX_ROWS_BY_LOAD if by_load else PAD_MAX_ROWS
    if group > 1:
        in_order = sorted(range(len(padded)), key=padded.__getitem__) if by_load else range(len(padded))
        for first in range(0, len(padded), group):
            # An empty expert stays empty: with no copy of its own to repeat, its padding would run it on a token
            # it was not routed to (an overflow there, 0 * inf, is nan in that token).
            run = [expert for expert in in_order[first : first + group] if padded[expert]]
            top, rows = max((padded[e] for e in run), default=0), sum(padded[e] for e in run)
            if len(run) > 1 and top <= max_rows and len(run) * top - rows <= PAD_MAX_WASTE * rows:
                for expert in run:
                    padded[expert] = top
    return padded


def batch_order(padded: list[int]) -> list[int] | None:
    """The order of the experts' blocks that makes the runs of ``padded_counts(by_load=True)`` adjacent.

    By row count, ties by index; ``None`` when that is the index order itself.
    """
    order = sorted(range(len(padded)), key=padded.__getitem__)
    return None if order == sorted(order) else order


def _expert_selectors(
    order: list[int], batches: list[tuple[int, int, int, int]], device: torch.device
) -> list[slice | Tensor]:
    """Per batch, its experts' rows in the stacked weights: a slice (a view), else an index.

    A slice where the batch's experts are evenly spaced in increasing order, consecutive or not.
    """
    selectors: list[slice | Tensor] = []
    for first, size, _, _ in batches:
        experts = order[first : first + size]
        step = experts[1] - experts[0] if size > 1 else 1
        if step > 0 and experts == list(range(experts[0], experts[-1] + 1, step)):
            selectors.append(slice(experts[0], experts[-1] + 1, step))
        else:
            selectors.append(torch.tensor(experts, device=device))
    return selectors


def autocast_dtype(x: Tensor, weight: Tensor) -> torch.dtype | None:
    """The dtype the expert matmuls of ``x`` and ``weight`` run in under autocast; ``None`` where they run as they are.

    Autocast casts no float64 operand (``torch.mm`` of float64 stays float64), so a float64 model keeps float64.
    A float64 input to lower-precision weights (which ``torch.mm`` would refuse) runs in the autocast dtype.
    """
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type) or (x.dtype == torch.float64 and weight.dtype == torch.float64):
        return None
    return torch.get_autocast_dtype(device_type)


def _casts_on_kept_memory(x: Tensor, weight: Tensor, grad_buffers: GradBuffers | None) -> bool:
    """Whether the fused kernel casts the weights itself, onto kept memory (CPU autocast to another dtype)."""
    dtype = autocast_dtype(x, weight)
    if x.device.type != "cpu" or grad_buffers is None or dtype is None:
        return False
    return weight.dtype != dtype


class _GroupedExpertMLP(torch.autograd.Function):
    """``out[rows[n]] += weights[n] * expert_e(x[rows[n]])`` for copies ``n`` of expert ``e``, sorted by expert.

    With ``rows=None`` row ``n`` of ``x`` is copy ``n`` and the output is ``(N, D)`` in the same order.
    The copies are sorted by expert in ``order`` (default: by index). Experts run in the batches of
    :func:`expert_batches` over that order: ``G`` experts of ``M`` rows each as ``(G, M, .)`` views and one
    ``bmm`` per matmul (a single expert is a batch of one). A batch's weights are read in place, a strided view
    of evenly spaced experts; with ``cast_dtype`` the kernel casts them in batch order onto kept memory.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        rows_N: Tensor | None,
        weights_N: Tensor | None,
        w1_EDF: Tensor,
        w3_EDF: Tensor | None,
        w2_EFD: Tensor,
        counts: list[int],
        activation: str,
        grad_buffers: GradBuffers | None = None,
        max_batch_rows: int = BATCH_MAX_ROWS,
        cast_dtype: torch.dtype | None = None,
        order: list[int] | None = None,
    ) -> Tensor:
        act = activation_fn(activation)
        master_dtype = w1_EDF.dtype
        identity = order is None
        order = list(range(len(counts))) if order is None else order
        max_experts = None  # with casts, bound the weight blocks copied at once
        if cast_dtype is not None:
            max_experts = max(1, BATCH_MAX_WEIGHT_BYTES // (w1_EDF[0].numel() * cast_dtype.itemsize))
        # Without casts a batch's weights are read in place: its experts must be evenly spaced (a strided view).
        spaced = None if cast_dtype is not None or identity else order
        batches = expert_batches([counts[e] for e in order], max_batch_rows, max_experts, spaced)
        # Where each batch's experts are: in the master weights and gradients, and in the weights the matmuls read.
        selectors = _expert_selectors(order, batches, w1_EDF.device)
        weight_selectors = selectors
        if cast_dtype is not None:  # autocast: the weights in the compute dtype, on kept memory, in batch order
            casts = []
            for w, key in ((w1_EDF, "w1"), (w3_EDF, "w3"), (w2_EFD, "w2")):
                cast = None if w is None else grad_buffers.empty_like(f"{key}.cast", w, cast_dtype)
                if cast is not None and identity:
                    cast.copy_(w)
                elif cast is not None:  # expert by expert: no temporary
                    for first, size, _, _ in batches:
                        for slot, expert in enumerate(order[first : first + size], first):
                            cast[slot].copy_(w[expert])
                casts.append(cast)
            w1_EDF, w3_EDF, w2_EFD = casts
            weight_selectors = [slice(first, first + size) for first, size, _, _ in batches]
        num_copies, dim, hidden = sum(counts), x.shape[-1], w1_EDF.shape[-1]
        h1_NF = x.new_empty(num_copies, hidden)
        h3_NF = x.new_empty(num_copies, hidden) if w3_EDF is not None else None
        out = torch.zeros_like(x) if rows_N is not None else x.new_empty(num_copies, dim)
        for (_, size, rows, start), experts in zip(batches, weight_selectors, strict=True):
            block = slice(start, start + size * rows)
            x_GMD = (x[block] if rows_N is None else x.index_select(0, rows_N[block])).view(size, rows, dim)
            g_GMF = act(torch.bmm(x_GMD, w1_EDF[experts], out=h1_NF[block].view(size, rows, hidden)))
            if h3_NF is not None:
                g_GMF = g_GMF.mul_(torch.bmm(x_GMD, w3_EDF[experts], out=h3_NF[block].view(size, rows, hidden)))
            if weights_N is not None:
                g_GMF = g_GMF.mul_(weights_N[block].view(size, rows, 1))
            if rows_N is None:
                torch.bmm(g_GMF, w2_EFD[experts], out=out[block].view(size, rows, dim))
            else:
                out.index_add_(0, rows_N[block], torch.bmm(g_GMF, w2_EFD[experts]).view(-1, dim))
        ctx.save_for_backward(x, rows_N, weights_N, w1_EDF, w3_EDF, w2_EFD, h1_NF, h3_NF)
        ctx.counts, ctx.batches, ctx.activation, ctx.grad_buffers = counts, batches, activation, grad_buffers
        ctx.selectors, ctx.weight_selectors = selectors, weight_selectors
        ctx.grad_dtype = master_dtype
        return out

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: this backward builds no graph, a second derivative would be 0
            raise RuntimeError("the fused expert kernel has no second derivatives: create_graph=True is unsupported")
        x, rows_N, weights_N, w1_EDF, w3_EDF, w2_EFD, h1_NF, h3_NF = ctx.saved_tensors
        act, act_grad = activation_fn(ctx.activation), activation_grad_fn(ctx.activation)
        need_x, _, need_weights, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:6]
        dim, hidden = x.shape[-1], w1_EDF.shape[-1]
        dout = dout.contiguous()
        dx = None
        if need_x:
            dx = torch.zeros_like(x) if rows_N is not None else torch.empty_like(x)
        dweights_N = torch.empty_like(weights_N) if need_weights else None
        # Every non-empty expert writes its whole gradient slice; only empty experts need zeros. The gradients
        # are in the master weights' dtype: a cast kernel converts each block's while it is in cache.
        buffers, grad_dtype = ctx.grad_buffers, ctx.grad_dtype

        def empty_like(key: str, weight: Tensor) -> Tensor:
            if buffers is None:
                return torch.empty_like(weight, dtype=grad_dtype)
            return buffers.empty_like(key if grad_dtype == weight.dtype else f"{key}.grad", weight, grad_dtype)

        def weight_grad(a: Tensor, b: Tensor, dw: Tensor, experts: slice | Tensor) -> None:
            if isinstance(experts, Tensor):  # expert by expert: no temporary in dw's dtype
                for dw_DF, expert in zip(torch.bmm(a, b), experts.tolist(), strict=True):
                    dw[expert].copy_(dw_DF)
            elif dw.dtype == a.dtype and (experts.step or 1) == 1:
                torch.bmm(a, b, out=dw[experts])
            else:  # a cast; or spaced experts, where a bmm into the strided view ran 1.5x slower than this copy
                dw[experts].copy_(torch.bmm(a, b))

        dw1 = empty_like("w1", w1_EDF) if need_w1 else None
        dw3 = empty_like("w3", w3_EDF) if need_w3 else None
        dw2 = empty_like("w2", w2_EFD) if need_w2 else None
        for e, count in enumerate(ctx.counts):
            if count == 0:
                for dw in (dw1, dw3, dw2):
                    if dw is not None:
                        dw[e].zero_()
        for (_, size, rows, start), experts, weight_experts in zip(
            ctx.batches, ctx.selectors, ctx.weight_selectors, strict=True
        ):
            block = slice(start, start + size * rows)
            x_GMD = (x[block] if rows_N is None else x.index_select(0, rows_N[block])).view(size, rows, dim)
            dout_GMD = (dout[block] if rows_N is None else dout.index_select(0, rows_N[block])).view(size, rows, dim)
            h1_GMF = h1_NF[block].view(size, rows, hidden)
            h3_GMF = h3_NF[block].view(size, rows, hidden) if h3_NF is not None else None
            # Fresh (M, F) temporaries are overwritten in place once their last reader is done.
            a_GMF = act(h1_GMF)
            g_GMF = a_GMF * h3_GMF if h3_GMF is not None else a_GMF
            dg_GMF = torch.bmm(dout_GMD, w2_EFD[weight_experts].transpose(1, 2))
            if weights_N is not None:
                w_GM1 = weights_N[block].view(size, rows, 1)
                if dweights_N is not None:
                    torch.sum(dg_GMF * g_GMF, -1, out=dweights_N[block].view(size, rows))
                if dw2 is not None:
                    g_GMF = g_GMF.mul_(w_GM1) if h3_GMF is not None else g_GMF * w_GM1
                    weight_grad(g_GMF.transpose(1, 2), dout_GMD, dw2, experts)
                dg_GMF = dg_GMF.mul_(w_GM1)
            elif dw2 is not None:
                weight_grad(g_GMF.transpose(1, 2), dout_GMD, dw2, experts)
            if h3_GMF is not None:
                dh3_GMF = a_GMF.mul_(dg_GMF)
                dh1_GMF = act_grad(dg_GMF.mul_(h3_GMF), h1_GMF)
            else:
                dh3_GMF = None
                dh1_GMF = act_grad(dg_GMF, h1_GMF)
            x_GDM = x_GMD.transpose(1, 2)
            if dw1 is not None:
                weight_grad(x_GDM, dh1_GMF, dw1, experts)
            if dw3 is not None:
                weight_grad(x_GDM, dh3_GMF, dw3, experts)
            if dx is not None:
                dx_GMD = torch.bmm(dh1_GMF, w1_EDF[weight_experts].transpose(1, 2))
                if dh3_GMF is not None:
                    dx_GMD.baddbmm_(dh3_GMF, w3_EDF[weight_experts].transpose(1, 2))
                if rows_N is None:
                    dx[block] = dx_GMD.view(-1, dim)
                else:
                    dx.index_add_(0, rows_N[block], dx_GMD.view(-1, dim))
        return dx, None, dweights_N, dw1, dw3, dw2, None, None, None, None, None, None


def _grouped_mm_mlp(
    x: Tensor,
    rows_N: Tensor | None,
    weights_N: Tensor | None,
    w1_EDF: Tensor,
    w3_EDF: Tensor | None,
    w2_EFD: Tensor,
    counts_E: Tensor,
    activation: str,
) -> Tensor:
    """The expert MLP as three ``torch._grouped_mm`` calls over all experts (autograd through torch).

    Materialises the ``(N, D)`` gathered copies and ``(N, F)`` hidden states, like a plain MLP on ``N``
    rows; the offsets stay on the device, so nothing here waits for the host.
    """
    offsets_E = torch.cumsum(counts_E.to(torch.int32), 0, dtype=torch.int32)
    x_ND = x if rows_N is None else x.index_select(0, rows_N)
    g_NF = activation_fn(activation)(torch._grouped_mm(x_ND, w1_EDF, offs=offsets_E))
    if w3_EDF is not None:
        g_NF = g_NF * torch._grouped_mm(x_ND, w3_EDF, offs=offsets_E)
    if weights_N is not None:
        g_NF = g_NF * weights_N.unsqueeze(-1)
    y_ND = torch._grouped_mm(g_NF, w2_EFD, offs=offsets_E)
    return y_ND if rows_N is None else torch.zeros_like(x).index_add(0, rows_N, y_ND)


def grouped_mm_applies(x: Tensor, w1_EDF: Tensor, w2_EFD: Tensor) -> bool:
    """Whether ``kernel="auto"`` picks ``torch._grouped_mm`` for these operands (in the autocast dtype, if on).

    It does on CUDA for bfloat16 on SM80+ GPUs with ``D`` and ``F`` multiples of 8 (the kernel's 16-byte
    stride rule), where torch has the op; everywhere else the fused block-by-block function is faster or the
    only one that runs.
    """
    dtype = autocast_dtype(x, w1_EDF) or x.dtype
    if not (x.is_cuda and hasattr(torch, "_grouped_mm") and dtype == torch.bfloat16):
        return False
    if w1_EDF.shape[1] % 8 or w1_EDF.shape[2] % 8 or w2_EFD.shape[2] % 8:
        return False
    return torch.cuda.get_device_capability(x.device) >= (8, 0)


def grouped_expert_mlp(
    x: Tensor,
    counts_E: Tensor | list[int],
    w1_EDF: Tensor,
    w3_EDF: Tensor | None,
    w2_EFD: Tensor,
    activation: str,
    rows_N: Tensor | None = None,
    weights_N: Tensor | None = None,
    kernel: str = "auto",
    grad_buffers: GradBuffers | None = None,
    batch_experts: bool = True,
    expert_order: list[int] | None = None,
) -> Tensor:
    """Run expert ``e`` (weights ``w*[e]``) on its contiguous block of expert-sorted copies.

    The one entry point to the expert computation: :class:`GroupedExperts` calls it with its own weights,
    the expert-parallel experts with the slice their rank owns. Under autocast the MLP runs in the autocast
    dtype (as autocast would run each matmul: float64 input stays float64); the casts are differentiable, so
    float32 master weights get their gradients.

    Args:
        x: Copies sorted by expert ``(N, D)``, or, with ``rows_N``, the tokens ``(T, D)`` they come from.
        counts_E: Copies per expert (one entry per row of ``w1_EDF``), summing to ``N``.
        w1_EDF: Input (gate) projections.
        w3_EDF: Up projections of gated experts, else ``None``.
        w2_EFD: Output projections.
        activation: Activation name (``ExpertsConfig.activation``).
        rows_N: Source token of each copy; then each output is weighted and added into that token's row.
        weights_N: Combine weight of each copy (with ``rows_N``).
        kernel: ``"fused"``, ``"grouped_mm"`` or ``"auto"`` (see ``ExpertsConfig.kernel``).
        grad_buffers: Where the fused kernel takes its weight-gradient memory from (``None``: fresh memory).
        batch_experts: Whether the fused kernel batches neighbouring experts with equal row counts
            (:func:`expert_batches`); else one expert at a time.
        expert_order: The order of the experts' blocks in the copies (a permutation of the expert indices,
            :func:`batch_order`; ``None``: by index). ``counts_E`` stays indexed by expert. Fused kernel only.

    Returns:
        ``(N, D)`` outputs in the order of the copies, or ``(T, D)`` combined outputs with ``rows_N``.

    Raises:
        ValueError: If ``counts_E`` does not match the weights or the copies (checked where that needs no wait
            for the device: list counts, or counts on the CPU), or ``expert_order`` is not a permutation of the
            experts or comes with ``kernel="grouped_mm"``, or ``kernel="grouped_mm"`` gets a dtype or widths
            ``torch._grouped_mm`` does not take.
    """
    if len(counts_E) != w1_EDF.shape[0]:
        raise ValueError(f"counts_E has {len(counts_E)} entries, expected num_experts={w1_EDF.shape[0]}")
    if expert_order is not None and sorted(expert_order) != list(range(w1_EDF.shape[0])):
        raise ValueError(f"expert_order={expert_order} is invalid: expected a permutation of 0..{w1_EDF.shape[0] - 1}")
    num_rows = x.shape[0] if rows_N is None else rows_N.shape[0]
    host_counts = None if isinstance(counts_E, Tensor) and counts_E.is_cuda else _counts_list(counts_E)
    if host_counts is not None and sum(host_counts) != num_rows:
        raise ValueError(f"counts_E sums to {sum(host_counts)}, but there are {num_rows} copies: they must match")
    device_type = x.device.type
    if kernel == "auto":
        kernel = "grouped_mm" if grouped_mm_applies(x, w1_EDF, w2_EFD) else "fused"
    cast_dtype = None
    dtype = autocast_dtype(x, w1_EDF)
    if dtype is not None:
        x = x.to(dtype)
        if kernel == "fused" and _casts_on_kept_memory(x, w1_EDF, grad_buffers):
            cast_dtype = dtype  # the fused kernel casts on kept memory and returns gradients in the weights' dtype
        else:
            w1_EDF, w3_EDF, w2_EFD = (None if w is None else w.to(dtype) for w in (w1_EDF, w3_EDF, w2_EFD))
    if weights_N is not None:
        weights_N = weights_N.to(x.dtype)
    with torch.autocast(device_type, enabled=False):
        if kernel == "grouped_mm":
            if expert_order is not None:
                raise ValueError("expert_order is invalid with kernel='grouped_mm': its copies are sorted by index")
            if x.dtype not in GROUPED_MM_DTYPES:
                allowed = ", ".join(map(str, GROUPED_MM_DTYPES))
                raise ValueError(
                    f"kernel='grouped_mm' is invalid for x.dtype={x.dtype}: torch._grouped_mm takes {allowed}; "
                    "use kernel='fused' or 'auto'"
                )
            dim, hidden = w1_EDF.shape[1], w1_EDF.shape[2]
            if (dim * x.element_size()) % 16 or (hidden * x.element_size()) % 16:
                raise ValueError(
                    f"kernel='grouped_mm' needs rows of 16-byte multiples: dim={dim} and hidden_dim={hidden} in "
                    f"{x.dtype} are not; use kernel='fused' or 'auto'"
                )
            counts = (
                counts_E.to(x.device) if isinstance(counts_E, Tensor) else torch.tensor(host_counts, device=x.device)
            )
            return _grouped_mm_mlp(x, rows_N, weights_N, w1_EDF, w3_EDF, w2_EFD, counts, activation)
        if kernel != "fused":
            raise ValueError(f"kernel={kernel!r} is invalid: expected one of ('auto', 'fused', 'grouped_mm')")
        counts = host_counts if host_counts is not None else _counts_list(counts_E)
        max_rows = BATCH_MAX_ROWS if batch_experts else 1
        return _GroupedExpertMLP.apply(
            x,
            rows_N,
            weights_N,
            w1_EDF,
            w3_EDF,
            w2_EFD,
            counts,
            activation,
            grad_buffers,
            max_rows,
            cast_dtype,
            expert_order,
        )


# glibc's malloc serves a block from its heap, reused without new page faults, once a block of that size has
# been freed, up to its largest dynamic mmap threshold (32 MiB on 64-bit); from there on every allocation is a
# fresh mmap whose pages fault in when first written.
FRESH_PAGES_MIN_BYTES = 32 * 2**20


def reuse_expert_grad_memory(model: nn.Module, enabled: bool = True, min_bytes: int = 0) -> int:
    """Make the :class:`GroupedExperts` in ``model`` keep their weight-gradient memory between steps (or stop).

    A CPU speed option (see :class:`GradBuffers`): saves the page faults of re-allocating the expert
    gradients every step (~20% of the layer time at 256 experts of hidden 512), and under autocast those of
    casting the weights to bfloat16 and their gradients back (~10% of a bf16-mixed layer step at 256 experts),
    at the cost of up to their size in peak memory (see :class:`GradBuffers` for when). CUDA tensors are
    never kept: the caching allocator already reuses memory there.

    Args:
        model: Any module.
        enabled: Turn the reuse on (True) or off, releasing the kept memory (False).
        min_bytes: Keep memory only for expert modules whose largest stacked weight has at least this many
            bytes; the others are turned off. ``FRESH_PAGES_MIN_BYTES`` (what ``CausalLMModule`` uses) keeps it
            only where glibc would map fresh pages every step: smaller gradients come back from its heap
            without page faults (measured: the same step time with and without the memory kept, for 16-21 MiB
            expert weights), so keeping them would cost memory for nothing.

    Returns:
        The number of expert modules that keep their memory.
    """
    kept = 0
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            keep = enabled and max(w.nbytes for w in module.parameters()) >= min_bytes
            if keep and module.grad_buffers is None:
                module.grad_buffers = GradBuffers()
            elif not keep:
                module.grad_buffers = None
            kept += keep
    return kept


class GroupedExperts(nn.Module):
    """``E`` feed-forward experts (ReLU/GELU MLP, GEGLU or SwiGLU) with stacked weights.

    Args:
        dim: Model width ``D``.
        num_experts: Number of experts ``E``.
        config: Hidden width, activation, gating and initialisation.

    Attributes:
        w1: ``(E, D, F)`` input (gate) projection.
        w3: ``(E, D, F)`` up projection of gated experts, else ``None``.
        w2: ``(E, F, D)`` output projection.
    """

    def __init__(self, dim: int, num_experts: int, config: ExpertsConfig) -> None:
        super().__init__()
        self.config = config
        self.num_experts = num_experts
        self.act = activation_fn(config.activation)
        hidden = config.hidden_dim
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden)) if config.gated else None
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        # Off by default: see reuse_expert_grad_memory.
        self.grad_buffers: GradBuffers | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal init, each expert drawn independently (``init_std``; ``out_init_std`` for ``w2``)."""
        out_std = self.config.init_std if self.config.out_init_std is None else self.config.out_init_std
        nn.init.normal_(self.w1, std=self.config.init_std)
        if self.w3 is not None:
            nn.init.normal_(self.w3, std=self.config.init_std)
        nn.init.normal_(self.w2, std=out_std)

    def needs_host_counts(self, x: Tensor) -> bool:
        """Whether the expert kernel chosen for ``x`` reads the per-expert counts on the host."""
        if self.config.kernel == "auto":
            return not grouped_mm_applies(x, self.w1, self.w2)
        return self.config.kernel == "fused"

    def padded_counts(self, x: Tensor, counts: list[int]) -> list[int]:
        """Row counts the dispatcher pads each expert's block to for input ``x`` (``counts`` itself: no padding).

        Only for the fused kernel on the CPU: in bfloat16/float16 (including under autocast) every block is
        rounded up to :data:`ROW_ALIGNMENT` rows, since every new row count costs a oneDNN kernel build; and
        experts with small blocks are padded in runs to one row count where that is cheap (:func:`padded_counts`),
        so the kernel runs each run as one ``bmm`` batch, one expert per thread, instead of splitting each small
        matmul over the threads. The runs are of ``max(2, threads)`` neighbouring experts, whose weights are
        adjacent; or of experts of nearly equal load (see :meth:`runs_by_load`, :meth:`block_order`): pairs, up
        to :data:`PAD_MAX_ROWS` rows, when the matmuls read float32 weights as they are on two threads or fewer
        (any two experts' weights are one strided view), or :data:`PAD_GROUP` experts, up to
        :data:`PAD_MAX_ROWS_BY_LOAD` rows, when the kernel casts the weights itself (autocast with kept memory:
        it can write the cast in any order for free).
        """
        if x.device.type != "cpu" or not self.needs_host_counts(x):
            return counts
        casts = _casts_on_kept_memory(x, self.w1, self.grad_buffers)
        group = max(PAD_GROUP if casts else 2, torch.get_num_threads()) if self.config.batch_experts else 1
        dtype = autocast_dtype(x, self.w1) or x.dtype
        align = ROW_ALIGNMENT if dtype in (torch.bfloat16, torch.float16) else 1
        max_rows = PAD_MAX_ROWS_BY_LOAD if casts else PAD_MAX_ROWS
        return padded_counts(counts, align, group, self.runs_by_load(x), max_rows)

    def block_order(self, x: Tensor, padded: list[int]) -> list[int] | None:
        """The order of the experts' blocks for the copies padded to ``padded`` (``None``: by index).

        By load (:func:`batch_order`) where :meth:`padded_counts` formed its runs by load, else ``None``.
        """
        if not self.config.batch_experts or x.device.type != "cpu":
            return None
        return batch_order(padded) if self.runs_by_load(x) else None

    def runs_by_load(self, x: Tensor) -> bool:
        """Whether :meth:`padded_counts` forms its runs by load for input ``x``.

        When the kernel casts the weights itself (it writes the cast in run order), and when the matmuls read
        float32 (or float64) weights as they are and the runs are pairs (two threads or fewer): any two experts'
        weights are one strided view, read in place. Not under autocast with autograd's casts (the 256-expert
        scaling layer ran 6% slower that way), nor for bf16 weights (a bf16 ``bmm`` over a strided view ran
        1.3x slower than over neighbours), nor for longer runs, whose experts are rarely evenly spaced (the
        kernel would split them).
        """
        if _casts_on_kept_memory(x, self.w1, self.grad_buffers):
            return True
        dtype = autocast_dtype(x, self.w1) or self.w1.dtype
        full_precision = dtype == self.w1.dtype and dtype in (torch.float32, torch.float64)
        return full_precision and max(2, torch.get_num_threads()) == 2

    def forward(self, x_ND: Tensor, counts_E: Tensor | list[int]) -> Tensor:
        """Run every expert on its contiguous block of expert-sorted rows.

        Args:
            x_ND: Token copies sorted by expert.
            counts_E: Copies per expert, summing to ``N``.

        Returns:
            ``(N, D)`` expert outputs in the same order.
        """
        return grouped_expert_mlp(
            x_ND,
            counts_E,
            self.w1,
            self.w3,
            self.w2,
            self.config.activation,
            kernel=self.config.kernel,
            grad_buffers=self.grad_buffers,
            batch_experts=self.config.batch_experts,
        )

    def forward_scatter(
        self,
        x_TD: Tensor,
        token_ids_N: Tensor,
        weights_N: Tensor,
        counts_E: Tensor | list[int],
        expert_order: list[int] | None = None,
    ) -> Tensor:
        """Gather, run, weight and scatter-add in one pass, block by block.

        Args:
            x_TD: Tokens.
            token_ids_N: Source token of each copy, copies sorted by expert (in ``expert_order``).
            weights_N: Combine weight of each copy.
            counts_E: Copies per expert, summing to ``N``.
            expert_order: Order of the experts' blocks (see :func:`grouped_expert_mlp`; ``None``: by index).

        Returns:
            ``(T, D)``: ``sum_n weights_N[n] * expert(x_TD[token_ids_N[n]])`` per token.
        """
        return grouped_expert_mlp(
            x_TD,
            counts_E,
            self.w1,
            self.w3,
            self.w2,
            self.config.activation,
            token_ids_N,
            weights_N,
            self.config.kernel,
            grad_buffers=self.grad_buffers,
            batch_experts=self.config.batch_experts,
            expert_order=expert_order,
        )

    def unbind_experts(self) -> list[tuple[Tensor, Tensor | None, Tensor]]:
        """Per-expert ``(w1, w3, w2)`` views, unbound in one autograd op (for the reference loop)."""
        w3s = self.w3.unbind(0) if self.w3 is not None else [None] * self.num_experts
        return list(zip(self.w1.unbind(0), w3s, self.w2.unbind(0), strict=True))

    def expert_forward(self, x_MD: Tensor, weights: tuple[Tensor, Tensor | None, Tensor]) -> Tensor:
        """Run one expert with plain tensor ops (the reference the grouped path is tested against).

        Args:
            x_MD: The expert's tokens.
            weights: That expert's ``(w1, w3, w2)`` from :meth:`unbind_experts`.
        """
        w1_DF, w3_DF, w2_FD = weights
        h_MF = self.act(x_MD @ w1_DF)
        if w3_DF is not None:
            h_MF = h_MF * (x_MD @ w3_DF)
        return h_MF @ w2_FD
