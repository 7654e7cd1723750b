import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_moe.nn import (
    ExpertsConfig,
    MoEConfig,
    MoELayer,
    RouterConfig,
    capacity_keep_mask,
    expert_capacity,
    priority_order,
)


@pytest.mark.parametrize(
    ("tokens", "top_k", "experts", "factor", "absolute", "expected"),
    [
        (4096, 2, 8, 1.25, None, 1280),
        (10, 1, 1, 1.1, None, 10),  # 1.1 * 10 is 11.000000000000002 in floats; capped at the 10 tokens
        (100, 1, 8, 1.0, None, 13),
        (100, 2, 8, 1.5, None, 38),
        (100, 2, 8, 1.5, 7, 7),  # absolute overrides the factor
        (5, 2, 2, 4.0, None, 5),  # never more than the token count
        (5, 2, 2, None, 50, 5),
        (5, 2, 2, None, None, None),  # dropless
    ],
)
def test_expert_capacity_formula(tokens, top_k, experts, factor, absolute, expected):
    assert expert_capacity(tokens, top_k, experts, factor, absolute) == expected


def test_float_noise_does_not_round_capacity_up():
    assert expert_capacity(20, 1, 2, 1.1) == 11  # 1.1 * 20 / 2 = 11.000000000000002


def test_capacity_keep_mask_by_hand_position_priority():
    # 4 tokens, top-2, layout (T, K). Copies of expert 0: (t0,k0), (t1,k1), (t2,k0), (t3,k0).
    expert_ids = torch.tensor([[0, 1], [1, 0], [0, 1], [0, 1]]).reshape(-1)
    keep = torch.ones(8, dtype=torch.bool)
    order = priority_order(torch.rand(8), top_k=2, by="position")
    kept = capacity_keep_mask(expert_ids, keep, order, capacity=2, num_experts=2).view(4, 2)
    # Expert 0 keeps its first choices of t0 and t2; t3's first choice and t1's second choice drop.
    # Expert 1 receives first choice t1 then second choices t0, t2, t3: keeps t1 and t0.
    assert kept.tolist() == [[True, True], [True, False], [True, False], [False, False]]


def test_capacity_keep_mask_by_hand_weight_priority():
    expert_ids = torch.tensor([0, 0, 0, 0])
    weights = torch.tensor([0.1, 0.9, 0.5, 0.7])
    order = priority_order(weights, top_k=1, by="weight")
    kept = capacity_keep_mask(expert_ids, torch.ones(4, dtype=torch.bool), order, capacity=2, num_experts=1)
    assert kept.tolist() == [False, True, False, True]


def test_dead_copies_take_no_slot():
    expert_ids = torch.tensor([0, 0, 0])
    keep = torch.tensor([False, True, True])
    order = priority_order(torch.zeros(3), top_k=1, by="position")
    kept = capacity_keep_mask(expert_ids, keep, order, capacity=2, num_experts=1)
    assert kept.tolist() == [False, True, True]


def _layer(num_experts, top_k, **kwargs):
    cfg = MoEConfig(
        dim=8, router=RouterConfig(num_experts=num_experts, top_k=top_k), experts=ExpertsConfig(hidden_dim=8), **kwargs
    )
    layer = MoELayer(cfg)
    layer.router.gate.weight.data.normal_(std=1.0)
    return layer


@settings(max_examples=40, deadline=None)
@given(
    num_experts=st.integers(2, 6),
    top_k=st.integers(1, 3),
    tokens=st.integers(1, 40),
    factor=st.sampled_from([0.25, 0.5, 1.0, 1.25]),
    priority=st.sampled_from(["position", "weight"]),
    seed=st.integers(0, 10_000),
)
def test_kept_tokens_follow_formula_and_drop_lowest_priority(num_experts, top_k, tokens, factor, priority, seed):
    top_k = min(top_k, num_experts)
    torch.manual_seed(seed)
    layer = _layer(num_experts, top_k, capacity_factor=factor, drop_priority=priority)
    x = torch.randn(tokens, 8)
    _, stats = layer(x)
    capacity = min(math.ceil(round(factor * tokens * top_k / num_experts, 6)), tokens)
    torch.testing.assert_close(stats.kept_per_expert, stats.tokens_per_expert.clamp(max=capacity))
    assert stats.num_dropped.item() == int((stats.tokens_per_expert - stats.kept_per_expert).sum())

    # Recompute which copies survive by an independent rule and compare with the layer's output.
    routing = layer.router(x)
    ids = routing.expert_ids_N.view(tokens, top_k)
    weights = routing.weights_N.view(tokens, top_k)
    expected_kept = torch.zeros(tokens, top_k, dtype=torch.bool)
    for e in range(num_experts):
        copies = [(k, t) for k in range(top_k) for t in range(tokens) if ids[t, k] == e]  # position order
        if priority == "weight":
            copies.sort(key=lambda kt: -weights[kt[1], kt[0]].item())  # stable: ties keep position order
        for k, t in copies[:capacity]:
            expected_kept[t, k] = True
    order = priority_order(routing.weights_N, top_k, priority)
    kept = capacity_keep_mask(routing.expert_ids_N, routing.keep_N, order, capacity, num_experts)
    assert torch.equal(kept.view(tokens, top_k), expected_kept)


def test_dropped_token_gets_zero_from_moe_branch():
    torch.manual_seed(0)
    layer = _layer(1, 1, expert_capacity=3)
    x = torch.randn(6, 8)
    y, stats = layer(x)
    assert stats.num_dropped.item() == 3
    assert torch.all(y[3:] == 0)  # position priority: the last three tokens drop
    assert torch.all(y[:3].abs().sum(-1) > 0)


def test_eval_capacity_factor_is_separate():
    torch.manual_seed(0)
    layer = _layer(4, 1, capacity_factor=0.5, eval_capacity_factor=2.0)
    x = torch.randn(32, 8)
    assert layer.capacity(32) == 4
    _, train_stats = layer.train()(x)
    layer.eval()
    assert layer.capacity(32) == 16
    _, eval_stats = layer(x)
    assert train_stats.num_dropped.item() > 0
    torch.testing.assert_close(eval_stats.kept_per_expert, eval_stats.tokens_per_expert.clamp(max=16))


def test_dropless_default_never_drops():
    torch.manual_seed(0)
    layer = _layer(4, 2)
    layer.router.gate.weight.data[0] += 5.0  # heavily skewed routing
    _, stats = layer(torch.randn(64, 8))
    assert stats.num_dropped.item() == 0
    assert torch.equal(stats.kept_per_expert, stats.tokens_per_expert)
    assert stats.tokens_per_expert.sum().item() == 128


def test_sequence_scope_counts_capacity_per_sequence_like_switch():
    torch.manual_seed(0)
    layer = _layer(4, 1, expert_capacity=2, capacity_scope="sequence")
    x = torch.randn(3, 7, 8)
    _, stats = layer(x)
    # Independent rule (Switch / Hugging Face): per sequence, a token keeps its expert while the running
    # count of that expert in the sequence is <= capacity.
    ids = layer.router(x.reshape(-1, 8)).expert_ids_N.view(3, 7)
    onehot = torch.nn.functional.one_hot(ids, 4)
    kept = ((onehot.cumsum(dim=1) <= 2) & (onehot == 1)).any(-1)
    assert stats.kept_per_expert.sum().item() == kept.sum().item()
    expected_per_expert = (onehot * kept.unsqueeze(-1)).sum((0, 1)).float()
    torch.testing.assert_close(stats.kept_per_expert, expected_per_expert)
    y, _ = layer(x)
    assert torch.equal(y.abs().sum(-1) > 0, kept)  # dropped tokens get zero


def test_sequence_scope_capacity_factor_uses_each_sequence_real_tokens():
    torch.manual_seed(0)
    layer = _layer(2, 1, capacity_factor=0.5, capacity_scope="sequence")
    x = torch.randn(2, 8, 8)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 4:] = False
    _, stats = layer(x, mask)
    ids = layer.router(x.reshape(-1, 8)).expert_ids_N.view(2, 8)
    expected = 0
    for row, real in ((0, 8), (1, 4)):
        cap = math.ceil(0.5 * real / 2)
        counts = torch.bincount(ids[row, :real], minlength=2)
        expected += counts.clamp(max=cap).sum().item()
    assert stats.kept_per_expert.sum().item() == expected


def test_bad_capacity_scope():
    with pytest.raises(ValueError, match=r"capacity_scope='global' is invalid: must be one of 'batch', 'sequence'"):
        MoEConfig(capacity_scope="global")


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.integers(0, 200_000),
    top_k=st.integers(1, 8),
    experts=st.integers(1, 256),
    factor=st.one_of(st.none(), st.floats(0.01, 8.0), st.sampled_from([1.0, 1.1, 1.25, 1.5, 2.0])),
    absolute=st.one_of(st.none(), st.integers(1, 5000)),
)
def test_capacity_from_a_token_count_tensor_equals_the_host_formula(tokens, top_k, experts, factor, absolute):
    on_host = expert_capacity(tokens, top_k, experts, factor, absolute)
    on_device = expert_capacity(torch.tensor([tokens, tokens // 3]), top_k, experts, factor, absolute)
    if on_host is None:
        assert on_device is None
        return
    assert on_device.dtype == torch.int64
    assert on_device.tolist() == [on_host, expert_capacity(tokens // 3, top_k, experts, factor, absolute)]
    if absolute is None:  # and the formula itself, by the old decimal rounding
        assert on_host == min(math.ceil(round(factor * tokens * top_k / experts, 6)), tokens)


def test_capacity_keep_mask_takes_a_tensor_capacity():
    torch.manual_seed(0)
    expert_ids = torch.randint(0, 4, (60,))
    keep = torch.rand(60) > 0.2
    order = priority_order(torch.rand(60), top_k=3, by="weight")
    expected = capacity_keep_mask(expert_ids, keep, order, 5, num_experts=4)
    assert torch.equal(capacity_keep_mask(expert_ids, keep, order, torch.tensor(5), num_experts=4), expected)


@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_padded_batch_drops_like_the_real_tokens_alone(scope):
    # Padding tokens take no slot and the capacity comes from the real tokens (a device tensor now): the
    # real tokens of a padded batch keep exactly what they keep without the padding.
    torch.manual_seed(0)
    layer = _layer(4, 2, capacity_factor=0.5, capacity_scope=scope)
    x = torch.randn(1, 24, 8)
    mask = torch.zeros(1, 24, dtype=torch.bool)
    mask[0, :17] = True
    y_padded, stats_padded = layer(x, mask)
    y_real, stats_real = layer(x[:, :17])
    assert stats_real.num_dropped.item() > 0
    torch.testing.assert_close(y_padded[:, :17], y_real)
    assert torch.all(y_padded[:, 17:] == 0)
    torch.testing.assert_close(stats_padded.kept_per_expert, stats_real.kept_per_expert)


def test_capacity_dropping_traces_without_graph_breaks():
    # CPU stand-in for "no host sync on CUDA": dynamo breaks the graph at every value read back to the host
    # (int(tensor), .tolist(), .item(), and data-dependent sizes such as bincount's minlength from a max).
    def keep_mask(expert_ids_N, keep_N, weights_N, mask_T):
        capacity = expert_capacity(mask_T.sum(), 2, 4, 1.25)
        order_N = priority_order(weights_N, 2, "weight")
        return capacity_keep_mask(expert_ids_N, keep_N, order_N, capacity, 4)

    def host_read(t):  # what the check must catch
        return torch.zeros(int(t.max()) + 1)

    torch.manual_seed(0)
    mask_T = torch.rand(32) > 0.3
    args = (torch.randint(0, 4, (64,)), mask_T.repeat_interleave(2), torch.rand(64), mask_T)
    with torch._dynamo.config.patch(capture_scalar_outputs=False, capture_dynamic_output_shape_ops=False):
        assert torch._dynamo.explain(host_read)(torch.tensor([3, 1])).graph_break_count == 1
        explanation = torch._dynamo.explain(keep_mask)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()


def test_capacity_helpers_refuse_bad_arguments():
    import pytest

    from lightning_moe.nn.capacity import priority_order

    with pytest.raises(ValueError, match=r"by='weights' is invalid: must be one of 'position', 'weight'"):
        priority_order(torch.rand(6), 2, "weights")
    with pytest.raises(ValueError, match=r"capacity_factor=-1.0 is invalid: must be a finite number > 0"):
        expert_capacity(10, 2, 4, -1.0)
    with pytest.raises(ValueError, match=r"absolute=0 is invalid"):
        expert_capacity(10, 2, 4, None, 0)
    with pytest.raises(ValueError, match=r"top_k=2 and num_experts=0 are invalid"):
        expert_capacity(10, 2, 0, 1.0)
