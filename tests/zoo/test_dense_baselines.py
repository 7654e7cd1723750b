"""Dense baselines: the same model with every MoE layer replaced by one FFN of equal active or total size."""

import pytest
import torch

from lightning_moe import zoo
from lightning_moe.nn.ffn import FeedForward
from lightning_moe.nn.moe import MoELayer
from lightning_moe.zoo.baselines import DECODER_TINY_PRESETS


def _meta(name):
    with torch.device("meta"):
        return zoo.build(name)


def _router_and_gate_params(model):
    """Parameters of an MoE model with no dense counterpart: routers and Qwen's shared-expert gates."""
    total = 0
    for m in model.modules():
        if isinstance(m, MoELayer):
            total += m.router.gate.weight.numel()
            total += m.shared_gate.weight.numel() if m.shared_gate is not None else 0
    return total


@pytest.mark.parametrize("name", DECODER_TINY_PRESETS)
def test_dense_baselines_have_the_parameter_counts_they_claim(name):
    moe = zoo.count_parameters(name)
    unmatched = _router_and_gate_params(_meta(name))
    active, total = zoo.count_parameters(f"{name}-dense"), zoo.count_parameters(f"{name}-dense-total")
    # A dense model uses every parameter for every token.
    assert active.active == active.total and total.active == total.total
    # Equal active: the dense total equals the MoE's active parameters less routers and shared gates.
    assert active.total == moe.active - unmatched
    # Equal total: the dense total equals the MoE's total parameters less routers and shared gates.
    assert total.total == moe.total - unmatched


def test_mixtral_tiny_dense_widths_by_independent_arithmetic():
    cfg = zoo.config("mixtral-tiny")
    d, f, e, k = cfg.dim, cfg.ffn_hidden, cfg.num_experts, cfg.top_k
    for suffix, width in (("dense", k * f), ("dense-total", e * f)):
        model = _meta(f"mixtral-tiny-{suffix}")
        ffns = [layer.ffn for layer in model.layers]
        assert all(isinstance(ffn, FeedForward) and ffn.w1.out_features == width for ffn in ffns)
        assert not any(isinstance(m, MoELayer) for m in model.modules())
        moe_ffn_params = cfg.num_layers * (e * 3 * d * f + d * e)  # experts (SwiGLU: 3 matrices) + routers
        dense_ffn_params = cfg.num_layers * 3 * d * width
        assert zoo.count_parameters(model).total == zoo.count_parameters("mixtral-tiny").total - (
            moe_ffn_params - dense_ffn_params
        )


def test_shared_experts_fold_into_the_dense_width():
    cfg = zoo.config("qwen-moe-tiny")
    model = _meta("qwen-moe-tiny-dense")
    assert model.layers[0].ffn.w1.out_features == cfg.dense_hidden  # natively dense layer unchanged
    assert model.layers[1].ffn.w1.out_features == cfg.top_k * cfg.expert_hidden + cfg.shared_expert_hidden


def test_glam_dense_baseline_keeps_the_experts_activation():
    ffn = _meta("glam-tiny-dense").layers[1].ffn  # an MoE position: plain GELU MLP like GLaM's experts
    assert ffn.w3 is None


def test_dense_override_works_on_any_preset_and_validates():
    assert zoo.config("mixtral-tiny", dense="total").dense == "total"
    with pytest.raises(ValueError, match="dense='half' is invalid"):
        zoo.config("mixtral-tiny", dense="half")


def test_dense_baseline_trains_a_step():
    torch.manual_seed(0)
    model = zoo.build("mixtral-tiny-dense")
    out = model(torch.randint(0, 1024, (2, 8)))
    assert out.router_stats == []
    out.logits.sum().backward()
