"""Callbacks where a step is skipped, training ends mid-window, or state crosses a resume."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_moe.callbacks import CapacityFactorTuner, ExpertLoadMonitor, LoadBalancingBias
from lightning_moe.module import CausalLMModule
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


def deepseek(**hparams: Any) -> CausalLMModule:
    """``tiny_deepseek`` with module arguments changed (``nan_policy``)."""
    torch.manual_seed(0)
    module = CausalLMModule(**{**tiny_deepseek().hparams, **hparams})
    skew_routers(module)
    return module


class SkipRecorder(StatsRecorder):
    """Also keeps each batch's routing when the step skipped it (``training_step`` returned ``None``)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if outputs:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class PoisonGradient(Callback):
    """Writes ``value`` into one gradient after the backward at optimizer step ``step``."""

    def __init__(self, step: int, value: float = float("nan")) -> None:
        self.step = step
        self.value = value

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            pl_module.model.layers[0].attn_norm.weight.grad[0] = self.value


class PoisonLoss(Callback):
    """Makes the router logits of every MoE layer NaN for the batch at optimizer step ``step`` only."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.saved: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            for _, layer in pl_module.moe_layers:
                self.saved.append(layer.router.gate.weight.detach().clone())
                layer.router.gate.weight.data.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for (_, layer), weight in zip(pl_module.moe_layers, self.saved, strict=False):
            layer.router.gate.weight.data.copy_(weight)
        self.saved = []


def expected_bias(recorder: StatsRecorder, applied_steps: list[int], gamma: float) -> torch.Tensor:
    """DeepSeek-V3's update by hand: one ``bias_update`` per applied step, on the load of that step's batch."""
    bias = torch.zeros(E)
    for step in applied_steps:
        load = sum(
            torch.bincount(r["expert_ids"][0].flatten(), minlength=E).float()
            for r in recorder.batches
            if r["step"] == step + 1
        )
        bias = bias_update(bias, load, gamma)
    return bias


def test_bias_is_not_updated_by_an_optimizer_step_the_nan_policy_skips(tmp_path):
    module, recorder, callback = deepseek(nan_policy="skip"), StatsRecorder(), LoadBalancingBias(gamma=0.01)
    with pytest.warns(UserWarning, match="skipping optimizer step"):
        trainer(tmp_path, [PoisonGradient(2), recorder, callback], max_steps=4).fit(module, loader(4))
    torch.testing.assert_close(module.moe_layers[0][1].router.score_bias, expected_bias(recorder, [0, 1, 3], 0.01))
    assert callback.updates == 3


def test_bias_is_not_updated_by_a_batch_the_nan_policy_skips(tmp_path):
    module, recorder, callback = deepseek(nan_policy="skip"), SkipRecorder(), LoadBalancingBias(gamma=0.01)
    with pytest.warns(UserWarning, match="skipping batch"):
        trainer(tmp_path, [PoisonLoss(1), recorder, callback], max_steps=4).fit(module, loader(4))
    torch.testing.assert_close(module.moe_layers[0][1].router.score_bias, expected_bias(recorder, [0, 2, 3], 0.01))
    assert callback.updates == 3


def test_bias_is_not_updated_by_an_optimizer_step_the_float16_scaler_skips(tmp_path):
    module, recorder, callback = deepseek(), StatsRecorder(), LoadBalancingBias(gamma=0.01)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
    fit = trainer(tmp_path, [PoisonGradient(1, float("inf")), recorder, callback], max_steps=4, plugins=[plugin])
    fit.fit(module, loader(4))
    assert plugin.scaler.get_scale() == 2.0**7  # the scaler found the inf once and skipped that step
    torch.testing.assert_close(module.moe_layers[0][1].router.score_bias, expected_bias(recorder, [0, 2, 3], 0.01))
    assert callback.updates == 3


def test_bias_update_after_the_step_uses_the_load_summed_over_ranks():
    module = tiny_deepseek()
    layer = module.moe_layers[0][1]
    local = torch.tensor([9.0, 9, 0, 0, 0, 0, 0, 0])
    other_rank = torch.tensor([0.0, 0, 0, 9, 9, 9, 9, 9])
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
    fake = SimpleNamespace(
        world_size=2,
        strategy=SimpleNamespace(reduce=lambda t, reduce_op: t + other_rank),
        optimizers=[optimizer],
        global_step=0,
        log_every_n_steps=50,
        loggers=[],
    )
    callback = LoadBalancingBias(gamma=0.1)
    callback.on_fit_start(fake, module)
    layer.tokens_per_expert.copy_(local)
    callback.on_before_optimizer_step(fake, module, optimizer)
    assert torch.all(layer.router.score_bias == 0)  # not before the step: it may yet be skipped
    module.model.embed.weight.grad = torch.zeros_like(module.model.embed.weight)
    optimizer.step()
    torch.testing.assert_close(layer.router.score_bias, bias_update(torch.zeros(E), local + other_rank, 0.1))
    assert callback.updates == 1
    optimizer.step()  # a step with no pending load (another caller) changes nothing
    assert callback.updates == 1
    callback.teardown(fake, module, "fit")
    layer.tokens_per_expert.copy_(local)
    callback.on_before_optimizer_step(fake, module, optimizer)
    optimizer.step()  # the hook is gone after teardown
    assert callback.updates == 1


def window_shares(recorder: StatsRecorder, layer: int, steps: range) -> torch.Tensor:
    """``(E,)`` share of a layer's routed copies per expert over the batches of ``steps``, counted by hand."""
    routed = recorder.routed(layer, E, steps)
    return routed / routed.sum()


def test_load_monitor_logs_the_last_partial_window_when_training_ends(tmp_path):
    torch.manual_seed(0)
    module, recorder, monitor = tiny_mixtral(), StatsRecorder(), ExpertLoadMonitor(logging_interval=4)
    skew_routers(module)
    trainer(tmp_path, [recorder, monitor], max_steps=6).fit(module, loader(6))
    events = read_events(tmp_path)
    assert sorted(scalars(events, "moe/layer_0/imbalance")) == [4, 6]
    for layer in range(2):
        for step, window in ((4, range(1, 5)), (6, range(5, 7))):
            share = window_shares(recorder, layer, window)
            logged = [scalars(events, f"moe/layer_{layer}/load/expert_{e}")[step] for e in range(E)]
            assert logged == pytest.approx(share.tolist(), abs=1e-6)
            # A 2-step window is measured against its own mean, not the mean of a full window.
            imbalance = scalars(events, f"moe/layer_{layer}/imbalance")[step]
            assert imbalance == pytest.approx(float(share.max() * E), rel=1e-5)
    assert sorted(e.step for e in events.Histograms("moe/layer_0/routed")) == [4, 6]


def test_load_monitor_window_resumed_from_a_save_after_training_ends_is_counted_once(tmp_path):
    torch.manual_seed(0)
    module, first, monitor = tiny_mixtral(), StatsRecorder(), ExpertLoadMonitor(logging_interval=4)
    fit = trainer(tmp_path / "a", [first, monitor], max_steps=6)
    fit.fit(module, loader(8))
    assert monitor.last_metrics  # the open window (steps 5 and 6) was logged at the end
    fit.save_checkpoint(tmp_path / "end.ckpt")  # a save after training ended keeps the open window, once
    second, resumed = StatsRecorder(), ExpertLoadMonitor(logging_interval=4)
    again = trainer(tmp_path / "b", [second, resumed], max_steps=8)
    again.fit(tiny_mixtral(), loader(8), ckpt_path=tmp_path / "end.ckpt")
    assert [r["step"] for r in second.batches] == [7, 8]
    routed = first.routed(0, E, range(5, 7)) + second.routed(0, E, range(7, 9))
    expected = (routed / routed.sum()).tolist()
    logged = [resumed.last_metrics[f"moe/layer_0/load/expert_{e}"] for e in range(E)]
    assert logged == pytest.approx(expected, abs=1e-6)
    assert float(resumed.last_load[0].sum()) == pytest.approx(1.0)


def test_load_monitor_train_end_takes_the_same_way_on_every_rank():
    # A rank whose window is open while another's is not (a 1-process window restored on rank 0 only) must not
    # enter the sum over the ranks alone: that would wait forever for the others.
    module = tiny_mixtral()
    monitor = ExpertLoadMonitor(logging_interval=4)
    monitor._reset([E, E])
    decisions: list[bool] = []

    def decide(open_here: bool, all: bool) -> bool:  # noqa: A002 (Lightning's argument name)
        decisions.append(open_here)
        return False  # another rank has no window

    def never(tensor, reduce_op):  # the sum over the ranks must not start
        raise AssertionError("reduce called")

    strategy = SimpleNamespace(reduce_boolean_decision=decide, reduce=never)
    fake = SimpleNamespace(world_size=2, global_rank=0, global_step=6, strategy=strategy, loggers=[])
    monitor.on_train_end(fake, module)
    assert decisions == [True]
    assert monitor._window is not None and not monitor.last_metrics


class RestoreAfterSetup(SingleDeviceStrategy):
    """Restores module and callback states after ``on_fit_start``, as FSDP and ``ExpertParallelStrategy`` do."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


class FactorRecorder(Callback):
    """Keeps each MoE layer's training capacity factor at the start of every training batch."""

    def __init__(self) -> None:
        self.factors: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.factors.append({name: layer.config.capacity_factor for name, layer in pl_module.moe_layers})


def test_tuned_factors_are_applied_on_resume_when_the_strategy_restores_after_setup(tmp_path):
    torch.manual_seed(0)
    module = tiny_mixtral(capacity_factor=1.0)
    skew_routers(module)
    tuner = CapacityFactorTuner(interval=2)
    trainer(tmp_path, [tuner], max_steps=2, enable_checkpointing=True).fit(module, loader(2))
    ckpt = next((tmp_path / "tb" / "version_0" / "checkpoints").glob("*.ckpt"))
    assert min(tuner.factors.values()) > 1.0
    fresh, restored, recorder = tiny_mixtral(capacity_factor=1.0), CapacityFactorTuner(interval=2), FactorRecorder()
    strategy = RestoreAfterSetup(device=torch.device("cpu"))
    again = trainer(tmp_path / "again", [recorder, restored], max_steps=3, strategy=strategy)
    again.fit(fresh, loader(3), ckpt_path=ckpt)
    assert recorder.factors == [tuner.factors]  # the resumed step trains with the tuned factors
    assert restored.factors == tuner.factors


def test_a_one_process_tuner_window_restored_after_setup_starts_afresh_on_several_ranks():
    # Every rank loads the same file: a 1-process window kept on all of them would be gathered once per rank.
    saved = CapacityFactorTuner(interval=4)
    saved._batches = {0: [torch.tensor([64.0, 30, 30, 2, 2, 16, 16, 16, 16])]}
    state = saved.state_dict()
    assert state["window_world_size"] == 1
    module, tuner = tiny_mixtral(capacity_factor=1.0), CapacityFactorTuner(interval=4)
    fake = SimpleNamespace(world_size=2, global_step=8)
    tuner.on_fit_start(fake, module)  # strategies that restore after setup: the state comes after this hook
    tuner.load_state_dict(state)
    tuner.on_train_start(fake, module)
    assert tuner._batches == {}


def test_bias_is_not_updated_when_an_optimizer_that_skips_inf_steps_itself_skips():
    # A fused AdamW takes GradScaler's found_inf and skips inside its own step: the step hook runs regardless.
    module = tiny_deepseek()
    layer = module.moe_layers[0][1]
    weight = module.model.embed.weight
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    fake = SimpleNamespace(world_size=1, optimizers=[optimizer], global_step=0, log_every_n_steps=50, loggers=[])
    callback = LoadBalancingBias(gamma=0.1)
    callback.on_fit_start(fake, module)
    load = torch.tensor([9.0, 9, 0, 0, 0, 0, 0, 0])
    for inf in (True, False):
        layer.tokens_per_expert.copy_(load)
        scaler.scale(torch.ones(()))  # starts the scale, as the backward of a scaled loss does
        weight.grad = torch.ones_like(weight)
        if inf:
            weight.grad[0, 0] = float("inf")
        before = weight.detach().clone()
        callback.on_before_optimizer_step(fake, module, optimizer)
        scaler.step(optimizer)
        scaler.update()
        assert torch.equal(weight.detach(), before) == inf  # the skipped step left the weights as they were
        expected = torch.zeros(E) if inf else bias_update(torch.zeros(E), load, 0.1)
        torch.testing.assert_close(layer.router.score_bias, expected)
    assert callback.updates == 1


class PoisonBatch(Callback):
    """Makes the router logits of every MoE layer NaN for the training batch ``batch_idx`` only."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx
        self.saved: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.batch_idx:
            for _, layer in pl_module.moe_layers:
                self.saved.append(layer.router.gate.weight.detach().clone())
                layer.router.gate.weight.data.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for (_, layer), weight in zip(pl_module.moe_layers, self.saved, strict=False):
            layer.router.gate.weight.data.copy_(weight)
        self.saved = []


class LoadByBatch(Callback):
    """Each trained (not skipped) batch's load of the first MoE layer, counted from its chosen experts."""

    def __init__(self) -> None:
        self.loads: dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if outputs:
            ids = outputs["router_stats"][0].expert_ids
            self.loads[batch_idx] = torch.bincount(ids[ids >= 0].flatten(), minlength=E).float()


def test_bias_update_leaves_out_the_load_of_a_micro_batch_the_nan_policy_skips(tmp_path):
    # Two micro-batches per step; the second of the first step is skipped for a non-finite loss. The step still
    # applies (the first micro-batch's gradients), and its bias update must use that micro-batch's load only.
    module, loads, callback = deepseek(nan_policy="skip"), LoadByBatch(), LoadBalancingBias(gamma=0.01)
    fit = trainer(tmp_path, [PoisonBatch(1), loads, callback], max_steps=2, accumulate_grad_batches=2)
    with pytest.warns(UserWarning, match="skipping batch"):
        fit.fit(module, loader(4))
    assert sorted(loads.loads) == [0, 2, 3]
    expected = bias_update(bias_update(torch.zeros(E), loads.loads[0], 0.01), loads.loads[2] + loads.loads[3], 0.01)
    torch.testing.assert_close(module.moe_layers[0][1].router.score_bias, expected)
    assert callback.updates == 2
