import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from lightning_moe.nn import ExpertsConfig, FeedForward, MoEConfig, MoELayer, RouterConfig, bias_update


@pytest.fixture
def threads():
    """Set torch's intra-op thread count for one test (the CPU padding runs depend on it), then restore it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _pair(cfg: MoEConfig, dtype=torch.float64, router_std=1.0):
    grouped = MoELayer(cfg).to(dtype)
    grouped.router.gate.weight.data.normal_(std=router_std)
    loop = MoELayer(MoEConfig(**{**cfg.__dict__, "dispatch": "loop"})).to(dtype)
    loop.load_state_dict(grouped.state_dict())
    return grouped, loop


def _assert_same_forward_and_grads(grouped, loop, x, mask=None):
    xg = x.clone().requires_grad_(True)
    xl = x.clone().requires_grad_(True)
    yg, sg = grouped(xg, mask)
    yl, sl = loop(xl, mask)
    torch.testing.assert_close(yg, yl, rtol=1e-10, atol=1e-12)
    for name in ("tokens_per_expert", "kept_per_expert", "num_dropped", "router_entropy"):
        torch.testing.assert_close(getattr(sg, name), getattr(sl, name))
    grad = torch.randn_like(yg)
    loss_g = (yg * grad).sum() + sum(sg.losses.values())
    loss_l = (yl * grad).sum() + sum(sl.losses.values())
    loss_g.backward()
    loss_l.backward()
    torch.testing.assert_close(xg.grad, xl.grad, rtol=1e-9, atol=1e-12)
    for (name, pg), (_, pl) in zip(grouped.named_parameters(), loop.named_parameters(), strict=True):
        if pl.grad is None:
            assert pg.grad is None or torch.all(pg.grad == 0), name
        else:
            torch.testing.assert_close(pg.grad, pl.grad, rtol=1e-9, atol=1e-12, msg=name)


@settings(max_examples=60, deadline=None)
@given(
    num_experts=st.integers(1, 8),
    top_k=st.integers(1, 4),
    dim=st.integers(1, 12),
    hidden=st.integers(1, 12),
    tokens=st.integers(1, 24),
    capacity_factor=st.sampled_from([None, 0.5, 1.0, 1.5]),
    drop_priority=st.sampled_from(["position", "weight"]),
    shared=st.sampled_from([(0, False), (6, False), (6, True)]),
    score_func=st.sampled_from(["softmax", "sigmoid"]),
    softmax_after_topk=st.booleans(),
    normalize_topk=st.booleans(),
    ffn=st.sampled_from([("silu", True), ("gelu", True), ("relu", False), ("gelu_tanh", False)]),
    seed=st.integers(0, 10_000),
)
def test_grouped_path_matches_loop_in_outputs_and_gradients(
    num_experts,
    top_k,
    dim,
    hidden,
    tokens,
    capacity_factor,
    drop_priority,
    shared,
    score_func,
    softmax_after_topk,
    normalize_topk,
    ffn,
    seed,
):
    top_k = min(top_k, num_experts)
    torch.manual_seed(seed)
    cfg = MoEConfig(
        dim=dim,
        router=RouterConfig(
            num_experts=num_experts,
            top_k=top_k,
            score_func=score_func,
            softmax_after_topk=softmax_after_topk and score_func == "softmax",
            normalize_topk=normalize_topk,
        ),
        experts=ExpertsConfig(hidden_dim=hidden, activation=ffn[0], gated=ffn[1]),
        capacity_factor=capacity_factor,
        drop_priority=drop_priority,
        shared_hidden_dim=shared[0],
        shared_gate=shared[1],
    )
    grouped, loop = _pair(cfg)
    _assert_same_forward_and_grads(grouped, loop, torch.randn(tokens, dim, dtype=torch.float64))


@settings(max_examples=15, deadline=None)
@given(num_experts=st.integers(1, 6), factor=st.sampled_from([0.5, 1.0, 2.0]), seed=st.integers(0, 1000))
def test_expert_choice_grouped_matches_loop(num_experts, factor, seed):
    torch.manual_seed(seed)
    cfg = MoEConfig(
        dim=6,
        router=RouterConfig(num_experts=num_experts, top_k=1, kind="expert_choice"),
        experts=ExpertsConfig(hidden_dim=5),
        capacity_factor=factor,
    )
    grouped, loop = _pair(cfg)
    _assert_same_forward_and_grads(grouped, loop, torch.randn(2, 7, 6, dtype=torch.float64))


def test_group_limited_sigmoid_with_bias_grouped_matches_loop():
    torch.manual_seed(0)
    cfg = MoEConfig(
        dim=8,
        router=RouterConfig(
            num_experts=16,
            top_k=4,
            score_func="sigmoid",
            n_group=4,
            topk_group=2,
            group_score="top2_sum",
            score_bias=True,
            normalize_topk=True,
            routed_scaling_factor=2.5,
        ),
        experts=ExpertsConfig(hidden_dim=6),
        shared_hidden_dim=12,
    )
    grouped, loop = _pair(cfg)
    bias = torch.randn(16, dtype=torch.float64)
    grouped.router.score_bias.copy_(bias)
    loop.router.score_bias.copy_(bias)
    _assert_same_forward_and_grads(grouped, loop, torch.randn(3, 10, 8, dtype=torch.float64))


def test_one_expert_top1_equals_dense_ffn():
    torch.manual_seed(0)
    for activation, gated in (("silu", True), ("relu", False), ("gelu", True)):
        layer = MoELayer(
            MoEConfig(
                dim=8,
                router=RouterConfig(num_experts=1, top_k=1),
                experts=ExpertsConfig(hidden_dim=16, activation=activation, gated=gated),
            )
        )
        dense = FeedForward(8, 16, activation, gated)
        dense.w1.weight.data = layer.experts.w1.data[0].t().clone()
        dense.w2.weight.data = layer.experts.w2.data[0].t().clone()
        if gated:
            dense.w3.weight.data = layer.experts.w3.data[0].t().clone()
        x = torch.randn(4, 5, 8)
        y, stats = layer(x)
        torch.testing.assert_close(y, dense(x))
        assert stats.tokens_per_expert.tolist() == [20.0]


def test_gradcheck_float64_tiny_layer():
    torch.manual_seed(0)
    cfg = MoEConfig(
        dim=4,
        router=RouterConfig(num_experts=3, top_k=2, normalize_topk=True),
        experts=ExpertsConfig(hidden_dim=5),
        capacity_factor=1.0,
        shared_hidden_dim=3,
        shared_gate=True,
    )
    layer = MoELayer(cfg).double()
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)

    def fn(x, *params):
        y, stats = functional_call(layer, dict(zip(names, params, strict=True)), (x,))
        return y, stats.losses["load_balance"], stats.losses["z_loss"]

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6)


def _pad(x, extra):
    batch, seq, dim = x.shape
    padded = torch.randn(batch, seq + extra, dim, dtype=x.dtype) * 100  # garbage must not leak
    padded[:, :seq] = x
    mask = torch.zeros(batch, seq + extra, dtype=torch.bool)
    mask[:, :seq] = True
    return padded, mask


def test_padding_changes_no_output_statistic_or_loss():
    for capacity_factor, kind in ((None, "token_choice"), (0.75, "token_choice"), (1.0, "expert_choice")):
        torch.manual_seed(0)
        cfg = MoEConfig(
            dim=6,
            router=RouterConfig(num_experts=4, top_k=2, kind=kind),
            experts=ExpertsConfig(hidden_dim=8),
            capacity_factor=capacity_factor,
            shared_hidden_dim=4,
            shared_gate=True,
        )
        layer = MoELayer(cfg).double()
        layer.router.gate.weight.data.normal_()
        x = torch.randn(3, 5, 6, dtype=torch.float64)
        y, stats = layer(x)
        padded, mask = _pad(x, 4)
        y_pad, stats_pad = layer(padded, mask)
        torch.testing.assert_close(y_pad[:, :5], y)
        assert torch.all(y_pad[:, 5:] == 0)
        for name in ("tokens_per_expert", "kept_per_expert", "num_dropped", "num_tokens", "router_entropy"):
            torch.testing.assert_close(getattr(stats_pad, name), getattr(stats, name), msg=f"{kind} {name}")
        assert stats.losses.keys() == stats_pad.losses.keys()
        for name, value in stats.losses.items():
            torch.testing.assert_close(stats_pad.losses[name], value, msg=name)


def test_eval_forward_changes_no_counter_and_training_counts():
    torch.manual_seed(0)
    cfg = MoEConfig(
        dim=6,
        router=RouterConfig(num_experts=4, top_k=2, score_func="sigmoid", score_bias=True),
        experts=ExpertsConfig(hidden_dim=8),
    )
    layer = MoELayer(cfg)
    before = copy.deepcopy(layer.state_dict())
    layer.eval()
    layer(torch.randn(2, 5, 6))
    assert torch.all(layer.tokens_per_expert == 0)
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name

    layer.train()
    _, s1 = layer(torch.randn(2, 5, 6))
    _, s2 = layer(torch.randn(2, 5, 6))
    torch.testing.assert_close(layer.tokens_per_expert, s1.tokens_per_expert + s2.tokens_per_expert)
    expected_bias = bias_update(layer.router.score_bias.clone(), layer.tokens_per_expert.clone(), 0.1)
    layer.update_bias(0.1)
    torch.testing.assert_close(layer.router.score_bias, expected_bias)
    assert torch.all(layer.tokens_per_expert == 0)


def test_stats_count_routed_copies():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(dim=6, router=RouterConfig(num_experts=5, top_k=2), experts=ExpertsConfig(hidden_dim=4)))
    x = torch.randn(30, 6)
    _, stats = layer(x)
    ids = layer.router(x).expert_ids_N
    torch.testing.assert_close(stats.tokens_per_expert, torch.bincount(ids, minlength=5).float())
    assert stats.num_tokens.item() == 30
    assert set(stats.losses) == {"load_balance", "z_loss"}  # no sequence loss for (T, D) input


def test_bfloat16_layer_runs_with_float32_router_and_matches_float32():
    torch.manual_seed(0)
    cfg = MoEConfig(dim=16, router=RouterConfig(num_experts=4, top_k=2), experts=ExpertsConfig(hidden_dim=32))
    layer = MoELayer(cfg)
    x = torch.randn(2, 8, 16)
    y32, _ = layer(x)
    layer_bf16 = copy.deepcopy(layer).to(torch.bfloat16)
    y16, stats = layer_bf16(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    assert stats.losses["load_balance"].dtype == torch.float32
    torch.testing.assert_close(y16.float(), y32, rtol=5e-2, atol=5e-3)
    y16.float().sum().backward()
    assert layer_bf16.experts.w1.grad.dtype == torch.bfloat16


def test_grouped_experts_forward_on_sorted_rows_matches_per_expert():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(dim=6, router=RouterConfig(num_experts=3, top_k=1), experts=ExpertsConfig(hidden_dim=4)))
    experts = layer.experts.double()
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    counts = [3, 0, 4]
    assert torch.autograd.gradcheck(lambda x: experts(x, counts), (x,))
    per_expert = experts.unbind_experts()
    expected = torch.cat([experts.expert_forward(x[:3], per_expert[0]), experts.expert_forward(x[3:], per_expert[2])])
    torch.testing.assert_close(experts(x, counts), expected)


def test_autocast_bfloat16_runs_experts_in_bfloat16_with_float32_master_grads():
    torch.manual_seed(0)
    cfg = MoEConfig(dim=16, router=RouterConfig(num_experts=4, top_k=2), experts=ExpertsConfig(hidden_dim=32),
                    shared_hidden_dim=8)  # fmt: skip
    layer = MoELayer(cfg)
    x = torch.randn(2, 8, 16)
    y32, _ = layer(x)
    y32.sum().backward()
    grad32 = layer.experts.w1.grad.clone()
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, stats = layer(x)
    y16.float().sum().backward()
    assert stats.losses["load_balance"].dtype == torch.float32  # router stays float32
    assert layer.experts.w1.grad.dtype == torch.float32
    torch.testing.assert_close(y16.float(), y32, rtol=5e-2, atol=2e-2)
    torch.testing.assert_close(layer.experts.w1.grad, grad32, rtol=5e-2, atol=2e-2)


def test_loop_oracle_under_autocast_matches_grouped_in_dtype_and_value():
    torch.manual_seed(0)
    cfg = MoEConfig(dim=16, router=RouterConfig(num_experts=4, top_k=2), experts=ExpertsConfig(hidden_dim=32))
    grouped, loop = _pair(cfg, dtype=torch.float32)
    x = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (yg, _), (yl, _) = grouped(x), loop(x)
    assert yg.dtype == yl.dtype == torch.bfloat16
    torch.testing.assert_close(yl, yg, rtol=2e-2, atol=2e-2)


@settings(max_examples=40, deadline=None)
@given(
    num_experts=st.integers(1, 8),
    top_k=st.integers(1, 3),
    dim=st.sampled_from([4, 8, 12]),  # float32 rows must be 16-byte multiples for torch._grouped_mm
    hidden=st.sampled_from([4, 12]),
    tokens=st.integers(1, 24),
    capacity_factor=st.sampled_from([None, 0.5, 1.0]),
    shared=st.sampled_from([0, 6]),
    ffn=st.sampled_from([("silu", True), ("relu", False)]),
    padded=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_grouped_mm_kernel_matches_loop(
    num_experts, top_k, dim, hidden, tokens, capacity_factor, shared, ffn, padded, seed
):
    # torch._grouped_mm runs on the CPU too (float32), so the CUDA kernel's code path, including the
    # dispatch that keeps dropped copies in the last expert's block with weight zero, is tested here.
    top_k = min(top_k, num_experts)
    torch.manual_seed(seed)
    cfg = MoEConfig(
        dim=dim,
        router=RouterConfig(num_experts=num_experts, top_k=top_k),
        experts=ExpertsConfig(hidden_dim=hidden, activation=ffn[0], gated=ffn[1], kernel="grouped_mm"),
        capacity_factor=capacity_factor,
        shared_hidden_dim=shared,
    )
    grouped, loop = _pair(cfg, dtype=torch.float32)
    x = torch.randn(2, tokens, dim)
    mask = torch.rand(2, tokens) > 0.3 if padded else None
    if capacity_factor is not None and padded:
        assert not grouped.experts.needs_host_counts(x)
    xg, xl = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (yg, sg), (yl, sl) = grouped(xg, mask), loop(xl, mask)
    torch.testing.assert_close(yg, yl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sg.kept_per_expert, sl.kept_per_expert)
    grad = torch.randn_like(yg)
    ((yg * grad).sum() + sg.losses["load_balance"]).backward()
    ((yl * grad).sum() + sl.losses["load_balance"]).backward()
    torch.testing.assert_close(xg.grad, xl.grad, rtol=1e-4, atol=1e-5)
    for (name, pg), (_, pl) in zip(grouped.named_parameters(), loop.named_parameters(), strict=True):
        expected = torch.zeros_like(pg) if pl.grad is None else pl.grad
        torch.testing.assert_close(pg.grad, expected, rtol=1e-4, atol=1e-5, msg=name)


def test_kernel_auto_picks_fused_on_cpu_and_grouped_mm_needs_no_host_counts():
    cfg = MoEConfig(dim=8, router=RouterConfig(num_experts=4, top_k=2), experts=ExpertsConfig(hidden_dim=8))
    layer = MoELayer(cfg)
    x = torch.randn(5, 8)
    assert layer.experts.needs_host_counts(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.experts.needs_host_counts(x)
    forced = MoELayer(MoEConfig(**{**cfg.__dict__, "experts": ExpertsConfig(hidden_dim=8, kernel="grouped_mm")}))
    assert not forced.experts.needs_host_counts(x)


@pytest.mark.parametrize(
    ("capacity_factor", "scope", "kind"),
    [(None, "batch", "token_choice"), (1.25, "batch", "token_choice"), (0.75, "sequence", "token_choice"),
     (1.0, "batch", "expert_choice")],
)  # fmt: skip
def test_grouped_mm_layer_reads_nothing_back_but_the_cpu_counts_check(capacity_factor, scope, kind):
    # CPU stand-in for the CUDA "no host sync" rule: dynamo breaks its graph at every value read back to the
    # host. With kernel="grouped_mm" routing, capacity dropping (padding mask included) and dispatch must
    # trace whole; the one host read allowed is the counts check that CPU tensors get and CUDA ones skip.
    # Expert choice with padding too: its top-k is sized by the capacity of all tokens, not the real count.
    torch.manual_seed(0)
    cfg = MoEConfig(
        dim=16,
        router=RouterConfig(num_experts=4, top_k=2, kind=kind),
        experts=ExpertsConfig(hidden_dim=16, kernel="grouped_mm"),
        capacity_factor=capacity_factor,
        capacity_scope=scope,
    )
    layer = MoELayer(cfg).to(torch.bfloat16)  # torch._grouped_mm traces in bfloat16 only
    x = torch.randn(2, 8, 16, dtype=torch.bfloat16)
    mask = torch.rand(2, 8) > 0.3
    with torch._dynamo.config.patch(capture_scalar_outputs=False, capture_dynamic_output_shape_ops=False):
        explanation = torch._dynamo.explain(layer)(x, mask)
    torch._dynamo.reset()
    reads = {reason.user_stack[-1].name for reason in explanation.break_reasons}
    assert reads == {"_counts_list"}, [reason.reason for reason in explanation.break_reasons]


def _cuda_layer_pair(kernel: str, capacity_factor: float | None):
    torch.manual_seed(0)
    cfg = MoEConfig(
        dim=64,
        router=RouterConfig(num_experts=8, top_k=2, score_func="sigmoid", n_group=4, topk_group=2),
        experts=ExpertsConfig(hidden_dim=32, kernel=kernel),
        capacity_factor=capacity_factor,
        shared_hidden_dim=32,
    )
    grouped, loop = _pair(cfg, dtype=torch.float32)
    return grouped.cuda(), loop.cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_cuda_bf16_grouped_mm_matches_loop(capacity_factor):
    grouped, loop = _cuda_layer_pair("auto", capacity_factor)
    x = torch.randn(4, 64, 64, device="cuda")
    mask = torch.ones(4, 64, dtype=torch.bool, device="cuda")
    mask[1:, 50:] = False  # padding: the capacity comes from a real-token count that stays on the device
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert not grouped.experts.needs_host_counts(x)
        torch.cuda.set_sync_debug_mode("error")  # routing, capacity dropping and dispatch never wait
        try:
            yg, _ = grouped(x, mask)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        yl, _ = loop(x, mask)
    torch.testing.assert_close(yg.float(), yl.float(), rtol=2e-2, atol=2e-2)
    yg.float().square().sum().backward()
    yl.float().square().sum().backward()
    torch.testing.assert_close(grouped.experts.w1.grad, loop.experts.w1.grad, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
def test_cuda_bf16_expert_choice_with_padding_reads_nothing_back():
    # Expert choice with a padding mask: the top-k is sized by the capacity of all tokens (a host size) and
    # the real tokens' capacity stays on the device.
    torch.manual_seed(0)
    cfg = MoEConfig(
        dim=64,
        router=RouterConfig(num_experts=8, top_k=2, kind="expert_choice"),
        experts=ExpertsConfig(hidden_dim=32),
        capacity_factor=1.0,
    )
    grouped, loop = (layer.cuda() for layer in _pair(cfg, dtype=torch.float32))
    x = torch.randn(4, 64, 64, device="cuda")
    mask = torch.ones(4, 64, dtype=torch.bool, device="cuda")
    mask[1:, 40:] = False
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.cuda.set_sync_debug_mode("error")
        try:
            yg, _ = grouped(x, mask)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        yl, _ = loop(x, mask)
    torch.testing.assert_close(yg.float(), yl.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_cuda_float32_fused_kernel_matches_loop():
    grouped, loop = _cuda_layer_pair("fused", None)
    x = torch.randn(4, 64, 64, device="cuda")
    (yg, _), (yl, _) = grouped(x), loop(x)
    torch.testing.assert_close(yg, yl, rtol=1e-4, atol=1e-5)


def test_grouped_mm_kernel_rejects_unaligned_widths():
    cfg = MoEConfig(dim=6, router=RouterConfig(num_experts=2), experts=ExpertsConfig(hidden_dim=8, kernel="grouped_mm"))
    with pytest.raises(ValueError, match="dim=6"):
        MoELayer(cfg)(torch.randn(3, 6))


def test_padded_expert_blocks_change_no_output_or_gradient():
    from lightning_moe.nn.dispatch import pad_expert_blocks
    from lightning_moe.nn.experts import grouped_expert_mlp, padded_counts

    torch.manual_seed(0)
    experts = MoELayer(
        MoEConfig(dim=6, router=RouterConfig(num_experts=4, top_k=2), experts=ExpertsConfig(hidden_dim=5))
    ).experts.double()
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    expert_ids = torch.tensor([0, 0, 0, 1, 3, 3, 3, 3, 3, 3, 3])  # expert 2 gets nothing
    token_ids = torch.randint(0, 9, (11,))
    weights = torch.rand(11, dtype=torch.float64, requires_grad=True)
    counts = torch.bincount(expert_ids, minlength=4)
    counts_p = torch.tensor(padded_counts(counts.tolist(), align=4))
    assert counts_p.tolist() == [4, 4, 0, 8]
    rows_p, weights_p = pad_expert_blocks(token_ids, weights, expert_ids, counts, counts_p)
    args = (experts.w1, experts.w3, experts.w2, "silu")
    y = grouped_expert_mlp(x, counts, *args, token_ids, weights)
    y_p = grouped_expert_mlp(x, counts_p, *args, rows_p, weights_p)
    _assert_same_values_and_grads(y_p, y, (x, weights, experts.w1, experts.w3, experts.w2))


def test_padding_copies_repeat_a_token_their_expert_already_computes():
    from lightning_moe.nn.dispatch import pad_expert_blocks

    token_ids = torch.tensor([4, 7, 2, 5, 5, 9])
    expert_ids = torch.tensor([0, 0, 1, 2, 2, 2])
    weights = torch.rand(6, dtype=torch.float64)
    rows_p, weights_p = pad_expert_blocks(
        token_ids, weights, expert_ids, torch.tensor([2, 1, 3]), torch.tensor([4, 4, 4])
    )
    assert rows_p.tolist() == [4, 7, 4, 4, 2, 2, 2, 2, 5, 5, 9, 5]
    assert weights_p[[2, 3, 5, 6, 7, 11]].eq(0).all()
    assert weights_p[[0, 1, 4, 8, 9, 10]].equal(weights)


def test_an_overflowing_expert_never_reaches_a_token_not_routed_to_it():
    # Under float16 autocast the CPU pads every expert block to 16 rows; padding copies of a token the expert does
    # not see (token 0 here: inf under expert 1) would add 0 * inf = nan to it.
    outputs = {}
    for dispatch in ("grouped", "loop"):
        cfg = MoEConfig(
            dim=4,
            router=RouterConfig(num_experts=2, top_k=1),
            experts=ExpertsConfig(hidden_dim=4, gated=False, activation="relu"),
            dispatch=dispatch,
        )
        layer = MoELayer(cfg)
        with torch.no_grad():
            layer.router.gate.weight.copy_(torch.tensor([[1.0] * 4, [-1.0] * 4]))  # positive x: expert 0
            layer.experts.w1.copy_(torch.stack([torch.full((4, 4), 0.01), torch.full((4, 4), 2000.0)]))
            layer.experts.w2.copy_(torch.stack([torch.full((4, 4), 0.01), torch.full((4, 4), 1.0)]))
        x = torch.full((5, 4), -0.01)
        x[0] = 10.0  # expert 1 on it: 4 * 10 * 2000 = 80000, past float16's largest value
        with torch.autocast("cpu", dtype=torch.float16):
            outputs[dispatch] = layer(x)[0].float()
    assert torch.isfinite(outputs["grouped"]).all()
    torch.testing.assert_close(outputs["grouped"], outputs["loop"])


@pytest.mark.parametrize("dispatch", ["grouped", "loop"])
def test_non_finite_padding_reaches_no_output_loss_or_gradient(dispatch):
    # A fully masked attention row can leave nan in a padding position: the layer must read it as nothing.
    torch.manual_seed(0)
    cfg = MoEConfig(
        dim=4,
        router=RouterConfig(num_experts=4, top_k=2, init_std=0.5),
        experts=ExpertsConfig(hidden_dim=8),
        shared_hidden_dim=4,
        dispatch=dispatch,
    )
    layer = MoELayer(cfg).double()
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 0] = False
    y_ref, stats_ref = layer(x, mask)
    x[0, 0] = float("nan")
    y, stats = layer(x, mask)
    torch.testing.assert_close(y, y_ref)
    assert y[0, 0].eq(0).all()
    for name, value in stats_ref.losses.items():
        torch.testing.assert_close(stats.losses[name], value)
    torch.testing.assert_close(stats.router_entropy, stats_ref.router_entropy)
    (y.sum() + sum(stats.losses.values())).backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def test_an_integer_mask_counts_its_nonzero_entries_as_real_tokens():
    torch.manual_seed(0)
    cfg = MoEConfig(
        dim=4,
        router=RouterConfig(num_experts=2, top_k=1, init_std=1.0),
        experts=ExpertsConfig(hidden_dim=4),
        capacity_factor=1.0,
        capacity_scope="sequence",
    )
    layer = MoELayer(cfg)
    x = torch.randn(1, 8, 4)
    ones = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]])
    y_bool, stats_bool = layer(x, ones.bool())
    y_two, stats_two = layer(x, 2 * ones)
    torch.testing.assert_close(y_two, y_bool)
    assert stats_two.kept_per_expert.equal(stats_bool.kept_per_expert)
    for name, value in stats_bool.losses.items():
        torch.testing.assert_close(stats_two.losses[name], value)


def test_an_empty_batch_gives_an_empty_output():
    layer = MoELayer(MoEConfig(dim=4, router=RouterConfig(num_experts=4, top_k=2), experts=ExpertsConfig(hidden_dim=8)))
    for shape in [(0, 5, 4), (2, 0, 4), (0, 4)]:
        y, stats = layer(torch.randn(shape))
        assert y.shape == shape and int(stats.num_tokens) == 0


def _assert_same_values_and_grads(y_p, y, inputs):
    """``y_p`` equals ``y`` (float64, to 1e-12), and so do their gradients into every input."""
    torch.testing.assert_close(y_p, y, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(y)
    grads = torch.autograd.grad((y * grad).sum(), inputs)
    grads_p = torch.autograd.grad((y_p * grad).sum(), inputs)
    for g, g_p in zip(grads, grads_p, strict=True):
        torch.testing.assert_close(g_p, g, rtol=1e-12, atol=1e-12)


def test_bfloat16_on_cpu_pads_expert_blocks_to_the_row_alignment(monkeypatch, threads):
    import lightning_moe.nn.experts as experts_module

    threads(2)
    seen = []
    original = experts_module.grouped_expert_mlp
    monkeypatch.setattr(
        experts_module,
        "grouped_expert_mlp",
        lambda x, counts, *a, **k: seen.append(list(counts)) or original(x, counts, *a, **k),
    )
    layer = MoELayer(
        MoEConfig(dim=16, router=RouterConfig(num_experts=4, top_k=2), experts=ExpertsConfig(hidden_dim=16))
    )
    x = torch.randn(37, 16)
    _, stats = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    routed = stats.tokens_per_expert.long().tolist()
    assert sum(routed) == 74
    # Float32 on two threads: pairs by load, no row alignment. bf16 with autograd's casts (nothing keeps memory
    # here): pairs of neighbours, rounded to the row alignment.
    assert seen[0] == experts_module.padded_counts(routed, group=2, by_load=True, max_rows=experts_module.PAD_MAX_ROWS)
    assert seen[1] == experts_module.padded_counts(routed, align=16, group=2)
    assert all(c % experts_module.ROW_ALIGNMENT == 0 for c in seen[1]) and sum(seen[1]) >= 74


def test_padded_counts_by_hand():
    from lightning_moe.nn.experts import PAD_MAX_ROWS, padded_counts

    counts = [60, 70, 3, 100, 0, 0, 600, 610, 5]
    # Pairs: 60/70 pads (10 rows on 130), 3/100 would add 97 rows on 103, 0/0 is empty, 600/610 is
    # above PAD_MAX_ROWS rows (large matmuls gain little), and the lone last expert has no partner.
    assert PAD_MAX_ROWS < 610
    assert padded_counts(counts, group=2) == [70, 70, 3, 100, 0, 0, 600, 610, 5]
    assert padded_counts(counts, align=16, group=1) == [64, 80, 16, 112, 0, 0, 608, 624, 16]
    assert padded_counts(counts, align=16, group=2) == [80, 80, 16, 112, 0, 0, 608, 624, 16]
    assert padded_counts([8, 9, 10, 11], group=4) == [11] * 4  # 6 rows on 38
    assert padded_counts(counts) == counts


def test_padded_counts_by_load_and_batch_order_by_hand():
    from lightning_moe.nn.experts import PAD_MAX_ROWS, PAD_MAX_ROWS_BY_LOAD, batch_order, padded_counts

    counts = [60, 3, 70, 100, 0, 64, 600, 5]
    # By index, pairs (60, 3) (70, 100) (0, 64) (600, 5): only 70/100 pads (30 rows on 170).
    assert padded_counts(counts, group=2) == [60, 3, 100, 100, 0, 64, 600, 5]
    # By load, pairs of experts 4/1 (0, 3), 7/0 (5, 60), 5/2 (64, 70), 3/6 (100, 600): 3 on 3, 55 on 65 and 500
    # on 700 rows are too much padding; 64/70 pads 6 rows on 134.
    assert PAD_MAX_ROWS < 600
    padded = padded_counts(counts, group=2, by_load=True)
    assert padded == [60, 3, 70, 100, 0, 70, 600, 5]
    # By count, ties by index: the padded pair 2/5 is adjacent.
    assert batch_order(padded) == [4, 1, 7, 0, 2, 5, 3, 6]
    assert batch_order([1, 2, 2, 600, 700]) is None  # already in that order
    # Runs of 4 by load: 8..11 pads to 11 (6 rows on 38), 29..32 to 32 (6 on 122).
    assert padded_counts([8, 30, 9, 31, 10, 29, 11, 32], group=4, by_load=True) == [11, 32] * 4
    # By index the runs mix both loads: 46 rows on 78 and on 82, too much, so nothing pads.
    assert padded_counts([8, 30, 9, 31, 10, 29, 11, 32], group=4) == [8, 30, 9, 31, 10, 29, 11, 32]
    # Large blocks pad in runs by load up to PAD_MAX_ROWS_BY_LOAD rows, by index only up to PAD_MAX_ROWS.
    assert PAD_MAX_ROWS < 1000 <= PAD_MAX_ROWS_BY_LOAD
    assert padded_counts([1000, 990], group=2, by_load=True) == [1000, 1000]
    assert padded_counts([1000, 990], group=2) == [1000, 990]


def test_expert_batches_by_hand():
    from lightning_moe.nn.experts import expert_batches

    counts = [4, 4, 4, 0, 4, 3, 3, 5]
    # (first expert, experts, rows each, first row): runs of equal non-zero counts; the empty expert breaks one.
    assert expert_batches(counts) == [(0, 3, 4, 0), (4, 1, 4, 12), (5, 2, 3, 16), (7, 1, 5, 22)]
    assert expert_batches(counts, max_rows=8) == [
        (0, 2, 4, 0),
        (2, 1, 4, 8),
        (4, 1, 4, 12),
        (5, 2, 3, 16),
        (7, 1, 5, 22),
    ]
    # At most one expert per batch: every non-empty expert alone, rows still counted past the empty one.
    singles = [(0, 1, 4, 0), (1, 1, 4, 4), (2, 1, 4, 8), (4, 1, 4, 12), (5, 1, 3, 16), (6, 1, 3, 19), (7, 1, 5, 22)]
    assert expert_batches(counts, max_experts=1) == singles


def test_expert_batches_of_spaced_experts_and_their_selectors_by_hand():
    from lightning_moe.nn.experts import _expert_selectors, expert_batches

    # Positions hold experts 1, 4, 7, 9, 2, 0 (an order by load), all with 4 rows: a batch continues only while
    # the indices rise in equal steps: 1, 4, 7 (step 3), then 9 (step 2) starts one, 2 (falls) another, 0 too.
    order = [1, 4, 7, 9, 2, 0]
    batches = expert_batches([4] * 6, experts=order)
    assert batches == [(0, 3, 4, 0), (3, 1, 4, 12), (4, 1, 4, 16), (5, 1, 4, 20)]
    assert expert_batches([4] * 6) == [(0, 6, 4, 0)]  # by position only: one batch
    selectors = _expert_selectors(order, batches, torch.device("cpu"))
    assert selectors == [slice(1, 8, 3), slice(9, 10, 1), slice(2, 3, 1), slice(0, 1, 1)]
    weights = torch.arange(10.0).view(10, 1, 1).expand(10, 2, 3)
    assert weights[selectors[0]][:, 0, 0].tolist() == [1.0, 4.0, 7.0]  # a view of the spaced experts
    # Without the spacing rule (the kernel casting into run order) a batch may hold any experts: an index.
    (index,) = _expert_selectors([1, 4, 9], [(0, 3, 4, 0)], torch.device("cpu"))
    assert index.tolist() == [1, 4, 9]


def _six_experts_case(expert_ids):
    """Float64 experts (6, dim 6, hidden 5), 12 tokens, and the copies of ``expert_ids`` (24) with their tokens
    and weights; plus the experts' output computed one by one with plain tensor ops."""
    torch.manual_seed(0)
    experts = MoELayer(
        MoEConfig(dim=6, router=RouterConfig(num_experts=6, top_k=2), experts=ExpertsConfig(hidden_dim=5))
    ).experts.double()
    x = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    token_ids = torch.randint(0, 12, (24,))
    weights = torch.rand(24, dtype=torch.float64, requires_grad=True)
    y = torch.zeros_like(x)
    for e, w in enumerate(experts.unbind_experts()):
        mine = expert_ids == e
        y = y.index_add(0, token_ids[mine], experts.expert_forward(x[token_ids[mine]], w) * weights[mine, None])
    return experts, x, token_ids, weights, y


def test_expert_batches_and_their_padding_change_no_output_or_gradient():
    # The batched (bmm) kernel on padded runs against the same kernel expert by expert, in float64.
    from lightning_moe.nn.dispatch import pad_expert_blocks
    from lightning_moe.nn.experts import grouped_expert_mlp, padded_counts

    expert_ids = torch.tensor([0] * 4 + [1] * 5 + [2] * 3 + [3] * 3 + [5] * 9)  # expert 4 gets nothing
    experts, x, token_ids, weights, y = _six_experts_case(expert_ids)
    counts = torch.bincount(expert_ids, minlength=6)
    counts_p = torch.tensor(padded_counts(counts.tolist(), group=2))
    assert counts_p.tolist() == [5, 5, 3, 3, 0, 9]
    rows_p, weights_p = pad_expert_blocks(token_ids, weights, expert_ids, counts, counts_p)
    args = (experts.w1, experts.w3, experts.w2, "silu")
    y_p = grouped_expert_mlp(x, counts_p, *args, rows_p, weights_p)
    _assert_same_values_and_grads(y_p, y, (x, weights, experts.w1, experts.w3, experts.w2))


def test_copies_in_batch_order_change_no_output_or_gradient():
    # Copies sorted in the by-load order, padded in runs by load: the kernel reads the weights of the pair 0/5
    # as one strided view and writes their gradients through a copy. Against the experts one by one, float64.
    from lightning_moe.nn.dispatch import pad_expert_blocks
    from lightning_moe.nn.experts import batch_order, grouped_expert_mlp, padded_counts

    expert_ids = torch.tensor([0] * 4 + [1] * 9 + [2] * 3 + [3] * 5 + [5] * 3)  # expert 4 gets nothing
    experts, x, token_ids, weights, y = _six_experts_case(expert_ids)
    counts = torch.bincount(expert_ids, minlength=6).tolist()
    padded = padded_counts(counts, group=2, by_load=True)
    # Pairs by load: experts 4/2 (0, 3), 5/0 (3, 4), 3/1 (5, 9): only 5/0 pads (1 row on 7), a run whose
    # experts are not adjacent in the weights.
    assert padded == [4, 9, 3, 5, 0, 4]
    order = batch_order(padded)
    assert order == [4, 2, 0, 5, 3, 1]
    rank = torch.empty(6, dtype=torch.long)
    rank[order] = torch.arange(6)
    slots = rank[expert_ids]
    sort = torch.argsort(slots, stable=True)
    in_order = torch.tensor([counts[e] for e in order]), torch.tensor([padded[e] for e in order])
    rows_p, weights_p = pad_expert_blocks(token_ids[sort], weights[sort], slots[sort], *in_order)
    args = (experts.w1, experts.w3, experts.w2, "silu")
    y_p = grouped_expert_mlp(x, padded, *args, rows_p, weights_p, expert_order=order)
    _assert_same_values_and_grads(y_p, y, (x, weights, experts.w1, experts.w3, experts.w2))
    with pytest.raises(ValueError, match="expert_order"):
        grouped_expert_mlp(x, padded, *args, rows_p, weights_p, expert_order=[0, 1, 2, 3, 4, 4])


def test_bfloat16_layer_with_kept_memory_batches_experts_by_load(monkeypatch, threads):
    # Under autocast with kept memory the kernel casts the weights in the by-load order and converts their
    # gradients back expert by expert: the same layer without kept memory (autograd casts, runs by index) must
    # agree to bf16 rounding, output and every gradient (a misplaced expert would be off by O(1)).
    import lightning_moe.nn.experts as experts_module
    from lightning_moe.nn import reuse_expert_grad_memory

    threads(2)
    orders = []
    original = experts_module.GroupedExperts.block_order
    monkeypatch.setattr(
        experts_module.GroupedExperts,
        "block_order",
        lambda self, x, padded: orders.append(original(self, x, padded)) or orders[-1],
    )
    torch.manual_seed(0)
    cfg = MoEConfig(dim=32, router=RouterConfig(num_experts=16, top_k=4), experts=ExpertsConfig(hidden_dim=16))
    kept, fresh = MoELayer(cfg), MoELayer(cfg)
    fresh.load_state_dict(kept.state_dict())
    assert reuse_expert_grad_memory(kept) == 1
    x = torch.randn(2, 200, 32)
    grad = torch.randn(2, 200, 32)
    outputs = []
    for layer in (kept, fresh):
        xl = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = layer(xl)
        (y.float() * grad).sum().backward()
        outputs.append((y.float(), xl.grad, {n: p.grad for n, p in layer.named_parameters()}))
    assert orders[0] is not None and orders[0] != sorted(orders[0])  # the kept-memory layer sorted by load
    assert orders[1] is None  # autograd's casts: runs of neighbours
    kept(x)  # float32 on two threads: pairs by load, read as strided views
    assert orders[2] is not None and orders[2] != orders[0]
    (y_k, dx_k, grads_k), (y_f, dx_f, grads_f) = outputs
    torch.testing.assert_close(y_k, y_f, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx_k, dx_f, rtol=2e-2, atol=2e-2)
    for name, g in grads_k.items():
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, grads_f[name], rtol=2e-2, atol=2e-2, msg=name)


def _grouped_and_loop(seed=0):
    from lightning_moe.nn import reuse_expert_grad_memory

    torch.manual_seed(seed)
    cfg = MoEConfig(dim=8, router=RouterConfig(num_experts=4, top_k=2), experts=ExpertsConfig(hidden_dim=8))
    grouped, loop = _pair(cfg, dtype=torch.float64)
    assert reuse_expert_grad_memory(grouped) == 1
    return grouped, loop


def _backward(layer, x):
    y, stats = layer(x)
    (y.square().sum() + stats.losses["load_balance"]).backward()


def test_weight_gradient_memory_is_reused_across_steps_and_stays_correct():
    grouped, loop = _grouped_and_loop()
    x1, x2 = torch.randn(2, 11, 8, dtype=torch.float64), torch.randn(2, 11, 8, dtype=torch.float64)
    _backward(grouped, x1)
    kept = grouped.experts.grad_buffers._buffers["w1"][0]
    assert grouped.experts.w1.grad.data_ptr() == kept.data_ptr()  # autograd took the kept memory as .grad
    grouped.zero_grad(set_to_none=True)
    _backward(grouped, x2)
    assert grouped.experts.w1.grad.data_ptr() == kept.data_ptr()  # and again: no fresh allocation
    _backward(loop, x2)
    for name in ("w1", "w2", "w3"):
        torch.testing.assert_close(getattr(grouped.experts, name).grad, getattr(loop.experts, name).grad)


@pytest.mark.parametrize("zero", ["accumulate", "zero_in_place"])
def test_weight_gradients_held_as_grad_are_never_overwritten(zero):
    # Accumulating over micro-batches, or zeroing in place (set_to_none=False), keeps .grad alive: its memory
    # must not be handed out again.
    grouped, loop = _grouped_and_loop(1)
    xs = [torch.randn(2, 9, 8, dtype=torch.float64) for _ in range(3)]
    for x in xs:
        if zero == "zero_in_place":
            grouped.zero_grad(set_to_none=False)
            loop.zero_grad(set_to_none=False)
        _backward(grouped, x)
        _backward(loop, x)
        for name in ("w1", "w2", "w3"):
            torch.testing.assert_close(getattr(grouped.experts, name).grad, getattr(loop.experts, name).grad)


def _bf16_kept_and_fresh(seed):
    from lightning_moe.nn import reuse_expert_grad_memory

    torch.manual_seed(seed)
    cfg = MoEConfig(dim=16, router=RouterConfig(num_experts=4, top_k=2), experts=ExpertsConfig(hidden_dim=32))
    kept = MoELayer(cfg)
    fresh = copy.deepcopy(kept)
    reuse_expert_grad_memory(kept)
    return kept, fresh


def _bf16_loss(layer, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(x)
    return y.float().square().sum()


def _assert_same_expert_grads(a, b):
    for name in ("w1", "w2", "w3"):
        grad_a, grad_b = getattr(a.experts, name).grad, getattr(b.experts, name).grad
        assert grad_a.dtype == torch.float32 and torch.equal(grad_a, grad_b), name


def test_autocast_weight_casts_go_to_kept_memory_and_match_fresh_casts():
    # Under bf16 autocast the kernel casts the stacked weights to bf16 on kept memory and writes their float32
    # gradients there block by block: the same bits as autograd's casts, the same memory every step, and the
    # float32 gradient is .grad.
    kept, fresh = _bf16_kept_and_fresh(0)
    first = None
    for _ in range(3):
        x = torch.randn(2, 11, 16)
        for layer in (kept, fresh):
            layer.zero_grad(set_to_none=True)
            _bf16_loss(layer, x).backward()
        _assert_same_expert_grads(kept, fresh)
        buffers = {key: buffer.data_ptr() for key, (buffer, _) in kept.experts.grad_buffers._buffers.items()}
        assert set(buffers) == {f"{name}.{kind}" for name in ("w1", "w2", "w3") for kind in ("cast", "grad")}
        assert kept.experts.grad_buffers._buffers["w2.cast"][0].dtype == torch.bfloat16
        assert kept.experts.w2.grad.data_ptr() == buffers["w2.grad"]
        first = first or buffers
        assert buffers == first  # nothing allocated afresh after the first step
    # Per weight: the bf16 copy and the float32 gradient (no bf16 gradient of the whole weight).
    weight_numel = kept.experts.w1.numel()
    assert kept.experts.grad_buffers.nbytes == 3 * weight_numel * (2 + 4)


def test_kept_weight_casts_are_not_reused_while_a_graph_holds_them():
    # Two forwards before one backward, the weights changed in between: the first graph must keep the bf16
    # copy of the weights it ran with.
    kept, fresh = _bf16_kept_and_fresh(1)
    x1, x2 = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    for layer in (kept, fresh):
        first = _bf16_loss(layer, x1)
        with torch.no_grad():
            layer.experts.w1.mul_(2)
        (first + _bf16_loss(layer, x2)).backward()
    _assert_same_expert_grads(kept, fresh)


def test_layer_with_kept_gradient_memory_deep_copies_and_pickles():
    import pickle

    grouped, _ = _grouped_and_loop()
    _backward(grouped, torch.randn(3, 8, dtype=torch.float64))
    copied = copy.deepcopy(grouped)
    restored = pickle.loads(pickle.dumps(grouped))
    for layer in (copied, restored):
        assert layer.experts.grad_buffers._buffers == {}  # memory, not state
        layer.zero_grad(set_to_none=True)
        _backward(layer, torch.randn(3, 8, dtype=torch.float64))
        assert layer.experts.w1.grad.data_ptr() != grouped.experts.w1.grad.data_ptr()


def test_grad_memory_reuse_is_off_by_default_and_can_be_turned_off():
    from lightning_moe.nn import reuse_expert_grad_memory

    layer = MoELayer(MoEConfig(dim=8, router=RouterConfig(num_experts=4), experts=ExpertsConfig(hidden_dim=8)))
    assert layer.experts.grad_buffers is None
    reuse_expert_grad_memory(layer)
    assert layer.experts.grad_buffers is not None
    reuse_expert_grad_memory(layer, enabled=False)
    assert layer.experts.grad_buffers is None


def test_grad_buffers_keep_only_cpu_memory():
    from lightning_moe.nn.experts import GradBuffers

    buffers = GradBuffers()
    cpu = torch.empty(4, 3)
    first = buffers.empty_like("w", cpu)
    del first
    assert buffers.empty_like("w", cpu).data_ptr() == buffers._buffers["w"][0].data_ptr()  # reused once free
    meta = torch.empty(4, 3, device="meta")  # any non-CPU device: a fresh tensor, nothing kept
    assert buffers.empty_like("m", meta).device.type == "meta" and "m" not in buffers._buffers


@pytest.mark.parametrize("kind", ["token_choice", "expert_choice"])
def test_batched_experts_match_one_expert_at_a_time(kind, threads):
    # Expert choice gives every expert the same row count (one batch of all experts); token choice gets
    # padded pairs. Both against batch_experts=False, which runs and pads nothing together.
    threads(2)
    torch.manual_seed(0)
    cfg = MoEConfig(
        dim=8,
        router=RouterConfig(num_experts=6, top_k=2, kind=kind),
        experts=ExpertsConfig(hidden_dim=8),
        capacity_factor=1.0 if kind == "expert_choice" else None,
    )
    batched, single = _pair(cfg)
    single.experts.config = dataclasses.replace(cfg.experts, batch_experts=False)
    x = torch.randn(40, 8, dtype=torch.float64)
    assert single.experts.padded_counts(x, [3, 5, 4]) == [3, 5, 4]
    # Two threads: pairs by load (4/5 pads, 0/3 would add 3 rows on 3); four threads: runs of four neighbours.
    assert batched.experts.padded_counts(x, [3, 5, 4, 0]) == [3, 5, 5, 0]
    assert batched.experts.padded_counts(x, [4, 5, 4, 5]) == [4, 5, 4, 5]  # equal pairs by load: no padding
    assert batched.experts.runs_by_load(x)
    assert not copy.deepcopy(batched).bfloat16().experts.runs_by_load(x.bfloat16())  # bf16 weights: neighbours
    threads(4)
    assert not batched.experts.runs_by_load(x)
    assert batched.experts.padded_counts(x, [4, 5, 4, 5]) == [5, 5, 5, 5]
    threads(2)
    xb, xs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (yb, _), (ys, _) = batched(xb), single(xs)
    torch.testing.assert_close(yb, ys, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(yb)
    (yb * grad).sum().backward()
    (ys * grad).sum().backward()
    torch.testing.assert_close(xb.grad, xs.grad, rtol=1e-12, atol=1e-12)
    for (name, pb), (_, ps) in zip(batched.named_parameters(), single.named_parameters(), strict=True):
        torch.testing.assert_close(pb.grad, ps.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_balancing_buffers_stay_float32_when_the_layer_is_cast_to_bf16():
    # Lightning's bf16-true casts the module with .to(bfloat16). The bias takes steps of gamma = 1e-3 and the
    # counter counts past 256: in bf16 steps round away at |b| >= 0.5 and counts round, so both stay float32.
    cfg = MoEConfig(
        dim=8,
        router=RouterConfig(num_experts=4, top_k=2, score_func="sigmoid", score_bias=True),
        experts=ExpertsConfig(hidden_dim=8),
    )
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.score_bias.copy_(torch.tensor([0.6, -0.6, 0.3, 0.05]))
    layer = layer.to(torch.bfloat16)
    assert layer.experts.w1.dtype == layer.router.gate.weight.dtype == torch.bfloat16
    assert layer.router.score_bias.dtype == layer.tokens_per_expert.dtype == torch.float32
    assert layer.router.score_bias.tolist() == torch.tensor([0.6, -0.6, 0.3, 0.05]).tolist()  # not bf16-rounded
    x = torch.randn(4, 300, 8, dtype=torch.bfloat16)
    counts = torch.zeros(4, dtype=torch.float64)
    for _ in range(3):
        counts += layer(x)[1].tokens_per_expert.double()
    assert counts.sum() == 3 * 4 * 300 * 2 and counts.max() > 256
    torch.testing.assert_close(layer.tokens_per_expert.double(), counts, rtol=0, atol=0)
    expected = torch.tensor([0.6, -0.6, 0.3, 0.05]) + 1e-3 * torch.sign(counts.mean() - counts).float()
    layer.update_bias(1e-3)
    torch.testing.assert_close(layer.router.score_bias, expected, rtol=0, atol=0)
    # float64 is kept, not narrowed.
    assert layer.double().router.score_bias.dtype == layer.tokens_per_expert.dtype == torch.float64
