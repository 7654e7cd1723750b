"""Sparse upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints").

A trained dense baseline (a zoo model built with ``dense="active"`` or ``"total"``) becomes an MoE model of the
same family: at every position where the family has an MoE layer, the dense FFN is replaced by an MoE layer whose
experts start as copies of that FFN; the router is fresh; attention, norms and embeddings are kept. The family's
router is kept except that the chosen top-k weights are renormalised to sum to one (and not scaled), so right after
upcycling every token's output is ``sum_k w_k FFN(x) = FFN(x)``: the MoE model computes the dense model's function
where no token is dropped (no capacity factor) and nothing is drawn (eval mode: no jitter or random routing).

Shape legend: ``E`` experts, ``D`` model width, ``H`` dense hidden width, ``F`` expert hidden width.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import nn

from lightning_moe.nn.config import MoEConfig
from lightning_moe.nn.ffn import FeedForward
from lightning_moe.nn.moe import MoELayer
from lightning_moe.zoo import registry


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
        mode. Its MoE layers are dropless or not as the family's; ``model.upcycled_from`` holds the dense config.

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
    model.zoo_config = None
    model.upcycled_from = cfg
    return model


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
