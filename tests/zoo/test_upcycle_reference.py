"""Upcycling, dense baselines and ``compare`` checked against hand computations and the dense model's logits."""

import functools
import warnings

import pytest
import torch

from lightning_moe import zoo
from lightning_moe.compare import CompareConfig, load_config
from lightning_moe.nn.ffn import FeedForward
from lightning_moe.nn.moe import MoELayer
from lightning_moe.zoo.baselines import DECODER_TINY_PRESETS

# Every family that upcycles: the decoder tiny presets, and Switch made dropless (its capacity drops tokens).
FAMILIES = [(name, {}) for name in DECODER_TINY_PRESETS] + [
    ("switch-tiny", {"capacity_factor": None, "eval_capacity_factor": None})
]


def _dense(name, overrides, mode="active"):
    torch.manual_seed(0)
    return zoo.build(name, **overrides, dense=mode)


@functools.cache
def _dense_eval(name):
    """The eval-mode dense baseline of a family in ``FAMILIES``, input ids and its logits (built once)."""
    dense = _dense(name, dict(FAMILIES)[name]).eval()
    ids = torch.randint(0, dense.zoo_config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    return dense, ids, _logits(dense, ids)


def _logits(model, ids):
    with torch.no_grad():
        if hasattr(model, "encoder"):
            return model(ids, decoder_input_ids=ids).logits
        return model(ids).logits


def _upcycle(dense, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # top_k=1 with renormalised weights warns about the router's gradient
        return zoo.upcycle(dense, *args, **kwargs)


def _ffn_matrices(cfg):
    """Weight matrices of one FFN of the family: 3 for a gated unit (SwiGLU/GEGLU), else 2."""
    gated = getattr(cfg, "gated", True) if zoo.family_of(cfg) != "glam" else False  # GLaM's experts: plain GELU
    return 3 if gated else 2


def _expert_and_shared_widths(cfg):
    """``(F, S)`` from the family's config fields."""
    expert = next(getattr(cfg, f) for f in ("expert_hidden", "moe_hidden", "ffn_hidden") if hasattr(cfg, f))
    shared = getattr(cfg, "shared_expert_hidden", 0) + getattr(cfg, "n_shared_experts", 0) * getattr(
        cfg, "moe_hidden", 0
    )
    return expert, shared


def test_upcycling_keeps_the_dense_models_mode():
    dense = _dense("glam-tiny", {}).eval()
    moe = _upcycle(dense, 4, 2)  # no .eval() afterwards: the copy is in the mode the dense model was in
    assert not any(m.training for m in moe.modules())
    ids = torch.randint(0, dense.zoo_config.vocab_size, (2, 16))
    # GLaM's random routing drops second choices in training mode only: in eval the output is the dense one.
    torch.testing.assert_close(_logits(moe, ids), _logits(dense, ids), atol=1e-5, rtol=0)
    assert all(m.training for m in _upcycle(dense.train(), 4, 2).modules())


@pytest.mark.parametrize(("name", "overrides"), FAMILIES)
@pytest.mark.parametrize(
    ("num_experts", "top_k", "kwargs"),
    [(3, 1, {"noise_std": 0.0}), (4, 2, {"zero_router": True}), (4, 4, {"split_hidden": True, "zero_router": True})],
)
def test_upcycled_logits_equal_the_dense_logits(name, overrides, num_experts, top_k, kwargs):
    dense, ids, dense_logits = _dense_eval(name)
    moe = _upcycle(dense, num_experts, top_k, **kwargs)  # in eval mode as the dense model is
    assert not any(m.training for m in moe.modules())
    layers = [m for m in moe.modules() if isinstance(m, MoELayer)]
    with torch.device("meta"):
        family_layers = [m for m in zoo.build(name, **overrides).modules() if isinstance(m, MoELayer)]
    assert len(layers) == len(family_layers)
    for layer in layers:
        assert layer.config.num_experts == num_experts == layer.experts.w1.shape[0]
        assert layer.config.router.top_k == top_k and layer.shared_experts is None
    torch.testing.assert_close(_logits(moe, ids), dense_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["deepseek-tiny", "qwen-moe-tiny"])
def test_natively_dense_layers_are_kept_as_they_are(name):
    # DeepSeek's first_k_dense and Qwen's mlp_only_layers: plain FFNs in the MoE model too, left alone.
    dense = _dense(name, {})
    moe = _upcycle(dense, 4, 2)
    ffn, upcycled = dense.layers[0].ffn, moe.layers[0].ffn
    assert isinstance(upcycled, FeedForward)
    for key, value in ffn.state_dict().items():
        torch.testing.assert_close(upcycled.state_dict()[key], value, rtol=0, atol=0)
    assert isinstance(moe.layers[1].ffn, MoELayer)


@pytest.mark.parametrize("name", DECODER_TINY_PRESETS)
def test_dense_baselines_have_the_hand_counted_ffn_parameters(name):
    cfg = zoo.config(name)
    f, s = _expert_and_shared_widths(cfg)
    m, d = _ffn_matrices(cfg), cfg.dim
    with torch.device("meta"):
        moe = zoo.build(name)
    moe_layers = [mod for mod in moe.modules() if isinstance(mod, MoELayer)]
    # What an MoE layer holds by hand: E experts, the shared expert, the router (and Qwen's shared gate).
    moe_ffn = len(moe_layers) * (
        cfg.num_experts * m * d * f
        + m * d * s
        + d * cfg.num_experts
        + (d if getattr(cfg, "shared_expert_hidden", 0) else 0)
    )
    moe_total = sum(p.numel() for p in moe.parameters())
    for suffix, width in (("dense", cfg.top_k * f + s), ("dense-total", cfg.num_experts * f + s)):
        with torch.device("meta"):
            dense = zoo.build(f"{name}-{suffix}")
        positions = [n for n, _ in moe.named_modules() if isinstance(_, MoELayer)]
        assert [dense.get_submodule(p).w1.out_features for p in positions] == [width] * len(positions)
        dense_total = sum(p.numel() for p in dense.parameters())
        assert dense_total == moe_total - moe_ffn + len(positions) * m * d * width
        assert zoo.count_parameters(f"{name}-{suffix}") == zoo.ParameterCount(dense_total, dense_total)


def test_upcycled_parameter_counts_by_hand():
    # README: upcycling mixtral-tiny-dense (hidden 2 * 256 = 512) into 8 experts of top-2.
    cfg = zoo.config("mixtral-tiny")
    d, h, e, k, layers = cfg.dim, cfg.top_k * cfg.ffn_hidden, cfg.num_experts, cfg.top_k, cfg.num_layers
    dense = _dense("mixtral-tiny", {})
    non_ffn = sum(p.numel() for p in dense.parameters()) - layers * 3 * d * h
    counts = zoo.count_parameters(_upcycle(dense, e, k))
    assert counts.total == non_ffn + layers * (e * 3 * d * h + d * e)
    assert counts.active == non_ffn + layers * (k * 3 * d * h + d * e)


def test_noise_is_independent_gaussian_noise_of_the_given_std():
    dense = _dense("mixtral-tiny", {})
    std = 0.05
    moe = _upcycle(dense, 4, 2, noise_std=std, generator=torch.Generator().manual_seed(0))
    delta = moe.layers[0].ffn.experts.w1 - dense.layers[0].ffn.w1.weight.T  # (E, D, H) noise
    assert abs(delta.std().item() - std) < 0.05 * std and abs(delta.mean().item()) < 0.05 * std
    flat = delta.flatten(1)
    corr = torch.corrcoef(flat)
    assert (corr - torch.eye(4)).abs().max() < 0.05  # each expert its own draw


def test_upcycle_refuses_a_generator_that_is_not_one():
    dense = _dense("mixtral-tiny", {})
    for noise_std in (0.0, 0.1):  # also where no noise is drawn: the argument is wrong either way
        with pytest.raises(ValueError, match=r"generator=0 is invalid: must be a torch.Generator or None"):
            zoo.upcycle(dense, 4, 2, noise_std=noise_std, generator=0)


def test_compare_refuses_null_options_instead_of_falling_back_to_the_default(tmp_path):
    for argv, match in [
        (["--max_steps", "null"], r"max_steps=None is invalid: must be an int"),
        (["--seeds", ""], r"seeds=None is invalid: expected a list of ints"),
        (["--lr", "~"], r"lr=None is invalid: must be a finite number"),
    ]:
        with pytest.raises(ValueError, match=match):
            load_config(["--out_dir", str(tmp_path / "out"), *argv])
    cfg = load_config(["--max_steps", "7"])
    assert cfg.max_steps == 7 and cfg.seeds == CompareConfig().seeds  # options not given keep their defaults


def test_compare_checks_the_data_fields_before_any_run(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"vocab_size=10 is invalid: must be an int >= 258"):
        load_config(["--out_dir", str(out), "--vocab_size", "10"])
    assert not out.exists()
