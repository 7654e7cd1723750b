"""Model presets by name: the registry every zoo family adds itself to.

A family module defines a config dataclass (a subclass of :class:`ModelConfig`), a ``build(config)``
function returning an ``nn.Module``, and a dict of named presets, then calls :func:`register_family`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_moe.nn.config import EXPERT_KERNELS, GATE_PRECISIONS, check_field_types
from lightning_moe.nn.ffn import FeedForward
from lightning_moe.nn.moe import MoELayer
from lightning_moe.nn.transformer import init_weights

DENSE_MODES = ("active", "total")


@dataclass
class ModelConfig:
    """Fields every zoo model config has.

    Args:
        vocab_size: Vocabulary size ``V``.
        dim: Model width ``D``.
        num_layers: Decoder layers (encoder and decoder layers each, for encoder-decoder models).
        max_seq_len: Longest sequence the model is meant for (its published context length).
        init_std: Standard deviation of the weight initialisation.
        load_balance_coef: Default coefficient of the Switch/GShard load-balancing loss, added per MoE layer (our
            normalisation: 1.0 when balanced). Hugging Face's Mixtral/Qwen loss pools all layers' statistics
            into one loss, ``top_k`` when balanced: ``from_hf`` maps its ``router_aux_loss_coef`` ``c`` to
            ``c * top_k / L`` for ``L`` MoE layers (equal losses for one layer).
        z_loss_coef: Default coefficient of the router z-loss.
        seq_balance_coef: Default coefficient of the DeepSeek sequence-wise balance loss.
        bias_update_speed: Default speed ``gamma`` of the auxiliary-loss-free bias update (0: off).
        dense: ``None`` (the family's model), or a dense baseline built from the same blocks: every MoE layer
            becomes one :class:`~lightning_moe.nn.ffn.FeedForward` with the experts' activation, of hidden width
            ``top_k * F + S`` (``"active"``: the FFN parameters a token uses) or ``E * F + S`` (``"total"``:
            all the layer's FFN parameters), ``F`` the expert width and ``S`` the shared-expert width. Only the
            router (and Qwen's shared-expert gate) has no dense counterpart. See :func:`dense_hidden_dim`.
        expert_kernel: How the routed experts multiply (``ExpertsConfig.kernel``): ``"auto"`` (``torch._grouped_mm``
            for bfloat16 on SM80+ GPUs, else the fused block-by-block kernel), ``"fused"`` or ``"grouped_mm"``.
        router_gate_precision: Precision of every router's gate matmul (``RouterConfig.gate_precision``):
            ``"float32"`` (default) or ``"compute"`` (the autocast dtype under mixed precision).
    """

    vocab_size: int = 32000
    dim: int = 512
    num_layers: int = 2
    max_seq_len: int = 4096
    init_std: float = 0.02
    load_balance_coef: float = 0.0
    z_loss_coef: float = 0.0
    seq_balance_coef: float = 0.0
    bias_update_speed: float = 0.0
    dense: str | None = None
    expert_kernel: str = "auto"
    router_gate_precision: str = "float32"

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("vocab_size", "dim", "num_layers", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be >= 1")
        for name in ("init_std", "load_balance_coef", "z_loss_coef", "seq_balance_coef", "bias_update_speed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be >= 0")
        if getattr(self, "norm_eps", 1.0) <= 0:  # every family's norms have one
            raise ValueError(f"norm_eps={self.norm_eps!r} is invalid: must be > 0")
        # Family fields the blocks receive under other names (hidden_dim, shared_hidden_dim, jitter_eps, theta) or
        # not at all (a dense FFN of negative width fails in torch): checked here, so the error names the field set.
        for name in ("ffn_hidden", "expert_hidden", "moe_hidden"):
            if getattr(self, name, 1) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be >= 1")
        for name in ("shared_expert_hidden", "n_shared_experts"):
            if getattr(self, name, 0) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be >= 0")
        if not 0 <= getattr(self, "router_jitter", 0.0) < 1:
            raise ValueError(f"router_jitter={self.router_jitter!r} is invalid: must be in [0, 1)")
        if getattr(self, "rope_theta", 1.0) <= 0:
            raise ValueError(f"rope_theta={self.rope_theta!r} is invalid: must be > 0")
        if self.dense is not None and self.dense not in DENSE_MODES:
            raise ValueError(f"dense={self.dense!r} is invalid: must be None, 'active' or 'total'")
        if self.expert_kernel not in EXPERT_KERNELS:
            raise ValueError(f"expert_kernel={self.expert_kernel!r} is invalid: expected one of {EXPERT_KERNELS}")
        if self.router_gate_precision not in GATE_PRECISIONS:
            raise ValueError(
                f"router_gate_precision={self.router_gate_precision!r} is invalid: expected one of {GATE_PRECISIONS}"
            )


@dataclass
class Family:
    """A registered zoo family."""

    name: str
    config_cls: type[ModelConfig]
    build: Callable[[Any], nn.Module]
    presets: dict[str, ModelConfig]


_FAMILIES: dict[str, Family] = {}
_PRESETS: dict[str, tuple[Family, ModelConfig]] = {}


def register_family(
    name: str, config_cls: type[ModelConfig], build_fn: Callable[[Any], nn.Module], presets: dict[str, ModelConfig]
) -> None:
    """Add a family and its presets to the registry.

    Raises:
        ValueError: If the family or a preset name is already registered.
    """
    if name in _FAMILIES:
        raise ValueError(f"family={name!r} is invalid: already registered")
    family = Family(name, config_cls, build_fn, presets)
    for preset in presets:
        if preset in _PRESETS:
            raise ValueError(f"preset={preset!r} is invalid: already registered by {_PRESETS[preset][0].name}")
    _FAMILIES[name] = family
    for preset, cfg in presets.items():
        _PRESETS[preset] = (family, cfg)


def names() -> list[str]:
    """Sorted list of preset names."""
    return sorted(_PRESETS)


def families() -> list[str]:
    """Sorted list of family names."""
    return sorted(_FAMILIES)


def family_of(name_or_config: str | ModelConfig) -> str:
    """The family name of a preset name or config."""
    if isinstance(name_or_config, str):
        return _lookup(name_or_config)[0].name
    return _family_for_config(name_or_config).name


def _lookup(name: str) -> tuple[Family, ModelConfig]:
    if name not in _PRESETS:
        close = difflib.get_close_matches(name, _PRESETS, n=5, cutoff=0.4)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ValueError(f"arch={name!r} is not a known preset{hint}. Known presets: {', '.join(names())}")
    return _PRESETS[name]


def _family_for_config(cfg: ModelConfig) -> Family:
    for family in _FAMILIES.values():
        if type(cfg) is family.config_cls:
            return family
    raise ValueError(f"config of type {type(cfg).__name__} is invalid: no registered family uses it")


def _apply_overrides(cfg: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    valid = {f.name: f for f in dataclasses.fields(cfg)}
    updates = {}
    for key, value in overrides.items():
        if key not in valid:
            raise ValueError(
                f"override {key}={value!r} is invalid for {type(cfg).__name__}: valid keys are {', '.join(valid)}"
            )
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = _apply_overrides(current, value)
        updates[key] = value
    return dataclasses.replace(cfg, **updates)


def config(name: str, **overrides: Any) -> ModelConfig:
    """The named preset's config with ``overrides`` applied (nested dataclass fields take dicts).

    Raises:
        ValueError: For an unknown name (listing the closest names) or an unknown override key (listing
            the valid keys), and for invalid values.
    """
    _, cfg = _lookup(name)
    return _apply_overrides(copy.deepcopy(cfg), overrides)  # nested fields (rope, lists) are the caller's own


def register_presets(family: str, presets: dict[str, ModelConfig]) -> None:
    """Add presets to a registered family (e.g. dense baselines of its presets).

    Raises:
        ValueError: If the family is unknown, a config is not the family's, or a name is already registered.
    """
    if family not in _FAMILIES:
        raise ValueError(f"family={family!r} is invalid: registered families are {', '.join(families())}")
    fam = _FAMILIES[family]
    for preset, cfg in presets.items():
        if preset in _PRESETS:
            raise ValueError(f"preset={preset!r} is invalid: already registered by {_PRESETS[preset][0].name}")
        if type(cfg) is not fam.config_cls:
            raise ValueError(f"preset={preset!r} is invalid: its config is not a {fam.config_cls.__name__}")
    fam.presets.update(presets)
    for preset, cfg in presets.items():
        _PRESETS[preset] = (fam, cfg)


def build(name_or_config: str | ModelConfig, **overrides: Any) -> nn.Module:
    """Build a model from a preset name or a config. Inside ``torch.device("meta")`` nothing is allocated.

    The model keeps its config as ``model.zoo_config``. With ``dense`` set, the family's model is built and
    each MoE layer is then replaced by its dense baseline FFN (:func:`densify`).
    """
    if isinstance(name_or_config, str):
        family, _ = _lookup(name_or_config)
        cfg = config(name_or_config, **overrides)
    else:
        family = _family_for_config(name_or_config)
        cfg = _apply_overrides(copy.deepcopy(name_or_config), overrides)  # the model's own, not the caller's
    model = family.build(cfg)
    if cfg.dense is not None:
        densify(model, cfg.dense, cfg.init_std)
    model.zoo_config = cfg
    return model


def dense_hidden_dim(layer: MoELayer, mode: str) -> int:
    """Hidden width of the dense FFN standing in for ``layer``: ``top_k * F + S`` or ``E * F + S``.

    Args:
        layer: The MoE layer (``E`` experts of width ``F``, top-``k``, shared width ``S``).
        mode: ``"active"`` (equal active FFN parameters) or ``"total"`` (equal total FFN parameters).

    Raises:
        ValueError: For an unknown mode.
    """
    if mode not in DENSE_MODES:
        raise ValueError(f"dense={mode!r} is invalid: must be 'active' or 'total'")
    cfg = layer.config
    width = cfg.router.top_k if mode == "active" else cfg.num_experts
    return width * cfg.experts.hidden_dim + cfg.shared_hidden_dim


def densify(model: nn.Module, mode: str, init_std: float) -> nn.Module:
    """Replace every :class:`MoELayer` below ``model`` by a dense FFN in place (see ``ModelConfig.dense``).

    Args:
        model: A zoo model.
        mode: ``"active"`` or ``"total"``.
        init_std: Standard deviation of the new FFNs' initialisation.

    Returns:
        ``model``.
    """
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]:
        experts = layer.config.experts
        ffn = FeedForward(layer.config.dim, dense_hidden_dim(layer, mode), experts.activation, experts.gated)
        init_weights(ffn, init_std)
        model.set_submodule(name, ffn)
    return model


@dataclass(frozen=True)
class ParameterCount:
    """Parameter counts.

    Attributes:
        total: Every parameter once (tied weights once).
        active: Parameters used per token: everything except the routed experts a token does not visit
            (``top_k`` of ``E`` experts are active in each MoE layer); embeddings and LM head included.
    """

    total: int
    active: int


def count_parameters(model_or_config: nn.Module | ModelConfig | str) -> ParameterCount:
    """Total and active parameters of a model, a config or a preset name (configs are built on meta)."""
    if isinstance(model_or_config, nn.Module):
        model = model_or_config
    else:
        with torch.device("meta"):
            model = build(model_or_config)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        if isinstance(module, MoELayer):
            num_experts, top_k = module.config.num_experts, module.config.router.top_k
            expert_params = sum(p.numel() for p in module.experts.parameters())
            inactive += expert_params * (num_experts - top_k) // num_experts
    return ParameterCount(total=total, active=total - inactive)
