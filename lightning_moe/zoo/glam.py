"""GLaM (Du et al. 2021, "GLaM: Efficient Scaling of Language Models with Mixture-of-Experts").

A decoder-only transformer with RMSNorm, no bias terms and tied input/output embeddings. Every other FFN
(layers 1, 3, 5, ...) is a top-2-of-64 MoE with GShard gating: softmax over all experts, the two best
weights renormalised to sum to one, and in training GShard's random routing (the second expert is kept
with probability ``2 * g_2``). Dense FFNs are gated GELU (GEGLU, three matrices); experts are plain GELU
MLPs (two matrices). Positions come from a relative position bias: GLaM uses Transformer-XL style per-layer
biases; we use one T5-style bucketed bias shared by all layers (unidirectional buckets).

Sizes from the paper's Table 4 (L, d_model, d_ff, heads, d_head): 0.1B/64E 12, 768, 3072, 12, 64;
1.7B/64E 24, 2048, 8192, 16, 128; 8B/64E 32, 4096, 16384, 32, 128; 64B/64E 64, 8192, 32768, 128, 128
(``128 * 128 = 16384`` attention width, twice d_model). Vocabulary: 256K SentencePiece (we use 256000).

Parameter counts (``registry.count_parameters``: every parameter once, the tied 256K embedding included,
dense FFNs with three matrices) against Table 4: 0.1B/64E 2.08B total (paper 1.9B), 1.7B/64E 27.3B (27B),
8B/64E 143.9B (143B), 64B/64E 1.162T (1.2T) and 96.6B active (96.6B). The paper's other active counts
(145M, 1.878B, 9.8B) sit between our counts with and without the embedding, so they cannot all be
reproduced by one counting rule; without the embedding our totals are 1.88B, 26.8B, 142.8B and 1.160T.

Capacity: GShard/GLaM bound each expert's tokens; we default to dropless, because capacity over a batch
lets a later token's routing drop an earlier token's expert and so breaks causality. Set
``capacity_factor`` to train with GShard-style dropping.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_moe.nn.attention import Attention, AttentionConfig
from lightning_moe.nn.config import ExpertsConfig, MoEConfig, RouterConfig
from lightning_moe.nn.ffn import FeedForward
from lightning_moe.nn.moe import MoELayer
from lightning_moe.nn.norm import RMSNorm
from lightning_moe.nn.position_bias import RelativePositionBias
from lightning_moe.nn.transformer import DecoderLayer, DecoderLM, init_weights
from lightning_moe.zoo.registry import ModelConfig, register_family


@dataclass
class GlamConfig(ModelConfig):
    """GLaM architecture.

    Args:
        num_heads: Attention heads.
        head_dim: Per-head width (``None``: ``dim // num_heads``).
        ffn_hidden: Hidden width of the dense FFNs and of each expert.
        num_experts: Experts per MoE layer.
        top_k: Experts per token.
        random_routing: GShard random routing of the second expert in training.
        capacity_factor: Training capacity factor (``None``: dropless).
        eval_capacity_factor: Evaluation capacity factor (``None``: same as training).
        num_buckets: Relative position buckets.
        max_distance: Relative distance from which positions share the last bucket.
        norm_eps: RMSNorm epsilon.
    """

    vocab_size: int = 256000
    dim: int = 768
    num_layers: int = 12
    max_seq_len: int = 1024  # the paper's Sec. 5.1: "a maximum sequence length of 1024 tokens"
    num_heads: int = 12
    head_dim: int | None = None
    ffn_hidden: int = 3072
    num_experts: int = 64
    top_k: int = 2
    random_routing: bool = True
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    num_buckets: int = 32
    max_distance: int = 128
    norm_eps: float = 1e-6
    # GShard's auxiliary-loss weight, which GLaM keeps; GLaM has no router z-loss.
    load_balance_coef: float = 0.01


def is_moe_layer(index: int) -> bool:
    """Whether layer ``index`` has an MoE FFN (every other layer, starting with the second)."""
    return index % 2 == 1


def _ffn(cfg: GlamConfig, moe: bool) -> FeedForward | MoELayer:
    if not moe:
        return FeedForward(cfg.dim, cfg.ffn_hidden, activation="gelu", gated=True)
    router = RouterConfig(
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        normalize_topk=True,
        random_routing=cfg.random_routing,
        init_std=cfg.init_std,
        gate_precision=cfg.router_gate_precision,
    )
    experts = ExpertsConfig(
        hidden_dim=cfg.ffn_hidden, activation="gelu", gated=False, init_std=cfg.init_std, kernel=cfg.expert_kernel
    )
    return MoELayer(
        MoEConfig(
            dim=cfg.dim,
            router=router,
            experts=experts,
            capacity_factor=cfg.capacity_factor,
            eval_capacity_factor=cfg.eval_capacity_factor,
        )
    )


def build(cfg: GlamConfig) -> DecoderLM:
    """Build a GLaM model."""
    attention = AttentionConfig(
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads, head_dim=cfg.head_dim, rope=False, norm_eps=cfg.norm_eps
    )
    layers = [
        DecoderLayer(
            Attention(cfg.dim, attention),
            _ffn(cfg, is_moe_layer(i)),
            RMSNorm(cfg.dim, cfg.norm_eps),
            RMSNorm(cfg.dim, cfg.norm_eps),
        )
        for i in range(cfg.num_layers)
    ]
    model = DecoderLM(
        cfg.vocab_size,
        cfg.dim,
        layers,
        RMSNorm(cfg.dim, cfg.norm_eps),
        rope=None,
        position_bias=RelativePositionBias(cfg.num_heads, cfg.num_buckets, cfg.max_distance, bidirectional=False),
        tie_embeddings=True,
    )
    init_weights(model, cfg.init_std)
    return model


PRESETS = {
    "glam-0.1b-64e": GlamConfig(),
    "glam-1.7b-64e": GlamConfig(dim=2048, num_layers=24, num_heads=16, ffn_hidden=8192),
    "glam-8b-64e": GlamConfig(dim=4096, num_layers=32, num_heads=32, ffn_hidden=16384),
    "glam-64b-64e": GlamConfig(dim=8192, num_layers=64, num_heads=128, head_dim=128, ffn_hidden=32768),
    "glam-tiny": GlamConfig(vocab_size=1024, dim=128, num_layers=2, num_heads=4, ffn_hidden=256, num_experts=8),
}

register_family("glam", GlamConfig, build, PRESETS)
