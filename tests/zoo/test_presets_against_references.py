"""The published presets against independent references: papers, published config.json files, transformers' models.

* Every preset ``to_hf`` can export writes a ``config.json`` that reads back as the preset and from which
  ``transformers`` builds (on the meta device) a model with exactly our total and active parameter counts.
* Presets without a ``transformers`` class are checked against their published ``config.json`` (DeepSeekMoE 16B)
  or against a hand count of the paper's architecture (Switch-XXL, Switch-C).
* Each preset's ``max_seq_len`` is its published context length (the ``ModelConfig`` contract).
"""

import copy
import dataclasses
import warnings

import pytest
import torch

from lightning_moe import zoo
from lightning_moe.interop import UnsupportedConfigError, hf_config_to_ours
from lightning_moe.interop.hf import _family_of, _hf_config
from lightning_moe.nn.attention import Attention
from lightning_moe.nn.ffn import FeedForward
from lightning_moe.nn.moe import MoELayer
from tests.zoo._helpers import transformers_counts

PUBLISHED = [name for name in zoo.names() if "tiny" not in name]
# Presets whose config transformers cannot hold (the reason is the export error's field).
NOT_EXPORTABLE = {
    "deepseek-moe-16b": "attention",  # MHA: transformers has DeepSeek-V2/V3 (MLA) only
    "switch-xxl-128": "gated",  # GEGLU experts: transformers' Switch experts are not gated
}
# Switch's presets count capacity over the batch by the paper's factors; transformers needs a fixed capacity per
# sequence, as the README says: switch-base-8 exports with {expert_capacity: 64, capacity_scope: sequence}.
SWITCH_EXPORT = {"expert_capacity": 64, "capacity_scope": "sequence"}
# What a config.json cannot hold, so that it does not come back: the V3 bias-balancing speed (to_hf warns), and
# Switch's capacity factors (transformers applies the fixed capacity in training and eval alike).
NOT_IN_CONFIG_JSON = {"bias_update_speed", "capacity_factor", "eval_capacity_factor"}


def _exportable(name: str) -> zoo.ModelConfig:
    overrides = SWITCH_EXPORT if zoo.family_of(name) == "switch" else {}
    return zoo.config(name, **overrides)


def _exported_config_json(cfg: zoo.ModelConfig) -> dict:
    """The config.json ``to_hf`` writes for ``cfg`` (its config part: the weights of a 671B model are not built)."""
    return _hf_config(cfg, _family_of(cfg))


GLAM = [name for name in PUBLISHED if zoo.family_of(name) == "glam"]  # no transformers class at all
EXPORTABLE = sorted(set(PUBLISHED) - set(NOT_EXPORTABLE) - set(GLAM))
# Switch-C's 1.57T parameters take half a minute for transformers to build even on meta; Switch-Base-16/32/64/256
# repeat Switch-Base-8/128 with other expert counts. Their exported configs are still read back below.
TRANSFORMERS_BUILT = sorted(
    set(EXPORTABLE) - {"switch-c-2048", "switch-base-16", "switch-base-32", "switch-base-64", "switch-base-256"}
)
TINY_EXPORTABLE = ["mixtral-tiny", "qwen-moe-tiny", "qwen3-moe-tiny", "deepseek-tiny", "switch-tiny"]


def test_the_presets_that_cannot_be_exported_are_refused_by_the_field_that_prevents_it():
    for name, field in NOT_EXPORTABLE.items():
        with pytest.raises(UnsupportedConfigError, match=rf"^{field}=.* cannot be exported to Hugging Face"):
            _family_of(zoo.config(name))
    for name in GLAM:
        with pytest.raises(UnsupportedConfigError, match="GlamConfig has no Hugging Face counterpart"):
            _family_of(zoo.config(name))


@pytest.mark.parametrize("name", EXPORTABLE + TINY_EXPORTABLE)
def test_the_exported_config_json_reads_back_as_the_preset(name):
    cfg = _exportable(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the exported file holds no field that needs a warning to read
        read = hf_config_to_ours(copy.deepcopy(_exported_config_json(cfg)))
    assert type(read) is type(cfg)
    differ = {
        f.name: (getattr(cfg, f.name), getattr(read, f.name))
        for f in dataclasses.fields(cfg)
        if f.name not in NOT_IN_CONFIG_JSON and getattr(cfg, f.name) != getattr(read, f.name)
    }
    assert not differ, f"preset vs its exported config.json read back (preset, read): {differ}"


@pytest.mark.parametrize("name", TRANSFORMERS_BUILT + TINY_EXPORTABLE)
def test_transformers_builds_the_exported_preset_with_our_total_and_active_counts(name):
    cfg = _exportable(name)
    total, active = transformers_counts(_exported_config_json(cfg))
    ours = zoo.count_parameters(cfg)
    assert (ours.total, ours.active) == (total, active)


# deepseek-ai/deepseek-moe-16b-base/config.json (model_type "deepseek", remote code; transformers has no class for
# it): its architecture fields.
DEEPSEEK_MOE_16B = {
    "attention_bias": False,
    "aux_loss_alpha": 0.001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "max_position_embeddings": 4096,
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 28,
    "num_key_value_heads": 16,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "vocab_size": 102400,
}


def test_deepseek_moe_16b_is_its_published_config_json():
    c, cfg = DEEPSEEK_MOE_16B, zoo.config("deepseek-moe-16b")
    assert (cfg.vocab_size, cfg.dim, cfg.num_layers, cfg.max_seq_len) == (
        c["vocab_size"],
        c["hidden_size"],
        c["num_hidden_layers"],
        c["max_position_embeddings"],
    )
    assert (cfg.first_k_dense, cfg.dense_hidden, cfg.moe_hidden) == (
        c["first_k_dense_replace"],
        c["intermediate_size"],
        c["moe_intermediate_size"],
    )
    assert (cfg.num_experts, cfg.n_shared_experts, cfg.top_k, cfg.normalize_topk, cfg.score_func) == (
        c["n_routed_experts"],
        c["n_shared_experts"],
        c["num_experts_per_tok"],
        c["norm_topk_prob"],
        c["scoring_func"],
    )
    assert (cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor, cfg.score_bias) == (1, 1, 1.0, False)  # greedy
    assert (cfg.norm_eps, cfg.rope.theta, cfg.rope.scaling, cfg.tie_embeddings) == (
        c["rms_norm_eps"],
        c["rope_theta"],
        "none",
        c["tie_word_embeddings"],
    )
    assert cfg.seq_balance_coef == c["aux_loss_alpha"]  # seq_aux: the sequence-wise balance loss
    # The built model: LLaMA-style MHA (16 heads of 128, as many KV heads, no bias, RoPE over the whole head), a
    # dense first layer, then MoE layers with 64 routed experts and 2 shared ones folded into one FFN.
    with torch.device("meta"):
        model = zoo.build("deepseek-moe-16b")
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    assert model.rope[1] == head_dim
    for i, layer in enumerate(model.layers):
        attention = layer.attention
        assert isinstance(attention, Attention)
        assert attention.q_proj.weight.shape == (c["num_attention_heads"] * head_dim, c["hidden_size"])
        assert attention.k_proj.weight.shape == (c["num_key_value_heads"] * head_dim, c["hidden_size"])
        assert attention.q_proj.bias is None and attention.o_proj.bias is None
        if i < c["first_k_dense_replace"]:
            assert isinstance(layer.ffn, FeedForward) and layer.ffn.w1.out_features == c["intermediate_size"]
        else:
            assert isinstance(layer.ffn, MoELayer)
            moe = layer.ffn.config
            assert (moe.num_experts, moe.router.top_k, moe.experts.hidden_dim, moe.shared_hidden_dim) == (
                c["n_routed_experts"],
                c["num_experts_per_tok"],
                c["moe_intermediate_size"],
                c["n_shared_experts"] * c["moe_intermediate_size"],
            )
    assert model.lm_head.weight is not model.embed.weight


def _switch_count_by_hand(cfg) -> tuple[int, int]:
    """Switch Transformer parameters, counted from the paper's architecture (T5 encoder-decoder, no biases)."""
    d, inner, f, e, v = cfg.dim, cfg.num_heads * cfg.head_dim, cfg.ffn_hidden, cfg.num_experts, cfg.vocab_size
    ffn = (3 if cfg.gated else 2) * d * f  # GEGLU: two input projections and the output one
    sparse = [cfg.sparse_step == 1 or i % cfg.sparse_step == 1 for i in range(cfg.num_layers)]
    attention = 4 * d * inner  # q, k, v, o
    total = inactive = 0
    for moe in sparse:
        layer_ffn = e * ffn + d * e if moe else ffn  # experts and the router
        total += attention + 2 * d + layer_ffn  # encoder layer: self-attention, FFN, two RMSNorms
        total += 2 * attention + 3 * d + layer_ffn  # decoder layer: self- and cross-attention, three RMSNorms
        inactive += 2 * (e - 1) * ffn if moe else 0  # top-1: one expert per token in each stack
    total += 2 * cfg.num_buckets * cfg.num_heads  # one relative position bias per stack
    total += 2 * d + v * d  # the two stacks' final norms and the embedding, tied to the LM head
    return total, total - inactive


@pytest.mark.parametrize("name", ["switch-base-8", "switch-large-128", "switch-xxl-128", "switch-c-2048"])
def test_switch_counts_by_hand_from_the_papers_architecture(name):
    cfg = zoo.config(name)
    count = zoo.count_parameters(name)
    assert (count.total, count.active) == _switch_count_by_hand(cfg)


def test_switch_xxl_and_c_are_the_papers_table_9():
    # Switch paper Table 9: Switch-XXL 395B (d_model 4096, d_ff 10240, 64 heads of 64, 24 layers, 128 experts,
    # every other FFN, GEGLU); Switch-C 1571B (2080, 6144, 32 heads of 64, 15 layers, 2048 experts, every FFN).
    xxl, c = zoo.config("switch-xxl-128"), zoo.config("switch-c-2048")
    assert (xxl.dim, xxl.ffn_hidden, xxl.num_heads, xxl.head_dim, xxl.num_layers, xxl.num_experts) == (
        4096,
        10240,
        64,
        64,
        24,
        128,
    )
    assert (xxl.sparse_step, xxl.gated, xxl.activation) == (2, True, "gelu_tanh")
    assert (c.dim, c.ffn_hidden, c.num_heads, c.head_dim, c.num_layers, c.num_experts, c.sparse_step) == (
        2080,
        6144,
        32,
        64,
        15,
        2048,
        1,
    )
    assert round(zoo.count_parameters("switch-xxl-128").total / 1e9) == 395
    assert round(zoo.count_parameters("switch-c-2048").total / 1e9) == 1571


@pytest.mark.parametrize("name", GLAM)
def test_glam_presets_context_is_the_papers_training_sequence_length(name):
    # GLaM paper (Du et al. 2022), Sec. 5.1: "We use a maximum sequence length of 1024 tokens". max_seq_len is the
    # published context length (ModelConfig); longer training blocks and generations are refused by it.
    assert zoo.config(name).max_seq_len == 1024


@pytest.mark.parametrize(("override", "value"), [({"num_heads": 3}, 3), ({"dim": 130, "num_heads": 2}, 2)])
def test_deepseek_mha_heads_that_do_not_split_the_width_are_refused_by_num_heads(override, value):
    # DeepSeekMoE's MHA has no head_dim field: the error names num_heads (not a head_dim the config lacks) and comes
    # from the config, before anything is built.
    with pytest.raises(ValueError, match=rf"^num_heads={value} is invalid for attention='mha'") as error:
        zoo.config("deepseek-moe-16b", **override)
    assert "head_dim" not in str(error.value)
    zoo.config("deepseek-moe-16b", **override, attention="mla")  # MLA heads have their own widths


def test_qwen_dense_layers_given_as_a_tuple_are_the_same_config_as_the_list():
    # mlp_only_layers accepts a tuple of layer indices: it is the same model, so the same config, and it survives
    # the round trip through the exported config.json (which holds a list).
    as_tuple, as_list = (
        zoo.config("qwen-moe-tiny", mlp_only_layers=(0, 2)),
        zoo.config("qwen-moe-tiny", mlp_only_layers=[0, 2]),
    )
    assert as_tuple == as_list
    read = hf_config_to_ours(copy.deepcopy(_exported_config_json(as_tuple)))
    assert read.mlp_only_layers == as_tuple.mlp_only_layers
