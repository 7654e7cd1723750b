"""DeepSeek MoE language models: DeepSeekMoE (Dai et al. 2024), DeepSeek-V2 (2024) and DeepSeek-V3 (2024).

What sets the family apart:

* fine-grained routed experts plus always-on shared experts, and the first ``first_k_dense`` layers dense;
* DeepSeekMoE: LLaMA-style multi-head attention; softmax routing over all experts, top-k, no renormalisation;
* V2: multi-head latent attention (:mod:`lightning_moe.nn.mla`) with YaRN, and group-limited routing (a token
  picks its ``topk_group`` best groups by their best expert, then its top-k experts inside them);
* V3: MLA, sigmoid scores with a selection-only correction bias (auxiliary-loss-free balancing), groups
  scored by their top-2 sum, renormalised and scaled weights, and optional multi-token prediction (MTP)
  modules, off by default and not part of the published 671B.

Sizes from the Hugging Face ``config.json`` of ``deepseek-ai/deepseek-moe-16b-base``,
``deepseek-ai/DeepSeek-V2-Lite``, ``deepseek-ai/DeepSeek-V2`` and ``deepseek-ai/DeepSeek-V3``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_moe.nn.attention import Attention, AttentionConfig, KVCache, attention_bias
from lightning_moe.nn.config import ExpertsConfig, MoEConfig, RouterConfig, config_from_dict
from lightning_moe.nn.cross_entropy import linear_cross_entropy
from lightning_moe.nn.ffn import FeedForward
from lightning_moe.nn.mla import MLAConfig, MultiHeadLatentAttention, mla_softmax_scale
from lightning_moe.nn.moe import MoELayer, MoEStats
from lightning_moe.nn.norm import RMSNorm
from lightning_moe.nn.rope import RopeConfig, rope_cos_sin
from lightning_moe.nn.transformer import DecoderLayer, DecoderLM, ModelOutput, init_weights
from lightning_moe.zoo.registry import ModelConfig, register_family

ATTENTION_KINDS = ("mha", "mla")


@dataclass
class DeepSeekConfig(ModelConfig):
    """DeepSeekMoE / DeepSeek-V2 / DeepSeek-V3 architecture (defaults: DeepSeekMoE 16B).

    Args:
        num_heads: Attention heads.
        attention: ``"mha"`` (DeepSeekMoE) or ``"mla"`` (multi-head latent attention, V2/V3).
        q_lora_rank: MLA query latent rank, or ``None`` for a full-rank query projection (V2-Lite).
        kv_lora_rank: MLA key/value latent rank.
        qk_nope_head_dim: MLA per-head query/key dims without RoPE.
        qk_rope_head_dim: MLA per-head query/key dims with RoPE (the key part is shared by all heads).
        v_head_dim: MLA per-head value dims.
        first_k_dense: The first ``first_k_dense`` layers have a dense FFN, the rest are MoE.
        dense_hidden: Hidden width of the dense FFNs.
        moe_hidden: Hidden width of each routed and each shared expert.
        n_shared_experts: Shared experts per MoE layer (one FFN of width ``n_shared_experts * moe_hidden``).
        num_experts: Routed experts per MoE layer.
        top_k: Routed experts per token.
        score_func: ``"softmax"`` (DeepSeekMoE, V2) or ``"sigmoid"`` (V3).
        n_group: Expert groups for group-limited routing (1: off).
        topk_group: Groups a token may route into.
        group_score: ``"max"`` (V2) or ``"top2_sum"`` (V3).
        routed_scaling_factor: Multiplies the routed experts' weights.
        normalize_topk: Renormalise the chosen weights to sum to one (V3).
        score_bias: Selection-only score-correction bias (V3).
        rope: Rotary settings (YaRN for V2/V3); the rotary width is ``qk_rope_head_dim`` (MLA) or the head dim.
        norm_eps: Epsilon of the block and final RMSNorms (the attention's latent norms keep 1e-6, as in
            DeepSeek's code and ``transformers``).
        tie_embeddings: Share the embedding with the LM head (never, in the released models).
        capacity_factor: ``None`` (dropless) or a training capacity factor.
        mtp_depth: Multi-token-prediction modules (V3 trained with 1); each adds a full MoE block.
        mtp_loss_coef: Weight ``lambda`` of the MTP loss, ``lambda / depth * sum_k CE_k`` (V3: 0.3 for the first
            10T tokens, then 0.1); :class:`~lightning_moe.module.CausalLMModule` adds it when ``mtp_depth > 0``.
    """

    vocab_size: int = 102400
    dim: int = 2048
    num_layers: int = 28
    num_heads: int = 16
    attention: str = "mha"
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    first_k_dense: int = 1
    dense_hidden: int = 10944
    moe_hidden: int = 1408
    n_shared_experts: int = 2
    num_experts: int = 64
    top_k: int = 6
    score_func: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    routed_scaling_factor: float = 1.0
    normalize_topk: bool = False
    score_bias: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    capacity_factor: float | None = None
    mtp_depth: int = 0
    mtp_loss_coef: float = 0.3
    # DeepSeekMoE/V2 reference code: aux_loss_alpha with seq_aux=true, i.e. alpha * our seq_balance loss.
    seq_balance_coef: float = 0.001

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rope = config_from_dict("rope", self.rope, RopeConfig)
        if not isinstance(self.rope, RopeConfig):
            raise ValueError(f"rope={self.rope!r} is invalid: must be RopeConfig(...) or a dict of its fields")
        if self.dense_hidden < 1:
            raise ValueError(f"dense_hidden={self.dense_hidden!r} is invalid: must be >= 1")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention={self.attention!r} is invalid: must be one of 'mha', 'mla'")
        # MHA heads are dim // num_heads wide (there is no head_dim field to set), with RoPE over the whole head.
        if self.attention == "mha" and (self.num_heads < 1 or self.dim % self.num_heads or self.rope_dim % 2):
            raise ValueError(
                f"num_heads={self.num_heads!r} is invalid for attention='mha' and dim={self.dim}: must divide dim "
                "into heads of an even width (rotary embeddings rotate pairs)"
            )
        if not 0 <= self.first_k_dense <= self.num_layers:
            raise ValueError(f"first_k_dense={self.first_k_dense!r} is invalid: must be in [0, {self.num_layers}]")
        if self.mtp_depth < 0:
            raise ValueError(f"mtp_depth={self.mtp_depth!r} is invalid: must be >= 0")
        if self.mtp_loss_coef < 0:
            raise ValueError(f"mtp_loss_coef={self.mtp_loss_coef!r} is invalid: must be >= 0")

    @property
    def rope_dim(self) -> int:
        """Rotary width: the MLA rotary head dim, or the whole MHA head."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.dim // self.num_heads


@dataclass
class DeepSeekOutput(ModelOutput):
    """:class:`~lightning_moe.nn.transformer.ModelOutput` plus multi-token-prediction logits (or losses).

    Attributes:
        mtp_logits: For depth ``k = 1..mtp_depth``, ``(B, T - k, V)`` logits; position ``i`` predicts token
            ``i + k + 1`` (train them against ``input_ids[:, k + 1:]`` on the first ``T - k - 1`` positions).
            Empty when the model was given targets.
        mtp_losses: With targets: for each depth ``k``, the mean cross-entropy of its predictions against
            ``targets[:, k:]`` (position ``i`` predicts ``targets[i + k]``; with an ``attention_mask`` only where
            tokens ``i`` and ``i + k`` are real), computed chunk by chunk.
    """

    mtp_logits: list[Tensor] = field(default_factory=list)
    mtp_losses: list[Tensor] = field(default_factory=list)


class MTPModule(nn.Module):
    """One V3 multi-token-prediction depth: ``h' = block(eh_proj([enorm(emb(t_{i+k})); hnorm(h_i)]))``.

    Args:
        dim: Model width ``D``.
        layer: The module's transformer block.
        eps: RMSNorm epsilon.
    """

    def __init__(self, dim: int, layer: DecoderLayer, eps: float) -> None:
        super().__init__()
        self.enorm, self.hnorm = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.eh_proj = nn.Linear(2 * dim, dim, bias=False)
        self.layer = layer
        self.norm = RMSNorm(dim, eps)  # before the shared LM head

    def forward(
        self,
        h_BTD: Tensor,
        emb_BTD: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None,
        token_mask: Tensor | None,
    ) -> tuple[Tensor, MoEStats | None, Tensor]:
        """Combine the previous depth's states with the next tokens' embeddings and run the block.

        Returns:
            The new states (the next depth's input), the block's MoE statistics, and the normed states the LM
            head reads (normed here, inside the module's forward, where a parallel wrapper has its weights).
        """
        x_BTD = self.eh_proj(torch.cat((self.enorm(emb_BTD), self.hnorm(h_BTD)), dim=-1))
        h_BTD, stats = self.layer(x_BTD, rope, mask, token_mask)
        return h_BTD, stats, self.norm(h_BTD)


class DeepSeekLM(DecoderLM):
    """:class:`~lightning_moe.nn.transformer.DecoderLM` with optional MTP modules sharing embedding and head.

    Args:
        mtp: The MTP modules (empty: a plain decoder LM).
        **kwargs: Passed to :class:`~lightning_moe.nn.transformer.DecoderLM`.
    """

    def __init__(self, mtp: list[MTPModule], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mtp = nn.ModuleList(mtp)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        targets: Tensor | None = None,
    ) -> DeepSeekOutput:
        """Next-token logits, plus MTP logits per depth (see :class:`DeepSeekOutput`); with ``targets``, losses.

        With a key/value cache (incremental decoding) the MTP modules are skipped.
        """
        out = super().forward(input_ids, attention_mask, cache, targets)
        result = DeepSeekOutput(out.logits, out.router_stats, out.hidden_states, out.loss)
        if cache is not None:
            return result
        h_BTD, (rope_cfg, rope_dim) = out.hidden_states, self.rope
        batch, seq = input_ids.shape
        token_mask = None if attention_mask is None else attention_mask.bool()
        for k, module in enumerate(self.mtp, start=1):
            length = seq - k
            if length < 1:  # a sequence of at most k tokens has nothing to predict k + 1 ahead
                break
            # Position i is real where its state (tokens i .. i + k - 1) and the token i + k it reads are.
            token_mask = None if token_mask is None else token_mask[:, :length] & attention_mask[:, k:].bool()
            cos, sin = rope_cos_sin(torch.arange(length, device=input_ids.device), rope_dim, rope_cfg, h_BTD.dtype)
            mask = attention_bias(batch, length, padding_mask_BS=token_mask, dtype=h_BTD.dtype, device=h_BTD.device)
            emb_BTD = self.embed(input_ids[:, k:])
            h_BTD, stats, head_input = module(
                h_BTD[:, :length], emb_BTD, (cos.unsqueeze(0), sin.unsqueeze(0)), mask, token_mask
            )
            if targets is None:
                result.mtp_logits.append(self.lm_head(head_input))
            else:
                targets_k = targets[:, k:]
                if token_mask is not None:  # a padding position predicts nothing
                    targets_k = targets_k.masked_fill(~token_mask, -100)
                result.mtp_losses.append(linear_cross_entropy(head_input, self.lm_head.weight, targets_k))
            if stats is not None:
                result.router_stats.append(stats)
        return result


def _layer(cfg: DeepSeekConfig, moe: bool) -> DecoderLayer:
    if cfg.attention == "mla":
        mla = MLAConfig(
            num_heads=cfg.num_heads,
            q_lora_rank=cfg.q_lora_rank,
            kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_nope_head_dim,
            qk_rope_head_dim=cfg.qk_rope_head_dim,
            v_head_dim=cfg.v_head_dim,
            scale=mla_softmax_scale(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.rope),
        )  # the latent norms keep MLAConfig's 1e-6 whatever norm_eps, as DeepSeek's code and transformers do
        attention: nn.Module = MultiHeadLatentAttention(cfg.dim, mla)
    else:
        attention = Attention(cfg.dim, AttentionConfig(num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads))
    if moe:
        router = RouterConfig(
            num_experts=cfg.num_experts,
            top_k=cfg.top_k,
            score_func=cfg.score_func,
            normalize_topk=cfg.normalize_topk,
            routed_scaling_factor=cfg.routed_scaling_factor,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            group_score=cfg.group_score,
            score_bias=cfg.score_bias,
            init_std=cfg.init_std,
            gate_precision=cfg.router_gate_precision,
        )
        ffn: nn.Module = MoELayer(
            MoEConfig(
                dim=cfg.dim,
                router=router,
                experts=ExpertsConfig(
                    hidden_dim=cfg.moe_hidden,
                    activation="silu",
                    gated=True,
                    init_std=cfg.init_std,
                    kernel=cfg.expert_kernel,
                ),
                capacity_factor=cfg.capacity_factor,
                shared_hidden_dim=cfg.n_shared_experts * cfg.moe_hidden,
            )
        )
    else:
        ffn = FeedForward(cfg.dim, cfg.dense_hidden, "silu", gated=True)
    return DecoderLayer(attention, ffn, RMSNorm(cfg.dim, cfg.norm_eps), RMSNorm(cfg.dim, cfg.norm_eps))


def build(cfg: DeepSeekConfig) -> DeepSeekLM:
    """Build a DeepSeekMoE / V2 / V3 model (with ``cfg.mtp_depth`` MTP modules, each an MoE block)."""
    layers = [_layer(cfg, moe=i >= cfg.first_k_dense) for i in range(cfg.num_layers)]
    mtp = [MTPModule(cfg.dim, _layer(cfg, moe=True), cfg.norm_eps) for _ in range(cfg.mtp_depth)]
    model = DeepSeekLM(
        mtp,
        vocab_size=cfg.vocab_size,
        dim=cfg.dim,
        layers=layers,
        norm=RMSNorm(cfg.dim, cfg.norm_eps),
        rope=(dataclasses.replace(cfg.rope), cfg.rope_dim),  # its own: editing model.zoo_config changes nothing
        tie_embeddings=cfg.tie_embeddings,
    )
    init_weights(model, cfg.init_std)
    return model


def _yarn(mscale: float) -> RopeConfig:
    """The V2/V3 YaRN settings (4K pre-training context extended 40x; ``max_position_embeddings`` 163840)."""
    return RopeConfig(
        theta=10000.0, scaling="yarn", factor=40.0, original_max_position=4096, mscale=mscale, mscale_all_dim=mscale
    )


# Other fields: the DeepSeekMoE 16B defaults.
_V2_LITE = DeepSeekConfig(num_layers=27, max_seq_len=163840, attention="mla", q_lora_rank=None, rope=_yarn(0.707))
_V3 = DeepSeekConfig(
    vocab_size=129280,
    dim=7168,
    num_layers=61,
    max_seq_len=163840,
    num_heads=128,
    attention="mla",
    q_lora_rank=1536,
    first_k_dense=3,
    dense_hidden=18432,
    moe_hidden=2048,
    n_shared_experts=1,
    num_experts=256,
    top_k=8,
    score_func="sigmoid",
    n_group=8,
    topk_group=4,
    group_score="top2_sum",
    routed_scaling_factor=2.5,
    normalize_topk=True,
    score_bias=True,
    rope=_yarn(1.0),
    # V3 paper: bias update speed 0.001, sequence-wise balance factor 0.0001 (its published config.json has
    # aux_loss_alpha=0.001, which from_hf reads; the preset follows the paper).
    seq_balance_coef=1e-4,
    bias_update_speed=1e-3,
)

PRESETS = {
    "deepseek-moe-16b": DeepSeekConfig(),
    "deepseek-v2-lite": _V2_LITE,
    "deepseek-v2": DeepSeekConfig(
        dim=5120,
        num_layers=60,
        max_seq_len=163840,
        num_heads=128,
        attention="mla",
        q_lora_rank=1536,
        dense_hidden=12288,
        moe_hidden=1536,
        num_experts=160,
        n_group=8,
        topk_group=3,
        routed_scaling_factor=16.0,
        rope=_yarn(0.707),
        seq_balance_coef=0.003,
    ),
    "deepseek-v3": _V3,
    # V3's routing (sigmoid + bias + top2_sum groups + scaling), MLA and a dense first layer, at CPU size.
    "deepseek-tiny": dataclasses.replace(
        _V3,
        vocab_size=1024,
        dim=128,
        num_layers=3,
        max_seq_len=1024,
        num_heads=4,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        first_k_dense=1,
        dense_hidden=256,
        moe_hidden=64,
        num_experts=16,
        top_k=4,
        n_group=4,
        topk_group=2,
        rope=RopeConfig(),
    ),
}

register_family("deepseek", DeepSeekConfig, build, PRESETS)
