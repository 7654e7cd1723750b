import warnings

import pytest
import torch

from lightning_moe.nn import ExpertsConfig, FeedForward, MoEConfig, MoELayer, RouterConfig, activation_fn


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_experts=4, top_k=5), r"top_k=5 is invalid: must be <= num_experts \(4\)"),
        (dict(num_experts=0), r"num_experts=0 is invalid"),
        (dict(top_k=0), r"top_k=0 is invalid"),
        (dict(num_experts=8, n_group=4, topk_group=5), r"topk_group=5 is invalid: must be in \[1, n_group\]"),
        (dict(num_experts=10, n_group=4, topk_group=1), r"n_group=4 is invalid: must divide num_experts \(10\)"),
        (dict(num_experts=8, top_k=4, n_group=4, topk_group=1), r"topk_group=1 is invalid: the chosen groups hold 2"),
        (dict(score_func="tanh"), r"score_func='tanh' is invalid: must be one of 'softmax', 'sigmoid'"),
        (dict(kind="hash"), r"kind='hash' is invalid: must be one of 'token_choice', 'expert_choice'"),
        (dict(group_score="mean"), r"group_score='mean' is invalid"),
        (dict(gate_precision="bf16"), r"gate_precision='bf16' is invalid: must be one of 'float32', 'compute'"),
        (dict(routed_scaling_factor=0.0), r"routed_scaling_factor=0.0 is invalid: must be > 0"),
        (dict(jitter_eps=1.5), r"jitter_eps=1.5 is invalid"),
        (dict(kind="expert_choice", random_routing=True), r"kind='expert_choice' is invalid"),
        (dict(kind="expert_choice", normalize_topk=True), r"normalize_topk=True is invalid: token choice only"),
        (dict(kind="expert_choice", softmax_after_topk=True), r"softmax_after_topk=True is invalid: token choice"),
        (
            dict(score_func="sigmoid", softmax_after_topk=True),
            r"softmax_after_topk=True is invalid: only with score_func='softmax'",
        ),
    ],
)
def test_bad_router_config_names_field_value_and_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RouterConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            dict(activation="swish"),
            r"activation='swish' is invalid: must be one of 'relu', 'gelu', 'gelu_tanh', 'silu'",
        ),
        (dict(hidden_dim=0), r"hidden_dim=0 is invalid: must be >= 1"),
        (dict(init_std=-1.0), r"init_std=-1.0 is invalid"),
    ],
)
def test_bad_experts_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExpertsConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(capacity_factor=0.0), r"capacity_factor=0.0 is invalid: must be > 0, or None for dropless"),
        (dict(capacity_factor=-1.25), r"capacity_factor=-1.25 is invalid"),
        (dict(eval_capacity_factor=0.0), r"eval_capacity_factor=0.0 is invalid"),
        (dict(expert_capacity=0), r"expert_capacity=0 is invalid: must be >= 1"),
        (dict(drop_priority="random"), r"drop_priority='random' is invalid: must be one of 'position', 'weight'"),
        (dict(dispatch="megablocks"), r"dispatch='megablocks' is invalid: must be one of 'grouped', 'loop'"),
        (dict(shared_gate=True), r"shared_gate=True is invalid: needs a shared expert"),
        (dict(shared_hidden_dim=-1), r"shared_hidden_dim=-1 is invalid"),
        (dict(router=RouterConfig(kind="expert_choice")), r"capacity_factor=None is invalid: expert-choice"),
        (
            dict(router=RouterConfig(kind="expert_choice"), capacity_factor=1.0, drop_priority="weight"),
            r"drop_priority='weight' is invalid: token choice only",
        ),
        (dict(router="softmax"), r"router='softmax' is invalid: must be RouterConfig\(...\) or a dict of its fields"),
        (dict(experts=None), r"experts=None is invalid: must be ExpertsConfig\(...\) or a dict"),
    ],
)
def test_bad_moe_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**kwargs)


def test_nested_dicts_become_configs():
    cfg = MoEConfig(dim=8, router={"num_experts": 4, "top_k": 1}, experts={"hidden_dim": 16})
    assert isinstance(cfg.router, RouterConfig) and cfg.router.num_experts == 4
    assert isinstance(cfg.experts, ExpertsConfig) and cfg.experts.hidden_dim == 16


def test_nested_dicts_with_unknown_keys_name_them_and_the_fields_allowed():
    from lightning_moe.zoo.deepseek import DeepSeekConfig

    with pytest.raises(ValueError, match=r"router=.* is invalid: has unknown keys \['topk'\]; RouterConfig takes"):
        MoEConfig(dim=8, router={"num_experts": 4, "top_k": 1, "topk": 2}, experts={"hidden_dim": 16})
    with pytest.raises(ValueError, match=r"experts=.* is invalid: has unknown keys \['hidden'\]; ExpertsConfig"):
        MoEConfig(dim=8, router={"num_experts": 4, "top_k": 1}, experts={"hidden": 16})
    with pytest.raises(ValueError, match=r"rope=.* is invalid: has unknown keys \['base'\]; RopeConfig takes"):
        DeepSeekConfig(rope={"base": 10000.0})


def test_unknown_activation_function_raises():
    with pytest.raises(ValueError, match=r"activation='tanh' is invalid"):
        activation_fn("tanh")
    with pytest.raises(ValueError, match=r"activation='tanh' is invalid"):
        FeedForward(4, 8, activation="tanh")


def _layer():
    return MoELayer(MoEConfig(dim=8, router=RouterConfig(num_experts=4, top_k=2), experts=ExpertsConfig(hidden_dim=16)))


def test_input_width_mismatch_raises_before_any_work():
    with pytest.raises(ValueError, match=r"x.shape=\(2, 3, 6\) is invalid: expected \(B, S, 8\) or \(T, 8\)"):
        _layer()(torch.randn(2, 3, 6))


def test_input_rank_mismatch_raises():
    with pytest.raises(ValueError, match=r"x.shape=\(8,\) is invalid"):
        _layer()(torch.randn(8))


def test_input_dtype_other_than_the_weights_raises_outside_autocast():
    layer = _layer()
    with pytest.raises(ValueError, match=r"x.dtype=torch.float64 is invalid: the layer's weights are torch.float32"):
        layer(torch.randn(2, 3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x.dtype=torch.int64 is invalid"):
        layer(torch.ones(2, 3, 8, dtype=torch.long))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast runs any floating input in its dtype
        y, _ = layer(torch.randn(2, 3, 8, dtype=torch.float64))
    assert y.dtype == torch.bfloat16
    y, _ = layer.to(torch.float64)(torch.randn(2, 3, 8, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_mask_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"mask.shape=\(2, 4\) is invalid: expected \(2, 3\)"):
        _layer()(torch.randn(2, 3, 8), mask=torch.ones(2, 4, dtype=torch.bool))


def test_update_bias_without_score_bias_raises():
    with pytest.raises(ValueError, match=r"router.score_bias=False is invalid"):
        _layer().update_bias(0.01)


def test_update_bias_needs_a_positive_finite_gamma():
    layer = MoELayer(
        MoEConfig(dim=8, router=RouterConfig(num_experts=4, score_bias=True), experts=ExpertsConfig(hidden_dim=8))
    )
    layer.tokens_per_expert.copy_(torch.tensor([4.0, 0.0, 2.0, 2.0]))
    for gamma in (-0.01, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"gamma=.* is invalid: must be a finite number > 0"):
            layer.update_bias(gamma)
    layer.update_bias(0.01)  # the over-loaded expert's bias goes down, the under-loaded one's up
    assert layer.router.score_bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])


def test_expert_choice_refuses_sequence_capacity_scope():
    router = RouterConfig(num_experts=4, top_k=2, kind="expert_choice")
    with pytest.raises(ValueError, match=r"capacity_scope='sequence' is invalid: expert-choice routing picks"):
        MoEConfig(dim=8, router=router, capacity_factor=1.0, capacity_scope="sequence")


def test_grouped_experts_counts_mismatch_raises():
    layer = _layer()
    with pytest.raises(ValueError, match=r"counts_E sums to 5, but there are 6 copies"):
        layer.experts(torch.randn(6, 8), [1, 1, 1, 2])
    with pytest.raises(ValueError, match=r"counts_E has 3 entries, expected num_experts=4"):
        layer.experts(torch.randn(6, 8), [2, 2, 2])


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: RouterConfig(top_k=1.5), r"top_k=1.5 is invalid: must be an int"),
        (lambda: RouterConfig(num_experts=8.0), r"num_experts=8.0 is invalid: must be an int"),
        (lambda: RouterConfig(top_k=True), r"top_k=True is invalid: must be an int"),
        (lambda: RouterConfig(normalize_topk="false"), r"normalize_topk='false' is invalid: must be a bool"),
        (lambda: RouterConfig(routed_scaling_factor=float("inf")), r"routed_scaling_factor=inf is invalid: must be a"),
        (lambda: ExpertsConfig(gated="false"), r"gated='false' is invalid: must be a bool"),
        (lambda: ExpertsConfig(activation=None), r"activation=None is invalid: must be a string"),
        (lambda: MoEConfig(dim="16"), r"dim='16' is invalid: must be an int"),
        (lambda: MoEConfig(capacity_factor=float("inf")), r"capacity_factor=inf is invalid: must be a finite"),
        (lambda: MoEConfig(expert_capacity=2.5), r"expert_capacity=2.5 is invalid: must be an int or None"),
        (lambda: MoEConfig(router={"top_k": 2.0}), r"top_k=2.0 is invalid: must be an int"),
    ],
)
def test_config_fields_of_the_wrong_type_name_the_field(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_config_fields_take_ints_for_floats_and_none_where_optional():
    cfg = MoEConfig(dim=8, router=RouterConfig(routed_scaling_factor=2, init_std=0), capacity_factor=1)
    assert cfg.router.routed_scaling_factor == 2 and cfg.capacity_factor == 1
    assert MoEConfig(capacity_factor=None, expert_capacity=None).dropless
    assert not MoEConfig(eval_capacity_factor=0.25).dropless  # drops in eval


def test_other_configs_check_their_field_types_and_yarn_fields():
    from lightning_moe import zoo
    from lightning_moe.nn.attention import AttentionConfig
    from lightning_moe.nn.rope import RopeConfig

    with pytest.raises(ValueError, match=r"num_heads=2.0 is invalid: must be an int"):
        AttentionConfig(num_heads=2.0)
    with pytest.raises(ValueError, match=r"num_layers=2.0 is invalid: must be an int"):
        zoo.build("mixtral-tiny", num_layers=2.0)
    with pytest.raises(ValueError, match=r"original_max_position=0 is invalid: must be >= 1"):
        RopeConfig(scaling="yarn", factor=4.0, original_max_position=0)
    with pytest.raises(ValueError, match=r"beta_fast=0.0 is invalid with beta_slow=1.0"):
        RopeConfig(scaling="yarn", factor=4.0, beta_fast=0.0)
    with pytest.raises(ValueError, match=r"theta=1.0 is invalid with scaling='yarn'"):
        RopeConfig(scaling="yarn", factor=4.0, theta=1.0)
    assert RopeConfig(theta=1.0).theta == 1.0  # without YaRN a base of 1 divides by nothing


def test_top1_with_weights_normalised_to_one_warns_that_the_router_gets_no_task_gradient():
    torch.manual_seed(0)
    for flags in (dict(softmax_after_topk=True), dict(normalize_topk=True)):
        with pytest.warns(UserWarning, match=r"top_k=1\) with softmax_after_topk or normalize_topk"):
            router = RouterConfig(num_experts=4, top_k=1, **flags)
        layer = MoELayer(MoEConfig(dim=8, router=router, experts=ExpertsConfig(hidden_dim=8)))
        y, _ = layer(torch.randn(5, 8))
        y.sum().backward()
        # What the warning says: nothing but the trace of the 1e-20 in w / (w + 1e-20) when renormalising.
        assert layer.router.gate.weight.grad.abs().max() < 1e-9
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RouterConfig(num_experts=4, top_k=1)  # Switch: softmax over all experts, no warning


def test_random_routing_with_top1_warns_that_it_does_nothing():
    with pytest.warns(UserWarning, match=r"random_routing=True\) has no effect with top_k=1"):
        RouterConfig(num_experts=4, top_k=1, random_routing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RouterConfig(num_experts=4, top_k=2, random_routing=True)


def test_per_sequence_capacity_needs_sequences():
    cfg = MoEConfig(dim=4, router=RouterConfig(num_experts=2, top_k=1), experts=ExpertsConfig(hidden_dim=4),
                    capacity_factor=1.0, capacity_scope="sequence")  # fmt: skip
    layer = MoELayer(cfg)
    assert layer(torch.randn(2, 3, 4))[0].shape == (2, 3, 4)
    with pytest.raises(ValueError, match=r"x.shape=\(6, 4\) is invalid with capacity_scope='sequence'.*\(B, S, 4\)"):
        layer(torch.randn(6, 4))
