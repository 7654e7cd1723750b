"""Hand-written backward passes checked by float64 finite differences and against plain autograd written here.

The fused expert kernel (``_GroupedExpertMLP`` behind ``grouped_expert_mlp``), its kept-memory paths, the CPU
``grouped_mm`` path, the grouped dispatcher with capacity drops and padding, and the chunked
``linear_cross_entropy`` are compared with ``torch.autograd.gradcheck`` and with reference implementations in
this file (never the project's loop oracle): every activation, gated or not, empty experts, a single token,
partial ``requires_grad``, non-contiguous operands, micro-batch accumulation, ``retain_graph``, ``no_grad`` and
``inference_mode`` forwards, and bf16 autocast against float32.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import gradcheck
from torch.func import functional_call

from lightning_moe.nn import ExpertsConfig, MoEConfig, MoELayer, RouterConfig
from lightning_moe.nn.attention import Attention, AttentionConfig, attention_bias
from lightning_moe.nn.cross_entropy import linear_cross_entropy
from lightning_moe.nn.dispatch import GroupedDispatcher
from lightning_moe.nn.experts import GradBuffers, GroupedExperts, grouped_expert_mlp
from lightning_moe.nn.position_bias import RelativePositionBias
from lightning_moe.nn.rope import RopeConfig, apply_rope_interleaved, rope_cos_sin

F64 = torch.float64
ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "silu": lambda h: h * torch.sigmoid(h),
}


def _weights(num_experts: int, dim: int, hidden: int, gated: bool, dtype=F64, seed: int = 0) -> list[Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(num_experts, dim, hidden), (num_experts, dim, hidden), (num_experts, hidden, dim)]
    w = [(0.5 * torch.randn(s, generator=g, dtype=dtype)).requires_grad_() for s in shapes]
    if not gated:
        w[1] = None
    return w


def _reference_mlp(
    x: Tensor,
    counts: list[int],
    w1: Tensor,
    w3: Tensor | None,
    w2: Tensor,
    act: str,
    rows: Tensor | None = None,
    weights: Tensor | None = None,
    order: list[int] | None = None,
) -> Tensor:
    """Copy by copy with plain autograd: ``out[rows[n]] += weights[n] * mlp_e(x[rows[n]])``."""
    fn = ACTIVATIONS[act]
    expert_of_copy = [e for e in (order or range(len(counts))) for _ in range(counts[e])]
    outs = []
    for n, e in enumerate(expert_of_copy):
        x_D = x[n] if rows is None else x[rows[n]]
        h_F = fn(x_D @ w1[e])
        if w3 is not None:
            h_F = h_F * (x_D @ w3[e])
        y_D = h_F @ w2[e]
        outs.append(y_D if weights is None else weights[n] * y_D)
    y_ND = torch.stack(outs) if outs else x.new_zeros(0, x.shape[-1])
    if rows is None:
        return y_ND
    out = x.new_zeros(x.shape)
    for n in range(len(outs)):
        out = out.index_add(0, rows[n : n + 1], y_ND[n : n + 1])
    return out


def _grads(y: Tensor, inputs: list[Tensor], grad_out: Tensor) -> list[Tensor | None]:
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(y, wanted, grad_out, allow_unused=True))
    return [next(got) if t is not None and t.requires_grad else None for t in inputs]


@pytest.mark.parametrize(
    ("act", "gated", "scatter"), list(itertools.product(ACTIVATIONS, [False, True], [False, True]))
)
def test_fused_kernel_gradcheck_every_activation(act, gated, scatter):
    counts = [2, 0, 2, 3]  # an empty expert, and two neighbours of equal count that batch
    num_tokens, num_copies = 5, sum(counts)
    w1, w3, w2 = _weights(4, 3, 4, gated)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(num_tokens if scatter else num_copies, 3, generator=g, dtype=F64, requires_grad=True)
    rows = torch.randint(0, num_tokens, (num_copies,), generator=g) if scatter else None
    wts = torch.rand(num_copies, generator=g, dtype=F64).requires_grad_() if scatter else None

    def fused(x, w1, w3, w2, wts):
        return grouped_expert_mlp(x, counts, w1, w3, w2, act, rows, wts, kernel="fused")

    inputs = [x, w1, w3, w2, wts]
    assert gradcheck(fused, inputs)
    y, ref = fused(*inputs), _reference_mlp(x, counts, w1, w3, w2, act, rows, wts)
    torch.testing.assert_close(y, ref)
    grad_out = torch.randn_like(ref)
    for a, b in zip(_grads(y, inputs, grad_out), _grads(ref, inputs, grad_out), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    assert not w1.grad_fn and w1.grad is None  # nothing accumulated by torch.autograd.grad


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_fused_kernel_one_expert_at_a_time_matches_batched(act):
    counts = [3, 3, 0, 3]
    w = _weights(4, 3, 5, gated=True)
    x = torch.randn(9, 3, dtype=F64, requires_grad=True)
    assert gradcheck(lambda x, *w: grouped_expert_mlp(x, counts, *w, act, kernel="fused", batch_experts=False), [x, *w])
    torch.testing.assert_close(
        grouped_expert_mlp(x, counts, *w, act, kernel="fused", batch_experts=False), _reference_mlp(x, counts, *w, act)
    )


@pytest.mark.parametrize("order", [[0, 2, 1, 4, 3], [4, 1, 3, 0, 2], [2, 0, 4, 1, 3]])
@pytest.mark.parametrize("kept", [False, True])
def test_fused_kernel_expert_order_and_kept_memory(order, kept):
    counts = [2, 3, 2, 0, 3]  # evenly spaced pairs of equal counts: strided weight views
    w = _weights(5, 3, 4, gated=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 3, generator=g, dtype=F64, requires_grad=True)
    rows = torch.randint(0, 7, (10,), generator=g)
    wts = torch.rand(10, generator=g, dtype=F64, requires_grad=True)
    buffers = GradBuffers() if kept else None

    def fused(x, w1, w3, w2, wts):
        return grouped_expert_mlp(
            x, counts, w1, w3, w2, "gelu", rows, wts, kernel="fused", grad_buffers=buffers, expert_order=order
        )

    assert gradcheck(fused, [x, *w, wts])
    torch.testing.assert_close(fused(x, *w, wts), _reference_mlp(x, counts, *w, "gelu", rows, wts, order))


@pytest.mark.parametrize("kept", [False, True])
@pytest.mark.parametrize("scatter", [False, True])
def test_fused_kernel_no_copies_and_single_token(kept, scatter):
    w = _weights(3, 4, 6, gated=True)
    buffers = GradBuffers() if kept else None
    x = torch.randn(5 if scatter else 0, 4, dtype=F64, requires_grad=True)
    rows = torch.zeros(0, dtype=torch.long) if scatter else None
    wts = torch.zeros(0, dtype=F64, requires_grad=True) if scatter else None
    y = grouped_expert_mlp(x, [0, 0, 0], *w, "relu", rows, wts, kernel="fused", grad_buffers=buffers)
    assert y.shape == ((5, 4) if scatter else (0, 4)) and not y.any()
    y.sum().backward()
    for t in [x, *w]:
        assert t.grad is not None and not t.grad.any()

    one = torch.randn(1, 4, dtype=F64, requires_grad=True)
    fused = lambda x, *w: grouped_expert_mlp(x, [0, 1, 0], *w, "gelu_tanh", kernel="fused", grad_buffers=buffers)  # noqa: E731
    assert gradcheck(fused, [one, *w])
    torch.testing.assert_close(fused(one, *w), _reference_mlp(one, [0, 1, 0], *w, "gelu_tanh"))


@pytest.mark.parametrize("needs", [(False, True, True, True), (True, False, False, False), (True, True, False, True)])
def test_fused_kernel_partial_requires_grad(needs):
    counts = [2, 0, 2]
    base = _weights(3, 4, 6, gated=True)
    x = torch.randn(4, 4, dtype=F64, requires_grad=needs[0])
    ws = [w.detach().requires_grad_(r) for w, r in zip(base, needs[1:], strict=True)]
    y = grouped_expert_mlp(x, counts, *ws, "silu", kernel="fused")
    ref = _reference_mlp(x, counts, *ws, "silu")
    torch.testing.assert_close(y, ref)
    grad_out = torch.randn_like(ref)
    for a, b in zip(_grads(y, [x, *ws], grad_out), _grads(ref, [x, *ws], grad_out), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kept", [False, True])
@pytest.mark.parametrize("scatter", [False, True])
def test_fused_kernel_non_contiguous_operands_unchanged(kept, scatter):
    counts = [2, 0, 3]
    g = torch.Generator().manual_seed(3)
    b1 = torch.randn(3, 6, 4, generator=g, dtype=F64, requires_grad=True)  # w1 = b1.transpose(1, 2)
    b3 = torch.randn(6, 3, 4, generator=g, dtype=F64, requires_grad=True)  # w3 = b3.permute(1, 2, 0)
    b2 = torch.randn(3, 4, 12, generator=g, dtype=F64, requires_grad=True)  # w2 = every other column, transposed
    xb = torch.randn(4, 10, generator=g, dtype=F64, requires_grad=True)  # x = every other row of xb.T
    wb = torch.rand(10, generator=g, dtype=F64, requires_grad=True)
    rows = torch.tensor([0, 2, 2, 1, 0]) if scatter else None
    buffers = GradBuffers() if kept else None

    def views(b1, b3, b2, xb, wb):
        return xb.t()[::2], b1.transpose(1, 2), b3.permute(1, 2, 0), b2[:, :, ::2].transpose(1, 2), wb[::2]

    def fused(*bases):
        x, w1, w3, w2, wts = views(*bases)
        return grouped_expert_mlp(
            x, counts, w1, w3, w2, "gelu", rows, wts if scatter else None, kernel="fused", grad_buffers=buffers
        )

    bases = [b1, b3, b2, xb, wb]
    before = [b.detach().clone() for b in bases]
    assert gradcheck(fused, bases)
    x, w1, w3, w2, wts = views(*bases)
    torch.testing.assert_close(
        fused(*bases), _reference_mlp(x, counts, w1, w3, w2, "gelu", rows, wts if scatter else None)
    )
    for b, b0 in zip(bases, before, strict=True):
        assert torch.equal(b, b0)


def _plain_loss(ws: list[Tensor], x: Tensor, counts: list[int]) -> Tensor:
    return _reference_mlp(x, counts, *ws, "gelu").pow(2).sum()


@pytest.mark.parametrize(("kept", "set_to_none"), list(itertools.product([False, True], [False, True])))
def test_micro_batch_accumulation_and_retain_graph(kept, set_to_none):
    counts = [4, 0, 4]
    fused_w, plain_w = _weights(3, 4, 6, gated=True), _weights(3, 4, 6, gated=True)
    buffers = GradBuffers() if kept else None
    opt_fused, opt_plain = torch.optim.SGD(fused_w, lr=1e-3), torch.optim.SGD(plain_w, lr=1e-3)
    xs = [torch.randn(8, 4, dtype=F64) for _ in range(3)]

    def fused_loss(x):
        return grouped_expert_mlp(x, counts, *fused_w, "gelu", kernel="fused", grad_buffers=buffers).pow(2).sum()

    for step in range(3):
        for micro in range(2):  # gradients accumulate into the previous micro-batch's .grad
            fused_loss(xs[step % 2 + micro]).backward()
            _plain_loss(plain_w, xs[step % 2 + micro], counts).backward()
        for a, b in zip(fused_w, plain_w, strict=True):
            torch.testing.assert_close(a.grad, b.grad)
        opt_fused.step()
        opt_plain.step()
        opt_fused.zero_grad(set_to_none=set_to_none)
        opt_plain.zero_grad(set_to_none=set_to_none)
    loss = fused_loss(xs[0])
    loss.backward(retain_graph=True)
    loss.backward()
    ref = _plain_loss(plain_w, xs[0], counts)
    ref.backward(retain_graph=True)
    ref.backward()
    for a, b in zip(fused_w, plain_w, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_kept_gradient_held_by_caller_is_not_overwritten():
    counts = [2, 2]
    w = _weights(2, 4, 6, gated=False)
    buffers = GradBuffers()
    x1, x2 = torch.randn(4, 4, dtype=F64), torch.randn(4, 4, dtype=F64)
    g1 = torch.autograd.grad(
        grouped_expert_mlp(x1, counts, *w, "relu", kernel="fused", grad_buffers=buffers).sum(), w[0]
    )
    kept = g1[0].clone()
    grouped_expert_mlp(x2, counts, *w, "relu", kernel="fused", grad_buffers=buffers).sum().backward()
    torch.testing.assert_close(g1[0], kept)
    ref = torch.autograd.grad(_reference_mlp(x2, counts, *w, "relu").sum(), w[0])[0]
    torch.testing.assert_close(w[0].grad, ref)


@pytest.mark.parametrize("kept", [False, True])
def test_no_grad_and_inference_mode_forwards_match(kept):
    counts = [2, 0, 2]
    w = _weights(3, 4, 6, gated=True)
    x = torch.randn(4, 4, dtype=F64, requires_grad=True)
    buffers = GradBuffers() if kept else None
    ref = _reference_mlp(x, counts, *w, "silu")
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            y = grouped_expert_mlp(x, counts, *w, "silu", kernel="fused", grad_buffers=buffers)
        assert not y.requires_grad
        torch.testing.assert_close(y, ref.detach())


def _bf16_experts_step(ws, x, counts, rows, wts, buffers):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_expert_mlp(x, counts, *ws, "silu", rows, wts, kernel="fused", grad_buffers=buffers)
    y.float().pow(2).sum().backward()
    return y


def test_kept_memory_first_used_under_inference_mode_then_trains():
    # A validation (Lightning's sanity check) under inference_mode before the first training step: the weights'
    # bf16 copy kept then must still be usable, and saved for backward, by the training forward.
    counts = [4, 0, 4]
    ws = _weights(3, 8, 16, gated=True, dtype=torch.float32)
    plain = [w.detach().clone().requires_grad_() for w in ws]
    x = torch.randn(8, 8)
    buffers = GradBuffers()
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_eval = grouped_expert_mlp(x, counts, *ws, "silu", kernel="fused", grad_buffers=buffers)
    y = _bf16_experts_step(ws, x, counts, None, None, buffers)
    y_plain = _bf16_experts_step(plain, x, counts, None, None, None)
    torch.testing.assert_close(y, y_eval)
    torch.testing.assert_close(y, y_plain)
    for a, b in zip(ws, plain, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("kept", [False, True])
@pytest.mark.parametrize("order", [None, [3, 0, 2, 1]])
def test_bf16_autocast_close_to_float32(kept, order):
    counts, num_tokens = [3, 0, 5, 4], 10
    g = torch.Generator().manual_seed(4)
    rows = torch.randint(0, num_tokens, (12,), generator=g)
    wts = torch.rand(12, generator=g)
    ws = _weights(4, 16, 32, gated=True, dtype=torch.float32)
    ref_w = [w.detach().clone().requires_grad_() for w in ws]
    x = torch.randn(num_tokens, 16, generator=g)
    buffers = GradBuffers() if kept else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_expert_mlp(
            x, counts, *ws, "silu", rows, wts, kernel="fused", grad_buffers=buffers, expert_order=order
        )
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()
    ref = _reference_mlp(x, counts, *ref_w, "silu", rows, wts, order)
    ref.pow(2).sum().backward()
    assert (y.float() - ref).norm() <= 1e-2 * ref.norm()
    for a, b in zip(ws, ref_w, strict=True):
        assert a.grad.dtype == torch.float32
        assert (a.grad - b.grad).norm() <= 2e-2 * b.grad.norm()


@pytest.mark.parametrize("kept", [False, True])
def test_float64_stays_float64_under_autocast(kept):
    # Autocast casts no float64 operand: the experts, like torch.mm and the loop dispatcher, stay in float64.
    counts = [2, 0, 3]
    ws = _weights(3, 4, 6, gated=True)
    x = torch.randn(6, 4, dtype=F64, requires_grad=True)
    rows, wts = torch.tensor([0, 5, 1, 1, 3]), torch.rand(5, dtype=F64)
    buffers = GradBuffers() if kept else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_expert_mlp(x, counts, *ws, "gelu", rows, wts, kernel="fused", grad_buffers=buffers)
        ref = _reference_mlp(x, counts, *ws, "gelu", rows, wts)
    assert ref.dtype == F64 and y.dtype == F64
    torch.testing.assert_close(y, ref)
    grad_out = torch.randn_like(ref)
    for a, b in zip(_grads(y, [x, *ws], grad_out), _grads(ref, [x, *ws], grad_out), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("act", "gated", "scatter"), list(itertools.product(["relu", "silu"], [False, True], [False, True]))
)
def test_grouped_mm_cpu_matches_reference(act, gated, scatter):
    counts, num_tokens = [3, 0, 2, 0], 6
    ws = _weights(4, 4, 8, gated, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(num_tokens if scatter else 5, 4, generator=g, requires_grad=True)
    rows = torch.randint(0, num_tokens, (5,), generator=g) if scatter else None
    wts = torch.rand(5, generator=g, requires_grad=True) if scatter else None
    y = grouped_expert_mlp(x, torch.tensor(counts), *ws, act, rows, wts, kernel="grouped_mm")
    ref = _reference_mlp(x, counts, *ws, act, rows, wts)
    torch.testing.assert_close(y, ref)
    grad_out = torch.randn_like(ref)
    for a, b in zip(_grads(y, [x, *ws, wts], grad_out), _grads(ref, [x, *ws, wts], grad_out), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_grouped_mm_refuses_float64_with_a_clear_error():
    ws = _weights(2, 4, 8, gated=False)
    with pytest.raises(ValueError, match=r"kernel='grouped_mm' is invalid for x.dtype=torch.float64: .*'fused'"):
        grouped_expert_mlp(torch.randn(3, 4, dtype=F64), [1, 2], *ws, "relu", kernel="grouped_mm")


@pytest.mark.parametrize(("act", "gated", "kept"), list(itertools.product(ACTIVATIONS, [False, True], [False, True])))
def test_dispatch_dropped_copies_get_zero_gradient(act, gated, kept):
    num_tokens, top_k, num_experts, dim = 7, 2, 4, 3
    experts = GroupedExperts(dim, num_experts, ExpertsConfig(hidden_dim=5, activation=act, gated=gated, init_std=0.5))
    experts.double()
    if kept:
        experts.grad_buffers = GradBuffers()
    g = torch.Generator().manual_seed(6)
    token_ids = torch.arange(num_tokens).repeat_interleave(top_k)
    expert_ids = torch.randint(0, num_experts, (num_tokens * top_k,), generator=g)
    keep = torch.rand(num_tokens * top_k, generator=g) > 0.3
    x = torch.randn(num_tokens, dim, generator=g, dtype=F64, requires_grad=True)
    wts = torch.rand(num_tokens * top_k, generator=g, dtype=F64, requires_grad=True)
    params = [experts.w1, experts.w3, experts.w2]

    def dispatch(x, wts):
        return GroupedDispatcher()(x, token_ids, expert_ids, wts, keep, experts)

    assert gradcheck(dispatch, [x, wts])
    live = keep.nonzero().squeeze(1)
    live = live[torch.argsort(expert_ids[live], stable=True)]
    counts = torch.bincount(expert_ids[live], minlength=num_experts).tolist()
    y, ref = dispatch(x, wts), _reference_mlp(x, counts, *params, act, token_ids[live], wts[live])
    torch.testing.assert_close(y, ref)
    grad_out = torch.randn_like(ref)
    got, want = _grads(y, [x, wts, *params], grad_out), _grads(ref, [x, wts, *params], grad_out)
    assert not got[1][~keep].any()
    for a, b in zip(got, want, strict=True):
        if a is not None:
            torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a))


@pytest.mark.parametrize(
    ("kind", "capacity_factor", "shared"),
    [("token_choice", None, 0), ("token_choice", 1.0, 6), ("expert_choice", 1.0, 0)],
)
def test_moe_layer_gradcheck_with_capacity_and_padding(kind, capacity_factor, shared):
    torch.manual_seed(0)
    config = MoEConfig(
        dim=4,
        router=RouterConfig(num_experts=4, top_k=2, kind=kind),
        experts=ExpertsConfig(hidden_dim=6, init_std=0.5),
        capacity_factor=capacity_factor,
        shared_hidden_dim=shared,
    )
    layer = MoELayer(config).double()
    layer.experts.grad_buffers = GradBuffers()
    x = torch.randn(2, 5, 4, dtype=F64, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    names, params = zip(*layer.named_parameters(), strict=True)

    def forward(x, *params):
        y, stats = functional_call(layer, dict(zip(names, params, strict=True)), (x, mask))
        return y, stats.losses["z_loss"]

    assert gradcheck(forward, [x, *params], atol=1e-6, fast_mode=True)
    y, stats = layer(x, mask)
    y.backward(torch.randn_like(y))
    assert not y[~mask].any() and not x.grad[~mask].any()
    if capacity_factor is not None and kind == "token_choice":
        assert int(stats.num_dropped) > 0


def _reference_cross_entropy(x: Tensor, w: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    logits = (x @ w.T).reshape(-1, w.shape[0]).double()
    valid = targets.reshape(-1) != ignore_index
    nll = -logits.log_softmax(-1)[valid].gather(1, targets.reshape(-1)[valid].long().unsqueeze(1)).squeeze(1)
    return (nll.sum() / valid.sum()).to(x.dtype)


@pytest.mark.parametrize("chunk", [1, 3, 4, 11, 64, None])
def test_linear_cross_entropy_gradcheck_chunks_and_ignored(chunk):
    num, dim, vocab = 11, 4, 13  # a prime vocabulary; chunks of 3 and 4 do not divide 11
    g = torch.Generator().manual_seed(7)
    x = torch.randn(num, dim, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(vocab, dim, generator=g, dtype=F64, requires_grad=True)
    targets = torch.randint(0, vocab, (num,), generator=g)
    targets[4:8] = -100  # a whole chunk of 4 ignored
    assert gradcheck(lambda x, w: linear_cross_entropy(x, w, targets, chunk_size=chunk), [x, w], fast_mode=True)
    loss, ref = linear_cross_entropy(x, w, targets, chunk_size=chunk), _reference_cross_entropy(x, w, targets)
    torch.testing.assert_close(loss, ref)
    for a, b in zip(torch.autograd.grad(loss, [x, w]), torch.autograd.grad(ref, [x, w]), strict=True):
        torch.testing.assert_close(a, b)


def test_linear_cross_entropy_all_ignored_and_custom_ignore_index():
    x = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    loss = linear_cross_entropy(x, w, torch.full((6,), -100), chunk_size=4)
    loss.backward()
    assert loss.isnan() and not x.grad.any() and not w.grad.any()

    base = torch.randn(4, 2, 6, dtype=F64)
    xs = base.permute(1, 2, 0).requires_grad_()  # (2, 6, 4), non-contiguous
    ws = torch.randn(4, 9, dtype=F64).t().requires_grad_()  # (9, 4), non-contiguous
    targets = torch.randint(0, 9, (2, 6))
    targets[0] = 7  # ignore_index=7: a whole row ignored, which a real token id could also be
    assert gradcheck(
        lambda x, w: linear_cross_entropy(x, w, targets, ignore_index=7, chunk_size=5), [xs, ws], fast_mode=True
    )
    loss = linear_cross_entropy(xs, ws, targets, ignore_index=7, chunk_size=5)
    torch.testing.assert_close(loss, _reference_cross_entropy(xs, ws, targets, ignore_index=7))
    assert torch.equal(xs, base.permute(1, 2, 0))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_linear_cross_entropy_narrow_integer_targets(dtype):
    x = torch.randn(7, 4, dtype=F64, requires_grad=True)
    w = torch.randn(11, 4, dtype=F64, requires_grad=True)
    targets = torch.randint(0, 11, (7,)).to(dtype)
    loss = linear_cross_entropy(x, w, targets, chunk_size=3)
    ref = _reference_cross_entropy(x, w, targets)
    torch.testing.assert_close(loss, ref)
    for a, b in zip(torch.autograd.grad(loss, [x, w]), torch.autograd.grad(ref, [x, w]), strict=True):
        torch.testing.assert_close(a, b)


def test_linear_cross_entropy_accumulation_retain_graph_and_no_grad():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(10, 4, generator=g, requires_grad=True)
    w = torch.randn(13, 4, generator=g, requires_grad=True)
    targets = torch.randint(0, 13, (10,), generator=g)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = linear_cross_entropy(x, w, targets, chunk_size=3)
    (3 * loss).backward(retain_graph=True)
    loss.backward()
    ref = F.cross_entropy(x_ref @ w_ref.T, targets)
    (3 * ref).backward(retain_graph=True)
    ref.backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(w.grad, w_ref.grad)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            value = linear_cross_entropy(x, w, targets, chunk_size=3)
        assert not value.requires_grad
        torch.testing.assert_close(value, ref.detach())
    only_w = linear_cross_entropy(x.detach(), w_ref, targets, chunk_size=4)
    assert torch.autograd.grad(only_w, w_ref)[0].shape == w.shape


def test_linear_cross_entropy_bf16_autocast_matches_autocast_reference():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(11, 8, generator=g, requires_grad=True)
    w = torch.randn(13, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 13, (11,), generator=g)
    targets[2:5] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, targets, chunk_size=4)
        ref = F.cross_entropy(F.linear(x, w).float(), targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref)
    grads, ref_grads = torch.autograd.grad(loss, [x, w]), torch.autograd.grad(ref, [x, w])
    full = torch.autograd.grad(F.cross_entropy(x @ w.T, targets), [x, w])
    for a, b, c in zip(grads, ref_grads, full, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-2 * b.abs().max().item(), rtol=0)
        assert (a - c).norm() <= 2e-2 * c.norm()


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def test_attention_with_padding_position_bias_and_rope_matches_reference():
    batch, seq, dim, heads, kv_heads = 2, 5, 8, 4, 2
    torch.manual_seed(0)
    attention = Attention(dim, AttentionConfig(num_heads=heads, num_kv_heads=kv_heads, qkv_bias=True)).double()
    position_bias = RelativePositionBias(heads, num_buckets=8, max_distance=6, bidirectional=False).double()
    cos, sin = rope_cos_sin(torch.arange(seq), attention.head_dim, RopeConfig(), F64)
    padding = torch.ones(batch, seq, dtype=torch.bool)
    padding[1, 3:] = False
    names, params = zip(*attention.named_parameters(), strict=True)
    x = torch.randn(batch, seq, dim, dtype=F64, requires_grad=True)

    def forward(x, table, *params):
        bias_HTS = functional_call(position_bias, {"embedding.weight": table}, (seq, seq))
        mask = attention_bias(batch, seq, padding_mask_BS=padding, position_bias_HTS=bias_HTS, dtype=F64)
        return functional_call(attention, dict(zip(names, params, strict=True)), (x, (cos[None], sin[None]), mask))

    table = position_bias.embedding.weight
    assert gradcheck(forward, [x, table, *params], fast_mode=True)

    def reference(x):
        hd = attention.head_dim
        q = attention.q_proj(x).view(batch, seq, heads, hd).transpose(1, 2)
        k = attention.k_proj(x).view(batch, seq, kv_heads, hd).transpose(1, 2).repeat_interleave(2, 1)
        v = attention.v_proj(x).view(batch, seq, kv_heads, hd).transpose(1, 2).repeat_interleave(2, 1)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        rel = torch.arange(seq).view(1, -1) - torch.arange(seq).view(-1, 1)
        scores = q @ k.transpose(-1, -2) / hd**0.5 + position_bias(seq, seq)
        allowed = (rel <= 0) & padding.view(batch, 1, 1, seq) | (rel == 0)
        out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        return attention.o_proj(out.transpose(1, 2).reshape(batch, seq, heads * hd))

    y, ref = forward(x, table, *params), reference(x)
    torch.testing.assert_close(y, ref)
    grad_out = torch.randn_like(ref)
    got = torch.autograd.grad(y, [x, table, *params], grad_out)
    want = torch.autograd.grad(ref, [x, table, *params], grad_out)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_interleaved_rope_is_the_complex_rotation():
    cos, sin = rope_cos_sin(torch.arange(6), 8, RopeConfig(theta=50.0), F64)
    x = torch.randn(2, 3, 6, 8, dtype=F64, requires_grad=True)
    assert gradcheck(lambda x: apply_rope_interleaved(x, cos[None], sin[None]), [x])
    pairs = torch.view_as_complex(x.detach().reshape(2, 3, 6, 4, 2).contiguous())
    angles = torch.arange(6, dtype=F64).view(-1, 1) * (50.0 ** (-torch.arange(0, 8, 2, dtype=F64) / 8))
    rotated = torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles))
    y = apply_rope_interleaved(x, cos[None], sin[None])
    torch.testing.assert_close(y, torch.cat((rotated[..., 0], rotated[..., 1]), dim=-1))


def test_second_derivatives_through_the_hand_written_backwards_are_refused_clearly():
    # Both backwards are hand-written, with no graph of their own: a double backward must fail by name, not return
    # a gradient that silently carries no graph (the cross-entropy did) or fail inside bmm (the experts did).
    x = torch.randn(6, 4, dtype=F64, requires_grad=True)
    w = torch.randn(5, 4, dtype=F64, requires_grad=True)
    with pytest.raises(RuntimeError, match="linear_cross_entropy has no second derivatives"):
        torch.autograd.grad(linear_cross_entropy(x, w, torch.randint(0, 5, (6,))), x, create_graph=True)
    ws = _weights(2, 4, 8, gated=True)
    xe = torch.randn(5, 4, dtype=F64, requires_grad=True)
    with pytest.raises(RuntimeError, match="fused expert kernel has no second derivatives"):
        torch.autograd.grad(grouped_expert_mlp(xe, [3, 2], *ws, "silu").sum(), xe, create_graph=True)
    (gxe,) = torch.autograd.grad(grouped_expert_mlp(xe, [3, 2], *ws, "silu").sum(), xe)  # first order still works
    assert gxe.shape == xe.shape and gxe.abs().sum() > 0
