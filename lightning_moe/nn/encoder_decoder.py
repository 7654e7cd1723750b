"""Encoder-decoder transformer (T5 / Switch Transformers layout) assembled from the shared blocks.

Shape legend: ``B`` batch, ``S`` encoder positions, ``T`` decoder positions, ``D`` model width, ``H`` heads,
``V`` vocabulary.

An encoder block is a pre-norm :class:`~lightning_moe.nn.transformer.DecoderLayer` given a bidirectional
mask; a decoder block adds cross-attention over the encoder output between its causal self-attention and
its FFN. Each FFN is dense or an :class:`~lightning_moe.nn.moe.MoELayer`. Relative position biases are
shared by all layers of a stack (one for the encoder, one for the decoder); cross-attention has none. The
forward returns a :class:`~lightning_moe.nn.transformer.ModelOutput` whose router statistics list the
encoder's MoE layers first, then the decoder's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_moe.nn.attention import Attention, KVCache, LayerKVCache, attention_bias, sdpa
from lightning_moe.nn.config import check_token_mask
from lightning_moe.nn.moe import MoELayer, MoEStats
from lightning_moe.nn.transformer import DecoderLayer, ModelOutput, check_targets, check_token_ids, head_output


class CrossAttention(Attention):
    """Multi-head attention from decoder queries to encoder keys and values (no RoPE, no causal mask).

    Same projections and config as :class:`~lightning_moe.nn.attention.Attention`; only the forward differs.
    """

    def forward(self, x_BTD: Tensor, memory_BSD: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        """Attend from ``x_BTD`` to ``memory_BSD``.

        Args:
            x_BTD: Decoder states (queries).
            memory_BSD: Encoder output (keys and values).
            mask: Additive mask broadcastable to ``(B, H, T, S)`` (see :func:`cross_attention_mask`).

        Returns:
            ``(B, T, D)`` output.
        """
        batch, seq, _ = x_BTD.shape
        mem_len, cfg = memory_BSD.shape[1], self.config
        q_BHTDh = self.q_proj(x_BTD).view(batch, seq, cfg.num_heads, self.head_dim).transpose(1, 2)
        k_BGSDh = self.k_proj(memory_BSD).view(batch, mem_len, cfg.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BGSDh = self.v_proj(memory_BSD).view(batch, mem_len, cfg.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q_BHTDh, k_BGSDh = self.q_norm(q_BHTDh), self.k_norm(k_BGSDh)
        out_BHTDh = sdpa(q_BHTDh, k_BGSDh, v_BGSDh, mask, cfg.scale)
        return self.o_proj(out_BHTDh.transpose(1, 2).reshape(batch, seq, cfg.num_heads * self.head_dim))


def cross_attention_mask(
    batch: int, mem_len: int, memory_mask_BS: Tensor | None, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Additive ``(B or 1, 1, 1, S)`` mask hiding padded encoder positions (all zeros without padding).

    Always a tensor: :func:`~lightning_moe.nn.attention.sdpa` reads ``None`` as causal.
    """
    if memory_mask_BS is None:
        return torch.zeros(1, 1, 1, mem_len, dtype=dtype, device=device)
    hidden = ~memory_mask_BS.bool().view(batch, 1, 1, mem_len)
    return torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill(hidden, torch.finfo(dtype).min)


class CrossAttentionDecoderLayer(nn.Module):
    """Pre-norm decoder block: causal self-attention, cross-attention, then a dense or MoE FFN.

    Args:
        attention: Self-attention taking ``(x, rope, mask)``.
        cross_attention: Cross-attention taking ``(x, memory, mask)``.
        ffn: A dense FFN, or an :class:`~lightning_moe.nn.moe.MoELayer`.
        attn_norm: Norm before self-attention.
        cross_norm: Norm before cross-attention.
        ffn_norm: Norm before the FFN.
    """

    def __init__(
        self,
        attention: nn.Module,
        cross_attention: CrossAttention,
        ffn: nn.Module,
        attn_norm: nn.Module,
        cross_norm: nn.Module,
        ffn_norm: nn.Module,
    ) -> None:
        super().__init__()
        self.attn_norm = attn_norm
        self.attention = attention
        self.cross_norm = cross_norm
        self.cross_attention = cross_attention
        self.ffn_norm = ffn_norm
        self.ffn = ffn

    @property
    def is_moe(self) -> bool:
        """Whether the FFN is an MoE layer."""
        return isinstance(self.ffn, MoELayer)

    def forward(
        self,
        x_BTD: Tensor,
        memory_BSD: Tensor,
        self_mask: Tensor | None,
        cross_mask: Tensor,
        token_mask_BT: Tensor | None = None,
        cache: LayerKVCache | None = None,
    ) -> tuple[Tensor, MoEStats | None]:
        """Run the block; returns the output and the MoE statistics (``None`` for a dense FFN).

        With ``cache`` (this layer's slot of a :class:`~lightning_moe.nn.attention.KVCache`) the self-attention
        appends this step's keys and values to the cached ones and attends to all of them.
        """
        h_BTD = x_BTD + self.attention(self.attn_norm(x_BTD), None, self_mask, cache)
        h_BTD = h_BTD + self.cross_attention(self.cross_norm(h_BTD), memory_BSD, cross_mask)
        if self.is_moe:
            ffn_BTD, stats = self.ffn(self.ffn_norm(h_BTD), token_mask_BT)
        else:
            ffn_BTD, stats = self.ffn(self.ffn_norm(h_BTD)), None
        return h_BTD + ffn_BTD, stats


class EncoderDecoderLM(nn.Module):
    """Shared token embedding, encoder stack, decoder stack and LM head.

    Args:
        vocab_size: Vocabulary ``V``.
        dim: Model width ``D``.
        encoder_layers: Encoder blocks (bidirectional self-attention).
        decoder_layers: Decoder blocks (causal self-attention + cross-attention).
        encoder_norm: Final encoder norm (applied to the memory the decoder attends to).
        decoder_norm: Final decoder norm.
        encoder_position_bias: Module ``(S, S) -> (H, S, S)`` shared by the encoder layers, or ``None``.
        decoder_position_bias: Module ``(T, T) -> (H, T, T)`` shared by the decoder self-attentions, or ``None``.
        tie_embeddings: Share the embedding matrix with the LM head.
        output_scale: Multiplies the final decoder states before the LM head (T5 uses ``D ** -0.5`` when the
            head is tied).
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        encoder_layers: list[DecoderLayer],
        decoder_layers: list[CrossAttentionDecoderLayer],
        encoder_norm: nn.Module,
        decoder_norm: nn.Module,
        encoder_position_bias: nn.Module | None = None,
        decoder_position_bias: nn.Module | None = None,
        tie_embeddings: bool = True,
        output_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.encoder = nn.ModuleList(encoder_layers)
        self.encoder_norm = encoder_norm
        self.encoder_position_bias = encoder_position_bias
        self.decoder = nn.ModuleList(decoder_layers)
        self.decoder_norm = decoder_norm
        self.decoder_position_bias = decoder_position_bias
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.output_scale = output_scale

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, list[MoEStats]]:
        """Encoder output ``(B, S, D)`` (after the final encoder norm) and the encoder's router statistics."""
        check_token_mask("attention_mask", attention_mask)
        batch, seq = input_ids.shape
        x_BSD = self.embed(input_ids)
        token_mask_BS = None if attention_mask is None else attention_mask.bool()
        bias_HSS = self.encoder_position_bias(seq, seq) if self.encoder_position_bias is not None else None
        mask = attention_bias(
            batch,
            seq,
            causal=False,
            padding_mask_BS=token_mask_BS,
            position_bias_HTS=bias_HSS,
            dtype=x_BSD.dtype,
            device=input_ids.device,
        )
        router_stats = []
        for layer in self.encoder:
            x_BSD, stats = layer(x_BSD, None, mask, token_mask_BS)
            if stats is not None:
                router_stats.append(stats)
        return self.encoder_norm(x_BSD), router_stats

    def forward(
        self,
        input_ids: Tensor,
        decoder_input_ids: Tensor,
        attention_mask: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> ModelOutput:
        """Teacher-forced logits for ``(B, T)`` decoder inputs given ``(B, S)`` encoder inputs, or their loss.

        Args:
            input_ids: ``(B, S)`` encoder token ids.
            decoder_input_ids: ``(B, T)`` decoder token ids (targets shifted right).
            attention_mask: ``(B, S)``, True for real encoder tokens.
            decoder_attention_mask: ``(B, T)``, True for real decoder tokens.
            targets: ``(B, T)`` the token each decoder position should predict (``-100``: no loss there). With
                them the output carries their mean cross-entropy as ``loss`` and no logits (see
                :class:`~lightning_moe.nn.transformer.ModelOutput`).

        Returns:
            Decoder logits ``(B, T, V)`` (or the loss), router statistics (encoder then decoder) and final
            decoder states.

        Raises:
            ValueError: If the shapes are wrong.
        """
        for name, ids, mask, mask_name in (
            ("input_ids", input_ids, attention_mask, "attention_mask"),
            ("decoder_input_ids", decoder_input_ids, decoder_attention_mask, "decoder_attention_mask"),
        ):
            check_token_mask(mask_name, mask)
            if ids.dim() != 2:
                raise ValueError(f"{name}.shape={tuple(ids.shape)} is invalid: expected (B, length)")
            check_token_ids(ids, self.embed.num_embeddings, name)
            if mask is not None and mask.shape != ids.shape:
                raise ValueError(f"the mask of {name} has shape {tuple(mask.shape)}: expected {tuple(ids.shape)}")
        if decoder_input_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"decoder_input_ids.shape={tuple(decoder_input_ids.shape)} is invalid: batch must match "
                f"input_ids ({input_ids.shape[0]})"
            )
        check_targets(targets, decoder_input_ids, "decoder_input_ids")
        memory_BSD, encoder_stats = self.encode(input_ids, attention_mask)
        out = self.decode(memory_BSD, decoder_input_ids, attention_mask, decoder_attention_mask, targets=targets)
        out.router_stats = encoder_stats + out.router_stats
        return out

    def new_cache(self) -> KVCache:
        """An empty key/value cache for the decoder's self-attentions (see :meth:`decode`)."""
        return KVCache(len(self.decoder))

    def decode(
        self,
        memory_BSD: Tensor,
        decoder_input_ids: Tensor,
        attention_mask: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        targets: Tensor | None = None,
    ) -> ModelOutput:
        """Decoder logits for ``(B, T)`` decoder inputs attending to an encoder output from :meth:`encode`.

        Args:
            memory_BSD: ``(B, S, D)`` encoder output.
            decoder_input_ids: ``(B, T)`` decoder token ids.
            attention_mask: ``(B, S)``, True for real encoder tokens (the cross-attention skips padding).
            decoder_attention_mask: True for real decoder tokens: ``(B, T)``, or ``(B, past + T)`` covering the
                cached positions too when a cache is given.
            cache: Key/value cache of the decoder's self-attentions (:meth:`new_cache`), extended in place: the
                decoder inputs are then the positions after the cached ones.
            targets: ``(B, T)`` targets, as in :meth:`forward`.

        Returns:
            Decoder logits ``(B, T, V)`` (or the loss), the decoder's router statistics and final decoder states.

        Raises:
            ValueError: If the shapes or token ids are wrong.
        """
        if decoder_input_ids.dim() != 2:
            raise ValueError(
                f"decoder_input_ids.shape={tuple(decoder_input_ids.shape)} is invalid: expected (B, length)"
            )
        batch, seq = decoder_input_ids.shape
        past = cache.length if cache is not None else 0
        check_token_ids(decoder_input_ids, self.embed.num_embeddings, "decoder_input_ids")
        check_token_mask("decoder_attention_mask", decoder_attention_mask)
        check_targets(targets, decoder_input_ids, "decoder_input_ids")
        if memory_BSD.dim() != 3 or memory_BSD.shape[0] != batch:
            raise ValueError(
                f"memory_BSD.shape={tuple(memory_BSD.shape)} is invalid: expected (B, S, D) with B={batch}, the batch "
                "of decoder_input_ids"
            )
        if past and cache.keys[0].shape[0] != batch:
            raise ValueError(
                f"decoder_input_ids.shape={tuple(decoder_input_ids.shape)} is invalid with this cache: it holds "
                f"{cache.keys[0].shape[0]} sequences; start a new one (model.new_cache()) for another batch size"
            )
        if decoder_attention_mask is not None and decoder_attention_mask.shape != (batch, past + seq):
            raise ValueError(
                f"decoder_attention_mask.shape={tuple(decoder_attention_mask.shape)} is invalid: expected "
                f"{(batch, past + seq)}"
            )
        x_BTD = self.embed(decoder_input_ids)
        token_mask_BT = None if decoder_attention_mask is None else decoder_attention_mask[:, past:].bool()
        bias_HTS = None
        if self.decoder_position_bias is not None:
            bias_HTS = self.decoder_position_bias(seq, past + seq, offset=past)
        self_mask = attention_bias(
            batch,
            seq,
            past=past,
            padding_mask_BS=decoder_attention_mask,
            position_bias_HTS=bias_HTS,
            dtype=x_BTD.dtype,
            device=x_BTD.device,
        )
        cross_mask = cross_attention_mask(batch, memory_BSD.shape[1], attention_mask, x_BTD.dtype, x_BTD.device)
        router_stats = []
        for index, layer in enumerate(self.decoder):
            layer_cache = cache.layer(index) if cache is not None else None
            x_BTD, stats = layer(x_BTD, memory_BSD, self_mask, cross_mask, token_mask_BT, layer_cache)
            if stats is not None:
                router_stats.append(stats)
        hidden_BTD = self.decoder_norm(x_BTD)
        scaled_BTD = hidden_BTD * self.output_scale if self.output_scale != 1.0 else hidden_BTD
        return head_output(self.lm_head, scaled_BTD, hidden_BTD, router_stats, targets)
