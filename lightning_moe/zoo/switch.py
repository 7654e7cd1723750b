"""Switch Transformers (Fedus et al. 2021, "Switch Transformers: Scaling to Trillion Parameter Models").

A T5-style encoder-decoder: RMSNorm (T5's LayerNorm), no bias terms, bucketed relative position bias
shared by each stack's self-attentions, attention without the ``1/sqrt(d)`` scale, a shared embedding
and, when tied, decoder states scaled by ``d_model ** -0.5`` before the LM head. Every ``sparse_step``-th
FFN is a top-1 MoE ("switch") layer with expert capacity and token dropping, jittered router input,
router z-loss and the Switch load-balancing loss. Hugging Face's ``SwitchTransformersStack`` makes layer
``i`` sparse when ``i % sparse_step == 1`` (or every layer when the step is 1): layers 1, 3, 5, ...

Sources:
    * ``google/switch-base-{8..256}`` config.json: d_model 768, d_ff 3072, d_kv 64, 12 heads, 12 + 12
      layers, sparse step 2, ReLU experts, vocab 32128, expert_capacity 64, jitter 0.01.
    * ``google/switch-large-128`` config.json: d_model 1024, d_ff 4096, 16 heads, 24 + 24 layers, ReLU.
    * ``google/switch-xxl-128`` config.json: d_model 4096, d_ff 10240, 64 heads, 24 + 24 layers, gated GELU
      (``gelu_new``: tanh approximation). Hugging Face's modeling code has no gated expert, so it cannot
      load this activation faithfully; we build it gated.
    * Switch-C: the paper's Table 9 (d_model 2080, d_ff 6144, 32 heads of 64, 15 + 15 layers, 2048
      experts in every layer). The ``google/switch-c-2048`` config.json says 30 heads and 12 decoder layers
      with a decoder sparse step of 0 (a dense decoder); that model has only ~0.8T parameters, half the
      published 1571B, so we follow the paper.
    * Paper (Sec. 2.2, 2.4, App. D): capacity factor 1.25 for training and 2.0 for evaluation, jitter
      0.01, load-balancing coefficient 0.01, z-loss coefficient 0.001 (Zoph et al. 2022 use the same).

Parameter counts (``registry.count_parameters``: every parameter once, the tied 32128-token embedding
included) against the paper's Table 9: Switch-XXL 394.5B (395B), Switch-C 1571.3B (1571B), Switch-Large
26.31B ("26B", +1.2%: the two-digit figure rounds 26.3B), Switch-Base-128 7.42B ("7B", +6%: Table 9's
GEGLU d_ff 2048 experts have exactly as many weights as the checkpoints' ReLU d_ff 3072 ones, so this too
is rounding). Table 9's GEGLU d_ff 2816 for Switch-Large would give 27.1B, further from 26B than the
checkpoint's ReLU d_ff 4096.

Hugging Face applies an absolute ``expert_capacity`` per sequence; our MoE layer counts capacity over the
whole batch by default (``capacity_factor`` / ``eval_capacity_factor``, or an absolute ``expert_capacity``), or
per sequence with ``capacity_scope="sequence"``, which :func:`lightning_moe.interop.from_hf` sets so the same
tokens drop as in ``transformers``. Capacity dropping couples the tokens of a batch, so the decoder is only causal in
the absence of drops (true of the original as well). There is no dropout.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lightning_moe.nn.attention import Attention, AttentionConfig
from lightning_moe.nn.config import ExpertsConfig, MoEConfig, RouterConfig
from lightning_moe.nn.encoder_decoder import CrossAttention, CrossAttentionDecoderLayer, EncoderDecoderLM
from lightning_moe.nn.ffn import FeedForward
from lightning_moe.nn.moe import MoELayer
from lightning_moe.nn.norm import RMSNorm
from lightning_moe.nn.position_bias import RelativePositionBias
from lightning_moe.nn.transformer import DecoderLayer, init_weights
from lightning_moe.zoo.registry import ModelConfig, register_family


@dataclass
class SwitchConfig(ModelConfig):
    """Switch Transformer architecture (``num_layers`` encoder layers and as many decoder layers).

    Args:
        num_heads: Attention heads.
        head_dim: Per-head width (T5's ``d_kv``).
        ffn_hidden: Hidden width of the dense FFNs and of each expert.
        activation: FFN activation (``"relu"``; ``"gelu_tanh"`` for T5 v1.1's ``gelu_new``).
        gated: Gated FFNs (GEGLU with ``activation="gelu_tanh"``).
        num_experts: Experts per MoE layer.
        sparse_step: Layer ``i`` is MoE when ``i % sparse_step == 1``, or every layer when it is 1.
        capacity_factor: Training capacity factor (``None``: dropless).
        eval_capacity_factor: Evaluation capacity factor (``None``: same as training).
        expert_capacity: Absolute tokens per expert; overrides both factors.
        capacity_scope: Count capacity over the whole batch (``"batch"``) or per sequence (``"sequence"``, Hugging
            Face's rule: with an absolute ``expert_capacity`` the same tokens drop as in ``transformers``).
        router_jitter: Training-only multiplicative noise on the router input.
        num_buckets: Relative position buckets.
        max_distance: Relative distance from which positions share the last bucket.
        norm_eps: RMSNorm epsilon.
        tie_embeddings: Share the embedding with the LM head (and scale the decoder output by ``dim ** -0.5``).
    """

    vocab_size: int = 32128
    dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    head_dim: int = 64
    ffn_hidden: int = 3072
    activation: str = "relu"
    gated: bool = False
    num_experts: int = 8
    sparse_step: int = 2
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = 2.0
    expert_capacity: int | None = None
    capacity_scope: str = "batch"
    router_jitter: float = 0.01
    num_buckets: int = 32
    max_distance: int = 128
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    # Paper coefficients; our top-1 load-balance loss is Switch's E * sum_i f_i P_i.
    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.001

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sparse_step < 1:
            raise ValueError(f"sparse_step={self.sparse_step!r} is invalid: must be >= 1")


def is_moe_layer(index: int, sparse_step: int) -> bool:
    """Whether layer ``index`` of a stack is sparse (Hugging Face's rule: ``i % step == 1``, or all for step 1)."""
    return sparse_step == 1 or index % sparse_step == 1


def _ffn(cfg: SwitchConfig, moe: bool) -> FeedForward | MoELayer:
    if not moe:
        return FeedForward(cfg.dim, cfg.ffn_hidden, cfg.activation, cfg.gated)
    router = RouterConfig(
        num_experts=cfg.num_experts,
        top_k=1,
        jitter_eps=cfg.router_jitter,
        init_std=cfg.init_std,
        gate_precision=cfg.router_gate_precision,
    )
    experts = ExpertsConfig(
        hidden_dim=cfg.ffn_hidden,
        activation=cfg.activation,
        gated=cfg.gated,
        init_std=cfg.init_std,
        kernel=cfg.expert_kernel,
    )
    return MoELayer(
        MoEConfig(
            dim=cfg.dim,
            router=router,
            experts=experts,
            capacity_factor=cfg.capacity_factor,
            eval_capacity_factor=cfg.eval_capacity_factor,
            expert_capacity=cfg.expert_capacity,
            capacity_scope=cfg.capacity_scope,
            drop_priority="position",
        )
    )


def build(cfg: SwitchConfig) -> EncoderDecoderLM:
    """Build a Switch Transformer."""
    attention = AttentionConfig(
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads, head_dim=cfg.head_dim, rope=False, scale=1.0
    )

    def norm() -> RMSNorm:
        return RMSNorm(cfg.dim, cfg.norm_eps)

    encoder = [
        DecoderLayer(Attention(cfg.dim, attention), _ffn(cfg, is_moe_layer(i, cfg.sparse_step)), norm(), norm())
        for i in range(cfg.num_layers)
    ]
    decoder = [
        CrossAttentionDecoderLayer(
            Attention(cfg.dim, attention),
            CrossAttention(cfg.dim, attention),
            _ffn(cfg, is_moe_layer(i, cfg.sparse_step)),
            norm(),
            norm(),
            norm(),
        )
        for i in range(cfg.num_layers)
    ]
    model = EncoderDecoderLM(
        cfg.vocab_size,
        cfg.dim,
        encoder,
        decoder,
        norm(),
        norm(),
        encoder_position_bias=RelativePositionBias(cfg.num_heads, cfg.num_buckets, cfg.max_distance, True),
        decoder_position_bias=RelativePositionBias(cfg.num_heads, cfg.num_buckets, cfg.max_distance, False),
        tie_embeddings=cfg.tie_embeddings,
        output_scale=cfg.dim**-0.5 if cfg.tie_embeddings else 1.0,
    )
    init_weights(model, cfg.init_std)
    # T5 / Mesh TensorFlow draw the embedding from N(0, 1); the tied head's D^-0.5 brings logits to unit scale.
    nn.init.normal_(model.embed.weight, std=1.0)
    return model


PRESETS = {
    **{f"switch-base-{e}": SwitchConfig(num_experts=e) for e in (8, 16, 32, 64, 128, 256)},
    "switch-large-128": SwitchConfig(dim=1024, num_layers=24, num_heads=16, ffn_hidden=4096, num_experts=128),
    "switch-xxl-128": SwitchConfig(
        dim=4096, num_layers=24, num_heads=64, ffn_hidden=10240, activation="gelu_tanh", gated=True, num_experts=128
    ),
    "switch-c-2048": SwitchConfig(
        dim=2080, num_layers=15, num_heads=32, ffn_hidden=6144, num_experts=2048, sparse_step=1
    ),
    # ~2.9M parameters; the paper's capacity factors (1.25 train, 2.0 eval) and jitter, as in the big presets.
    "switch-tiny": SwitchConfig(vocab_size=1024, dim=128, num_layers=2, num_heads=4, head_dim=32, ffn_hidden=512),
}

register_family("switch", SwitchConfig, build, PRESETS)
