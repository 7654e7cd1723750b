"""Multi-head latent attention (MLA, DeepSeek-V2/V3): low-rank compressed queries and keys/values.

Shape legend: ``B`` batch, ``T`` positions, ``D`` model width, ``H`` heads, ``Q`` query latent rank
(``q_lora_rank``), ``L`` key/value latent rank (``kv_lora_rank``), ``N`` non-rotary q/k head dim
(``qk_nope_head_dim``), ``R`` rotary head dim (``qk_rope_head_dim``), ``V`` value head dim.

Queries come from ``x`` directly (``q_proj``) or through a normalised rank-``Q`` bottleneck
(``q_a_proj -> q_a_layernorm -> q_b_proj``). Keys and values come from one rank-``L`` latent
(``kv_a_proj_with_mqa -> kv_a_layernorm -> kv_b_proj``); the same projection also emits a single ``R``-wide
rotary key ``k_pe`` shared by every head (decoupled RoPE). Each head's query and key are ``[nope, rope]``,
``N + R`` wide. Rotary dims are interleaved pairs, as in the DeepSeek checkpoints. Module and parameter names
follow Hugging Face's ``DeepseekV3Attention`` so checkpoints map one to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_moe.nn.attention import LayerKVCache, sdpa
from lightning_moe.nn.config import check_field_types
from lightning_moe.nn.norm import RMSNorm
from lightning_moe.nn.rope import RopeConfig, apply_rope_interleaved, yarn_mscale


@dataclass
class MLAConfig:
    """Multi-head latent attention.

    Args:
        num_heads: Heads ``H``.
        q_lora_rank: Query latent rank ``Q``, or ``None`` for a full-rank ``q_proj`` (DeepSeek-V2-Lite).
        kv_lora_rank: Key/value latent rank ``L``.
        qk_nope_head_dim: Per-head query/key dims without RoPE ``N``.
        qk_rope_head_dim: Per-head query/key dims with RoPE ``R`` (the key part is shared by all heads).
        v_head_dim: Per-head value dims ``V``.
        bias: Bias on ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj`` (HF ``attention_bias``).
        scale: Softmax scale (``None``: ``(N + R) ** -0.5``; see :func:`mla_softmax_scale` for YaRN).
        norm_eps: Epsilon of the latent RMSNorms.
    """

    num_heads: int = 16
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    bias: bool = False
    scale: float | None = None
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("num_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be >= 1")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise ValueError(f"q_lora_rank={self.q_lora_rank!r} is invalid: must be >= 1 or None")
        if self.qk_rope_head_dim < 2 or self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim!r} is invalid: must be even and >= 2")

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width ``N + R``."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim


def mla_softmax_scale(qk_head_dim: int, rope: RopeConfig) -> float:
    """DeepSeek's softmax scale: ``qk_head_dim ** -0.5``, times ``yarn_mscale(factor, mscale_all_dim) ** 2`` under YaRN.

    The cos/sin tables carry the ratio ``mscale(mscale) / mscale(mscale_all_dim)`` (1 in the released configs);
    the logits get the square of the all-dim correction here.
    """
    scale = qk_head_dim**-0.5
    if rope.scaling == "yarn" and rope.mscale_all_dim:
        scale = scale * yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return scale


class MultiHeadLatentAttention(nn.Module):
    """MLA self-attention, a drop-in for :class:`~lightning_moe.nn.attention.Attention` (``(x, rope, mask)``).

    Args:
        dim: Model width ``D``.
        config: MLA config.
    """

    def __init__(self, dim: int, config: MLAConfig) -> None:
        super().__init__()
        self.config = config
        cfg, heads = config, config.num_heads
        # Either a full-rank q_proj, or the q_a_proj -> q_a_layernorm -> q_b_proj bottleneck.
        self.q_proj: nn.Linear | None = None
        self.q_a_proj: nn.Linear | None = None
        self.q_a_layernorm: RMSNorm | None = None
        self.q_b_proj: nn.Linear | None = None
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(dim, heads * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, cfg.q_lora_rank, bias=cfg.bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, heads * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * cfg.v_head_dim, dim, bias=cfg.bias)

    def forward(
        self,
        x_BTD: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        cache: LayerKVCache | None = None,
    ) -> Tensor:
        """Attend.

        Args:
            x_BTD: Input.
            rope: ``(cos, sin)`` tables ``(B or 1, T, R)`` from :func:`~lightning_moe.nn.rope.rope_cos_sin`.
            mask: Additive mask from :func:`~lightning_moe.nn.attention.attention_bias`; ``None`` means causal.
            cache: This layer's key/value cache for incremental decoding (it holds the expanded per-head keys
                and values, not the compressed latent), or ``None``.

        Returns:
            ``(B, T, D)`` output.

        Raises:
            ValueError: If ``rope`` is missing.
        """
        if rope is None:
            raise ValueError("rope=None is invalid: multi-head latent attention needs the (cos, sin) tables")
        cfg = self.config
        batch, seq, _ = x_BTD.shape
        heads, nope, rot = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim

        if self.q_proj is not None:
            q_BTX = self.q_proj(x_BTD)
        else:
            q_BTX = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_BHTK = q_BTX.view(batch, seq, heads, nope + rot).transpose(1, 2)
        q_nope_BHTN, q_pe_BHTR = q_BHTK.split([nope, rot], dim=-1)

        latent_BTX = self.kv_a_proj_with_mqa(x_BTD)
        kv_BTL, k_pe_BTR = latent_BTX.split([cfg.kv_lora_rank, rot], dim=-1)
        kv_BHTX = self.kv_b_proj(self.kv_a_layernorm(kv_BTL)).view(batch, seq, heads, nope + cfg.v_head_dim)
        k_nope_BHTN, v_BHTV = kv_BHTX.transpose(1, 2).split([nope, cfg.v_head_dim], dim=-1)

        q_pe_BHTR = apply_rope_interleaved(q_pe_BHTR, *rope)
        k_pe_B1TR = apply_rope_interleaved(k_pe_BTR.unsqueeze(1), *rope)

        q_BHTK = torch.cat((q_nope_BHTN, q_pe_BHTR), dim=-1)
        k_BHTK = torch.cat((k_nope_BHTN, k_pe_B1TR.expand(-1, heads, -1, -1)), dim=-1)
        if cache is not None:
            k_BHTK, v_BHTV = cache.update(k_BHTK, v_BHTV)
        scale = cfg.scale if cfg.scale is not None else cfg.qk_head_dim**-0.5
        out_BHTV = sdpa(q_BHTK, k_BHTK, v_BHTV, mask, scale)
        return self.o_proj(out_BHTV.transpose(1, 2).reshape(batch, seq, heads * cfg.v_head_dim))
