"""Hugging Face checkpoints in and out: :func:`from_hf` builds our zoo model with the weights, :func:`to_hf` exports.

Shape legend: ``E`` experts, ``D`` model width, ``F`` expert hidden width.

Families (Hugging Face ``model_type``): ``mixtral``, ``qwen2_moe`` (Qwen1.5-MoE, Qwen2-MoE), ``qwen3_moe``,
``deepseek_v2``, ``deepseek_v3`` and ``switch_transformers``.

Two things are explicit here and nowhere else:

* **The config mapping.** Each family reads every ``config.json`` field it knows into our zoo config. A field
  that changes the architecture and that we do not support (``use_sliding_window``, ``attention_bias``,
  ``router_bias``, a RoPE type other than default/YaRN, ...) raises :class:`UnsupportedConfigError` naming it;
  so does any field we do not know at all, since we cannot tell whether it matters. Fields that never change
  the forward (token ids, dropout, generation defaults, ...) are listed in ``_NEVER_ARCHITECTURAL``.
* **The tensor mapping.** Each family lists every Hugging Face tensor as a :class:`_Slot`: which of our tensors
  (or expert slices) it fills and how (copy, transpose, split a fused ``gate_up_proj``). Loading checks the
  checkpoint against that list, so a missing, extra or mis-shaped tensor raises :class:`CheckpointMismatchError`
  naming it. Routed experts are read in either layout: fused ``gate_up_proj`` ``(E, 2F, D)`` /
  ``down_proj`` ``(E, D, F)`` (a ``transformers`` 5 model's ``state_dict``) or one tensor per expert (what the
  Hub and ``save_pretrained`` store); :func:`to_hf` writes the per-expert layout.

Reading a directory needs only ``safetensors``: the model is built on the meta device, materialised once, and
the checkpoint is read one tensor at a time, so peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lightning_moe import zoo
from lightning_moe.nn.rope import RopeConfig
from lightning_moe.zoo.deepseek import DeepSeekConfig
from lightning_moe.zoo.mixtral import MixtralConfig
from lightning_moe.zoo.qwen_moe import QwenMoEConfig
from lightning_moe.zoo.registry import ModelConfig
from lightning_moe.zoo.switch import SwitchConfig, is_moe_layer
from lightning_moe.zoo.upcycle import upcycled_config

__all__ = ["CheckpointMismatchError", "UnsupportedConfigError", "from_hf", "hf_config_to_ours", "to_hf"]

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "switch_transformers")


class UnsupportedConfigError(ValueError):
    """A Hugging Face config field (or value) that lightning-moe cannot represent."""


class CheckpointMismatchError(ValueError):
    """A checkpoint tensor that is missing, unexpected or of the wrong shape for its config."""


# Fields of PretrainedConfig and of the families that never change the forward pass in eval: token ids,
# bookkeeping, generation defaults, dropout, output switches, initialisation.
_NEVER_ARCHITECTURAL = frozenset(
    """_name_or_path architectures model_type transformers_version dtype torch_dtype auto_map
    bos_token_id eos_token_id pad_token_id sep_token_id decoder_start_token_id forced_bos_token_id forced_eos_token_id
    use_cache return_dict output_attentions output_hidden_states output_router_logits output_scores
    return_dict_in_generate torchscript use_bfloat16 tf_legacy_loss pruned_heads chunk_size_feed_forward
    id2label label2id problem_type finetuning_task prefix task_specific_params tokenizer_class
    is_encoder_decoder is_decoder add_cross_attention cross_attention_hidden_size
    max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty temperature top_k
    top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size
    bad_words_ids num_return_sequences remove_invalid_values exponential_decay_length_penalty suppress_tokens
    begin_suppress_tokens initializer_range initializer_factor attention_dropout dropout_rate pretraining_tp
    _attn_implementation_autoset ep_size""".split()
)


# ---------------------------------------------------------------------------------------------------- config


# What transformers' config classes take for a field absent from ``config.json``, where that is not what the
# readers below would otherwise fall back to (a hand-written file that leaves them out must mean the same model).
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {"num_key_value_heads": 8, "max_position_embeddings": 131072, "router_aux_loss_coef": 0.001},
    "qwen2_moe": {"num_key_value_heads": 16, "shared_expert_intermediate_size": 5632, "router_aux_loss_coef": 0.001},
    "qwen3_moe": {"num_key_value_heads": 4, "router_aux_loss_coef": 0.001},
    "deepseek_v2": {"n_shared_experts": 2, "q_lora_rank": 1536, "max_position_embeddings": 2048},
    "deepseek_v3": {
        "n_group": 8,
        "topk_group": 4,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 3,
        "n_shared_experts": 1,
        "q_lora_rank": 1536,
    },
    "switch_transformers": {
        "router_jitter_noise": 0.01,
        "router_aux_loss_coef": 0.001,
        "expert_capacity": 64,
        "num_decoder_layers": 12,  # not num_layers: transformers builds 12 decoder blocks whatever the encoder's
        "num_sparse_encoder_layers": 3,
        "num_sparse_decoder_layers": 3,
    },
}


class _Fields:
    """A ``config.json`` dict read field by field; :meth:`finish` rejects whatever no one read."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.model_type = raw.get("model_type")
        self.read: set[str] = set()

    def get(self, name: str, default: Any = ..., *aliases: str) -> Any:
        """The field's value (or its first present alias's); when absent, transformers' default, else ``default``."""
        self.read.update((name, *aliases))
        for key in (name, *aliases):
            if key in self.raw:
                return self.raw[key]
        hf_defaults = _HF_DEFAULTS.get(self.model_type, {})
        if name in hf_defaults:
            return hf_defaults[name]
        if default is ...:
            raise UnsupportedConfigError(f"{self.model_type} config field {name!r} is required but missing")
        return default

    def expect(self, name: str, allowed: tuple[Any, ...], why: str, default: Any = ...) -> Any:
        """The field's value, which must be one of ``allowed`` (absent reads as ``allowed[0]``)."""
        value = self.get(name, allowed[0] if default is ... else default)
        if value not in allowed:
            raise UnsupportedConfigError(f"{self.model_type} config field {name}={value!r} is unsupported: {why}")
        return value

    def ignore(self, *names: str) -> None:
        """Mark fields read on purpose that have no counterpart in our config."""
        self.read.update(names)

    def finish(self) -> None:
        left = sorted(set(self.raw) - self.read - _NEVER_ARCHITECTURAL)
        if left:
            raise UnsupportedConfigError(
                f"{self.model_type} config fields {left} are unknown to lightning-moe: it cannot tell whether they "
                "change the architecture, so it refuses to ignore them"
            )


def _rope(f: _Fields, yarn: bool, default_theta: float) -> RopeConfig:
    """RoPE settings from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (older)."""
    params = dict(f.get("rope_parameters", None) or f.get("rope_scaling", None) or {})
    theta = params.pop("rope_theta", None) or f.get("rope_theta", default_theta)
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    allowed = ("default", "yarn") if yarn else ("default",)
    if kind not in allowed:
        raise UnsupportedConfigError(f"{f.model_type} config field rope_parameters.rope_type={kind!r} is unsupported")
    if kind == "default":
        if params:
            raise UnsupportedConfigError(
                f"{f.model_type} config fields rope_parameters {sorted(params)} are unsupported"
            )
        return RopeConfig(theta=float(theta))
    if params.pop("truncate", True) is not True:
        raise UnsupportedConfigError(f"{f.model_type} config field rope_parameters.truncate=False is unsupported")
    if "original_max_position_embeddings" not in params:
        raise UnsupportedConfigError(f"{f.model_type} YaRN needs rope_parameters.original_max_position_embeddings")
    original = int(params.pop("original_max_position_embeddings"))
    factor = params.pop("factor", None) or f.get("max_position_embeddings") / original
    mscale, mscale_all_dim = params.pop("mscale", None), params.pop("mscale_all_dim", None)
    if mscale_all_dim and not mscale:
        # transformers then ignores mscale_all_dim for the cos/sin factor but not for the softmax scale.
        raise UnsupportedConfigError(f"{f.model_type} config field rope_parameters.mscale={mscale!r} is unsupported")
    rope = RopeConfig(
        theta=float(theta),
        scaling="yarn",
        factor=float(factor),
        original_max_position=original,
        beta_fast=float(params.pop("beta_fast", None) or 32.0),
        beta_slow=float(params.pop("beta_slow", None) or 1.0),
        mscale=float(mscale or 1.0),
        mscale_all_dim=float(mscale_all_dim or 0.0),
    )
    if params:  # attention_factor, partial_rotary_factor, ...
        raise UnsupportedConfigError(f"{f.model_type} config fields rope_parameters {sorted(params)} are unsupported")
    return rope


def _silu(f: _Fields) -> None:
    f.expect("hidden_act", ("silu", "swish"), "the experts and FFNs are SwiGLU (silu)")


def _aux_coef(f: _Fields, top_k: int, moe_layers: int, default: float) -> float:
    """Hugging Face's ``router_aux_loss_coef`` ``c`` as our ``load_balance_coef``: ``c * top_k / moe_layers``.

    transformers computes one load-balancing loss for the whole model from the statistics of all its MoE layers
    pooled, ``top_k * E * sum_e mean_l(f_le) * mean_l(P_le)`` (``top_k`` when balanced); we add one loss per layer,
    ``E * sum_e f_le * P_le`` (1 when balanced), as Switch, GShard and Megatron-Core do. ``c * top_k / L`` gives the
    same total when balanced and about the same weight on each layer's router; with one MoE layer the two losses
    are equal. ``default`` is ours, used when the field and its class default are absent.
    """
    layers = max(1, moe_layers)
    return float(f.get("router_aux_loss_coef", default * layers / top_k)) * top_k / layers


def _hf_aux_coef(coef: float, top_k: int, moe_layers: int) -> float:
    """The inverse of :func:`_aux_coef`."""
    return coef * max(1, moe_layers) / top_k


def _warn_dropout(f: _Fields) -> None:
    """Warn that a configured dropout is not applied: our models have none (inference is unaffected)."""
    rates = {k: f.raw[k] for k in ("attention_dropout", "dropout_rate") if isinstance(f.raw.get(k), (int, float))}
    rates = {k: v for k, v in rates.items() if v > 0}
    if rates:
        warnings.warn(
            f"{f.model_type} config sets {rates}: lightning-moe models have no dropout, so training runs without it "
            "(outputs in eval mode are unaffected)",
            stacklevel=3,
        )


def _mixtral_config(f: _Fields) -> MixtralConfig:
    _silu(f)
    dim, heads, top_k = f.get("hidden_size"), f.get("num_attention_heads"), f.get("num_experts_per_tok")
    head_dim = f.get("head_dim", None)
    return MixtralConfig(
        vocab_size=f.get("vocab_size"),
        dim=dim,
        num_layers=f.get("num_hidden_layers"),
        max_seq_len=f.get("max_position_embeddings", 32768),
        num_heads=heads,
        num_kv_heads=f.get("num_key_value_heads", heads),
        head_dim=None if head_dim in (None, dim // heads) else head_dim,
        ffn_hidden=f.get("intermediate_size"),
        num_experts=f.get("num_local_experts", ..., "num_experts"),
        top_k=top_k,
        rope_theta=_rope(f, yarn=False, default_theta=1e6).theta,
        norm_eps=f.get("rms_norm_eps", 1e-5),
        sliding_window=f.get("sliding_window", None),
        router_jitter=f.get("router_jitter_noise", 0.0),
        tie_embeddings=f.get("tie_word_embeddings", False),
        load_balance_coef=_aux_coef(f, top_k, f.get("num_hidden_layers"), MixtralConfig.load_balance_coef),
    )


def _qwen_config(f: _Fields) -> QwenMoEConfig:
    qwen3 = f.model_type == "qwen3_moe"
    _silu(f)
    sliding = f.expect("use_sliding_window", (False,), "sliding-window layers are not supported for Qwen-MoE")
    layer_types = set(f.get("layer_types", None) or ["full_attention"])
    if not sliding and layer_types != {"full_attention"}:
        raise UnsupportedConfigError(f"{f.model_type} config field layer_types={sorted(layer_types)} is unsupported")
    f.ignore("sliding_window", "max_window_layers")  # only read when use_sliding_window is true
    dim, heads, top_k = f.get("hidden_size"), f.get("num_attention_heads"), f.get("num_experts_per_tok")
    head_dim = f.get("head_dim", None)
    if qwen3:
        f.expect("attention_bias", (False,), "Qwen3-MoE with attention biases (incl. o_proj) is not supported")
    cfg = QwenMoEConfig(
        vocab_size=f.get("vocab_size"),
        dim=dim,
        num_layers=f.get("num_hidden_layers"),
        max_seq_len=f.get("max_position_embeddings", 32768),
        num_heads=heads,
        num_kv_heads=f.get("num_key_value_heads", heads),
        head_dim=None if head_dim in (None, dim // heads) else head_dim,
        qkv_bias=False if qwen3 else f.get("qkv_bias", True),
        qk_norm=qwen3,
        num_experts=f.get("num_experts", ..., "num_local_experts"),
        top_k=top_k,
        expert_hidden=f.get("moe_intermediate_size"),
        normalize_topk=f.get("norm_topk_prob", False),
        shared_expert_hidden=0 if qwen3 else f.get("shared_expert_intermediate_size"),
        dense_hidden=f.get("intermediate_size"),
        decoder_sparse_step=f.get("decoder_sparse_step", 1),
        mlp_only_layers=list(f.get("mlp_only_layers", None) or []),
        rope_theta=_rope(f, yarn=False, default_theta=10000.0).theta,
        norm_eps=f.get("rms_norm_eps", 1e-6),
        tie_embeddings=f.get("tie_word_embeddings", False),
    )
    coef = _aux_coef(f, top_k, _moe_layer_count(cfg), QwenMoEConfig.load_balance_coef)
    return dataclasses.replace(cfg, load_balance_coef=coef)


def _moe_layer_count(cfg: ModelConfig) -> int:
    """How many of the model's layers are MoE (decoder families; for Switch, the sparse layers of one stack)."""
    if isinstance(cfg, QwenMoEConfig):
        return sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    if isinstance(cfg, SwitchConfig):
        return sum(1 for i in range(cfg.num_layers) if cfg.sparse_step == 1 or i % cfg.sparse_step == 1)
    return cfg.num_layers


def _deepseek_config(f: _Fields) -> DeepSeekConfig:
    v3 = f.model_type == "deepseek_v3"
    _silu(f)
    f.expect("attention_bias", (False,), "MLA projections with biases are not supported")
    f.expect("mlp_bias", (False,), "FFN biases are not supported")
    f.expect("moe_layer_freq", (1,), "every layer after first_k_dense_replace must be MoE")
    f.expect("seq_aux", (True,), "aux_loss_alpha maps to our sequence-wise balance loss")
    f.expect("rope_interleave", (True,), "MLA rotary dims are interleaved pairs, as in the DeepSeek checkpoints")
    # MLA has no KV heads; head_dim and qk_head_dim are derived; transformers skips the MTP layers too.
    f.ignore("num_key_value_heads", "head_dim", "num_nextn_predict_layers")
    nope, rot = f.get("qk_nope_head_dim"), f.get("qk_rope_head_dim")
    if f.get("qk_head_dim", nope + rot) != nope + rot:
        raise UnsupportedConfigError(f"deepseek config field qk_head_dim={f.raw['qk_head_dim']!r} != {nope + rot}")
    n_group, topk_group = f.get("n_group", None) or 1, f.get("topk_group", None) or 1
    if v3:
        f.expect("scoring_func", ("sigmoid",), "DeepSeek-V3 routes with sigmoid scores")
        f.expect("topk_method", ("noaux_tc",), "DeepSeek-V3 routes with the correction bias (noaux_tc)")
        routing = dict(score_func="sigmoid", group_score="top2_sum", score_bias=True)
        normalize = f.get("norm_topk_prob", True)
    else:
        f.expect("scoring_func", ("softmax",), "DeepSeek-V2 routes with softmax scores")
        method = f.expect("topk_method", ("greedy", "group_limited_greedy"), "only greedy and group_limited_greedy")
        if method == "greedy":
            n_group = topk_group = 1
        routing = dict(score_func="softmax", group_score="max", score_bias=False)
        # transformers' DeepseekV2 never renormalises, whatever this says: a True cannot be honoured both ways.
        normalize = f.expect("norm_topk_prob", (False,), "transformers' DeepSeek-V2 ignores it; ambiguous")
    q_lora = f.get("q_lora_rank", None)
    top_k = f.get("num_experts_per_tok")
    return DeepSeekConfig(
        vocab_size=f.get("vocab_size"),
        dim=f.get("hidden_size"),
        num_layers=f.get("num_hidden_layers"),
        max_seq_len=f.get("max_position_embeddings", 4096),
        num_heads=f.get("num_attention_heads"),
        attention="mla",
        q_lora_rank=q_lora,
        kv_lora_rank=f.get("kv_lora_rank"),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rot,
        v_head_dim=f.get("v_head_dim"),
        first_k_dense=f.get("first_k_dense_replace", 0),
        dense_hidden=f.get("intermediate_size"),
        moe_hidden=f.get("moe_intermediate_size"),
        n_shared_experts=f.get("n_shared_experts", None) or 0,
        num_experts=f.get("n_routed_experts", ..., "num_local_experts", "num_experts"),
        top_k=top_k,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=float(f.get("routed_scaling_factor", 1.0)),
        normalize_topk=normalize,
        rope=_rope(f, yarn=True, default_theta=10000.0),
        norm_eps=f.get("rms_norm_eps", 1e-6),
        tie_embeddings=f.get("tie_word_embeddings", False),
        seq_balance_coef=float(f.get("aux_loss_alpha", DeepSeekConfig.seq_balance_coef)),
        **routing,
    )


_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def _switch_config(f: _Fields) -> SwitchConfig:
    layers = f.get("num_layers")
    f.expect("num_decoder_layers", (layers, None), "encoder and decoder must have as many layers")

    def step(stack: str, num: int) -> int:
        sparse = f.get(f"num_sparse_{stack}_layers")
        return num // sparse if sparse > 0 else num  # transformers' rule (its "0 sparse layers" hack included)

    f.ignore("encoder_sparse_step", "decoder_sparse_step")  # transformers recomputes both from the counts
    encoder_step, decoder_step = step("encoder", layers), step("decoder", layers)
    if encoder_step != decoder_step or encoder_step < 1:
        raise UnsupportedConfigError(
            f"switch_transformers config fields num_sparse_encoder_layers={f.raw['num_sparse_encoder_layers']!r} and "
            f"num_sparse_decoder_layers={f.raw['num_sparse_decoder_layers']!r} are unsupported: both stacks must "
            "place their sparse layers alike"
        )
    activation = f.expect("dense_act_fn", tuple(_ACTIVATIONS), "unknown activation", default="relu")
    f.expect("router_bias", (False,), "the router has no bias")
    f.expect("router_dtype", ("float32",), "the router always runs in float32")
    # transformers reads router_ignore_padding_tokens nowhere; padding takes no capacity in our layer.
    f.ignore("router_ignore_padding_tokens", "add_router_probs")
    f.expect("is_gated_act", (False,), "transformers' Switch experts are not gated")
    # Older Hub configs (transformers 4.2x conversions) carry these; transformers 5 reads neither and routes each
    # token to one expert with a per-sequence capacity, masking the rest: what the values below describe.
    f.expect("num_selected_experts", (1,), "transformers' Switch routes each token to one expert")
    f.expect("router_type", ("tokens_masked",), "transformers' Switch router is top-1 token choice, capacity masked")
    cfg = SwitchConfig(
        vocab_size=f.get("vocab_size"),
        dim=f.get("d_model"),
        num_layers=layers,
        num_heads=f.get("num_heads"),
        head_dim=f.get("d_kv"),
        ffn_hidden=f.get("d_ff"),
        activation=_ACTIVATIONS[activation],
        gated=False,
        num_experts=f.get("num_experts"),
        sparse_step=encoder_step,
        # transformers applies an absolute capacity per sequence, in training and eval alike.
        capacity_factor=None,
        eval_capacity_factor=None,
        expert_capacity=f.get("expert_capacity"),
        capacity_scope="sequence",
        router_jitter=f.get("router_jitter_noise", 0.0),
        num_buckets=f.get("relative_attention_num_buckets", 32),
        max_distance=f.get("relative_attention_max_distance", 128),
        norm_eps=f.get("layer_norm_epsilon", 1e-6),
        tie_embeddings=f.get("tie_word_embeddings", True),
    )
    # transformers averages each stack's z-losses over its sparse layers, and pools a stack's load statistics into
    # one loss (per sequence), where we add one loss per layer: a coefficient per layer of c / (sparse layers per
    # stack) gives the same totals when balanced (and, for the z-loss, whenever there is no padding).
    per_stack = max(1, _moe_layer_count(cfg))
    aux, z = f.get("router_aux_loss_coef", 0.01), f.get("router_z_loss_coef", 0.001)
    return dataclasses.replace(cfg, load_balance_coef=float(aux) / per_stack, z_loss_coef=float(z) / per_stack)


_CONFIG_READERS: dict[str, Callable[[_Fields], ModelConfig]] = {
    "mixtral": _mixtral_config,
    "qwen2_moe": _qwen_config,
    "qwen3_moe": _qwen_config,
    "deepseek_v2": _deepseek_config,
    "deepseek_v3": _deepseek_config,
    "switch_transformers": _switch_config,
}


def hf_config_to_ours(hf_config: dict[str, Any]) -> ModelConfig:
    """Our zoo config for a Hugging Face ``config.json`` dict.

    Raises:
        UnsupportedConfigError: For an unsupported ``model_type``, a field whose value we cannot represent, or a
            field we do not know (each named in the message).
    """
    fields = _Fields(hf_config)
    if fields.model_type not in _CONFIG_READERS:
        raise UnsupportedConfigError(
            f"model_type={fields.model_type!r} is unsupported: expected one of {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    cfg = _CONFIG_READERS[fields.model_type](fields)
    fields.finish()
    _warn_dropout(fields)
    return cfg


# ---------------------------------------------------------------------------------------------------- tensors

_Target = tuple[str, int | None]  # our state-dict key, and an expert index (a slice of a stacked tensor) or None


@dataclass(frozen=True)
class _Slot:
    """One Hugging Face tensor: the tensors of ours it fills, and the two conversions.

    Attributes:
        targets: Our state-dict keys (with an expert index for a slice of stacked experts).
        to_ours: HF tensor -> one tensor per target.
        to_hf: One tensor per target -> HF tensor.
        optional: May be absent from a checkpoint (a tied LM head, Switch's per-stack embedding copies).
        export: Written by :func:`to_hf` (not a tied LM head: ``transformers`` ties it itself).
    """

    targets: tuple[_Target, ...]
    to_ours: Callable[[Tensor], tuple[Tensor, ...]] = lambda t: (t,)
    to_hf: Callable[[tuple[Tensor, ...]], Tensor] = lambda ts: ts[0]
    optional: bool = False
    export: bool = True


def _copy(ours: str, optional: bool = False) -> _Slot:
    return _Slot(((ours, None),), optional=optional, export=not optional)


def _transposed(ours: str, expert: int | None = None) -> _Slot:
    return _Slot(((ours, expert),), lambda t: (t.t(),), lambda ts: ts[0].t())


def _experts(slots: dict[str, _Slot], ours: str, fused: str | None, per_expert: Callable[[int], tuple], n: int):
    """Routed experts ``ours.w1/w3`` ``(E, D, F)`` and ``ours.w2`` ``(E, F, D)``.

    Args:
        slots: Filled in.
        ours: Our experts' prefix (``layers.3.ffn.experts``).
        fused: HF prefix of the fused layout (``gate_up_proj`` ``(E, 2F, D)``, gate rows first, and ``down_proj``
            ``(E, D, F)``), or ``None`` for the per-expert layout.
        per_expert: ``e -> (gate, up, down)`` HF names of expert ``e``'s ``(F, D)``, ``(F, D)``, ``(D, F)`` weights.
        n: Experts ``E``.
    """
    w1, w3, w2 = f"{ours}.w1", f"{ours}.w3", f"{ours}.w2"
    if fused is not None:
        slots[f"{fused}.gate_up_proj"] = _Slot(
            ((w1, None), (w3, None)),
            lambda t: tuple(x.transpose(1, 2) for x in t.chunk(2, dim=1)),
            lambda ts: torch.cat([x.transpose(1, 2) for x in ts], dim=1),
        )
        slots[f"{fused}.down_proj"] = _Slot(
            ((w2, None),), lambda t: (t.transpose(1, 2),), lambda ts: ts[0].transpose(1, 2)
        )
        return
    for e in range(n):
        gate, up, down = per_expert(e)
        slots[gate], slots[down] = _transposed(w1, e), _transposed(w2, e)
        if up is not None:
            slots[up] = _transposed(w3, e)


def _swiglu(slots: dict[str, _Slot], hf: str, ours: str, names: tuple[str, str, str] = ("gate", "up", "down")) -> None:
    """A dense SwiGLU FFN: HF ``{gate,up,down}_proj`` Linears -> our ``w1``, ``w3``, ``w2``."""
    for name, mine in zip(names, ("w1", "w3", "w2"), strict=True):
        slots[f"{hf}.{name}_proj.weight"] = _copy(f"{ours}.{mine}.weight")


def _decoder_only(model: nn.Module, cfg: ModelConfig, keys: set[str], family: str) -> dict[str, _Slot]:
    """Every tensor of a Mixtral / Qwen-MoE / DeepSeek checkpoint (``model.layers.{i}...`` naming)."""
    slots = {
        "model.embed_tokens.weight": _copy("embed.weight"),
        "model.norm.weight": _copy("norm.weight"),
        "lm_head.weight": _copy("lm_head.weight", optional=cfg.tie_embeddings),
    }
    for i, layer in enumerate(model.layers):
        hf, ours = f"model.layers.{i}", f"layers.{i}"
        slots[f"{hf}.input_layernorm.weight"] = _copy(f"{ours}.attn_norm.weight")
        slots[f"{hf}.post_attention_layernorm.weight"] = _copy(f"{ours}.ffn_norm.weight")
        for name, _ in layer.attention.named_parameters():  # our attention modules use HF's names
            slots[f"{hf}.self_attn.{name}"] = _copy(f"{ours}.attention.{name}")
        ffn = f"{ours}.ffn"
        if not layer.is_moe:
            _swiglu(slots, f"{hf}.mlp", ffn)
            continue
        # Mixtral's Hub layout names its MoE block block_sparse_moe with w1/w3/w2 experts.
        legacy_mixtral = family == "mixtral" and f"{hf}.mlp.gate.weight" not in keys
        moe = f"{hf}.block_sparse_moe" if legacy_mixtral else f"{hf}.mlp"
        slots[f"{moe}.gate.weight"] = _copy(f"{ffn}.router.gate.weight")
        if layer.ffn.router.score_bias is not None:
            slots[f"{moe}.gate.e_score_correction_bias"] = _copy(f"{ffn}.router.score_bias")
        fused = f"{moe}.experts" if f"{moe}.experts.gate_up_proj" in keys else None
        if legacy_mixtral:
            names = ("w1", "w3", "w2")
        else:
            names = ("gate_proj", "up_proj", "down_proj")
        _experts(
            slots,
            f"{ffn}.experts",
            fused,
            lambda e, m=moe, n=names: tuple(f"{m}.experts.{e}.{x}.weight" for x in n),
            layer.ffn.config.num_experts,
        )
        if layer.ffn.shared_experts is not None:
            shared = "shared_experts" if family.startswith("deepseek") else "shared_expert"
            _swiglu(slots, f"{moe}.{shared}", f"{ffn}.shared_experts")
        if layer.ffn.shared_gate is not None:
            slots[f"{moe}.shared_expert_gate.weight"] = _copy(f"{ffn}.shared_gate.weight")
    return slots


def _switch_tensors(model: nn.Module, cfg: SwitchConfig, keys: set[str], family: str) -> dict[str, _Slot]:
    """Every tensor of a Switch Transformers checkpoint (T5 naming; one Linear per expert)."""
    slots = {
        "shared.weight": _copy("embed.weight"),
        # transformers 5 keeps per-stack copies of the shared embedding; we have one, so they must equal it.
        "encoder.embed_tokens.weight": _Slot((("embed.weight", None),), optional=True),
        "decoder.embed_tokens.weight": _Slot((("embed.weight", None),), optional=True),
        "lm_head.weight": _copy("lm_head.weight", optional=cfg.tie_embeddings),
        "encoder.final_layer_norm.weight": _copy("encoder_norm.weight"),
        "decoder.final_layer_norm.weight": _copy("decoder_norm.weight"),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": _copy(
            "encoder_position_bias.embedding.weight"
        ),
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": _copy(
            "decoder_position_bias.embedding.weight"
        ),
    }

    def attention(hf: str, ours: str) -> None:
        for name in "qkvo":
            slots[f"{hf}.{name}.weight"] = _copy(f"{ours}.{name}_proj.weight")

    def ffn(hf: str, ours: str, layer: nn.Module) -> None:
        if not layer.is_moe:
            slots[f"{hf}.mlp.wi.weight"] = _copy(f"{ours}.w1.weight")
            slots[f"{hf}.mlp.wo.weight"] = _copy(f"{ours}.w2.weight")
            return
        slots[f"{hf}.mlp.router.classifier.weight"] = _copy(f"{ours}.router.gate.weight")
        experts = f"{hf}.mlp.experts.expert_"
        per_expert = lambda e: (f"{experts}{e}.wi.weight", None, f"{experts}{e}.wo.weight")  # noqa: E731
        _experts(slots, f"{ours}.experts", None, per_expert, cfg.num_experts)

    for i, layer in enumerate(model.encoder):
        hf, ours = f"encoder.block.{i}.layer", f"encoder.{i}"
        attention(f"{hf}.0.SelfAttention", f"{ours}.attention")
        slots[f"{hf}.0.layer_norm.weight"] = _copy(f"{ours}.attn_norm.weight")
        slots[f"{hf}.1.layer_norm.weight"] = _copy(f"{ours}.ffn_norm.weight")
        ffn(f"{hf}.1", f"{ours}.ffn", layer)
    for i, layer in enumerate(model.decoder):
        hf, ours = f"decoder.block.{i}.layer", f"decoder.{i}"
        attention(f"{hf}.0.SelfAttention", f"{ours}.attention")
        attention(f"{hf}.1.EncDecAttention", f"{ours}.cross_attention")
        slots[f"{hf}.0.layer_norm.weight"] = _copy(f"{ours}.attn_norm.weight")
        slots[f"{hf}.1.layer_norm.weight"] = _copy(f"{ours}.cross_norm.weight")
        slots[f"{hf}.2.layer_norm.weight"] = _copy(f"{ours}.ffn_norm.weight")
        ffn(f"{hf}.2", f"{ours}.ffn", layer)
    return slots


def _tensor_map(model: nn.Module, cfg: ModelConfig, keys: set[str], family: str) -> dict[str, _Slot]:
    if isinstance(cfg, SwitchConfig):
        return _switch_tensors(model, cfg, keys, family)
    return _decoder_only(model, cfg, keys, family)


# ---------------------------------------------------------------------------------------------------- sources


class _Checkpoint:
    """A config dict, the tensor names, and the tensors one at a time, from a directory or a model instance."""

    def __init__(self, source: str | os.PathLike | nn.Module) -> None:
        if isinstance(source, nn.Module):
            if not hasattr(source, "config") or not hasattr(source.config, "to_dict"):
                raise TypeError(f"source of type {type(source).__name__} is invalid: not a transformers model")
            self.config = source.config.to_dict()
            self._state = source.state_dict()
            self.keys = list(self._state)
            self._files: dict[str, list[str]] = {}
            return
        root = Path(source)
        if not (root / "config.json").is_file():
            raise FileNotFoundError(f"source={str(source)!r} is invalid: no config.json in that directory")
        self.config = json.loads((root / "config.json").read_text())
        index = root / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {}
            for key, file in weight_map.items():
                self._files.setdefault(str(root / file), []).append(key)
        else:
            from safetensors import safe_open

            single = root / "model.safetensors"
            files = [single] if single.is_file() else sorted(root.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"source={str(source)!r} is invalid: no *.safetensors files in that directory")
            self._files = {}
            for file in files:
                with safe_open(str(file), framework="pt") as handle:
                    self._files[str(file)] = list(handle.keys())
        self._state = None
        self.keys = [key for keys in self._files.values() for key in keys]

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        """``(name, tensor)`` pairs, reading one tensor at a time from disk."""
        if self._state is not None:
            yield from self._state.items()
            return
        from safetensors import safe_open

        for file, keys in self._files.items():
            with safe_open(file, framework="pt") as handle:
                for key in keys:
                    yield key, handle.get_tensor(key)


# ---------------------------------------------------------------------------------------------------- API


def _ignored(key: str, tensor: Tensor, cfg: ModelConfig, raw: dict[str, Any]) -> bool:
    """Checkpoint tensors we skip on purpose.

    Rotary caches; DeepSeek-V3's MTP layers (as transformers does); and a shared expert of width 0
    (``shared_expert_intermediate_size=0``, ``n_shared_experts=0``), which transformers builds from empty weights
    (for Qwen2-MoE with a gate on its zero output) and we leave out.
    """
    if key.endswith("rotary_emb.inv_freq"):
        return True
    shared = re.match(r"model\.layers\.\d+\.mlp\.shared_expert(s|_gate)?\.", key)
    no_shared = getattr(cfg, "shared_expert_hidden", None) == 0 or getattr(cfg, "n_shared_experts", None) == 0
    if shared and no_shared and (tensor.numel() == 0 or shared.group(1) == "_gate"):
        return True
    match = re.match(r"model\.layers\.(\d+)\.", key)
    return (
        bool(match)
        and int(match.group(1)) >= cfg.num_layers
        and int(match.group(1)) < cfg.num_layers + (raw.get("num_nextn_predict_layers") or 0)
    )


def _slices(state: dict[str, Tensor], targets: tuple[_Target, ...]) -> tuple[Tensor, ...]:
    return tuple(state[name] if index is None else state[name][index] for name, index in targets)


def _materialize(model: nn.Module) -> None:
    """Allocate a meta-device model on the CPU (uninitialised), keeping tied parameters tied."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module, name))
    model.to_empty(device="cpu")
    for (first, first_name), *others in owners.values():
        for module, name in others:
            setattr(module, name, getattr(first, first_name))


def from_hf(source: str | os.PathLike | nn.Module) -> nn.Module:
    """Our zoo model with the weights of a Hugging Face checkpoint.

    Args:
        source: A ``transformers`` model instance, or a local directory holding ``config.json`` and
            ``*.safetensors`` (one file, or shards listed by ``model.safetensors.index.json``). Reading a
            directory does not import ``transformers``.

    Returns:
        The model (float32 parameters, in train mode, like a freshly built zoo model), built from our own blocks
        by :func:`lightning_moe.zoo.build`. Its zoo config is ``model.zoo_config``; ``model.hf_token_ids`` keeps
        the checkpoint's special token ids (``eos_token_id``, ...), which :func:`to_hf` writes back.

    Raises:
        UnsupportedConfigError: For a config field we cannot represent (named in the message).
        CheckpointMismatchError: For a missing, unexpected or mis-shaped tensor (named in the message).

    Example::

        model = from_hf("checkpoints/Qwen1.5-MoE-A2.7B").eval()
        logits = model(input_ids).logits
    """
    checkpoint = _Checkpoint(source)
    cfg = hf_config_to_ours(checkpoint.config)
    family = checkpoint.config["model_type"]
    with torch.device("meta"):
        model = zoo.build(cfg)
    _materialize(model)
    state = model.state_dict()
    for name, buffer in model.named_buffers():  # non-persistent buffers (counters) are not in a checkpoint
        if name not in state:
            buffer.zero_()
    slots = _tensor_map(model, cfg, set(checkpoint.keys), family)
    covered = {name for slot in slots.values() for name, _ in slot.targets}
    assert covered == set(state), f"tensor map of {family} misses {sorted(set(state) - covered)}"  # our bug if hit

    shapes = {name: tensor.to("meta") for name, tensor in state.items()}
    seen: set[str] = set()
    loaded: set[int] = set()  # data pointers of our tensors already filled (tied tensors share one)
    deferred: list[tuple[str, Tensor]] = []
    for key, tensor in checkpoint.tensors():
        if key not in slots:
            if _ignored(key, tensor, cfg, checkpoint.config):
                continue
            raise CheckpointMismatchError(f"tensor {key!r} is unexpected for a {family} model with this config.json")
        slot = slots[key]
        expected = tuple(slot.to_hf(_slices(shapes, slot.targets)).shape)
        if tuple(tensor.shape) != expected:
            raise CheckpointMismatchError(
                f"tensor {key!r} has shape {tuple(tensor.shape)}, but config.json implies {expected}"
            )
        seen.add(key)
        if all(index is None and state[name].data_ptr() in loaded for name, index in slot.targets):
            deferred.append((key, tensor))  # a second copy of a shared tensor: must equal the first
            continue
        with torch.no_grad():
            for (name, index), value in zip(slot.targets, slot.to_ours(tensor), strict=True):
                (state[name] if index is None else state[name][index]).copy_(value)
                if index is None:
                    loaded.add(state[name].data_ptr())
    missing = [key for key, slot in slots.items() if key not in seen and not slot.optional]
    if missing:
        raise CheckpointMismatchError(f"tensor {missing[0]!r} is missing from the checkpoint ({len(missing)} missing)")
    for key, tensor in deferred:
        if not torch.equal(tensor.to(torch.float32), _slices(state, slots[key].targets)[0]):
            raise CheckpointMismatchError(
                f"tensor {key!r} differs from the tensor it shares storage with in our model: unsupported"
            )
    model.zoo_config = cfg
    model.hf_token_ids = {k: checkpoint.config[k] for k in _TOKEN_ID_FIELDS if checkpoint.config.get(k) is not None}
    return model


def _hf_num_sparse_layers(cfg: SwitchConfig) -> int:
    """The ``num_sparse_{encoder,decoder}_layers`` for which ``transformers`` makes the same layers sparse as ours.

    ``transformers`` derives a step ``num_layers // num_sparse`` and makes layer ``i`` sparse when
    ``i % step == 1`` (every layer for step 1). That is not always ``num_sparse`` layers (11 layers, 3 sparse: step
    3, layers 1, 4, 7 and 10), so every count is tried, the number of our sparse layers first.

    Raises:
        UnsupportedConfigError: If no count gives our layers (no sparse layer at all, or e.g. ``sparse_step=3`` with
            ``num_layers=5``: layers 1 and 4).
    """
    layers = cfg.num_layers
    ours = [is_moe_layer(i, cfg.sparse_step) for i in range(layers)]
    for num_sparse in (sum(ours), *range(1, layers + 1)):
        step = layers // num_sparse if num_sparse else layers
        if [is_moe_layer(i, step) for i in range(layers)] == ours:
            return num_sparse
    sparse_layers = [i for i, moe in enumerate(ours) if moe]
    raise UnsupportedConfigError(
        f"sparse_step={cfg.sparse_step} with num_layers={layers} is unsupported: transformers makes layer i sparse "
        f"when i % (num_layers // num_sparse_layers) == 1, and no count places them at layers {sparse_layers}"
    )


def _hf_config(cfg: ModelConfig, family: str) -> dict[str, Any]:
    """The ``config.json`` of our config (the inverse of :func:`hf_config_to_ours`)."""
    common = {"model_type": family, "torch_dtype": "float32", "tie_word_embeddings": cfg.tie_embeddings}
    if isinstance(cfg, SwitchConfig):
        sparse, num_sparse = _moe_layer_count(cfg), _hf_num_sparse_layers(cfg)
        activation = {v: k for k, v in _ACTIVATIONS.items() if k != "gelu_pytorch_tanh"}[cfg.activation]
        return common | {
            "architectures": ["SwitchTransformersForConditionalGeneration"],
            "vocab_size": cfg.vocab_size,
            "d_model": cfg.dim,
            "d_kv": cfg.head_dim,
            "d_ff": cfg.ffn_hidden,
            "num_heads": cfg.num_heads,
            "num_layers": cfg.num_layers,
            "num_decoder_layers": cfg.num_layers,
            "num_sparse_encoder_layers": num_sparse,
            "num_sparse_decoder_layers": num_sparse,
            "num_experts": cfg.num_experts,
            "expert_capacity": cfg.expert_capacity,
            "router_jitter_noise": cfg.router_jitter,
            "relative_attention_num_buckets": cfg.num_buckets,
            "relative_attention_max_distance": cfg.max_distance,
            "layer_norm_epsilon": cfg.norm_eps,
            "dense_act_fn": activation,
            "router_aux_loss_coef": cfg.load_balance_coef * sparse,
            "router_z_loss_coef": cfg.z_loss_coef * sparse,
            "dropout_rate": 0.0,
            "is_encoder_decoder": True,
            "decoder_start_token_id": 0,
            "pad_token_id": 0,
            "eos_token_id": 1,
        }
    base = common | {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.num_layers,
        "max_position_embeddings": cfg.max_seq_len,
        "num_attention_heads": cfg.num_heads,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "num_experts_per_tok": cfg.top_k,
    }
    if isinstance(cfg, MixtralConfig):
        return base | {
            "architectures": ["MixtralForCausalLM"],
            "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim or cfg.dim // cfg.num_heads,
            "intermediate_size": cfg.ffn_hidden,
            "num_local_experts": cfg.num_experts,
            "rope_theta": cfg.rope_theta,
            "sliding_window": cfg.sliding_window,
            "router_jitter_noise": cfg.router_jitter,
            "router_aux_loss_coef": _hf_aux_coef(cfg.load_balance_coef, cfg.top_k, _moe_layer_count(cfg)),
        }
    if isinstance(cfg, QwenMoEConfig):
        qwen = base | {
            "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim or cfg.dim // cfg.num_heads,
            "intermediate_size": cfg.dense_hidden,
            "moe_intermediate_size": cfg.expert_hidden,
            "num_experts": cfg.num_experts,
            "norm_topk_prob": cfg.normalize_topk,
            "decoder_sparse_step": cfg.decoder_sparse_step,
            "mlp_only_layers": list(cfg.mlp_only_layers),
            "rope_theta": cfg.rope_theta,
            "use_sliding_window": False,
            "router_aux_loss_coef": _hf_aux_coef(cfg.load_balance_coef, cfg.top_k, _moe_layer_count(cfg)),
        }
        if family == "qwen3_moe":
            return qwen | {
                "architectures": ["Qwen3MoeForCausalLM"],
                "attention_bias": False,
            }
        return qwen | {
            "architectures": ["Qwen2MoeForCausalLM"],
            "qkv_bias": cfg.qkv_bias,
            "shared_expert_intermediate_size": cfg.shared_expert_hidden,
        }
    assert isinstance(cfg, DeepSeekConfig)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope.theta}
    if cfg.rope.scaling == "yarn":
        rope |= {
            "rope_type": "yarn",
            "factor": cfg.rope.factor,
            "original_max_position_embeddings": cfg.rope.original_max_position,
            "beta_fast": cfg.rope.beta_fast,
            "beta_slow": cfg.rope.beta_slow,
            "mscale": cfg.rope.mscale,
            "mscale_all_dim": cfg.rope.mscale_all_dim,
        }
    v3 = family == "deepseek_v3"
    deepseek = base | {
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "num_key_value_heads": cfg.num_heads,
        "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "first_k_dense_replace": cfg.first_k_dense,
        "intermediate_size": cfg.dense_hidden,
        "moe_intermediate_size": cfg.moe_hidden,
        "n_shared_experts": cfg.n_shared_experts,
        "n_routed_experts": cfg.num_experts,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "norm_topk_prob": cfg.normalize_topk,
        "rope_parameters": rope,
        # DeepSeek's own config fields (transformers keeps them): its sequence-wise balance loss.
        "aux_loss_alpha": cfg.seq_balance_coef,
        "seq_aux": True,
    }
    if v3:
        return deepseek | {"rope_interleave": True, "num_nextn_predict_layers": 0}
    return deepseek | {"topk_method": "group_limited_greedy" if cfg.n_group > 1 else "greedy"}


def _family_of(cfg: ModelConfig) -> str:
    """The Hugging Face ``model_type`` that can hold our config, or an error naming the field that prevents it."""

    def require(ok: bool, field: str, why: str) -> None:
        if not ok:
            raise UnsupportedConfigError(f"{field}={getattr(cfg, field)!r} cannot be exported to Hugging Face: {why}")

    require(
        cfg.dense is None,
        "dense",
        "a dense baseline has plain FFNs where every Hugging Face MoE family expects routers and experts; only "
        "dense=None (the MoE model) can be exported",
    )
    if isinstance(cfg, MixtralConfig):
        require(cfg.capacity_factor is None, "capacity_factor", "Mixtral is dropless")
        return "mixtral"
    if isinstance(cfg, QwenMoEConfig):
        if cfg.qk_norm:
            require(not cfg.qkv_bias, "qkv_bias", "Qwen3-MoE has no q/k/v biases")
            require(cfg.shared_expert_hidden == 0, "shared_expert_hidden", "Qwen3-MoE has no shared expert")
            family = "qwen3_moe"
        else:  # shared_expert_hidden=0 too: transformers then builds a width-0 shared expert (see to_hf)
            family = "qwen2_moe"
        require(cfg.capacity_factor is None, "capacity_factor", "Qwen-MoE is dropless")
        return family
    if isinstance(cfg, DeepSeekConfig):
        require(cfg.attention == "mla", "attention", "transformers has DeepSeek-V2/V3 (MLA) only")
        require(cfg.mtp_depth == 0, "mtp_depth", "transformers' DeepSeek-V3 has no MTP modules")
        require(cfg.capacity_factor is None, "capacity_factor", "DeepSeek is dropless")
        rope = cfg.rope
        if rope.scaling == "yarn" and rope.mscale_all_dim and not rope.mscale:
            raise UnsupportedConfigError(
                f"rope.mscale={rope.mscale!r} with rope.mscale_all_dim={rope.mscale_all_dim!r} cannot be exported to "
                "Hugging Face: transformers reads mscale=0 as unset and scales cos/sin by yarn_mscale(factor), not "
                "yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)"
            )
        if cfg.score_func == "sigmoid":
            require(cfg.score_bias, "score_bias", "transformers' DeepSeek-V3 (sigmoid scores) always adds the bias")
            grouped = cfg.n_group > 1  # one group: the group score picks nothing
            require(
                not grouped or cfg.group_score == "top2_sum", "group_score", "DeepSeek-V3 scores groups by top-2 sum"
            )
            return "deepseek_v3"
        require(not cfg.score_bias, "score_bias", "transformers' DeepSeek-V2 (softmax scores) has no correction bias")
        grouped = cfg.n_group > 1
        require(
            not grouped or cfg.group_score == "max", "group_score", "DeepSeek-V2 scores groups by their best expert"
        )
        require(not cfg.normalize_topk, "normalize_topk", "transformers' DeepSeek-V2 never renormalises")
        return "deepseek_v2"
    if isinstance(cfg, SwitchConfig):
        require(not cfg.gated, "gated", "transformers' Switch experts are not gated")
        require(cfg.expert_capacity is not None, "expert_capacity", "transformers needs an absolute capacity")
        require(cfg.capacity_scope == "sequence", "capacity_scope", "transformers counts capacity per sequence")
        require(cfg.activation in ("relu", "gelu", "gelu_tanh"), "activation", "no transformers name for it")
        return "switch_transformers"
    raise UnsupportedConfigError(f"config of type {type(cfg).__name__} has no Hugging Face counterpart")


# The training-only coefficients each family's config.json holds; the others are left out of an export.
_EXPORTED_TRAINING_FIELDS = {
    "mixtral": ("load_balance_coef",),
    "qwen2_moe": ("load_balance_coef",),
    "qwen3_moe": ("load_balance_coef",),
    "deepseek_v2": ("seq_balance_coef",),
    "deepseek_v3": ("seq_balance_coef",),
    "switch_transformers": ("load_balance_coef", "z_loss_coef"),
}


def _warn_dropped_training_fields(cfg: ModelConfig, family: str) -> None:
    """Warn about the training-only settings ``config.json`` cannot hold (the forward pass does not use them)."""
    fields = ("load_balance_coef", "z_loss_coef", "seq_balance_coef", "bias_update_speed")
    dropped = {f: getattr(cfg, f) for f in fields if getattr(cfg, f) and f not in _EXPORTED_TRAINING_FIELDS[family]}
    if dropped:
        warnings.warn(
            f"training settings {dropped} have no place in a Hugging Face {family} config and are not exported: the "
            "exported model computes the same logits, but training it in transformers will not use these settings",
            UserWarning,
            stacklevel=3,
        )


def _empty_shared_experts(model: nn.Module, cfg: ModelConfig, family: str) -> dict[str, Tensor]:
    """The tensors ``transformers`` builds for a shared expert of width 0, which our model leaves out.

    Qwen2-MoE with ``shared_expert_intermediate_size=0`` and DeepSeek with ``n_shared_experts=0`` still build the
    shared expert's projections, with no rows (Qwen2-MoE also its gate, on the expert's zero output), and
    ``save_pretrained`` stores them: written here too, the checkpoint holds every tensor ``from_pretrained`` expects.
    """
    if family == "qwen2_moe" and cfg.shared_expert_hidden == 0:
        prefix, gate = "shared_expert", True
    elif family.startswith("deepseek") and cfg.n_shared_experts == 0:
        prefix, gate = "shared_experts", False
    else:
        return {}
    tensors: dict[str, Tensor] = {}
    for i, layer in enumerate(model.layers):
        if layer.is_moe:
            hf = f"model.layers.{i}.mlp"
            for name, shape in (("gate_proj", (0, cfg.dim)), ("up_proj", (0, cfg.dim)), ("down_proj", (cfg.dim, 0))):
                tensors[f"{hf}.{prefix}.{name}.weight"] = torch.zeros(shape)
            if gate:
                tensors[f"{hf}.shared_expert_gate.weight"] = torch.zeros(1, cfg.dim)
    return tensors


# The special token ids of a config.json, which from_hf keeps on the model for to_hf to write back.
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def _special_tokens(tokenizer_json: str, family: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The special token ids of our tokenizer for ``config.json``, and its special tokens for ``tokenizer_config.json``.

    Our data ends every document with ``<|endoftext|>`` and pads with ``<|pad|>``, and
    :class:`~lightning_moe.module.Seq2SeqLMModule` starts decoding with the padding id (0 without one).
    ``transformers``' ``generate`` reads these ids from ``config.json``, and where they are absent takes its config
    class's, which name other tokens (Mixtral ends at id 2 and DeepSeek-V3 at 1, Qwen-MoE never ends, Switch starts
    decoding at 0). ``<|endoftext|>`` is also the start id, as in GPT-2 and Qwen (Switch has none). A token the
    tokenizer lacks leaves its fields out.

    Returns:
        ``({field: id}, {"eos_token": ..., "pad_token": ..., ...})``.
    """
    from tokenizers import Tokenizer

    from lightning_moe.data.tokenizer import EOS_TOKEN, PAD_TOKEN

    vocab = Tokenizer.from_str(tokenizer_json)
    eos, pad = vocab.token_to_id(EOS_TOKEN), vocab.token_to_id(PAD_TOKEN)
    ids: dict[str, Any] = {}
    names: dict[str, str] = {}
    if eos is not None:
        ids["eos_token_id"], names["eos_token"] = eos, EOS_TOKEN
        if family != "switch_transformers":
            ids["bos_token_id"], names["bos_token"] = eos, EOS_TOKEN
    if pad is not None:
        ids["pad_token_id"], names["pad_token"] = pad, PAD_TOKEN
    if family == "switch_transformers":
        ids["decoder_start_token_id"] = 0 if pad is None else pad
    return ids, names


_SHARD_NAME = re.compile(r"model-\d+-of-\d+\.safetensors")


def _stale_shards(out: Path) -> list[str]:
    """A previous sharded checkpoint's index and shards, which readers would prefer to ``model.safetensors``.

    Only ``model.safetensors.index.json`` and files named like Hugging Face's shards
    (``model-00001-of-00003.safetensors``), as ``save_pretrained`` removes them; nothing else.
    """
    names = ["model.safetensors.index.json"] if (out / "model.safetensors.index.json").is_file() else []
    return names + sorted(
        path.name
        for path in out.glob("model-*-of-*.safetensors")
        if _SHARD_NAME.fullmatch(path.name) and path.is_file()
    )


def _write_export(out: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Write an export's files into ``out`` all or nothing: ``writers`` maps each file name to what writes it.

    Every file is first written into a temporary folder; if one fails, that folder is removed and ``out`` is as
    it was. A new ``out`` is then that folder (a sibling, ``.NAME.to_hf-*``) renamed into place: one atomic
    rename. An existing ``out`` may hold the user's other files, which the export must neither delete nor
    move, so there the folder is staged inside it (``.to_hf-*``: on the same filesystem as the files it
    replaces, with no need to write to the parent), and each file is moved in with :func:`os.replace` after the
    one it replaces is moved aside, ``config.json`` last; a previous sharded checkpoint is moved aside too (it
    would shadow the new ``model.safetensors``). Should a move fail, the files moved aside are moved back. The
    old files are deleted at the end; nothing else in ``out`` is touched.

    Raises:
        NotADirectoryError: If ``out`` exists and is not a directory.
    """
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir={str(out)!r} is invalid: it exists and is not a directory")
    new = not out.exists()
    if new:
        created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = out.parent / f".{out.name}.to_hf-{secrets.token_hex(4)}"
    else:
        stage = out / f".to_hf-{secrets.token_hex(4)}"
    os.mkdir(stage)  # not mkdtemp: a folder renamed into place gets the usual permissions (umask)
    try:
        names = sorted(writers, key=lambda name: name == "config.json")  # config.json last
        for name in names:
            writers[name](stage / name)
        moved = False
        if new:
            try:
                os.rename(stage, out)
                moved = True
            except OSError:
                if not out.is_dir():  # else someone made the folder meanwhile: move the files in one by one
                    raise
        if not moved:
            _move_into(out, stage, names)
    except _NotRestoredError:
        raise  # the previous files are in the staging folder: keep it
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if new:
            for parent in created:  # the parent folders this call made, innermost first, if still empty
                try:
                    parent.rmdir()
                except OSError:
                    break
        raise
    shutil.rmtree(stage, ignore_errors=True)  # the replaced files (gone already if the folder was renamed)


class _NotRestoredError(OSError):
    """An export failed while moving its files in, and the files it had replaced could not all be put back."""


def _move_into(out: Path, stage: Path, names: list[str]) -> None:
    """Move each ``stage/NAME`` to ``out/NAME``, the file it replaces (and any stale shard) aside to ``stage``.

    On an error the new files are removed and the old ones moved back before the error is raised.

    Raises:
        _NotRestoredError: If moving the old files back failed too (the message says where they are).
    """
    backup = stage / ".replaced"
    os.mkdir(backup)
    aside: list[str] = []
    placed: list[str] = []
    try:
        for name in _stale_shards(out):
            os.replace(out / name, backup / name)
            aside.append(name)
        for name in names:
            if (out / name).is_file() or (out / name).is_symlink():
                os.replace(out / name, backup / name)
                aside.append(name)
            os.replace(stage / name, out / name)
            placed.append(name)
    except BaseException as error:
        failed: list[OSError] = []
        for name in placed:
            try:
                (out / name).unlink()
            except OSError as again:
                failed.append(again)
        for name in reversed(aside):  # each one that can go back does
            try:
                os.replace(backup / name, out / name)
            except OSError as again:
                failed.append(again)
        if failed:
            raise _NotRestoredError(
                f"to_hf failed ({error!r}) and could not restore {str(out)!r} ({failed[0]!r}): the previous files "
                f"it could not put back are in {backup}"
            ) from error
        raise


def _export_config(model: nn.Module, inner: nn.Module) -> ModelConfig:
    """The zoo config to export when none is given: the zoo model's ``zoo_config``, else the module's ``config``.

    An upcycled model (:func:`lightning_moe.zoo.upcycle`, also inside a module, whose ``config`` is the dense
    baseline's) exports its ``zoo_config``, or the config :func:`~lightning_moe.zoo.upcycle.upcycled_config`
    finds for it (a model upcycled before ``upcycle`` set it).

    Raises:
        UnsupportedConfigError: For an upcycled model whose structure no family config expresses (the reason
            given).
        ValueError: If there is no zoo config at all.
    """
    if getattr(inner, "upcycled_from", None) is not None:
        if isinstance(getattr(inner, "zoo_config", None), ModelConfig):
            return inner.zoo_config
        try:
            return upcycled_config(inner)
        except ValueError as err:
            raise UnsupportedConfigError(
                f"this upcycled model's structure has no preset form (model.zoo_config is None: no "
                f"{type(inner.upcycled_from).__name__} builds it), so it cannot be exported to Hugging Face: {err}"
            ) from None
    config = getattr(model, "zoo_config", None) or getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise ValueError("config=None is invalid: pass the model's zoo config (model.zoo_config is not set)")
    return config


def to_hf(
    model: nn.Module, out_dir: str | os.PathLike, config: ModelConfig | None = None, tokenizer: Any = None
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` that ``transformers`` loads into the same model.

    The tensors keep the model's dtype, and ``config.json`` names it (``torch_dtype``), so ``from_pretrained``
    loads a bfloat16 model in bfloat16 and a float64 one in float64. With a tokenizer (given, or the
    ``tokenizer_json`` a ``lightning-moe fit`` module carries) it also writes ``tokenizer.json``, which
    ``init_from`` checks the data against and ``--data.tokenizer_path`` can name, and ``tokenizer_config.json``
    naming its end and padding tokens; ``config.json`` then holds their ids (``eos_token_id``, ``pad_token_id``,
    Switch's ``decoder_start_token_id``), which ``generate`` in ``transformers`` reads. Without a tokenizer it writes
    the ids :func:`from_hf` read, if any.

    Args:
        model: Our zoo model (or a LightningModule holding it as ``.model`` with its ``.config``), upcycled ones
            (:func:`lightning_moe.zoo.upcycle`) included.
        out_dir: Output directory (created). All or nothing: every file is written into a temporary folder
            first, so an export that fails leaves no trace and ``out_dir`` as it was. A new ``out_dir`` is that
            folder renamed into place. In an existing one the files are moved in one by one (moved back should
            that fail), and a sharded checkpoint already there (``model.safetensors.index.json`` and
            ``model-*-of-*.safetensors`` shards) is removed, as it would shadow the new single file. Other files
            are left alone (a ``tokenizer.json`` too, when no tokenizer is exported).
        config: The model's zoo config (default: ``model.zoo_config``, set by :func:`from_hf`,
            :func:`lightning_moe.zoo.build` and :func:`lightning_moe.zoo.upcycle`, or ``model.config`` of a
            :class:`~lightning_moe.module.MoELanguageModule`, or its model's ``zoo_config`` if upcycled).
        tokenizer: A ``tokenizers.Tokenizer`` or its JSON string (default: ``model.tokenizer_json``, if any).

    Returns:
        ``out_dir``.

    Raises:
        UnsupportedConfigError: If the config has no Hugging Face counterpart (the field is named), e.g. a dense
            baseline (``dense`` not ``None``), or an upcycled model's structure has no zoo config (the reason is
            given: an upcycled Switch Transformer, or GLaM experts wider than its dense FFNs).
        ValueError: If the model's parameters are sharded over processes (export from one process).
        NotADirectoryError: If ``out_dir`` exists and is not a directory.
    """
    from safetensors.torch import save_file

    inner = model
    if hasattr(model, "model") and isinstance(model.model, nn.Module) and not hasattr(model, "layers"):
        inner = model.model
    if config is None:
        config = _export_config(model, inner)
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config of type {type(config).__name__} is invalid: pass the model's zoo config")
    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer_json", None)
    model = inner
    family = _family_of(config)
    hf_config = _hf_config(config, family)  # may refuse too: before anything is written
    _warn_dropped_training_fields(config, family)
    state = model.state_dict()
    sharded = sorted(k for k, v in state.items() if isinstance(v, DTensor))
    if sharded:
        raise ValueError(
            f"model is invalid for to_hf: its parameters are sharded over processes (e.g. {sharded[0]!r}); export "
            "from one process: load the checkpoint with lightning_moe.strategies.load_distributed_checkpoint or "
            "full_checkpoint, then call to_hf"
        )
    state = {k: v.detach().cpu() for k, v in state.items()}
    hf_config |= getattr(model, "hf_token_ids", {})
    token_names: dict[str, str] = {}
    if tokenizer is not None:
        tokenizer = tokenizer if isinstance(tokenizer, str) else tokenizer.to_str()
        token_ids, token_names = _special_tokens(tokenizer, family)
        hf_config |= token_ids
    # The weights' dtype, as save_pretrained writes it: from_pretrained's default ("auto") loads the model in it.
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    slots = _tensor_map(model, config, set(), family)
    tensors, pointers = {}, set()
    for key, slot in slots.items():
        if slot.export:
            tensor = slot.to_hf(_slices(state, slot.targets)).contiguous()
            if tensor.data_ptr() in pointers:  # safetensors refuses aliases (Switch's per-stack embeddings)
                tensor = tensor.clone()
            pointers.add(tensor.data_ptr())
            tensors[key] = tensor
    tensors |= _empty_shared_experts(model, config, family)

    def text(content: str) -> Callable[[Path], None]:
        return lambda path: path.write_text(content, encoding="utf-8")

    writers = {
        "model.safetensors": lambda path: save_file(tensors, str(path), metadata={"format": "pt"}),
        "config.json": text(json.dumps(hf_config, indent=2) + "\n"),
    }
    if tokenizer is not None:
        tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **token_names}
        writers["tokenizer.json"] = text(tokenizer)
        writers["tokenizer_config.json"] = text(json.dumps(tokenizer_config, indent=2) + "\n")
    out = Path(out_dir)
    _write_export(out, writers)
    return out
