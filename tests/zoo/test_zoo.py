"""Behaviour every zoo family shares: lookup errors, overrides, tiny presets that learn, causal masks."""

import pytest
import torch

from lightning_moe import zoo
from lightning_moe.nn import GroupedExperts, Router

from ._helpers import is_encoder_decoder, lm_loss

TINY = [name for name in zoo.names() if name.endswith("-tiny")]
CAUSAL_TINY = [name for name in TINY if not is_encoder_decoder(name)]


def test_every_family_has_a_tiny_preset():
    assert {zoo.family_of(name) for name in TINY} == set(zoo.families())


def test_unknown_preset_lists_close_matches():
    with pytest.raises(ValueError, match=r"arch='mixtral-8x7' is not a known preset; closest: mixtral-8x7b"):
        zoo.config("mixtral-8x7")


def test_unknown_override_names_key_and_valid_keys():
    with pytest.raises(
        ValueError, match=r"override num_expert=4 is invalid for MixtralConfig: valid keys are .*num_experts"
    ):
        zoo.config("mixtral-tiny", num_expert=4)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"norm_eps": -1.0}, r"norm_eps=-1.0 is invalid: must be > 0"),
        ({"load_balance_coef": -1.0}, r"load_balance_coef=-1.0 is invalid: must be >= 0"),
        ({"num_layers": 2.0}, r"num_layers=2.0 is invalid: must be an int"),
        ({"dim": 130}, r"dim=130 is invalid for num_heads=4: must be a multiple of it"),
        ({"sliding_window": 0}, r"sliding_window=0 is invalid: must be >= 1"),
    ],
)
def test_bad_override_values_name_the_field(override, match):
    with pytest.raises(ValueError, match=match):
        zoo.build("mixtral-tiny", **override)


@pytest.mark.parametrize(
    ("arch", "override", "match"),
    [
        ("qwen-moe-tiny", {"mlp_only_layers": 5}, r"mlp_only_layers=5 is invalid: must be a list of layer indices"),
        ("qwen-moe-tiny", {"mlp_only_layers": [True]}, r"mlp_only_layers=\[True\] is invalid"),
        ("qwen-moe-tiny", {"dense_hidden": 0}, r"dense_hidden=0 is invalid: must be >= 1"),
        ("deepseek-tiny", {"rope": "yarn"}, r"rope='yarn' is invalid: must be RopeConfig\(...\) or a dict"),
        ("deepseek-tiny", {"dense_hidden": 0}, r"dense_hidden=0 is invalid: must be >= 1"),
    ],
)
def test_bad_structured_overrides_name_the_field(arch, override, match):
    with pytest.raises(ValueError, match=match):
        zoo.config(arch, **override)


def test_overrides_apply_and_presets_stay_untouched():
    cfg = zoo.config("mixtral-tiny", num_experts=4, top_k=1)
    assert (cfg.num_experts, cfg.top_k) == (4, 1)
    assert zoo.config("mixtral-tiny").num_experts == 8
    model = zoo.build("mixtral-tiny", num_experts=4)
    assert model.layers[0].ffn.experts.w1.shape[0] == 4
    assert zoo.build(cfg).layers[0].ffn.config.router.top_k == 1


def test_configs_share_no_nested_field_with_presets_or_models():
    # Editing a config's nested fields (rope, lists) must not reach the presets or a model built before.
    torch.manual_seed(0)
    model = zoo.build("deepseek-tiny").eval()
    ids = torch.randint(0, 1024, (1, 16))
    with torch.no_grad():
        before = model(ids).logits
    theta = zoo.config("deepseek-tiny").rope.theta
    zoo.config("deepseek-tiny").rope.theta = theta * 50
    model.zoo_config.rope.theta = theta * 50  # the model's recorded config is a copy too
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    assert zoo.config("deepseek-tiny").rope.theta == theta
    layers = list(zoo.config("qwen-moe-tiny").mlp_only_layers)
    zoo.config("qwen-moe-tiny").mlp_only_layers.append(1)
    assert zoo.config("qwen-moe-tiny").mlp_only_layers == zoo.config("qwen-moe-tiny-dense").mlp_only_layers == layers
    cfg = zoo.config("deepseek-tiny")
    built = zoo.build(cfg)
    cfg.rope.theta = 1.0
    assert built.zoo_config.rope.theta == theta


def test_build_on_meta_allocates_nothing():
    with torch.device("meta"):
        model = zoo.build("mixtral-8x22b")
    assert all(p.is_meta for p in model.parameters())


def test_count_parameters_by_hand_for_a_tiny_mixtral():
    cfg = zoo.config("mixtral-tiny")
    d, f, e, v, layers = cfg.dim, cfg.ffn_hidden, cfg.num_experts, cfg.vocab_size, cfg.num_layers
    kv = cfg.num_kv_heads * (d // cfg.num_heads)
    attention = 2 * d * d + 2 * d * kv
    per_layer_experts = e * 3 * d * f
    per_layer_rest = attention + d * e + 2 * d  # router, two norms
    total = layers * (per_layer_experts + per_layer_rest) + 2 * v * d + d
    active = total - layers * (e - cfg.top_k) * 3 * d * f
    count = zoo.count_parameters("mixtral-tiny")
    assert (count.total, count.active) == (total, active)
    assert zoo.count_parameters(zoo.build("mixtral-tiny")) == count


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_learns_a_fixed_batch(name):
    torch.manual_seed(0)
    model = zoo.build(name)
    vocab = zoo.config(name).vocab_size
    input_ids = torch.randint(0, vocab, (4, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = lm_loss(model, name, input_ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("name", CAUSAL_TINY)
def test_causal_model_is_causal(name):
    torch.manual_seed(0)
    model = zoo.build(name).eval()
    vocab = zoo.config(name).vocab_size
    ids = torch.randint(0, vocab, (2, 24))
    changed = ids.clone()
    changed[:, 12] = (ids[:, 12] + 1) % vocab
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("name", CAUSAL_TINY)
def test_masked_tokens_change_no_other_logit(name):
    torch.manual_seed(0)
    model = zoo.build(name).eval()
    vocab = zoo.config(name).vocab_size
    ids = torch.randint(0, vocab, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[0, 3:6] = False
    mask[1, 0:2] = False
    changed = ids.clone()
    changed[~mask] = (ids[~mask] + 7) % vocab
    with torch.no_grad():
        a, b = model(ids, mask).logits, model(changed, mask).logits
    torch.testing.assert_close(a[mask], b[mask])


def test_sliding_window_limits_what_a_position_sees():
    torch.manual_seed(0)
    model = zoo.build("mixtral-tiny", num_layers=1, sliding_window=4).eval()
    ids = torch.randint(0, 1024, (1, 12))
    changed = ids.clone()
    changed[0, 2] = (ids[0, 2] + 1) % 1024
    with torch.no_grad():
        a, b = model(ids).logits[0], model(changed).logits[0]
    # Position i sees positions i-3..i: a change at 2 reaches positions 2..5 only.
    for i in range(12):
        same = torch.allclose(a[i], b[i], rtol=1e-4, atol=1e-5)  # MoE blocking adds float noise
        assert same == (i < 2 or i > 5), i


@pytest.mark.parametrize("name", TINY)
def test_expert_kernel_reaches_every_moe_layer_and_grouped_mm_matches_fused(name):
    torch.manual_seed(0)
    fused = zoo.build(name, expert_kernel="fused")
    grouped_mm = zoo.build(name, expert_kernel="grouped_mm")
    grouped_mm.load_state_dict(fused.state_dict())
    kernels = {m.config.kernel for m in grouped_mm.modules() if isinstance(m, GroupedExperts)}
    assert kernels == {"grouped_mm"}
    assert {m.config.kernel for m in fused.modules() if isinstance(m, GroupedExperts)} == {"fused"}
    input_ids = torch.randint(0, zoo.config(name).vocab_size, (2, 16))
    losses = [lm_loss(model.eval(), name, input_ids) for model in (fused, grouped_mm)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_router_gate_precision_reaches_every_router(name):
    model = zoo.build(name, router_gate_precision="compute")
    precisions = {m.config.gate_precision for m in model.modules() if isinstance(m, Router)}
    assert precisions == {"compute"}
    assert {m.config.gate_precision for m in zoo.build(name).modules() if isinstance(m, Router)} == {"float32"}
    with pytest.raises(ValueError, match=r"router_gate_precision='bf16' is invalid"):
        zoo.config(name, router_gate_precision="bf16")


def test_expert_kernel_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"expert_kernel='cutlass' is invalid: expected one of \('auto', 'fused'"):
        zoo.config("mixtral-tiny", expert_kernel="cutlass")


@pytest.mark.parametrize("name", TINY)
def test_bf16_autocast_trains_every_family_like_float32(name):
    # Every family under CPU autocast to bf16, with the expert memory kept as CausalLMModule keeps it: same
    # loss to bf16 accuracy, and float32 gradients for the same parameters pointing the same way. Eval mode:
    # no jitter or random routing, so both passes route alike.
    from lightning_moe.nn import reuse_expert_grad_memory

    torch.manual_seed(0)
    model = zoo.build(name).eval()
    reuse_expert_grad_memory(model)
    ids = torch.randint(0, zoo.config(name).vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    loss32 = lm_loss(model, name, ids)
    loss32.backward()
    grads32 = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = lm_loss(model, name, ids)
    loss16.backward()
    torch.testing.assert_close(loss16.float(), loss32, rtol=1e-2, atol=0)
    grads16 = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads16.keys() == grads32.keys()
    for n, grad in grads16.items():
        assert grad.dtype == torch.float32, n
        if grads32[n].abs().sum() > 0:
            cos = torch.nn.functional.cosine_similarity(grad.flatten(), grads32[n].flatten(), dim=0)
            assert cos > 0.95, (n, float(cos))


@pytest.mark.parametrize("name", TINY)
def test_targets_give_the_cross_entropy_of_the_logits_and_its_gradients(name):
    torch.manual_seed(0)
    model = zoo.build(name).double()
    vocab = zoo.config(name).vocab_size
    ids, targets = torch.randint(0, vocab, (2, 16)), torch.randint(0, vocab, (2, 16))
    targets[0, :3] = -100
    args = (ids, torch.roll(ids, 1, dims=1)) if is_encoder_decoder(name) else (ids,)
    results = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same router jitter, if any
        out = model(*args, targets=targets) if fused else model(*args)
        if fused:
            assert out.logits is None
            loss = out.loss
        else:
            loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, vocab), targets.reshape(-1))
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (expected, expected_grads), (got, got_grads) = results
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert got_grads.keys() == expected_grads.keys()
    for n in expected_grads:
        torch.testing.assert_close(got_grads[n], expected_grads[n], rtol=1e-9, atol=1e-12, msg=n)


def test_targets_of_the_wrong_shape_name_the_field():
    model = zoo.build("mixtral-tiny")
    with pytest.raises(ValueError, match=r"targets.shape=\(2, 7\) is invalid: expected the shape of input_ids"):
        model(torch.zeros(2, 8, dtype=torch.long), targets=torch.zeros(2, 7, dtype=torch.long))
    switch = zoo.build("switch-tiny")
    ids = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"expected the shape of decoder_input_ids, \(2, 8\)"):
        switch(ids, ids, targets=torch.zeros(2, 9, dtype=torch.long))
