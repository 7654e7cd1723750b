"""Mixtral: published sizes, and logits equal to Hugging Face's Mixtral with the same weights."""

import pytest
import torch
import transformers

from lightning_moe import zoo
from lightning_moe.interop import from_hf
from lightning_moe.nn.transformer import DecoderLM

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
    model = from_hf(hf).eval()
    assert isinstance(model, DecoderLM) and model.sliding_window == window
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids, output_router_logits=True)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    # Same experts chosen per token in every layer.
    for stats, hf_logits in zip(ours.router_stats, theirs.router_logits, strict=True):
        hf_counts = torch.bincount(hf_logits.topk(top_k, dim=-1).indices.reshape(-1), minlength=experts).float()
        torch.testing.assert_close(stats.tokens_per_expert, hf_counts)
