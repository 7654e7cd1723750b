import math

import torch

from lightning_moe.nn import (
    ExpertsConfig,
    MoEConfig,
    MoELayer,
    RouterConfig,
    bias_update,
    load_balancing_loss,
    router_entropy,
    router_z_loss,
    sequence_balance_loss,
)


def test_load_balancing_loss_by_hand():
    # 4 tokens, 2 experts, top-1: three tokens pick expert 0, one picks expert 1.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    ids = torch.tensor([[0], [0], [0], [1]])
    f = [3 / 4, 1 / 4]
    p = [(0.9 + 0.8 + 0.6 + 0.3) / 4, (0.1 + 0.2 + 0.4 + 0.7) / 4]
    expected = 2 * (f[0] * p[0] + f[1] * p[1])
    assert math.isclose(load_balancing_loss(probs, ids).item(), expected, rel_tol=1e-6)


def test_load_balancing_loss_top2_counts_copies_and_ignores_padding():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    ids = torch.tensor([[0, 1], [1, 2], [2, 0]])
    mask = torch.tensor([True, True, False])
    # Real tokens 0 and 1: copies to experts 0, 1, 1, 2 -> f = [1/4, 2/4, 1/4]; P = mean of rows 0, 1.
    f = torch.tensor([0.25, 0.5, 0.25])
    p = (probs[0] + probs[1]) / 2
    expected = 3 * (f * p).sum()
    torch.testing.assert_close(load_balancing_loss(probs, ids, mask), expected)


def test_losses_read_any_nonzero_mask_entry_as_a_real_token_and_ignore_what_padding_holds():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [float("nan")] * 3])
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [float("inf"), 0.0, 0.0]])
    ids = torch.tensor([[0, 1], [1, 2], [2, 0]])
    mask_bool, mask_int = torch.tensor([True, True, False]), torch.tensor([3, 1, 0])
    expected = load_balancing_loss(probs[:2], ids[:2])
    torch.testing.assert_close(load_balancing_loss(probs, ids, mask_bool), expected)
    torch.testing.assert_close(load_balancing_loss(probs, ids, mask_int), expected)
    torch.testing.assert_close(router_z_loss(logits, mask_int), router_z_loss(logits[:2]))
    torch.testing.assert_close(router_entropy(probs, mask_int), router_entropy(probs[:2]))
    seq = sequence_balance_loss(probs.view(1, 3, 3), ids.view(1, 3, 2), mask_int.view(1, 3))
    torch.testing.assert_close(seq, sequence_balance_loss(probs[None, :2], ids[None, :2]))


def test_load_balancing_loss_is_one_when_uniform():
    probs = torch.full((8, 4), 0.25)
    ids = torch.arange(8).view(8, 1) % 4
    torch.testing.assert_close(load_balancing_loss(probs, ids), torch.tensor(1.0))


def test_sequence_balance_loss_by_hand():
    # Two sequences of 2 tokens, 2 experts, top-1; the second sequence has one padding token.
    probs = torch.tensor([[[0.7, 0.3], [0.4, 0.6]], [[0.9, 0.1], [0.5, 0.5]]])
    ids = torch.tensor([[[0], [1]], [[0], [1]]])
    mask = torch.tensor([[True, True], [True, False]])
    # Sequence 0: S=2, f = E/(K S) * counts = [1, 1], P = [0.55, 0.45] -> 1.0
    # Sequence 1: S=1, f = [2, 0], P = [0.9, 0.1] -> 1.8
    expected = (1.0 + 1.8) / 2
    assert math.isclose(sequence_balance_loss(probs, ids, mask).item(), expected, rel_tol=1e-6)


def test_sequence_balance_loss_skips_fully_padded_sequences():
    probs = torch.tensor([[[0.7, 0.3]], [[0.2, 0.8]]])
    ids = torch.tensor([[[0]], [[1]]])
    mask = torch.tensor([[True], [False]])
    # Only sequence 0 counts: f = [2, 0], P = [0.7, 0.3] -> 1.4
    assert math.isclose(sequence_balance_loss(probs, ids, mask).item(), 1.4, rel_tol=1e-6)


def test_router_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0], [9.0, 9.0]])
    mask = torch.tensor([True, True, False])
    z0 = math.log(2.0)
    z1 = math.log(math.exp(1.0) + math.exp(2.0))
    assert math.isclose(router_z_loss(logits, mask).item(), (z0**2 + z1**2) / 2, rel_tol=1e-6)


def test_router_entropy_uniform_and_one_hot():
    assert math.isclose(router_entropy(torch.full((3, 4), 0.25)).item(), math.log(4), rel_tol=1e-6)
    assert router_entropy(torch.tensor([[1.0, 0.0, 0.0]])).item() == 0.0


def test_bias_update_rule_by_hand():
    bias = torch.tensor([0.0, 0.1, -0.2, 0.0])
    load = torch.tensor([10.0, 2.0, 6.0, 6.0])  # mean 6
    new = bias_update(bias, load, gamma=0.01)
    torch.testing.assert_close(new, torch.tensor([-0.01, 0.11, -0.2, 0.0]))
    torch.testing.assert_close(bias, torch.tensor([0.0, 0.1, -0.2, 0.0]))  # pure


def _layer(**router):
    torch.manual_seed(0)
    cfg = MoEConfig(
        dim=8,
        router=RouterConfig(num_experts=4, top_k=2, **router),
        experts=ExpertsConfig(hidden_dim=16),
        shared_hidden_dim=8,
    )
    return MoELayer(cfg)


def test_aux_losses_give_gradients_to_the_router_only():
    layer = _layer()
    _, stats = layer(torch.randn(2, 5, 8))
    for name in ("load_balance", "z_loss", "seq_balance"):
        layer.zero_grad(set_to_none=True)
        stats.losses[name].backward(retain_graph=True)
        grads = {n: p.grad for n, p in layer.named_parameters()}
        assert grads["router.gate.weight"] is not None and grads["router.gate.weight"].abs().sum() > 0, name
        assert all(g is None for n, g in grads.items() if n != "router.gate.weight"), name


def test_layer_losses_match_the_pure_functions():
    layer = _layer(score_func="sigmoid")
    x = torch.randn(3, 4, 8)
    _, stats = layer(x)
    logits = x.reshape(-1, 8) @ layer.router.gate.weight.t()
    scores = torch.sigmoid(logits)
    probs = scores / scores.sum(-1, keepdim=True)
    ids = scores.topk(2, dim=-1).indices
    torch.testing.assert_close(stats.losses["load_balance"], load_balancing_loss(probs, ids))
    torch.testing.assert_close(stats.losses["z_loss"], router_z_loss(logits))
    torch.testing.assert_close(
        stats.losses["seq_balance"], sequence_balance_loss(probs.view(3, 4, 4), ids.view(3, 4, 2))
    )


def test_losses_name_mismatched_choices_and_masks():
    import pytest

    probs = torch.rand(6, 4).softmax(-1)
    ids = torch.zeros(6, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"expert_ids.shape=\(12,\) is invalid with probs.shape=\(6, 4\)"):
        load_balancing_loss(probs, ids.view(-1))
    with pytest.raises(ValueError, match=r"expert_ids.shape=\(5, 2\) is invalid"):
        load_balancing_loss(probs, ids[:5])
    with pytest.raises(ValueError, match=r"mask.shape=\(5,\) is invalid: expected \(6,\), one entry per token"):
        load_balancing_loss(probs, ids, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expert_ids.shape=\(6, 2\) is invalid with probs.shape=\(2, 3, 4\)"):
        sequence_balance_loss(probs.view(2, 3, 4), ids)
    # A (B, S) mask for flattened (T,) tokens is the same tokens: still accepted.
    mask = torch.tensor([[True, True, False], [True, False, True]])
    assert torch.equal(load_balancing_loss(probs, ids, mask), load_balancing_loss(probs, ids, mask.view(-1)))


def test_sequence_balance_loss_of_bf16_scores_is_computed_in_float32():
    # bf16 holds 8 significant bits: counts and their scaling in bf16 are off by up to 0.4% (and GPU atomic adds
    # in bf16 stall at 256).
    from lightning_moe.nn.losses import sequence_balance_loss

    seq, experts = 1000, 2
    probs = torch.tensor([0.3, 0.7]).expand(1, seq, experts)
    ids = torch.zeros(1, seq, 1, dtype=torch.long)
    ids[0, :399] = 1  # expert 1 takes 399 tokens, expert 0 takes 601: f = E / S * count
    expected = experts / seq * 601 * 0.3 + experts / seq * 399 * 0.7
    loss = sequence_balance_loss(probs.bfloat16().float().bfloat16(), ids)
    assert loss.dtype == torch.float32
    assert abs(float(loss) - float(sequence_balance_loss(probs.bfloat16().float(), ids))) < 1e-6
    assert abs(float(loss) - expected) < 2e-3, (float(loss), expected)  # 0.3 and 0.7 are rounded to bf16
