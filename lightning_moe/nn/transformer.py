"""Decoder blocks and the decoder-only language model every causal zoo family is assembled from.

Shape legend: ``B`` batch, ``T`` positions, ``D`` model width, ``V`` vocabulary.

A zoo family builds a list of :class:`DecoderLayer` (its attention, and a dense FFN or an MoE layer per
layer) and hands it to :class:`DecoderLM` with its positional scheme; the forward returns a
:class:`ModelOutput` with the logits and the router statistics of every MoE layer, in layer order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_moe.nn.attention import KVCache, LayerKVCache, attention_bias
from lightning_moe.nn.config import check_token_mask
from lightning_moe.nn.cross_entropy import linear_cross_entropy
from lightning_moe.nn.moe import MoELayer, MoEStats
from lightning_moe.nn.rope import RopeConfig, rope_cos_sin


@dataclass
class ModelOutput:
    """What a zoo model returns.

    Attributes:
        logits: ``(B, T, V)`` next-token logits; ``None`` when the model was given targets.
        router_stats: One :class:`~lightning_moe.nn.moe.MoEStats` per MoE layer, in layer order.
        hidden_states: ``(B, T, D)`` final hidden states (after the final norm).
        loss: With targets: their mean cross-entropy, from
            :func:`~lightning_moe.nn.cross_entropy.linear_cross_entropy` (no logits materialised).
    """

    logits: Tensor | None
    router_stats: list[MoEStats] = field(default_factory=list)
    hidden_states: Tensor | None = None
    loss: Tensor | None = None


def check_token_ids(input_ids: Tensor, vocab_size: int, name: str = "input_ids") -> None:
    """Raise a ``ValueError`` unless ``input_ids`` are int64 or int32 ids in ``[0, vocab_size)``.

    Those are the index dtypes ``nn.Embedding`` takes. The range is checked on the CPU only: on a GPU it would
    wait for the device (the embedding's own index check still fails there, less clearly).
    """
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"{name}.dtype={input_ids.dtype} is invalid: expected integer token ids, int64 or int32 (the index dtypes "
            "nn.Embedding takes)"
        )
    if input_ids.device.type == "cpu" and input_ids.numel():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"{name} holds {low if low < 0 else high}, which is invalid: expected token ids in [0, {vocab_size})"
            )


def check_targets(targets: Tensor | None, input_ids: Tensor, name: str = "input_ids") -> None:
    """Raise a ``ValueError`` unless ``targets`` is ``None`` or has the shape of ``input_ids``."""
    if targets is not None and targets.shape != input_ids.shape:
        raise ValueError(
            f"targets.shape={tuple(targets.shape)} is invalid: expected the shape of {name}, {tuple(input_ids.shape)}"
        )


def head_output(
    lm_head: nn.Linear, head_input: Tensor, hidden: Tensor, router_stats: list[MoEStats], targets: Tensor | None
) -> ModelOutput:
    """The model's output: the LM head's logits of ``head_input``, or with ``targets`` their chunked loss."""
    if targets is None:
        return ModelOutput(logits=lm_head(head_input), router_stats=router_stats, hidden_states=hidden)
    loss = linear_cross_entropy(head_input, lm_head.weight, targets)
    return ModelOutput(logits=None, router_stats=router_stats, hidden_states=hidden, loss=loss)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(norm1(x))``, ``out = h + ffn(norm2(h))``; the FFN is dense or MoE.

    Args:
        attention: Self-attention module taking ``(x, rope, mask)``.
        ffn: A dense FFN, or an :class:`~lightning_moe.nn.moe.MoELayer`.
        attn_norm: Norm before attention.
        ffn_norm: Norm before the FFN.
    """

    def __init__(self, attention: nn.Module, ffn: nn.Module, attn_norm: nn.Module, ffn_norm: nn.Module) -> None:
        super().__init__()
        self.attn_norm = attn_norm
        self.attention = attention
        self.ffn_norm = ffn_norm
        self.ffn = ffn

    @property
    def is_moe(self) -> bool:
        """Whether the FFN is an MoE layer."""
        return isinstance(self.ffn, MoELayer)

    def forward(
        self,
        x_BTD: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        token_mask_BT: Tensor | None = None,
        cache: LayerKVCache | None = None,
    ) -> tuple[Tensor, MoEStats | None]:
        """Run the block; returns the output and the MoE statistics (``None`` for a dense FFN)."""
        h_BTD = x_BTD + self.attention(self.attn_norm(x_BTD), rope, mask, cache)
        if self.is_moe:
            ffn_BTD, stats = self.ffn(self.ffn_norm(h_BTD), token_mask_BT)
        else:
            ffn_BTD, stats = self.ffn(self.ffn_norm(h_BTD)), None
        return h_BTD + ffn_BTD, stats


class DecoderLM(nn.Module):
    """Token embedding, decoder layers, final norm and LM head.

    Args:
        vocab_size: Vocabulary ``V``.
        dim: Model width ``D``.
        layers: The decoder layers.
        norm: Final norm.
        rope: Rotary settings, with the rotary width, or ``None`` for no RoPE.
        position_bias: Module ``(T, S) -> (H, T, S)`` additive bias shared by all layers (T5-style), or
            ``None``.
        tie_embeddings: Share the embedding matrix with the LM head.
        sliding_window: Causal window length for every layer, or ``None``.
        embed_scale: Multiplies the embeddings (1.0: none).
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        layers: list[DecoderLayer],
        norm: nn.Module,
        rope: tuple[RopeConfig, int] | None = None,
        position_bias: nn.Module | None = None,
        tie_embeddings: bool = False,
        sliding_window: int | None = None,
        embed_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window={sliding_window!r} is invalid: must be >= 1 or None (full causal)")
        self.embed = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope = rope
        self.position_bias = position_bias
        self.sliding_window = sliding_window
        self.embed_scale = embed_scale

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        targets: Tensor | None = None,
    ) -> ModelOutput:
        """Next-token logits for ``(B, T)`` token ids, or with ``targets`` their loss.

        Args:
            input_ids: ``(B, T)`` token ids.
            attention_mask: 1/True for real tokens and 0/False for padding: ``(B, T)``, or ``(B, past + T)``
                covering the cached positions too when a cache is given.
            cache: Key/value cache for incremental decoding (see :meth:`new_cache`); it is extended in place.
            targets: ``(B, T)`` the token each position should predict (``-100``: no loss there). With them
                the output carries the mean cross-entropy as ``loss`` and no logits: the LM head and the loss
                run chunk by chunk (:func:`~lightning_moe.nn.cross_entropy.linear_cross_entropy`).

        Returns:
            Logits (or the loss) and router statistics.

        Raises:
            ValueError: If the shapes are wrong.
        """
        check_targets(targets, input_ids)
        x_BTD, rope, mask, token_mask_BT, past = self.prepare(input_ids, attention_mask, cache)
        router_stats = []
        for index, layer in enumerate(self.layers):
            layer_cache = cache.layer(index) if cache is not None else None
            x_BTD, stats = layer(x_BTD, rope, mask, token_mask_BT, layer_cache)
            if stats is not None:
                router_stats.append(stats)
        hidden_BTD = self.norm(x_BTD)
        return head_output(self.lm_head, hidden_BTD, hidden_BTD, router_stats, targets)

    def new_cache(self) -> KVCache:
        """An empty key/value cache for this model."""
        return KVCache(len(self.layers))

    def prepare(
        self, input_ids: Tensor, attention_mask: Tensor | None, cache: KVCache | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None, Tensor | None, Tensor | None, int]:
        """Embeddings, rotary tables, attention mask and MoE token mask for a forward.

        Returns:
            ``(x_BTD, rope, mask, token_mask_BT, past)``.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids.shape={tuple(input_ids.shape)} is invalid: expected (B, T)")
        batch, seq = input_ids.shape
        past = cache.length if cache is not None else 0
        check_token_ids(input_ids, self.embed.num_embeddings)
        if past and cache.keys[0].shape[0] != batch:
            raise ValueError(
                f"input_ids.shape={tuple(input_ids.shape)} is invalid with this cache: it holds "
                f"{cache.keys[0].shape[0]} sequences; start a new one (model.new_cache()) for another batch size"
            )
        check_token_mask("attention_mask", attention_mask)
        if attention_mask is not None and attention_mask.shape != (batch, past + seq):
            raise ValueError(
                f"attention_mask.shape={tuple(attention_mask.shape)} is invalid: expected {(batch, past + seq)}"
            )
        x_BTD = self.embed(input_ids)
        if self.embed_scale != 1.0:
            x_BTD = x_BTD * self.embed_scale
        token_mask_BT = None if attention_mask is None else attention_mask[:, past:].bool()
        rope = None
        if self.rope is not None:
            rope_cfg, rope_dim = self.rope
            positions_T = torch.arange(past, past + seq, device=input_ids.device)
            cos, sin = rope_cos_sin(positions_T, rope_dim, rope_cfg, x_BTD.dtype)
            rope = (cos.unsqueeze(0), sin.unsqueeze(0))
        bias_HTS = None
        if self.position_bias is not None:
            bias_HTS = self.position_bias(past + seq, past + seq)[:, past:]
        mask = attention_bias(
            batch,
            seq,
            past=past,
            sliding_window=self.sliding_window,
            padding_mask_BS=attention_mask,
            position_bias_HTS=bias_HTS,
            dtype=x_BTD.dtype,
            device=input_ids.device,
        )
        return x_BTD, rope, mask, token_mask_BT, past


def init_weights(module: nn.Module, std: float) -> None:
    """Normal(0, ``std``) for every Linear and Embedding weight below ``module``, zeros for biases.

    Stacked experts and norms keep their own initialisation. A no-op in cost on the meta device.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
