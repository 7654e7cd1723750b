"""Hugging Face interop on unusual but valid configs: odd values convert exactly, round-trip, or are refused.

Every case builds a tiny random ``transformers`` model, so ``transformers`` 5 is the reference throughout.
"""

import dataclasses
import json
import warnings

import pytest
import torch

from lightning_moe import zoo
from lightning_moe.interop import UnsupportedConfigError, from_hf, to_hf
from lightning_moe.module import CausalLMModule
from lightning_moe.nn.rope import RopeConfig

transformers = pytest.importorskip("transformers")

VOCAB = 61


def _perturb(hf: torch.nn.Module) -> torch.nn.Module:
    """Weights off their init scale (sharp routers, non-unit norms, a non-zero V3 correction bias), eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("mlp.gate.weight", "router.classifier.weight")):
                p.normal_(std=1.0)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(std=0.1)
        for name, buffer in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.3 * torch.randn_like(buffer))
    hf.generation_config.eos_token_id = None  # greedy generation runs its full length, as ours does
    return hf.float().eval()


def mixtral(**changes):
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        attn_implementation="eager",
    )
    return _perturb(transformers.MixtralForCausalLM(transformers.MixtralConfig(**(cfg | changes))))


def qwen2(**changes):
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=12,
        shared_expert_intermediate_size=24,
        attn_implementation="eager",
    )
    return _perturb(transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**(cfg | changes))))


def qwen3(**changes):
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=12,
        attn_implementation="eager",
    )
    return _perturb(transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**(cfg | changes))))


def deepseek(v3: bool, **changes):
    heads = changes.get("num_attention_heads", 2)
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        n_routed_experts=8,
        num_experts_per_tok=2,
        first_k_dense_replace=0,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        max_position_embeddings=64,
        n_group=1,
        topk_group=1,
        attn_implementation="eager",
    )
    if v3:
        return _perturb(transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**(cfg | changes))))
    return _perturb(transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**(cfg | changes))))


def _yarn(**extra):
    return {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16} | extra


CASES = {
    "mixtral-tied-headdim12-kv1-eps1e-2": lambda: mixtral(
        tie_word_embeddings=True, head_dim=12, num_key_value_heads=1, rms_norm_eps=1e-2
    ),
    "mixtral-maxpos4": lambda: mixtral(max_position_embeddings=4),  # shorter than the sequences below
    "mixtral-window3-theta123": lambda: mixtral(
        sliding_window=3, rope_parameters={"rope_type": "default", "rope_theta": 123.0}
    ),
    "qwen2-step2-mlponly1-normalized": lambda: qwen2(decoder_sparse_step=2, mlp_only_layers=[1], norm_topk_prob=True),
    "qwen2-nobias-tied-headdim12-kv1": lambda: qwen2(
        qkv_bias=False, tie_word_embeddings=True, head_dim=12, num_key_value_heads=1
    ),
    "qwen3-step2-unnormalized-tied": lambda: qwen3(
        decoder_sparse_step=2, norm_topk_prob=False, tie_word_embeddings=True
    ),
    "deepseek-v2-greedy-scaled-yarn": lambda: deepseek(
        False,
        topk_method="greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.7,
        rope_parameters=_yarn(mscale=0.8, mscale_all_dim=0.6),
    ),
    "deepseek-v2-grouped-g1-qlora-dense1-h1": lambda: deepseek(
        False,
        topk_method="group_limited_greedy",
        q_lora_rank=12,
        first_k_dense_replace=1,
        num_hidden_layers=3,
        num_attention_heads=1,
        rope_parameters=_yarn(mscale=0.8),
    ),
    "deepseek-v3-unnormalized-scaled-tied": lambda: deepseek(
        True, norm_topk_prob=False, routed_scaling_factor=1.7, tie_word_embeddings=True, n_group=4, topk_group=1
    ),
    "deepseek-v3-qlora-dense1-yarn": lambda: deepseek(
        True,
        q_lora_rank=12,
        first_k_dense_replace=1,
        num_hidden_layers=3,
        n_group=2,
        topk_group=1,
        rope_parameters=_yarn(mscale=0.8, mscale_all_dim=0.6),
    ),
}


def _ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq))


@pytest.mark.parametrize("case", sorted(CASES))
def test_odd_configs_match_hugging_face_and_round_trip(case, tmp_path):
    hf = CASES[case]()
    ours = from_hf(hf).eval()
    ids = _ids(2, 12)
    with torch.no_grad():
        theirs = hf(ids).logits
        torch.testing.assert_close(ours(ids).logits, theirs, rtol=1e-5, atol=1e-5)
        to_hf(ours, tmp_path)
        reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, attn_implementation="eager", output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"]
        torch.testing.assert_close(reloaded.float().eval()(ids).logits, theirs, rtol=1e-5, atol=1e-5)
    assert from_hf(tmp_path).zoo_config == ours.zoo_config


GENERATION_CASES = [  # one per family (generate() keeps to max_seq_len, so not mixtral-maxpos4)
    "mixtral-window3-theta123",
    "qwen2-step2-mlponly1-normalized",
    "qwen3-step2-unnormalized-tied",
    "deepseek-v2-grouped-g1-qlora-dense1-h1",
    "deepseek-v3-qlora-dense1-yarn",
]


@pytest.mark.parametrize("case", GENERATION_CASES)
def test_cached_generation_equals_uncached_and_hugging_faces_greedy_with_left_padding(case, tmp_path):
    hf = CASES[case]()
    hf.save_pretrained(tmp_path)
    module = CausalLMModule(arch="mixtral-tiny", init_from=str(tmp_path))
    ids = _ids(2, 5, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # row 0: a 3-token prompt padded on the left
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)
        padded_logits = hf(ids, attention_mask=mask).logits
        torch.testing.assert_close(
            module.model.eval()(ids, mask).logits[mask.bool()], padded_logits[mask.bool()], rtol=1e-5, atol=1e-5
        )
    cached = module.generate(ids, 7, attention_mask=mask)
    assert torch.equal(cached, module.generate(ids, 7, attention_mask=mask, use_cache=False))
    assert torch.equal(cached, theirs)
    assert torch.equal(cached[:1, 2:], module.generate(ids[:1, 2:], 7))  # the padded row continues as alone


# ------------------------------------------------------------------------------------------------ shared experts


@pytest.mark.parametrize(
    "make",
    [
        lambda: qwen2(shared_expert_intermediate_size=0),
        lambda: deepseek(False, n_shared_experts=0),
        lambda: deepseek(True, n_shared_experts=0),
    ],
    ids=["qwen2", "deepseek-v2", "deepseek-v3"],
)
def test_a_model_without_shared_experts_exports_every_tensor_transformers_builds(make, tmp_path):
    # transformers builds a width-0 shared expert (Qwen2-MoE: and its gate); from_hf accepts such a model, so to_hf
    # must write it back: as a complete checkpoint from_pretrained loads with nothing missing and the same logits.
    hf = make()
    ours = from_hf(hf)
    to_hf(ours, tmp_path)
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert set(reloaded.state_dict()) == set(hf.state_dict())
    ids = _ids(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.float().eval()(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
    assert from_hf(tmp_path).zoo_config == ours.zoo_config


# ------------------------------------------------------------------------------------------------ DeepSeek export


def _deepseek_tiny(**changes):
    return dataclasses.replace(zoo.config("deepseek-tiny"), vocab_size=VOCAB, num_layers=2, **changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"score_func": "softmax", "score_bias": True, "group_score": "max", "normalize_topk": False},
            r"score_bias=True cannot be exported",
        ),
        ({"score_func": "sigmoid", "score_bias": True, "group_score": "max"}, r"group_score='max' cannot be exported"),
        (
            {"score_func": "sigmoid", "score_bias": False, "group_score": "top2_sum"},
            r"score_bias=False cannot be exported",
        ),
        (
            {"score_func": "softmax", "score_bias": False, "group_score": "top2_sum", "normalize_topk": False},
            r"group_score='top2_sum' cannot be exported",
        ),
    ],
)
def test_deepseek_export_refusal_names_the_field_that_prevents_it(changes, message, tmp_path):
    with pytest.raises(UnsupportedConfigError, match=message):
        to_hf(zoo.build(_deepseek_tiny(**changes)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_deepseek_with_one_group_exports_whatever_its_group_score(score_func, tmp_path):
    # One group: the group score selects nothing, so the V2/V3 group score need not match.
    other = "top2_sum" if score_func == "softmax" else "max"
    cfg = _deepseek_tiny(
        score_func=score_func, score_bias=score_func == "sigmoid", normalize_topk=score_func == "sigmoid",
        n_group=1, topk_group=1, group_score=other,
    )  # fmt: skip
    torch.manual_seed(0)
    ours = zoo.build(cfg).eval()
    to_hf(ours, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids = _ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_export_warns_about_training_settings_the_hugging_face_config_cannot_hold(tmp_path):
    cfg = dataclasses.replace(_deepseek_tiny(), bias_update_speed=1e-3, z_loss_coef=1e-4, seq_balance_coef=1e-3)
    with pytest.warns(UserWarning, match=r"'z_loss_coef': 0.0001, 'bias_update_speed': 0.001\} have no place"):
        to_hf(zoo.build(cfg), tmp_path / "ds")
    assert json.loads((tmp_path / "ds" / "config.json").read_text())["aux_loss_alpha"] == 1e-3  # exported, no warning
    mixtral_cfg = dataclasses.replace(zoo.config("mixtral-tiny"), vocab_size=VOCAB, num_layers=1, z_loss_coef=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its load-balance coefficient is router_aux_loss_coef: nothing dropped
        to_hf(zoo.build(dataclasses.replace(mixtral_cfg, seq_balance_coef=0.0, bias_update_speed=0.0)), tmp_path / "m")


def test_yarn_mscale_zero_with_mscale_all_dim_is_refused_on_export(tmp_path):
    # transformers reads mscale=0 as unset: its cos/sin factor would be yarn_mscale(factor), not ours
    # yarn_mscale(factor, 0) / yarn_mscale(factor, mscale_all_dim), so the export would be another model.
    rope = RopeConfig(scaling="yarn", factor=4.0, original_max_position=16, mscale=0.0, mscale_all_dim=0.7)
    with pytest.raises(UnsupportedConfigError, match=r"rope\.mscale=0\.0 with rope\.mscale_all_dim=0\.7"):
        to_hf(zoo.build(_deepseek_tiny(rope=rope)), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # Its neighbours export to the same model.
    for mscale, mscale_all_dim in [(0.8, 0.7), (0.0, 0.0)]:
        cfg = _deepseek_tiny(rope=dataclasses.replace(rope, mscale=mscale, mscale_all_dim=mscale_all_dim))
        torch.manual_seed(0)
        ours = zoo.build(cfg).eval()
        to_hf(ours, tmp_path / f"{mscale}")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"{mscale}", attn_implementation="eager")
        ids = _ids(2, 20)
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, hf.eval()(ids).logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ Switch layout


def _switch_hf(num_layers: int, num_sparse: int, device: str = "cpu"):
    cfg = transformers.SwitchTransformersConfig(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=4,
        d_ff=16,
        num_heads=2,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_sparse_encoder_layers=num_sparse,
        num_sparse_decoder_layers=num_sparse,
        num_experts=2,
        expert_capacity=64,
        relative_attention_num_buckets=4,
        relative_attention_max_distance=8,
        dropout_rate=0.0,
        router_jitter_noise=0.0,
        attn_implementation="eager",
    )
    with torch.device(device):
        hf = transformers.SwitchTransformersForConditionalGeneration(cfg)
    return hf


def _sparse_layout(hf) -> tuple[list[bool], list[bool]]:
    return [b.is_sparse for b in hf.encoder.block], [b.is_sparse for b in hf.decoder.block]


@pytest.mark.parametrize(("num_layers", "num_sparse"), [(11, 3), (4, 0), (3, 1), (6, 2)])
def test_switch_sparse_layout_round_trips_through_to_hf(num_layers, num_sparse, tmp_path):
    # transformers places layers at i % (num_layers // num_sparse) == 1, which is not always num_sparse layers
    # (11 layers, 3 sparse: layers 1, 4, 7 and 10); the export must give transformers back the same layout.
    hf = _perturb(_switch_hf(num_layers, num_sparse))
    with torch.no_grad():
        hf.encoder.embed_tokens.weight.copy_(hf.shared.weight)
        hf.decoder.embed_tokens.weight.copy_(hf.shared.weight)
    ours = from_hf(hf).eval()
    to_hf(ours, tmp_path)
    reloaded = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    assert _sparse_layout(reloaded) == _sparse_layout(hf)
    assert [layer.is_moe for layer in ours.encoder] == _sparse_layout(hf)[0]
    ids, dec = _ids(2, 9), _ids(2, 5, seed=2)
    with torch.no_grad():
        theirs = hf(input_ids=ids, decoder_input_ids=dec).logits
        torch.testing.assert_close(ours(ids, dec).logits, theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reloaded(input_ids=ids, decoder_input_ids=dec).logits, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("num_layers", "sparse_step"), [(1, 2), (2, 5), (3, 2), (4, 3), (5, 3), (6, 4)])
def test_switch_export_places_the_sparse_layers_ours_has_or_refuses(num_layers, sparse_step, tmp_path):
    cfg = dataclasses.replace(
        zoo.config("switch-tiny"),
        vocab_size=VOCAB,
        dim=16,
        num_heads=2,
        head_dim=8,
        ffn_hidden=16,
        num_layers=num_layers,
        sparse_step=sparse_step,
        expert_capacity=8,
        capacity_scope="sequence",
    )
    ours = zoo.build(cfg)
    layout = [layer.is_moe for layer in ours.encoder]
    # transformers can build the layout when some num_sparse_*_layers gives it (built on the meta device).
    reachable = any(
        _sparse_layout(_switch_hf(num_layers, n, device="meta")) == (layout, layout) for n in range(num_layers + 1)
    )
    if not reachable:
        with pytest.raises(UnsupportedConfigError, match=rf"sparse_step={sparse_step} with num_layers={num_layers}"):
            to_hf(ours, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        return
    to_hf(ours, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    built = _switch_hf(num_layers, saved["num_sparse_encoder_layers"], device="meta")
    assert _sparse_layout(built) == (layout, layout)
    assert [layer.is_moe for layer in from_hf(tmp_path).encoder] == layout
