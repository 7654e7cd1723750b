"""Mixtral: published sizes, and logits equal to Hugging Face's Mixtral with the same weights."""

import pytest
import torch
import transformers

from lightning_moe import zoo

# Published totals/actives (Mistral AI's Mixtral announcements and the Mixtral paper, Jiang et al. 2024).
PUBLISHED = {
    "mixtral-8x7b": (46.7e9, 12.9e9),
    "mixtral-8x22b": (141e9, 39e9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_sizes_within_one_percent(name):
    total, active = PUBLISHED[name]
    count = zoo.count_parameters(name)
    assert abs(count.total / total - 1) < 0.01, count
    assert abs(count.active / active - 1) < 0.01, count


def copy_hf_mixtral(hf_model, model) -> None:
    """Copy a Hugging Face Mixtral's weights into our model (test helper; the real importer is interop)."""
    sd = hf_model.state_dict()
    with torch.no_grad():
        model.embed.weight.copy_(sd["model.embed_tokens.weight"])
        model.norm.weight.copy_(sd["model.norm.weight"])
        model.lm_head.weight.copy_(sd["lm_head.weight"])
        for i, layer in enumerate(model.layers):
            prefix = f"model.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.attention, proj).weight.copy_(sd[prefix + f"self_attn.{proj}.weight"])
            layer.attn_norm.weight.copy_(sd[prefix + "input_layernorm.weight"])
            layer.ffn_norm.weight.copy_(sd[prefix + "post_attention_layernorm.weight"])
            layer.ffn.router.gate.weight.copy_(sd[prefix + "mlp.gate.weight"])
            gate_up = sd[prefix + "mlp.experts.gate_up_proj"]  # (E, 2F, D)
            hidden = gate_up.shape[1] // 2
            layer.ffn.experts.w1.copy_(gate_up[:, :hidden].transpose(1, 2))
            layer.ffn.experts.w3.copy_(gate_up[:, hidden:].transpose(1, 2))
            layer.ffn.experts.w2.copy_(sd[prefix + "mlp.experts.down_proj"].transpose(1, 2))


@pytest.mark.parametrize(
    ("experts", "top_k", "heads", "kv_heads", "window"), [(4, 2, 4, 2, None), (8, 3, 4, 1, 5), (3, 1, 2, 2, None)]
)
def test_logits_match_hugging_face(experts, top_k, heads, kv_heads, window):
    torch.manual_seed(0)
    hf_cfg = transformers.MixtralConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        sliding_window=window,
        attn_implementation="eager",
    )
    hf = transformers.MixtralForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "mlp.gate" in name:
                p.normal_(std=1.0)  # non-trivial routing
            elif p.dim() > 1:
                p.normal_(std=0.1)
    model = zoo.build(
        "mixtral-tiny",
        vocab_size=97,
        dim=32,
        ffn_hidden=24,
        num_layers=2,
        num_heads=heads,
        num_kv_heads=kv_heads,
        num_experts=experts,
        top_k=top_k,
        sliding_window=window,
    ).eval()
    copy_hf_mixtral(hf, model)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids, output_router_logits=True)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    # Same experts chosen per token in every layer.
    for stats, hf_logits in zip(ours.router_stats, theirs.router_logits, strict=True):
        hf_counts = torch.bincount(hf_logits.topk(top_k, dim=-1).indices.reshape(-1), minlength=experts).float()
        torch.testing.assert_close(stats.tokens_per_expert, hf_counts)
