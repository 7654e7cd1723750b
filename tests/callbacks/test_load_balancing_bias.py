from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_moe.callbacks import LoadBalancingBias
from lightning_moe.nn.losses import bias_update
from tests.callbacks._helpers import (
    StatsRecorder,
    loader,
    read_events,
    scalars,
    skew_routers,
    tiny_deepseek,
    tiny_mixtral,
    trainer,
)

E = 8


def imbalance(counts: torch.Tensor) -> float:
    return float(counts.max() / counts.mean())


def skewed_run(tmp_path, callbacks, steps=30):
    torch.manual_seed(0)
    module = tiny_deepseek(lr=1e-4)
    skew_routers(module)
    recorder = StatsRecorder()
    trainer(tmp_path, [recorder, *callbacks], max_steps=steps).fit(module, loader(steps))
    return module, recorder


def test_bias_balancer_reduces_the_imbalance_of_a_skewed_router_without_aux_loss(tmp_path):
    steps = 30
    _, plain = skewed_run(tmp_path / "plain", [], steps)
    module, balanced = skewed_run(tmp_path / "bias", [LoadBalancingBias(gamma=0.02)], steps)
    last = range(steps - 9, steps + 1)
    before, without, with_bias = (
        imbalance(plain.routed(0, E, range(1, 2))),
        imbalance(plain.routed(0, E, last)),
        imbalance(balanced.routed(0, E, last)),
    )
    assert before > 1.8 and without > 1.8  # the skew stays without balancing
    assert with_bias < 1.4, (before, without, with_bias)
    bias = module.moe_layers[0][1].router.score_bias
    assert bias[[2, 3, 4, 5]].min() > bias[[0, 7]].max()  # starved experts were raised above the favourites
    assert sorted(scalars(read_events(tmp_path / "bias"), "bias/layer_0/imbalance")) == list(range(1, steps + 1))


def test_update_uses_all_micro_batches_of_a_gradient_accumulation_cycle(tmp_path):
    torch.manual_seed(0)
    module = tiny_deepseek()
    recorder = StatsRecorder()
    gamma = 0.01
    trainer(tmp_path, [recorder, LoadBalancingBias(gamma=gamma)], max_steps=3, accumulate_grad_batches=2).fit(
        module, loader(6)
    )
    expected = torch.zeros(E)
    for step in range(3):
        load = sum(
            torch.bincount(r["expert_ids"][0].flatten(), minlength=E).float()
            for r in recorder.batches[2 * step : 2 * step + 2]
        )
        expected = bias_update(expected, load, gamma)
    torch.testing.assert_close(module.moe_layers[0][1].router.score_bias, expected)


def test_update_uses_the_load_summed_over_ranks():
    module = tiny_deepseek()
    layer = module.moe_layers[0][1]
    layer.tokens_per_expert.copy_(torch.tensor([9.0, 9, 0, 0, 0, 0, 0, 0]))
    other_rank = torch.tensor([0.0, 0, 9, 9, 9, 9, 9, 9])
    fake = SimpleNamespace(
        world_size=2,
        strategy=SimpleNamespace(reduce=lambda t, reduce_op: t + other_rank),
        optimizers=["opt"],
        global_step=0,
        log_every_n_steps=50,
        loggers=[],
    )
    callback = LoadBalancingBias(gamma=0.1)
    callback._gamma = 0.1
    callback.on_before_optimizer_step(fake, module, "opt")
    # The summed load [9, 9, 9, ...] is balanced: no expert moves. Rank 0's own load alone would have moved all.
    assert torch.all(layer.router.score_bias == 0)
    assert torch.all(layer.tokens_per_expert == 0)


def test_gamma_defaults_to_the_model_configs_bias_update_speed(tmp_path):
    torch.manual_seed(0)
    module = tiny_deepseek()
    callback = LoadBalancingBias()
    trainer(tmp_path, [callback], max_steps=2).fit(module, loader(2))
    assert callback._gamma == module.config.bias_update_speed == 1e-3
    assert callback.updates == 2
    assert module.moe_layers[0][1].router.score_bias.abs().max() == pytest.approx(2e-3)


def test_routers_without_a_score_bias_are_rejected(tmp_path):
    with pytest.raises(MisconfigurationException, match="no MoE layer has RouterConfig.score_bias=True"):
        trainer(tmp_path, [LoadBalancingBias(gamma=0.1)], max_steps=1).fit(tiny_mixtral(), loader(1))


def test_invalid_gamma():
    for gamma in (0.0, -1e-3, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match=r"gamma=.* is invalid: must be > 0"):
            LoadBalancingBias(gamma=gamma)


def test_bias_and_update_count_survive_a_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    module = tiny_deepseek()
    skew_routers(module)
    callback = LoadBalancingBias(gamma=0.01)
    trainer(tmp_path, [callback], max_steps=3, enable_checkpointing=True).fit(module, loader(3))
    ckpt = next((tmp_path / "tb" / "version_0" / "checkpoints").glob("*.ckpt"))
    fresh, restored = tiny_deepseek(), LoadBalancingBias(gamma=0.01)
    trainer(tmp_path / "again", [restored], max_steps=3).fit(fresh, loader(3), ckpt_path=ckpt)
    assert restored.updates == callback.updates == 3
    bias = module.moe_layers[0][1].router.score_bias
    assert bias.abs().max() > 0
    torch.testing.assert_close(fresh.moe_layers[0][1].router.score_bias, bias)
