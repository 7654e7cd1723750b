import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_moe.nn import Router, RouterConfig
from lightning_moe.nn.router import random_routing_mask


def _router(dim=6, **kwargs):
    torch.manual_seed(0)
    router = Router(dim, RouterConfig(**kwargs))
    router.gate.weight.data.normal_(std=1.0)
    return router


def test_softmax_then_topk_matches_hand_computation():
    router = _router(num_experts=5, top_k=2)
    x = torch.randn(7, 6)
    r = router(x)
    probs = torch.softmax(x @ router.gate.weight.t(), dim=-1)
    values, ids = probs.topk(2, dim=-1)
    torch.testing.assert_close(r.probs_TE, probs)
    assert torch.equal(r.expert_ids_N.view(7, 2), ids)
    torch.testing.assert_close(r.weights_N.view(7, 2), values)
    assert torch.equal(r.token_ids_N, torch.arange(7).repeat_interleave(2))


def test_topk_then_softmax_equals_renormalised_softmax():
    mixtral = _router(num_experts=8, top_k=2, softmax_after_topk=True)
    renorm = _router(num_experts=8, top_k=2, normalize_topk=True)
    x = torch.randn(11, 6)
    a, b = mixtral(x), renorm(x)
    assert torch.equal(a.expert_ids_N, b.expert_ids_N)
    torch.testing.assert_close(a.weights_N, b.weights_N)
    torch.testing.assert_close(a.weights_N.view(11, 2).sum(-1), torch.ones(11))


def test_sigmoid_scores_with_scaling_factor_and_normalisation():
    router = _router(num_experts=6, top_k=3, score_func="sigmoid", normalize_topk=True, routed_scaling_factor=2.5)
    x = torch.randn(9, 6)
    r = router(x)
    scores = torch.sigmoid(x @ router.gate.weight.t())
    values, ids = scores.topk(3, dim=-1)
    assert torch.equal(r.expert_ids_N.view(9, 3), ids)
    torch.testing.assert_close(r.weights_N.view(9, 3), 2.5 * values / values.sum(-1, keepdim=True))
    torch.testing.assert_close(r.probs_TE, scores / scores.sum(-1, keepdim=True))


def test_score_bias_changes_selection_but_not_weights():
    router = _router(num_experts=4, top_k=1, score_func="sigmoid", score_bias=True)
    x = torch.randn(32, 6)
    before = router(x)
    router.score_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    after = router(x)
    assert torch.all(after.expert_ids_N == 3)
    scores = torch.sigmoid(x @ router.gate.weight.t())
    torch.testing.assert_close(after.weights_N, scores[:, 3])  # unbiased score of the chosen expert
    assert not torch.equal(before.expert_ids_N, after.expert_ids_N)


def test_group_scores_max_and_top2_sum_by_hand():
    # 2 groups of 3 experts. Group 0 has the best single expert, group 1 the best top-2 sum.
    logits = torch.tensor([[5.0, -9.0, -9.0, 4.0, 4.0, -9.0]])
    for group_score, expected_group in (("max", 0), ("top2_sum", 1)):
        router = Router(
            6,
            RouterConfig(
                num_experts=6, top_k=1, score_func="sigmoid", n_group=2, topk_group=1, group_score=group_score
            ),
        )
        router.gate.weight.data = torch.eye(6)
        r = router(logits)
        assert r.expert_ids_N.item() // 3 == expected_group


@settings(max_examples=40, deadline=None)
@given(
    n_group=st.sampled_from([1, 2, 4]),
    per_group=st.integers(2, 5),
    topk_group=st.integers(1, 4),
    seed=st.integers(0, 99),
)
def test_top2_sum_group_scores_equal_the_sum_of_the_two_largest(n_group, per_group, topk_group, seed):
    # Small integer scores make ties (two equal best experts in a group) common.
    from lightning_moe.nn.router import group_limited_mask

    topk_group = min(topk_group, n_group)
    scores = torch.randint(0, 4, (6, n_group * per_group), generator=torch.Generator().manual_seed(seed)).float()
    top2 = scores.view(6, n_group, per_group).topk(2, dim=-1).values.sum(-1)
    chosen = top2.topk(topk_group, dim=-1).indices
    expected = torch.zeros(6, n_group, dtype=torch.bool).scatter_(1, chosen, True).repeat_interleave(per_group, 1)
    assert torch.equal(group_limited_mask(scores, n_group, topk_group, "top2_sum"), expected)


@settings(max_examples=40, deadline=None)
@given(
    n_group=st.sampled_from([2, 4, 8]),
    per_group=st.integers(2, 4),
    topk_group=st.integers(1, 3),
    top_k=st.integers(1, 4),
    group_score=st.sampled_from(["max", "top2_sum"]),
    score_func=st.sampled_from(["softmax", "sigmoid"]),
    bias=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_group_limited_routing_stays_inside_chosen_groups(
    n_group, per_group, topk_group, top_k, group_score, score_func, bias, seed
):
    topk_group = min(topk_group, n_group)
    top_k = min(top_k, topk_group * per_group)
    num_experts = n_group * per_group
    torch.manual_seed(seed)
    router = Router(
        8,
        RouterConfig(
            num_experts=num_experts,
            top_k=top_k,
            n_group=n_group,
            topk_group=topk_group,
            group_score=group_score,
            score_func=score_func,
            score_bias=bias,
        ),
    )
    router.gate.weight.data.normal_()
    if bias:
        router.score_bias.normal_(std=2.0)  # large negative biases must not let an outside expert in
    x = torch.randn(16, 8)
    r = router(x)
    scores = router._scores(router.logits(x))[0]
    choice = scores + (router.score_bias if bias else 0)
    grouped = choice.view(16, n_group, per_group)
    if group_score == "max":
        group_scores = grouped.amax(-1)
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
    chosen_groups = group_scores.topk(topk_group, dim=-1).indices
    expert_groups = r.expert_ids_N.view(16, top_k) // per_group
    for t in range(16):
        assert set(expert_groups[t].tolist()) <= set(chosen_groups[t].tolist())
        assert len(set(r.expert_ids_N.view(16, top_k)[t].tolist())) == top_k  # distinct experts


def test_router_runs_in_float32_for_bfloat16_input():
    router = _router(num_experts=4, top_k=2).to(torch.bfloat16)
    r = router(torch.randn(5, 6, dtype=torch.bfloat16))
    assert r.logits_TE.dtype == torch.float32
    assert r.weights_N.dtype == torch.float32
    assert r.probs_TE.dtype == torch.float32


def test_gate_precision_float32_or_compute_dtype_under_autocast():
    # float32 (default): the gate matmul in float32 even under autocast; "compute": in autocast's bf16, the
    # logits then cast to float32. Outside autocast both are the same float32 matmul.
    routers = {p: _router(num_experts=8, top_k=2, gate_precision=p) for p in ("float32", "compute")}
    x = torch.randn(16, 6)
    w = routers["float32"].gate.weight
    full = x @ w.t()
    bf16 = (x.bfloat16() @ w.bfloat16().t()).float()
    assert not torch.equal(full, bf16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r32, rc = routers["float32"](x), routers["compute"](x)
    assert r32.logits_TE.dtype == rc.logits_TE.dtype == rc.weights_N.dtype == torch.float32
    torch.testing.assert_close(r32.logits_TE, full, rtol=0, atol=1e-6)
    torch.testing.assert_close(rc.logits_TE, bf16, rtol=0, atol=0)
    torch.testing.assert_close(rc.probs_TE, bf16.softmax(-1), rtol=0, atol=1e-7)
    assert torch.equal(routers["compute"](x).logits_TE, routers["float32"](x).logits_TE)
    rc.weights_N.sum().backward()  # the gradient reaches the float32 gate weight through the casts
    assert routers["compute"].gate.weight.grad.dtype == torch.float32


def test_jitter_only_in_training():
    router = _router(num_experts=4, top_k=2, jitter_eps=0.5)
    x = torch.randn(64, 6)
    router.eval()
    assert torch.equal(router(x).logits_TE, router(x).logits_TE)
    torch.testing.assert_close(router(x).logits_TE, x @ router.gate.weight.t())
    router.train()
    a, b = router(x).logits_TE, router(x).logits_TE
    assert not torch.equal(a, b)
    # Multiplicative noise in [1 - eps, 1 + eps] on each input feature bounds the logit change.
    bound = 0.5 * (x.abs() @ router.gate.weight.abs().t())
    assert torch.all((a - x @ router.gate.weight.t()).abs() <= bound + 1e-5)


def test_random_routing_keeps_first_choice_and_second_with_gshard_probability():
    weights = torch.tensor([[0.8, 0.2]]).expand(20000, 2).contiguous()
    keep = random_routing_mask(weights, torch.Generator().manual_seed(0))
    assert keep[:, 0].all()
    # GShard: the second expert is kept with probability 2 * g2 / (g1 + g2) = 0.4.
    assert abs(keep[:, 1].float().mean().item() - 0.4) < 0.02


def test_random_routing_always_keeps_the_largest_weight_even_when_a_bias_chose_another_expert_first():
    # A selection bias can put the smaller-weight expert first; GShard keeps the larger one and draws the other.
    weights = torch.tensor([[0.2, 0.8]]).expand(20000, 2).contiguous()
    keep = random_routing_mask(weights, torch.Generator().manual_seed(0))
    assert keep[:, 1].all()
    assert abs(keep[:, 0].float().mean().item() - 0.4) < 0.02
    router = _router(dim=2, num_experts=4, top_k=2, random_routing=True, score_bias=True)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
        router.score_bias.copy_(torch.tensor([0.0, 1.0, -9.0, -9.0]))
    x = torch.tensor([[3.0, 0.0]]).expand(20000, 2).contiguous()  # expert 0 scores highest, the bias ranks 1 first
    router.train()
    routing = router(x)
    assert (routing.expert_ids_N.view(-1, 2)[:, 0] == 1).all()
    keep = routing.keep_N.view(-1, 2)
    assert keep[:, 1].all()  # expert 0, the larger weight, is always kept
    weights = routing.weights_N.view(-1, 2)[0]
    assert abs(keep[:, 0].float().mean().item() - 2 * float(weights[0] / weights.sum())) < 0.02


def test_random_routing_off_in_eval():
    router = _router(num_experts=8, top_k=2, random_routing=True)
    x = torch.randn(200, 6)
    router.eval()
    assert router(x).keep_N.all()
    router.train()
    keep = router(x).keep_N.view(200, 2)
    assert keep[:, 0].all() and not keep[:, 1].all()


def test_padding_tokens_are_not_live():
    router = _router(num_experts=4, top_k=2)
    mask = torch.tensor([True, False, True, False, True])
    r = router(torch.randn(5, 6), mask)
    assert torch.equal(r.keep_N.view(5, 2), mask.view(5, 1).expand(5, 2))


def test_expert_choice_gives_each_expert_exactly_c_tokens():
    router = _router(num_experts=4, top_k=2, kind="expert_choice")
    x = torch.randn(10, 6)
    capacity = math.ceil(1.0 * 10 * 2 / 4)
    r = router(x, capacity=capacity)
    counts = torch.bincount(r.expert_ids_N, minlength=4)
    assert counts.tolist() == [capacity] * 4
    probs = torch.softmax(x @ router.gate.weight.t(), dim=-1)
    for e in range(4):
        tokens = r.token_ids_N[r.expert_ids_N == e]
        assert len(set(tokens.tolist())) == capacity  # distinct tokens
        assert set(tokens.tolist()) == set(probs[:, e].topk(capacity).indices.tolist())
        torch.testing.assert_close(r.weights_N[r.expert_ids_N == e], probs[tokens, e])


def test_expert_choice_never_picks_padding():
    router = _router(num_experts=3, top_k=1, kind="expert_choice")
    mask = torch.tensor([True, True, False, True, False, True])
    r = router(torch.randn(6, 6), mask, capacity=4)
    assert mask[r.token_ids_N].all() and r.keep_N.all()


def test_router_takes_flat_tokens_only():
    import pytest

    router = Router(8, RouterConfig(num_experts=4, top_k=2))
    with pytest.raises(ValueError, match=r"x_TD.shape=\(2, 3, 8\) is invalid: expected \(T, 8\)"):
        router(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"x_TD.shape=\(3, 6\) is invalid: expected \(T, 8\)"):
        router(torch.randn(3, 6))
    with pytest.raises(ValueError, match=r"mask_T.shape=\(2,\) is invalid: expected \(3,\)"):
        router(torch.randn(3, 8), torch.ones(2, dtype=torch.bool))
