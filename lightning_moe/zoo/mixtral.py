"""Mixtral (Jiang et al. 2024, "Mixtral of Experts").

A decoder-only GQA + RoPE transformer with RMSNorm; every FFN is a top-2-of-8 SwiGLU MoE with softmax over
the chosen logits; optional sliding window.

Sizes from the Hugging Face configs of ``mistralai/Mixtral-8x7B-v0.1`` and ``mistralai/Mixtral-8x22B-v0.1``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_moe.nn.attention import Attention, AttentionConfig
from lightning_moe.nn.config import ExpertsConfig, MoEConfig, RouterConfig
from lightning_moe.nn.moe import MoELayer
from lightning_moe.nn.norm import RMSNorm
from lightning_moe.nn.rope import RopeConfig
from lightning_moe.nn.transformer import DecoderLayer, DecoderLM, init_weights
from lightning_moe.zoo.registry import ModelConfig, register_family


@dataclass
class MixtralConfig(ModelConfig):
    """Mixtral architecture.

    Args:
        num_heads: Query heads.
        num_kv_heads: Key/value heads (GQA).
        head_dim: Per-head width (``None``: ``dim // num_heads``).
        ffn_hidden: Hidden width of each expert.
        num_experts: Routed experts per layer.
        top_k: Experts per token.
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon.
        sliding_window: Attention window, or ``None`` for full causal attention.
        router_jitter: Training-only multiplicative router-input noise.
        tie_embeddings: Share the embedding matrix with the LM head.
        capacity_factor: ``None`` (dropless, Mixtral's behaviour) or a capacity factor.
    """

    vocab_size: int = 32000
    dim: int = 4096
    num_layers: int = 32
    max_seq_len: int = 32768
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int | None = None
    ffn_hidden: int = 14336
    num_experts: int = 8
    top_k: int = 2
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    sliding_window: int | None = None
    router_jitter: float = 0.0
    tie_embeddings: bool = False
    capacity_factor: float | None = None
    # Per MoE layer, as Switch, GShard and Megatron-Core weight the loss: HF's router_aux_loss_coef=0.02 times top_k
    # (HF's loss for one layer is top_k times ours). from_hf of the published config gives c * top_k / L instead
    # (0.00125 for 8x7B), because HF pools all L layers into one loss; see ModelConfig.load_balance_coef.
    load_balance_coef: float = 0.04


def build(cfg: MixtralConfig) -> DecoderLM:
    """Build a Mixtral model."""
    attention = AttentionConfig(
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, norm_eps=cfg.norm_eps
    )
    moe = MoEConfig(
        dim=cfg.dim,
        router=RouterConfig(
            num_experts=cfg.num_experts,
            top_k=cfg.top_k,
            softmax_after_topk=True,
            jitter_eps=cfg.router_jitter,
            init_std=cfg.init_std,
            gate_precision=cfg.router_gate_precision,
        ),
        experts=ExpertsConfig(
            hidden_dim=cfg.ffn_hidden, activation="silu", gated=True, init_std=cfg.init_std, kernel=cfg.expert_kernel
        ),
        capacity_factor=cfg.capacity_factor,
    )
    layers = [
        DecoderLayer(
            Attention(cfg.dim, attention), MoELayer(moe), RMSNorm(cfg.dim, cfg.norm_eps), RMSNorm(cfg.dim, cfg.norm_eps)
        )
        for _ in range(cfg.num_layers)
    ]
    head_dim = cfg.head_dim or cfg.dim // cfg.num_heads
    model = DecoderLM(
        cfg.vocab_size,
        cfg.dim,
        layers,
        RMSNorm(cfg.dim, cfg.norm_eps),
        rope=(RopeConfig(theta=cfg.rope_theta), head_dim),
        sliding_window=cfg.sliding_window,
        tie_embeddings=cfg.tie_embeddings,
    )
    init_weights(model, cfg.init_std)
    return model


PRESETS = {
    "mixtral-8x7b": MixtralConfig(),
    "mixtral-8x22b": MixtralConfig(
        vocab_size=32768,
        dim=6144,
        num_layers=56,
        num_heads=48,
        num_kv_heads=8,
        ffn_hidden=16384,
        max_seq_len=65536,
        load_balance_coef=0.001 * 2,  # its config.json has router_aux_loss_coef=0.001 (8x7B: 0.02)
    ),  # fmt: skip
    "mixtral-tiny": MixtralConfig(
        vocab_size=1024,
        dim=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden=256,
        sliding_window=128,
        max_seq_len=1024,
    ),
}

register_family("mixtral", MixtralConfig, build, PRESETS)
