"""Qwen-MoE: published sizes, the Qwen2-MoE / Qwen3-MoE switches, and logits equal to Hugging Face's models."""

import pytest
import torch
import transformers

from lightning_moe import zoo
from lightning_moe.interop import from_hf
from lightning_moe.nn.ffn import FeedForward
from lightning_moe.nn.moe import MoELayer
from lightning_moe.nn.norm import RMSNorm

# Published (total, active) and the relative tolerance of each check. Sources: the model cards of
# Qwen/Qwen1.5-MoE-A2.7B ("14.3B in total and 2.7B activated"), Qwen/Qwen3-30B-A3B ("30.5B in total and
# 3.3B activated", "29.9B non-embedding") and Qwen/Qwen3-235B-A22B ("235B in total and 22B activated",
# "234B non-embedding"); the Qwen2 technical report (Yang et al. 2024, Table 1) for Qwen2-57B-A14B.
PUBLISHED = {
    "qwen1.5-moe-a2.7b": (14.3e9, 2.7e9, 0.01, 0.01),
    # "14B" is the integer in the model name: ours is 14.25B (+1.8%), inside its rounding (13.5B..14.5B).
    "qwen2-57b-a14b": (57e9, 14e9, 0.01, 0.036),
    # Ours is 3.353B (+1.6%): 2.731B non-embedding + 0.622B embedding and LM head. The total and the card's
    # non-embedding total (29.9B, below) match to 0.1%, so the architecture agrees; Qwen's "3.3B" truncates.
    "qwen3-30b-a3b": (30.5e9, 3.3e9, 0.01, 0.02),
    "qwen3-235b-a22b": (235e9, 22e9, 0.01, 0.01),
}
NON_EMBEDDING = {"qwen3-30b-a3b": 29.9e9, "qwen3-235b-a22b": 234e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_sizes(name):
    total, active, total_tol, active_tol = PUBLISHED[name]
    count = zoo.count_parameters(name)
    assert abs(count.total / total - 1) < total_tol, count
    assert abs(count.active / active - 1) < active_tol, count


@pytest.mark.parametrize("name", sorted(NON_EMBEDDING))
def test_published_non_embedding_sizes(name):
    cfg = zoo.config(name)
    embeddings = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    assert abs((zoo.count_parameters(name).total - embeddings) / NON_EMBEDDING[name] - 1) < 0.01


def test_count_parameters_by_hand_for_the_tiny_presets():
    cfg = zoo.config("qwen-moe-tiny")
    d, v, e, k = cfg.dim, cfg.vocab_size, cfg.num_experts, cfg.top_k
    kv = cfg.num_kv_heads * (d // cfg.num_heads)
    attention = 2 * d * d + 2 * d * kv + (d + 2 * kv)  # q/k/v biases
    experts = e * 3 * d * cfg.expert_hidden
    moe = experts + d * e + 3 * d * cfg.shared_expert_hidden + d  # router, shared expert, shared gate
    dense = 3 * d * cfg.dense_hidden
    total = 3 * (attention + 2 * d) + 2 * moe + dense + 2 * v * d + d  # layer 0 dense, layers 1-2 MoE
    assert zoo.count_parameters("qwen-moe-tiny") == zoo.ParameterCount(total, total - 2 * experts * (e - k) // e)

    cfg = zoo.config("qwen3-moe-tiny")
    d, v, e, k, hd = cfg.dim, cfg.vocab_size, cfg.num_experts, cfg.top_k, cfg.head_dim
    attention = 2 * d * cfg.num_heads * hd + 2 * d * cfg.num_kv_heads * hd + 2 * hd  # q/k norms
    experts = e * 3 * d * cfg.expert_hidden
    total = 2 * (attention + 2 * d + experts + d * e) + 2 * v * d + d
    assert zoo.count_parameters("qwen3-moe-tiny") == zoo.ParameterCount(total, total - 2 * experts * (e - k) // e)


@pytest.mark.parametrize("name", ["qwen1.5-moe-a2.7b", "qwen2-57b-a14b"])
def test_qwen2_moe_has_qkv_bias_and_a_gated_shared_expert(name):
    with torch.device("meta"):
        model = zoo.build(name)
    cfg = zoo.config(name)
    attention, ffn = model.layers[0].attention, model.layers[0].ffn
    assert all(getattr(attention, p).bias is not None for p in ("q_proj", "k_proj", "v_proj"))
    assert attention.o_proj.bias is None and attention.q_norm is None and attention.k_norm is None
    assert isinstance(ffn, MoELayer) and not ffn.config.router.normalize_topk
    assert ffn.shared_experts.w1.weight.shape == (cfg.shared_expert_hidden, cfg.dim)
    assert ffn.shared_gate.weight.shape == (1, cfg.dim)
    assert cfg.load_balance_coef == pytest.approx(0.001 * cfg.top_k)


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "qwen3-235b-a22b"])
def test_qwen3_moe_has_qk_norm_head_dim_128_and_no_shared_expert(name):
    with torch.device("meta"):
        model = zoo.build(name)
    cfg = zoo.config(name)
    attention, ffn = model.layers[0].attention, model.layers[0].ffn
    assert all(getattr(attention, p).bias is None for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert isinstance(attention.q_norm, RMSNorm) and attention.q_norm.weight.shape == (128,)
    assert isinstance(attention.k_norm, RMSNorm) and attention.k_norm.weight.shape == (128,)
    assert attention.q_proj.weight.shape == (cfg.num_heads * 128, cfg.dim) != (cfg.dim, cfg.dim)
    assert ffn.shared_experts is None and ffn.shared_gate is None
    assert ffn.config.router.normalize_topk and ffn.config.router.top_k == 8 and ffn.config.num_experts == 128
    assert all(layer.is_moe for layer in model.layers)
    assert cfg.load_balance_coef == pytest.approx(0.001 * 8)


@pytest.mark.parametrize(
    ("step", "mlp_only", "moe_layers"), [(1, [], [0, 1, 2, 3]), (2, [], [1, 3]), (1, [0, 2], [1, 3]), (2, [3], [1])]
)
def test_decoder_sparse_step_and_mlp_only_layers_pick_dense_layers(step, mlp_only, moe_layers):
    model = zoo.build("qwen-moe-tiny", num_layers=4, decoder_sparse_step=step, mlp_only_layers=mlp_only)
    assert [i for i, layer in enumerate(model.layers) if layer.is_moe] == moe_layers
    dense = [layer.ffn for layer in model.layers if not layer.is_moe]
    assert all(isinstance(ffn, FeedForward) and ffn.w1.out_features == 256 for ffn in dense)


def test_invalid_dense_layer_settings_raise():
    with pytest.raises(ValueError, match=r"decoder_sparse_step=0 is invalid: must be >= 1"):
        zoo.config("qwen-moe-tiny", decoder_sparse_step=0)
    with pytest.raises(ValueError, match=r"mlp_only_layers=\[1, 3\] is invalid: \[3\] not in \[0, 3\)"):
        zoo.config("qwen-moe-tiny", mlp_only_layers=[1, 3])


# --- Faithfulness against Hugging Face ------------------------------------------------------------------


def perturb(hf_model: torch.nn.Module) -> None:
    """Random weights everywhere: sharp routers, non-trivial biases and norm weights."""
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(std=1.0)  # router: well-separated top-k
            elif name.endswith("norm.weight"):
                p.normal_(mean=1.0, std=0.1)
            else:
                p.normal_(std=0.1)


def assert_matches_hf(hf_model: torch.nn.Module, model: torch.nn.Module, vocab: int, top_k: int, experts: int) -> None:
    """Same logits (1e-5) and the same top-k expert set per token in every MoE layer, with and without padding."""
    ours_ids, hf_ids = [], []
    hooks = [
        layer.ffn.router.register_forward_hook(lambda m, i, out: ours_ids.append(out.expert_ids_N.view(-1, top_k)))
        for layer in model.layers
        if layer.is_moe
    ]
    hooks += [
        layer.mlp.gate.register_forward_hook(lambda m, i, out: hf_ids.append(out[2]))
        for layer in hf_model.model.layers
        if hasattr(layer.mlp, "gate")  # a sparse block; dense MLPs have gate_proj
    ]
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (3, 13))
    try:
        with torch.no_grad():
            ours, theirs = model(ids).logits, hf_model(ids).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        assert len(ours_ids) == len(hf_ids) == sum(layer.is_moe for layer in model.layers) > 0
        for ours_TK, hf_TK in zip(ours_ids, hf_ids, strict=True):
            assert torch.equal(ours_TK.sort(dim=-1).values, hf_TK.sort(dim=-1).values)
        # Every expert is used somewhere, so the comparison covers them all.
        assert all(torch.unique(ids_TK).numel() == experts for ids_TK in ours_ids)

        mask = torch.ones_like(ids, dtype=torch.bool)
        mask[0, -4:] = False  # right padding
        mask[1, :3] = False  # left padding
        with torch.no_grad():
            ours, theirs = model(ids, mask).logits, hf_model(ids, attention_mask=mask.long()).logits
        torch.testing.assert_close(ours[mask], theirs[mask], rtol=1e-5, atol=1e-5)
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize(
    ("step", "mlp_only", "normalize"), [(1, [0, 2], False), (2, [], False), (1, [3], True)], ids=str
)
def test_qwen2_moe_logits_and_experts_match_hugging_face(step, mlp_only, normalize):
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen2MoeConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=6,
        num_experts_per_tok=3,
        moe_intermediate_size=12,
        shared_expert_intermediate_size=24,
        norm_topk_prob=normalize,
        decoder_sparse_step=step,
        mlp_only_layers=mlp_only,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        attn_implementation="eager",
    )
    hf = transformers.Qwen2MoeForCausalLM(hf_cfg).eval()
    perturb(hf)
    model = from_hf(hf).eval()
    cfg = model.zoo_config
    assert (cfg.decoder_sparse_step, cfg.mlp_only_layers, cfg.normalize_topk) == (step, mlp_only, normalize)
    assert cfg.qkv_bias and not cfg.qk_norm and cfg.shared_expert_hidden == 24
    assert_matches_hf(hf, model, vocab=97, top_k=3, experts=6)


@pytest.mark.parametrize(("mlp_only", "kv_heads"), [([], 2), ([1], 1)], ids=str)
def test_qwen3_moe_logits_and_experts_match_hugging_face(mlp_only, kv_heads):
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen3MoeConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=16,  # heads * head_dim = 64 > hidden_size, as in the real Qwen3 models
        num_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=12,
        norm_topk_prob=True,
        mlp_only_layers=mlp_only,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        attn_implementation="eager",
    )
    hf = transformers.Qwen3MoeForCausalLM(hf_cfg).eval()
    perturb(hf)
    model = from_hf(hf).eval()
    cfg = model.zoo_config
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.mlp_only_layers) == (16, kv_heads, mlp_only)
    assert cfg.qk_norm and not cfg.qkv_bias and cfg.shared_expert_hidden == 0 and cfg.normalize_topk
    assert_matches_hf(hf, model, vocab=97, top_k=3, experts=8)
