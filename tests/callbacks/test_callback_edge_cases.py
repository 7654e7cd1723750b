"""Callback edge cases: revival donors and seeds, argument checks, names under wrappers, heatmap scales."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_moe.callbacks import CapacityFactorTuner, ExpertCollapseDetector, ExpertLoadMonitor
from lightning_moe.callbacks.heatmap import load_heatmap
from lightning_moe.nn import ExpertsConfig, MoEConfig, MoELayer, RouterConfig
from lightning_moe.strategies.expert_parallel import apply_activation_checkpointing
from tests.callbacks._helpers import loader, skew_routers, tiny_mixtral, trainer

STARVED = [2, 3, 4, 5]  # the experts the skewed router of the helpers never picks
LIVE = [0, 1, 6, 7]


def test_revive_with_a_large_seed_revives_instead_of_overflowing(tmp_path):
    # The revival generator's seed mixes seed, step, layer and expert; with a 31-bit seed (a common choice) the
    # mix left the 64-bit range and torch.Generator.manual_seed raised at the first revival, mid-training.
    torch.manual_seed(0)
    module = tiny_mixtral(lr=1e-4)
    skew_routers(module)
    detector = ExpertCollapseDetector(action="revive", patience=1, max_share=None, noise=0.0, seed=2**31 - 1)
    with pytest.warns(UserWarning, match="action: revive"):
        trainer(tmp_path, [detector], max_steps=1).fit(module, loader(1))
    for _, layer in module.moe_layers:
        w1 = layer.experts.w1.detach()
        for expert in STARVED:  # noise 0: an exact copy of one of the live experts
            assert any(torch.equal(w1[expert], w1[donor]) for donor in LIVE), expert


def test_revive_takes_donors_from_live_experts_only():
    # Experts 1 and 2 starve for two steps (patience), expert 3 starts starving in the second step: it gets no
    # token then, so it is no donor. The only live expert is 0, so both revived experts are copies of it.
    torch.manual_seed(0)
    config = MoEConfig(dim=8, router=RouterConfig(num_experts=4, top_k=1), experts=ExpertsConfig(hidden_dim=8))
    layer = MoELayer(config)
    original = layer.experts.w1.detach().clone()
    module = SimpleNamespace(moe_layers=[("moe", layer)])
    fake = SimpleNamespace(world_size=1, global_step=1, optimizers=[], loggers=[], is_global_zero=True)
    detector = ExpertCollapseDetector(action="revive", patience=2, min_load=0.1, max_share=None, noise=0.0)
    tokens = torch.tensor([[12.0, 12.0]], dtype=torch.float64)
    detector._check(fake, module, [torch.tensor([8.0, 0.0, 0.0, 4.0], dtype=torch.float64)], tokens)
    fake.global_step = 2
    with pytest.warns(UserWarning, match=r"experts \[1, 2\]"):
        detector._check(fake, module, [torch.tensor([12.0, 0.0, 0.0, 0.0], dtype=torch.float64)], tokens)
    w1 = layer.experts.w1.detach()
    torch.testing.assert_close(w1[1], original[0], rtol=0, atol=0)
    torch.testing.assert_close(w1[2], original[0], rtol=0, atol=0)
    torch.testing.assert_close(w1[3], original[3], rtol=0, atol=0)  # starving, but not yet for `patience` steps


@pytest.mark.parametrize(
    ("callback", "kwargs", "match"),
    [
        (ExpertCollapseDetector, {"noise": math.nan}, r"noise=nan is invalid"),  # revived weights were NaN
        (ExpertCollapseDetector, {"noise": math.inf}, r"noise=inf is invalid"),
        (ExpertCollapseDetector, {"patience": 1.5}, r"patience=1.5 is invalid"),
        (ExpertCollapseDetector, {"patience": True}, r"patience=True is invalid"),
        (ExpertCollapseDetector, {"seed": 1.5}, r"seed=1.5 is invalid"),
        (ExpertCollapseDetector, {"seed": "x"}, r"seed='x' is invalid"),
        (ExpertCollapseDetector, {"min_load": "0.1"}, r"min_load='0.1' is invalid"),
        (ExpertCollapseDetector, {"max_share": math.nan}, r"max_share=nan is invalid"),
        (CapacityFactorTuner, {"max_factor": math.inf}, r"max_factor=inf is invalid"),  # raised mid-training
        (CapacityFactorTuner, {"max_factor": math.nan}, r"max_factor=nan is invalid"),
        (CapacityFactorTuner, {"min_factor": math.nan}, r"min_factor=nan is invalid"),
        (CapacityFactorTuner, {"interval": 2.5}, r"interval=2.5 is invalid"),
        (CapacityFactorTuner, {"interval": True}, r"interval=True is invalid"),
        (CapacityFactorTuner, {"target_drop_rate": "0.1"}, r"target_drop_rate='0.1' is invalid"),
        (CapacityFactorTuner, {"fast_up": "no"}, r"fast_up='no' is invalid"),
        (CapacityFactorTuner, {"tune_eval": 1}, r"tune_eval=1 is invalid"),
        (ExpertLoadMonitor, {"logging_interval": 2.5}, r"logging_interval=2.5 is invalid"),
        (ExpertLoadMonitor, {"logging_interval": True}, r"logging_interval=True is invalid"),
        (ExpertLoadMonitor, {"logging_interval": "5"}, r"logging_interval='5' is invalid"),
        (ExpertLoadMonitor, {"max_expert_scalars": 1.5}, r"max_expert_scalars=1.5 is invalid"),
        (ExpertLoadMonitor, {"log_histograms": "no"}, r"log_histograms='no' is invalid"),
        (ExpertLoadMonitor, {"log_heatmap": None}, r"log_heatmap=None is invalid"),
    ],
)
def test_invalid_arguments_are_rejected_before_training(callback, kwargs, match):
    with pytest.raises(ValueError, match=match):
        callback(**kwargs)


def test_tuned_factors_are_reapplied_when_resuming_without_activation_checkpointing(tmp_path):
    # Activation checkpointing wraps each block, so the MoE layers' module names gain a wrapper prefix; the tuner
    # keyed its factors by those names, and a resume without the wrapper (or with it, after a run without) found
    # none of them: every layer went back to the configured factor.
    torch.manual_seed(0)
    module = tiny_mixtral(capacity_factor=1.0)
    skew_routers(module)
    apply_activation_checkpointing(module.model)
    tuner = CapacityFactorTuner(interval=2)
    trainer(tmp_path, [tuner], max_steps=2).fit(module, loader(2))
    assert set(tuner.factors) == {"model.layers.0.ffn", "model.layers.1.ffn"}
    assert min(tuner.factors.values()) > 1.0
    fresh, restored = tiny_mixtral(capacity_factor=1.0), CapacityFactorTuner(interval=2)
    restored.load_state_dict(tuner.state_dict())  # what a resume does, then fit starts
    restored.on_fit_start(SimpleNamespace(world_size=1), fresh)
    assert restored.factors == tuner.factors
    assert [layer.config.capacity_factor for _, layer in fresh.moe_layers] == [
        tuner.factors["model.layers.0.ffn"],
        tuner.factors["model.layers.1.ffn"],
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vmax": math.nan}, r"vmax=nan is invalid"),  # drew garbage colours
        ({"vmax": math.inf}, r"vmax=inf is invalid"),  # drew every overloaded expert white (balanced)
        ({"cell": 2.5}, r"cell=2.5 is invalid"),
    ],
)
def test_heatmap_rejects_a_non_finite_scale_and_a_fractional_cell(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_heatmap(np.full((1, 4), 0.25), **kwargs)
