"""Sparse upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints").

A trained dense baseline (a zoo model built with ``dense="active"`` or ``"total"``) becomes an MoE model of the
same family: at every position where the family has an MoE layer, the dense FFN is replaced by an MoE layer whose
experts start as copies of that FFN; the router is fresh; attention, norms and embeddings are kept. The family's
router is kept except that the chosen top-k weights are renormalised to sum to one (and not scaled), so right after
upcycling every token's output is ``sum_k w_k FFN(x) = FFN(x)``: the MoE model computes the dense model's function
where no token is dropped (no capacity factor) and nothing is drawn (eval mode: no jitter or random routing).

The upcycled model's ``zoo_config`` is the family config that builds the same network (:func:`upcycled_config`:
the experts' count, top-k and width, no shared expert, one expert group, weights renormalised and unscaled), so
``zoo.build(model.zoo_config)`` loads its ``state_dict`` and :func:`lightning_moe.interop.to_hf` exports it. Where
the family's config has no field for the upcycled structure (Switch's renormalised top-1 weight; GLaM experts wider
than its dense FFNs) it is ``None``, and ``to_hf`` says why. ``model.upcycled_from`` keeps the dense config.

Shape legend: ``E`` experts, ``D`` model width, ``H`` dense hidden width, ``F`` expert hidden width.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import torch
from torch import nn

from lightning_moe.nn.config import MoEConfig
from lightning_moe.nn.ffn import FeedForward
from lightning_moe.nn.moe import MoELayer
from lightning_moe.zoo import registry
from lightning_moe.zoo.deepseek import DeepSeekConfig
from lightning_moe.zoo.glam import GlamConfig
from lightning_moe.zoo.mixtral import MixtralConfig
from lightning_moe.zoo.qwen_moe import QwenMoEConfig
from lightning_moe.zoo.switch import SwitchConfig


def upcycle(
    dense_model: nn.Module,
    num_experts: int,
    top_k: int,
    noise_std: float = 0.0,
    split_hidden: bool = False,
    zero_router: bool = False,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Turn a dense baseline into an MoE model of the same family (a new model; the input is left alone).

    Args:
        dense_model: A zoo model built with ``dense`` set (``lightning_moe.zoo.build("mixtral-tiny-dense")``); its
            config is read from ``dense_model.zoo_config``.
        num_experts: Routed experts per MoE layer ``E``.
        top_k: Experts per token.
        noise_std: Standard deviation of Gaussian noise added to each expert's copy of the weights, so that
            experts can drift apart (0: exact copies).
        split_hidden: Fine-grained experts: expert ``e`` gets the ``e``-th of ``E`` equal slices of the dense
            hidden units (``F = H / E``), its output projection scaled by ``top_k``. The output then equals the
            dense output only with ``top_k == num_experts`` and a uniform router (``zero_router``); otherwise a
            token starts from ``top_k`` of the ``E`` slices.
        zero_router: Start the router at zero (uniform weights) instead of the family's random initialisation.
        generator: Random generator for the noise.

    Returns:
        The upcycled model, the same class as ``dense_model``, on its device and dtype, in its training or eval
        mode. Its MoE layers are dropless or not as the family's; ``model.upcycled_from`` holds the dense config
        and ``model.zoo_config`` the family config that builds the upcycled network (:func:`upcycled_config`), or
        ``None`` where the family's config cannot express it.

    Raises:
        ValueError: If the model is not a zoo dense baseline, its router kind cannot be upcycled (expert
            choice), the hidden width does not split into ``num_experts`` slices, or an argument is out of range.

    Example::

        dense = zoo.build("mixtral-tiny-dense")  # ... train it ...
        moe = zoo.upcycle(dense, num_experts=8, top_k=2)
        moe.eval(); torch.testing.assert_close(moe(ids).logits, dense.eval()(ids).logits)
    """
    cfg = getattr(dense_model, "zoo_config", None)
    if not isinstance(cfg, registry.ModelConfig):
        raise ValueError(
            f"upcycle does not support {type(dense_model).__name__} without a zoo_config: build the dense model "
            "with lightning_moe.zoo.build (e.g. 'mixtral-tiny-dense')"
        )
    if cfg.dense is None:
        raise ValueError(
            f"upcycle does not support an MoE model ({type(cfg).__name__} with dense=None): give a dense baseline "
            "built with dense='active' or 'total'"
        )
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts={num_experts!r} is invalid: must be an int >= 1")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k!r} is invalid: must be an int in [1, num_experts={num_experts}]")
    if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or not 0 <= noise_std < math.inf:
        raise ValueError(f"noise_std={noise_std!r} is invalid: must be a finite number >= 0")
    for name, value in (("split_hidden", split_hidden), ("zero_router", zero_router)):
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} is invalid: must be true or false")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator={generator!r} is invalid: must be a torch.Generator or None")

    with torch.device("meta"):
        reference = registry.build(dataclasses.replace(cfg, dense=None))
    moe_positions = [(name, m.config) for name, m in reference.named_modules() if isinstance(m, MoELayer)]
    model = copy.deepcopy(dense_model)
    for name, family_config in moe_positions:
        ffn = model.get_submodule(name)
        if not isinstance(ffn, FeedForward):
            raise ValueError(f"upcycle does not support {name}={type(ffn).__name__}: expected a dense FeedForward")
        layer_config = _upcycled_config(family_config, ffn, num_experts, top_k, split_hidden)
        param = ffn.w1.weight
        with torch.device(param.device):
            layer = MoELayer(layer_config).to(param.dtype)
        layer.train(ffn.training)  # a new module starts in training mode: take the replaced FFN's mode
        if zero_router:
            nn.init.zeros_(layer.router.gate.weight)
        _copy_experts(ffn, layer, split_hidden, top_k, noise_std, generator)
        model.set_submodule(name, layer)
    model.upcycled_from = model.zoo_config  # the deep copy's: the upcycled model's own
    try:
        model.zoo_config = upcycled_config(model)
    except ValueError:  # the family's config has no field for it; to_hf repeats the reason
        model.zoo_config = None
    return model


def upcycled_config(model: nn.Module) -> registry.ModelConfig:
    """The zoo config that builds an upcycled model's network: the family config of ``model.upcycled_from``.

    The upcycled MoE layers differ from the family's in ``E``, top-k, the expert width ``F``, no shared expert,
    one expert group and unscaled, renormalised weights (see :func:`upcycle`). The config returned is checked by
    building it on the meta device: the same state-dict keys and shapes and, at every MoE position, the same
    :class:`~lightning_moe.nn.config.MoEConfig`, so ``zoo.build(config)`` with the upcycled ``state_dict`` loaded
    computes the same logits.

    Args:
        model: A model returned by :func:`upcycle`.

    Returns:
        The family's config (``dense=None``) for the upcycled structure.

    Raises:
        ValueError: If ``model`` is not an upcycled model, or the family's config cannot express its structure
            (the message says why).
    """
    dense_cfg = getattr(model, "upcycled_from", None)
    if not isinstance(dense_cfg, registry.ModelConfig):
        raise ValueError(f"model of type {type(model).__name__} is invalid: not upcycled (no model.upcycled_from)")
    layers = {name: m.config for name, m in model.named_modules() if isinstance(m, MoELayer)}
    if not layers:
        raise ValueError("model is invalid: an upcycled model without MoE layers")
    candidate = _family_form(dataclasses.replace(dense_cfg, dense=None), next(iter(layers.values())))
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # the router's top-1 warning was given when the model was upcycled
        rebuilt = registry.build(candidate)
    rebuilt_layers = {name: m.config for name, m in rebuilt.named_modules() if isinstance(m, MoELayer)}
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    rebuilt_shapes = {key: tuple(value.shape) for key, value in rebuilt.state_dict().items()}
    if rebuilt_layers != layers or rebuilt_shapes != shapes:
        differ = [n for n in sorted(set(layers) | set(rebuilt_layers)) if layers.get(n) != rebuilt_layers.get(n)]
        differ += [k for k in sorted(set(shapes) | set(rebuilt_shapes)) if shapes.get(k) != rebuilt_shapes.get(k)]
        raise ValueError(
            f"{type(candidate).__name__} cannot express this upcycled model: the config closest to it builds other "
            f"modules at {differ[:3]}"
        )
    return copy.deepcopy(candidate)  # its own nested fields (rope, lists), not upcycled_from's


def _family_form(cfg: registry.ModelConfig, layer: MoEConfig) -> registry.ModelConfig:
    """``cfg`` (the family's model, ``dense=None``) with the upcycled MoE layer's structure, or why there is none."""
    router, hidden = layer.router, layer.experts.hidden_dim
    routing = {"num_experts": router.num_experts, "top_k": router.top_k}
    if isinstance(cfg, MixtralConfig):  # softmax over the chosen logits: already the family's weights
        return dataclasses.replace(cfg, **routing, ffn_hidden=hidden)
    if isinstance(cfg, QwenMoEConfig):
        return dataclasses.replace(
            cfg, **routing, expert_hidden=hidden, normalize_topk=router.normalize_topk, shared_expert_hidden=0
        )
    if isinstance(cfg, DeepSeekConfig):
        return dataclasses.replace(
            cfg,
            **routing,
            moe_hidden=hidden,
            n_shared_experts=0,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
            normalize_topk=router.normalize_topk,
        )
    if isinstance(cfg, GlamConfig):  # GShard gating renormalises the top-k weights already
        if hidden != cfg.ffn_hidden:
            raise ValueError(
                f"GlamConfig has one ffn_hidden ({cfg.ffn_hidden}) for its dense FFNs and its experts, but the "
                f"upcycled experts are {hidden} wide (split_hidden=True with num_experts = dense width / ffn_hidden "
                "gives experts of that width)"
            )
        return dataclasses.replace(cfg, **routing)
    if isinstance(cfg, SwitchConfig):
        raise ValueError(
            "SwitchConfig routes top-1 and weights the expert's output by its softmax probability over all experts, "
            f"while the upcycled router (top_k={router.top_k}) renormalises the chosen weights to sum to one, so that "
            "the model starts out computing the dense FFN; SwitchConfig (and Hugging Face's Switch Transformers) has "
            "no field for that"
        )
    raise ValueError(f"{type(cfg).__name__} has no known upcycled form")


def _upcycled_config(
    family: MoEConfig, ffn: FeedForward, num_experts: int, top_k: int, split_hidden: bool
) -> MoEConfig:
    """The family's MoE layer config with ``E`` experts of the dense FFN's width and renormalised top-k weights."""
    if family.router.kind != "token_choice":
        raise ValueError(f"upcycle does not support router kind={family.router.kind!r}: only 'token_choice'")
    hidden = ffn.w1.out_features
    if split_hidden and hidden % num_experts:
        raise ValueError(
            f"split_hidden=True is invalid: the dense hidden width {hidden} does not split into "
            f"num_experts={num_experts} equal slices"
        )
    router = dataclasses.replace(
        family.router,
        num_experts=num_experts,
        top_k=top_k,
        # softmax over the chosen logits already sums to one
        normalize_topk=not (family.router.softmax_after_topk and family.router.score_func == "softmax"),
        routed_scaling_factor=1.0,
        n_group=1,
        topk_group=1,
    )
    experts = dataclasses.replace(family.experts, hidden_dim=hidden // num_experts if split_hidden else hidden)
    return dataclasses.replace(family, router=router, experts=experts, shared_hidden_dim=0, shared_gate=False)


@torch.no_grad()
def _copy_experts(
    ffn: FeedForward,
    layer: MoELayer,
    split_hidden: bool,
    top_k: int,
    noise_std: float,
    generator: torch.Generator | None,
) -> None:
    """Fill the stacked expert weights (``w1``/``w3``: ``(E, D, F)``, ``w2``: ``(E, F, D)``) from the FFN."""
    experts = layer.experts
    num_experts = experts.w1.shape[0]
    pairs = [(experts.w1, ffn.w1.weight.T, 1.0), (experts.w2, ffn.w2.weight.T, float(top_k) if split_hidden else 1.0)]
    if experts.w3 is not None:
        pairs.append((experts.w3, ffn.w3.weight.T, 1.0))
    for stacked_EXY, dense_XY, scale in pairs:  # dense_XY: (D, H) for w1/w3, (H, D) for w2
        if split_hidden:
            hidden_axis = 1 if stacked_EXY is not experts.w2 else 0
            chunks = dense_XY.chunk(num_experts, dim=hidden_axis)
            stacked_EXY.copy_(torch.stack(chunks) * scale)
        else:
            stacked_EXY.copy_(dense_XY.unsqueeze(0).expand_as(stacked_EXY) * scale)
        if noise_std > 0:
            noise = torch.randn(stacked_EXY.shape, generator=generator, dtype=torch.float32)
            stacked_EXY.add_(noise.to(stacked_EXY) * noise_std)
