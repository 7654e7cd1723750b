"""Multi-head / grouped-query attention and the attention masks the zoo needs.

Shape legend: ``B`` batch, ``T`` query positions, ``S`` key positions, ``D`` model width, ``H`` query heads,
``G`` key/value heads, ``Dh`` head dim.

All attention goes through ``torch.nn.functional.scaled_dot_product_attention``. Masks are either ``None``
with ``is_causal`` (the fast path) or a float additive mask ``(B or 1, H or 1, T, S)`` built once per
forward by :func:`attention_bias` and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.nn.config import check_field_types, check_token_mask
from lightning_moe.nn.norm import RMSNorm
from lightning_moe.nn.rope import apply_rope


@dataclass
class AttentionConfig:
    """Multi-head or grouped-query attention.

    Args:
        num_heads: Query heads ``H``.
        num_kv_heads: Key/value heads ``G`` (``H`` for MHA, fewer for GQA); must divide ``H``.
        head_dim: Per-head width (``None``: ``dim // num_heads``).
        qkv_bias: Bias on the q/k/v projections (Qwen1.5/2).
        out_bias: Bias on the output projection.
        qk_norm: RMSNorm on each head's queries and keys before RoPE (Qwen3).
        rope: Apply rotary embeddings (the model passes cos/sin).
        scale: Softmax scale (``None``: ``head_dim ** -0.5``; T5 uses 1.0).
        norm_eps: Epsilon of the q/k norms.

    A sliding window is the model's (``DecoderLM(sliding_window=...)``): it shapes the mask every layer gets.
    """

    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False
    rope: bool = True
    scale: float | None = None
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.num_heads < 1:
            raise ValueError(f"num_heads={self.num_heads!r} is invalid: must be >= 1")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads!r} is invalid: must be >= 1 and divide num_heads ({self.num_heads})"
            )
        if self.head_dim is not None and self.head_dim < 1:
            raise ValueError(f"head_dim={self.head_dim!r} is invalid: must be >= 1 or None (dim // num_heads)")


class KVCache:
    """Keys and values of past positions, one slot per attention layer, for incremental decoding.

    Args:
        num_layers: Attention layers that will use the cache.

    Example::

        cache = KVCache(len(model.layers))
        logits = model(prompt_ids, cache=cache).logits          # prefill
        logits = model(next_ids, cache=cache).logits            # one position at a time after that
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        """Positions held so far."""
        return 0 if self.keys[0] is None else self.keys[0].shape[-2]

    def layer(self, index: int) -> LayerKVCache:
        """The view of one layer's slot."""
        return LayerKVCache(self, index)


class LayerKVCache:
    """One layer's slot of a :class:`KVCache`."""

    def __init__(self, cache: KVCache, index: int) -> None:
        self.cache, self.index = cache, index

    def update(self, k_BGTDh: Tensor, v_BGTDv: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's keys and values; return all of them ``(B, G, S, ...)``."""
        keys, values = self.cache.keys, self.cache.values
        if keys[self.index] is not None:
            k_BGTDh = torch.cat([keys[self.index], k_BGTDh], dim=-2)
            v_BGTDv = torch.cat([values[self.index], v_BGTDv], dim=-2)
        keys[self.index], values[self.index] = k_BGTDh, v_BGTDv
        return k_BGTDh, v_BGTDv


def attention_bias(
    batch: int,
    seq: int,
    *,
    past: int = 0,
    causal: bool = True,
    sliding_window: int | None = None,
    padding_mask_BS: Tensor | None = None,
    position_bias_HTS: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor | None:
    """Additive attention mask ``(B or 1, H or 1, T, S)``, or ``None`` when plain causal attention suffices.

    Queries are positions ``past .. past + T - 1``, keys ``0 .. S - 1`` with ``S = past + T``. Query ``i`` may
    see key ``j`` when ``j <= i`` (causal), ``i - j < sliding_window`` (sliding window) and key ``j`` is not
    padding. Every query may always see itself, so padded query rows stay finite.

    Args:
        batch: Batch size ``B``.
        seq: Query positions ``T``.
        past: Cached positions before the queries.
        causal: Causal masking.
        sliding_window: Window length, or ``None``.
        padding_mask_BS: True for real tokens, over all ``S`` key positions.
        position_bias_HTS: Added bias (T5 relative position bias), or ``None``.
        dtype: Mask dtype.
        device: Mask device.
    """
    check_token_mask("padding_mask_BS", padding_mask_BS)
    plain = sliding_window is None and padding_mask_BS is None and position_bias_HTS is None
    if causal and plain and past == 0:
        return None
    total = past + seq
    q_T1 = torch.arange(past, total, device=device).view(-1, 1)
    k_1S = torch.arange(total, device=device).view(1, -1)
    allowed_TS = k_1S <= q_T1 if causal else torch.ones(seq, total, dtype=torch.bool, device=device)
    if sliding_window is not None:
        allowed_TS = allowed_TS & (q_T1 - k_1S < sliding_window)
    allowed = allowed_TS.view(1, 1, seq, total)
    if padding_mask_BS is not None:
        allowed = allowed & padding_mask_BS.bool().view(batch, 1, 1, total)
    allowed = allowed | (k_1S == q_T1).view(1, 1, seq, total)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    if position_bias_HTS is not None:
        bias = bias + position_bias_HTS.to(dtype).unsqueeze(0)
    return bias


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention with optional QKV bias, q/k norm and RoPE.

    Args:
        dim: Model width ``D``.
        config: Attention config.
    """

    def __init__(self, dim: int, config: AttentionConfig) -> None:
        super().__init__()
        self.config = config
        if config.head_dim is None and dim % config.num_heads:
            raise ValueError(
                f"dim={dim} is invalid for num_heads={config.num_heads}: must be a multiple of it, or set head_dim"
            )
        self.head_dim = config.head_dim if config.head_dim is not None else dim // config.num_heads
        if config.rope and self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} is invalid with rope=True: rotary embeddings need an even one")
        heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=config.out_bias)
        self.q_norm = RMSNorm(head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(head_dim, config.norm_eps) if config.qk_norm else None

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
            rope: ``(cos, sin)`` tables ``(B or 1, T, Dh)`` when the config uses RoPE.
            mask: Additive mask from :func:`attention_bias`, or a boolean one (True: may attend), as
                ``F.scaled_dot_product_attention`` takes them; ``None`` means plain causal.
            cache: This layer's key/value cache for incremental decoding, or ``None``.

        Returns:
            ``(B, T, D)`` output.
        """
        batch, seq, _ = x_BTD.shape
        cfg = self.config
        q_BHTDh = self.q_proj(x_BTD).view(batch, seq, cfg.num_heads, self.head_dim).transpose(1, 2)
        k_BGTDh = self.k_proj(x_BTD).view(batch, seq, cfg.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BGTDh = self.v_proj(x_BTD).view(batch, seq, cfg.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q_BHTDh, k_BGTDh = self.q_norm(q_BHTDh), self.k_norm(k_BGTDh)
        if cfg.rope:
            if rope is None:
                raise ValueError("rope=None is invalid: this attention uses rotary embeddings; pass (cos, sin)")
            q_BHTDh, k_BGTDh = apply_rope(q_BHTDh, *rope), apply_rope(k_BGTDh, *rope)
        if cache is not None:
            k_BGTDh, v_BGTDh = cache.update(k_BGTDh, v_BGTDh)
        out_BHTDh = sdpa(q_BHTDh, k_BGTDh, v_BGTDh, mask, cfg.scale)
        return self.o_proj(out_BHTDh.transpose(1, 2).reshape(batch, seq, cfg.num_heads * self.head_dim))


def sdpa(q_BHTDh: Tensor, k_BGSDh: Tensor, v_BGSDh: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
    """Scaled dot-product attention with grouped key/value heads; causal when ``mask`` is None."""
    groups = q_BHTDh.shape[1] // k_BGSDh.shape[1]
    if groups > 1:
        k_BGSDh = k_BGSDh.repeat_interleave(groups, dim=1)
        v_BGSDh = v_BGSDh.repeat_interleave(groups, dim=1)
    if mask is not None and mask.dtype != torch.bool:  # SDPA reads a boolean mask as "may attend"
        mask = mask.to(q_BHTDh.dtype)
    return F.scaled_dot_product_attention(
        q_BHTDh, k_BGSDh, v_BGSDh, attn_mask=mask, is_causal=mask is None, scale=scale
    )
