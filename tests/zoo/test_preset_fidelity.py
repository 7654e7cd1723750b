"""Full-size presets against the published models: config.json values, and transformers' own parameter counts.

Each ``PUBLISHED_CONFIGS`` entry is the architecture part of the model's Hugging Face ``config.json`` (source named
above it; token ids, dtype and other bookkeeping left out, as is DeepSeek-V3's fp8 ``quantization_config``). Three
independent checks per preset:

* ``hf_config_to_ours(published)`` is the preset's config, field for field (training-only coefficients aside);
* ``transformers`` builds, on the meta device, a model with exactly as many parameters as ours;
* the active count of ``zoo.count_parameters`` equals the one read off ``transformers``' model (everything but the
  ``E - k`` of ``E`` routed experts a token skips).
"""

import copy

import pytest

from lightning_moe import zoo
from lightning_moe.interop import hf_config_to_ours
from tests.zoo._helpers import transformers_counts

_MIXTRAL = {
    "model_type": "mixtral",
    "architectures": ["MixtralForCausalLM"],
    "hidden_act": "silu",
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_experts_per_tok": 2,
    "num_local_experts": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
}
_QWEN3_MOE = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "decoder_sparse_step": 1,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 40960,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
_DEEPSEEK = {
    "attention_bias": False,
    "hidden_act": "silu",
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "moe_layer_freq": 1,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "seq_aux": True,
    "tie_word_embeddings": False,
    "v_head_dim": 128,
}


def _yarn(mscale: float) -> dict:
    return {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": mscale,
        "mscale_all_dim": mscale,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    }


def _switch(num_experts: int, **fields: object) -> dict:
    # google/switch-base-{8..256}/config.json (architecture fields).
    base = {
        "model_type": "switch_transformers",
        "architectures": ["SwitchTransformersForConditionalGeneration"],
        "d_ff": 3072,
        "d_kv": 64,
        "d_model": 768,
        "expert_capacity": 64,
        "layer_norm_epsilon": 1e-06,
        "num_decoder_layers": 12,
        "num_experts": num_experts,
        "num_heads": 12,
        "num_layers": 12,
        "num_sparse_decoder_layers": 6,
        "num_sparse_encoder_layers": 6,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32,
        "router_jitter_noise": 0.01,
        "vocab_size": 32128,
    }
    return base | fields


PUBLISHED_CONFIGS = {
    # mistralai/Mixtral-8x7B-v0.1/config.json
    "mixtral-8x7b": _MIXTRAL
    | {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "num_hidden_layers": 32,
        "router_aux_loss_coef": 0.02,
        "vocab_size": 32000,
    },
    # mistralai/Mixtral-8x22B-v0.1/config.json (with the 32768-token vocabulary of Mistral's v3 tokenizer)
    "mixtral-8x22b": _MIXTRAL
    | {
        "hidden_size": 6144,
        "intermediate_size": 16384,
        "max_position_embeddings": 65536,
        "num_attention_heads": 48,
        "num_hidden_layers": 56,
        "router_aux_loss_coef": 0.001,
        "vocab_size": 32768,
    },
    # Qwen/Qwen1.5-MoE-A2.7B/config.json
    "qwen1.5-moe-a2.7b": {
        "model_type": "qwen2_moe",
        "architectures": ["Qwen2MoeForCausalLM"],
        "decoder_sparse_step": 1,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "max_position_embeddings": 8192,
        "max_window_layers": 21,
        "moe_intermediate_size": 1408,
        "norm_topk_prob": False,
        "num_attention_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 24,
        "num_key_value_heads": 16,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": 5632,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    # Qwen/Qwen2-57B-A14B/config.json
    "qwen2-57b-a14b": {
        "model_type": "qwen2_moe",
        "architectures": ["Qwen2MoeForCausalLM"],
        "decoder_sparse_step": 1,
        "hidden_act": "silu",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "max_position_embeddings": 131072,
        "max_window_layers": 28,
        "moe_intermediate_size": 2560,
        "norm_topk_prob": False,
        "num_attention_heads": 28,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": 20480,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    # Qwen/Qwen3-30B-A3B/config.json
    "qwen3-30b-a3b": _QWEN3_MOE
    | {
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "max_window_layers": 48,
        "moe_intermediate_size": 768,
        "num_attention_heads": 32,
        "num_hidden_layers": 48,
    },
    # Qwen/Qwen3-235B-A22B/config.json
    "qwen3-235b-a22b": _QWEN3_MOE
    | {
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "max_window_layers": 94,
        "moe_intermediate_size": 1536,
        "num_attention_heads": 64,
        "num_hidden_layers": 94,
    },
    # deepseek-ai/DeepSeek-V2-Lite/config.json
    "deepseek-v2-lite": _DEEPSEEK
    | {
        "model_type": "deepseek_v2",
        "architectures": ["DeepseekV2ForCausalLM"],
        "aux_loss_alpha": 0.001,
        "first_k_dense_replace": 1,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "n_group": 1,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "norm_topk_prob": False,
        "num_attention_heads": 16,
        "num_experts_per_tok": 6,
        "num_hidden_layers": 27,
        "num_key_value_heads": 16,
        "q_lora_rank": None,
        "rope_scaling": _yarn(0.707),
        "routed_scaling_factor": 1.0,
        "scoring_func": "softmax",
        "topk_group": 1,
        "topk_method": "greedy",
        "vocab_size": 102400,
    },
    # deepseek-ai/DeepSeek-V2/config.json
    "deepseek-v2": _DEEPSEEK
    | {
        "model_type": "deepseek_v2",
        "architectures": ["DeepseekV2ForCausalLM"],
        "aux_loss_alpha": 0.003,
        "first_k_dense_replace": 1,
        "hidden_size": 5120,
        "intermediate_size": 12288,
        "moe_intermediate_size": 1536,
        "n_group": 8,
        "n_routed_experts": 160,
        "n_shared_experts": 2,
        "norm_topk_prob": False,
        "num_attention_heads": 128,
        "num_experts_per_tok": 6,
        "num_hidden_layers": 60,
        "num_key_value_heads": 128,
        "q_lora_rank": 1536,
        "rope_scaling": _yarn(0.707),
        "routed_scaling_factor": 16.0,
        "scoring_func": "softmax",
        "topk_group": 3,
        "topk_method": "group_limited_greedy",
        "vocab_size": 102400,
    },
    # deepseek-ai/DeepSeek-V3/config.json (num_nextn_predict_layers: the MTP module, not part of the 671B and
    # skipped by transformers and by our preset, whose mtp_depth is 0)
    "deepseek-v3": _DEEPSEEK
    | {
        "model_type": "deepseek_v3",
        "architectures": ["DeepseekV3ForCausalLM"],
        "aux_loss_alpha": 0.001,
        "first_k_dense_replace": 3,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "n_group": 8,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 61,
        "num_key_value_heads": 128,
        "num_nextn_predict_layers": 1,
        "q_lora_rank": 1536,
        "rope_scaling": _yarn(1.0),
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "topk_group": 4,
        "topk_method": "noaux_tc",
        "vocab_size": 129280,
    },
    **{f"switch-base-{e}": _switch(e) for e in (8, 16, 32, 64, 128, 256)},
    # google/switch-large-128/config.json
    "switch-large-128": _switch(
        128,
        d_ff=4096,
        d_model=1024,
        num_decoder_layers=24,
        num_heads=16,
        num_layers=24,
        num_sparse_decoder_layers=12,
        num_sparse_encoder_layers=12,
    ),
}

# Training-only coefficients: the presets take the papers' values in our per-layer normalisation, where a
# config.json holds transformers' pooled-loss coefficient (README, "Hugging Face checkpoints"); they do not change
# the model. Switch's capacity: the presets follow the paper's factors (1.25 train, 2.0 eval), the checkpoints a
# fixed expert_capacity per sequence (zoo/switch.py).
TRAINING_ONLY = {"load_balance_coef", "z_loss_coef", "seq_balance_coef", "bias_update_speed"}
SWITCH_CAPACITY = {"capacity_factor", "eval_capacity_factor", "expert_capacity", "capacity_scope"}

FULL_SIZE = [name for name in zoo.names() if "tiny" not in name]
# transformers can hold every full-size preset but these: GLaM and DeepSeekMoE-16B (MHA) have no transformers
# class; Switch-XXL's experts are gated (transformers' are not); Switch-C's 1.57T parameters take half a minute to
# build even on meta (its config mapping is that of the other Switch presets).
WITHOUT_HF = {"deepseek-moe-16b", "switch-xxl-128", "switch-c-2048"} | {n for n in FULL_SIZE if n.startswith("glam")}


def test_every_full_size_preset_with_a_transformers_family_is_checked():
    assert set(PUBLISHED_CONFIGS) == set(FULL_SIZE) - WITHOUT_HF


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_published_config_json_reads_as_the_preset(name):
    ours = zoo.config(name)
    read = hf_config_to_ours(copy.deepcopy(PUBLISHED_CONFIGS[name]))
    skip = TRAINING_ONLY | (SWITCH_CAPACITY if zoo.family_of(name) == "switch" else set())
    differ = {
        field: (getattr(ours, field), getattr(read, field))
        for field in ours.__dataclass_fields__
        if field not in skip and getattr(ours, field) != getattr(read, field)
    }
    assert not differ, f"preset vs published config.json (preset, published): {differ}"


@pytest.mark.parametrize("name", sorted(n for n in PUBLISHED_CONFIGS if zoo.family_of(n) in ("mixtral", "qwen_moe")))
def test_mixtral_and_qwen_presets_weight_each_layer_by_the_published_coefficient_times_top_k(name):
    # The presets' per-layer convention (Switch, GShard, Megatron-Core): HF's router_aux_loss_coef times top_k,
    # HF's loss for one MoE layer being top_k times ours.
    published = PUBLISHED_CONFIGS[name]
    ours = zoo.config(name)
    assert ours.load_balance_coef == pytest.approx(published["router_aux_loss_coef"] * ours.top_k)


# The big Switch-Base presets repeat switch-base-8/-128's structure with more experts; skipped to keep this fast.
HF_COUNTED = sorted(set(PUBLISHED_CONFIGS) - {"switch-base-16", "switch-base-32", "switch-base-64", "switch-base-256"})


@pytest.mark.parametrize("name", HF_COUNTED)
def test_transformers_builds_the_published_model_with_our_parameter_counts(name):
    total, active = transformers_counts(PUBLISHED_CONFIGS[name])
    ours = zoo.count_parameters(name)
    assert (ours.total, ours.active) == (total, active)


def test_preset_context_is_the_published_max_position_embeddings():
    # max_seq_len bounds training blocks and generation, and to_hf writes it as max_position_embeddings.
    for name, published in PUBLISHED_CONFIGS.items():
        if "max_position_embeddings" in published:
            assert zoo.config(name).max_seq_len == published["max_position_embeddings"], name


@pytest.mark.parametrize(
    ("arch", "override", "match"),
    [
        # Fields the blocks receive under another name, or a dense FFN that torch fails to build: the error names
        # the field the caller set, before anything is built.
        ("glam-tiny", {"ffn_hidden": -3}, r"ffn_hidden=-3 is invalid: must be >= 1"),
        ("switch-tiny", {"ffn_hidden": -3}, r"ffn_hidden=-3 is invalid: must be >= 1"),
        ("mixtral-tiny", {"ffn_hidden": 0}, r"ffn_hidden=0 is invalid: must be >= 1"),
        ("qwen-moe-tiny", {"expert_hidden": 0}, r"expert_hidden=0 is invalid: must be >= 1"),
        ("qwen-moe-tiny", {"shared_expert_hidden": -1}, r"shared_expert_hidden=-1 is invalid: must be >= 0"),
        ("deepseek-tiny", {"moe_hidden": 0}, r"moe_hidden=0 is invalid: must be >= 1"),
        ("deepseek-tiny", {"n_shared_experts": -1}, r"n_shared_experts=-1 is invalid: must be >= 0"),
        ("mixtral-tiny", {"router_jitter": -0.1}, r"router_jitter=-0.1 is invalid: must be in \[0, 1\)"),
        ("switch-tiny", {"router_jitter": 1.0}, r"router_jitter=1.0 is invalid: must be in \[0, 1\)"),
        ("qwen3-moe-tiny", {"rope_theta": 0.0}, r"rope_theta=0.0 is invalid: must be > 0"),
    ],
)
def test_bad_family_fields_are_refused_by_their_own_name_before_building(arch, override, match):
    with pytest.raises(ValueError, match=match):
        zoo.config(arch, **override)
