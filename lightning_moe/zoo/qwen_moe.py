"""Qwen-MoE: Qwen1.5-MoE / Qwen2-MoE (Qwen Team 2024) and Qwen3-MoE (Qwen Team 2025, "Qwen3 Technical Report").

A decoder-only GQA + RoPE transformer with RMSNorm and SwiGLU experts, routed by softmax over all experts
then top-k. The two generations differ in a handful of switches, kept as plain fields:

- **Qwen1.5/Qwen2-MoE**: bias on the q/k/v projections; many small ("fine-grained") routed experts plus
  one large shared expert whose output is scaled by ``sigmoid(x w_gate)``; top-k weights are *not*
  renormalised. ``decoder_sparse_step`` and ``mlp_only_layers`` turn some layers into dense SwiGLU FFNs.
- **Qwen3-MoE**: no QKV bias, RMSNorm on each head's queries and keys, no shared expert, renormalised
  top-k weights, and an explicit ``head_dim`` of 128 (``num_heads * head_dim`` exceeds the width).

Sizes from the Hugging Face ``config.json`` of ``Qwen/Qwen1.5-MoE-A2.7B``, ``Qwen/Qwen2-57B-A14B``,
``Qwen/Qwen3-30B-A3B`` and ``Qwen/Qwen3-235B-A22B``. ``max_seq_len`` is their ``max_position_embeddings``: 8192,
131072, 40960 and 40960.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lightning_moe.nn.attention import Attention, AttentionConfig
from lightning_moe.nn.config import ExpertsConfig, MoEConfig, RouterConfig
from lightning_moe.nn.ffn import FeedForward
from lightning_moe.nn.moe import MoELayer
from lightning_moe.nn.norm import RMSNorm
from lightning_moe.nn.rope import RopeConfig
from lightning_moe.nn.transformer import DecoderLayer, DecoderLM, init_weights
from lightning_moe.zoo.registry import ModelConfig, register_family

# Hugging Face's router_aux_loss_coef for every Qwen MoE; the presets use it times top_k per MoE layer (HF's loss
# for one MoE layer is top_k times ours), while from_hf of a published config divides that by the MoE layer count,
# since HF pools all layers into one loss (see ModelConfig.load_balance_coef).
HF_ROUTER_AUX_LOSS_COEF = 0.001


@dataclass
class QwenMoEConfig(ModelConfig):
    """Qwen-MoE architecture (defaults: Qwen1.5-MoE-A2.7B).

    Args:
        num_heads: Query heads.
        num_kv_heads: Key/value heads (GQA).
        head_dim: Per-head width (``None``: ``dim // num_heads``; Qwen3 sets 128).
        qkv_bias: Bias on the q/k/v projections (Qwen1.5/2).
        qk_norm: RMSNorm on each head's queries and keys before RoPE (Qwen3).
        num_experts: Routed experts per MoE layer.
        top_k: Routed experts per token.
        expert_hidden: Hidden width of each routed expert (HF ``moe_intermediate_size``).
        normalize_topk: Renormalise the top-k weights to sum to one (HF ``norm_topk_prob``; Qwen3 only).
        shared_expert_hidden: Hidden width of the sigmoid-gated shared expert (HF
            ``shared_expert_intermediate_size``); 0 for none (Qwen3).
        dense_hidden: Hidden width of the dense FFN of non-MoE layers (HF ``intermediate_size``).
        decoder_sparse_step: Layer ``i`` is MoE when ``(i + 1) % decoder_sparse_step == 0``.
        mlp_only_layers: Layer indices that are dense whatever ``decoder_sparse_step`` says.
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon (block, final and q/k norms).
        tie_embeddings: Share the embedding matrix with the LM head.
        capacity_factor: ``None`` (dropless, Qwen's behaviour) or a capacity factor.
    """

    vocab_size: int = 151936
    dim: int = 2048
    num_layers: int = 24
    max_seq_len: int = 8192
    num_heads: int = 16
    num_kv_heads: int = 16
    head_dim: int | None = None
    qkv_bias: bool = True
    qk_norm: bool = False
    num_experts: int = 60
    top_k: int = 4
    expert_hidden: int = 1408
    normalize_topk: bool = False
    shared_expert_hidden: int = 5632
    dense_hidden: int = 5632
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    rope_theta: float = 1e6
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    capacity_factor: float | None = None
    load_balance_coef: float = HF_ROUTER_AUX_LOSS_COEF * 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step={self.decoder_sparse_step!r} is invalid: must be >= 1")
        if self.dense_hidden < 1:
            raise ValueError(f"dense_hidden={self.dense_hidden!r} is invalid: must be >= 1")
        layers = self.mlp_only_layers
        if not isinstance(layers, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
            raise ValueError(f"mlp_only_layers={layers!r} is invalid: must be a list of layer indices (ints)")
        self.mlp_only_layers = list(layers)  # a tuple is the same layers: equal configs, a list in every export
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(
                f"mlp_only_layers={self.mlp_only_layers!r} is invalid: {bad} not in [0, {self.num_layers})"
            )

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer ``index`` has an MoE FFN (else a dense one), by Hugging Face's rule."""
        return index not in self.mlp_only_layers and (index + 1) % self.decoder_sparse_step == 0


def _ffn(cfg: QwenMoEConfig, index: int) -> nn.Module:
    if not cfg.is_moe_layer(index):
        return FeedForward(cfg.dim, cfg.dense_hidden, activation="silu", gated=True)
    moe = MoEConfig(
        dim=cfg.dim,
        router=RouterConfig(
            num_experts=cfg.num_experts,
            top_k=cfg.top_k,
            normalize_topk=cfg.normalize_topk,
            init_std=cfg.init_std,
            gate_precision=cfg.router_gate_precision,
        ),
        experts=ExpertsConfig(
            hidden_dim=cfg.expert_hidden, activation="silu", gated=True, init_std=cfg.init_std, kernel=cfg.expert_kernel
        ),
        capacity_factor=cfg.capacity_factor,
        shared_hidden_dim=cfg.shared_expert_hidden,
        shared_gate=cfg.shared_expert_hidden > 0,
    )
    return MoELayer(moe)


def build(cfg: QwenMoEConfig) -> DecoderLM:
    """Build a Qwen-MoE model."""
    attention = AttentionConfig(
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        qkv_bias=cfg.qkv_bias,
        qk_norm=cfg.qk_norm,
        norm_eps=cfg.norm_eps,
    )
    layers = [
        DecoderLayer(
            Attention(cfg.dim, attention), _ffn(cfg, i), RMSNorm(cfg.dim, cfg.norm_eps), RMSNorm(cfg.dim, cfg.norm_eps)
        )
        for i in range(cfg.num_layers)
    ]
    head_dim = cfg.head_dim or cfg.dim // cfg.num_heads
    model = DecoderLM(
        cfg.vocab_size,
        cfg.dim,
        layers,
        RMSNorm(cfg.dim, cfg.norm_eps),
        rope=(RopeConfig(theta=cfg.rope_theta), head_dim),
        tie_embeddings=cfg.tie_embeddings,
    )
    init_weights(model, cfg.init_std)
    return model


def _qwen3(**fields: object) -> QwenMoEConfig:
    """A Qwen3-MoE config: q/k norm, no QKV bias, no shared expert, renormalised top-k, head_dim 128."""
    base = {
        "num_layers": 48,
        "max_seq_len": 40960,
        "num_heads": 32,
        "num_kv_heads": 4,
        "head_dim": 128,
        "qkv_bias": False,
        "qk_norm": True,
        "num_experts": 128,
        "top_k": 8,
        "expert_hidden": 768,
        "normalize_topk": True,
        "shared_expert_hidden": 0,
        "dense_hidden": 6144,
        "load_balance_coef": HF_ROUTER_AUX_LOSS_COEF * 8,
    }
    return QwenMoEConfig(**(base | fields))


PRESETS = {
    "qwen1.5-moe-a2.7b": QwenMoEConfig(),
    "qwen2-57b-a14b": QwenMoEConfig(
        dim=3584,
        num_layers=28,
        max_seq_len=131072,
        num_heads=28,
        num_kv_heads=4,
        num_experts=64,
        top_k=8,
        expert_hidden=2560,
        shared_expert_hidden=20480,
        dense_hidden=18944,
        load_balance_coef=HF_ROUTER_AUX_LOSS_COEF * 8,
    ),
    "qwen3-30b-a3b": _qwen3(dim=2048),
    "qwen3-235b-a22b": _qwen3(
        dim=4096, num_layers=94, num_heads=64, num_kv_heads=4, expert_hidden=1536, dense_hidden=12288
    ),
    # Qwen2-MoE routing in miniature: 16 fine-grained experts (top-4) + a gated shared expert 4x wider;
    # the first layer is dense (mlp_only_layers) so both FFN kinds are exercised.
    "qwen-moe-tiny": QwenMoEConfig(
        vocab_size=1024,
        dim=128,
        num_layers=3,
        max_seq_len=4096,
        num_heads=4,
        num_kv_heads=2,
        num_experts=16,
        top_k=4,
        expert_hidden=64,
        shared_expert_hidden=256,
        dense_hidden=256,
        mlp_only_layers=[0],
    ),
    # Qwen3-MoE in miniature: q/k norm, head_dim * heads > dim, renormalised top-4 of 16, no shared expert.
    "qwen3-moe-tiny": _qwen3(
        vocab_size=1024,
        dim=128,
        num_layers=2,
        max_seq_len=4096,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        num_experts=16,
        top_k=4,
        expert_hidden=64,
        dense_hidden=256,
        load_balance_coef=HF_ROUTER_AUX_LOSS_COEF * 4,
    ),
}

register_family("qwen_moe", QwenMoEConfig, build, PRESETS)
