"""``torch.compile`` with capacity factors changed during training (``CapacityFactorTuner``): each new factor is
honoured, and a compiled layer compiles once more at the first change, then never again."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from lightning.pytorch.callbacks import Callback

from lightning_moe import zoo
from lightning_moe.callbacks import CapacityFactorTuner
from lightning_moe.callbacks._utils import moe_layers
from lightning_moe.module import CausalLMModule
from lightning_moe.nn.compile import compile_blocks
from lightning_moe.nn.moe import MoELayer
from tests._helpers import QUIET, batch_loader, compiled_graphs, quiet_trainer

VOCAB = 64
MIXTRAL = {"vocab_size": VOCAB, "dim": 32, "num_heads": 2, "num_kv_heads": 1, "ffn_hidden": 32, "capacity_factor": 1.0}


pytestmark = [QUIET, pytest.mark.usefixtures("fresh_dynamo")]


def _batch(step: int, rows: int = 3, length: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(step))


def _moe_layers(model: torch.nn.Module) -> list[MoELayer]:
    return [module for module in model.modules() if isinstance(module, MoELayer)]


def test_a_new_capacity_factor_is_honoured_without_compiling_again() -> None:
    """What CapacityFactorTuner does between steps: a new factor per layer, dropping what it drops uncompiled."""
    torch.manual_seed(0)
    eager = zoo.build("mixtral-tiny", **MIXTRAL)
    compiled = compile_blocks(copy.deepcopy(eager), backend="aot_eager")
    for model in (eager, compiled):
        for layer in _moe_layers(model):
            layer.config = copy.copy(layer.config)  # one config per layer, as the tuner gives them
    ids = _batch(0)
    graphs, drops = [], set()
    for step, factor in enumerate([1.0, 1.3, 0.5, 2.0, 0.7, 1.1]):
        for model in (eager, compiled):
            for i, layer in enumerate(_moe_layers(model)):
                layer.config.capacity_factor = factor * (1 + 0.25 * i)
        ref, got = eager(ids, targets=ids), compiled(ids, targets=ids)
        dropped = [[int(s.num_dropped) for s in out.router_stats] for out in (ref, got)]
        assert dropped[1] == dropped[0], f"step {step}"
        drops.add(tuple(dropped[0]))
        torch.testing.assert_close(got.loss, ref.loss, atol=1e-6, rtol=1e-6)
        graphs.append(compiled_graphs())
    assert len(drops) > 3  # each factor dropped a different number of copies
    # The first new factor may compile once more (the factor becomes a graph input); no later one does.
    assert graphs[2:] == [graphs[1]] * (len(graphs) - 2), graphs


class _GraphCounter(Callback):
    def __init__(self) -> None:
        self.graphs: list[int] = []

    def on_train_batch_end(self, *args: object) -> None:
        self.graphs.append(compiled_graphs())


def test_capacity_factor_tuner_under_compile_trains_as_without_and_compiles_once() -> None:
    runs = []
    for backend in (False, "aot_eager"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        module = CausalLMModule(arch="mixtral-tiny", overrides=MIXTRAL, compile=backend)
        tuner = CapacityFactorTuner(target_drop_rate=0.0, min_factor=0.5, interval=1, smoothing=0.0)
        counter = _GraphCounter()
        trainer = quiet_trainer([tuner, counter], max_steps=5)
        trainer.fit(module, batch_loader([_batch(step, rows=4, length=17) for step in range(5)]))
        runs.append((module.model.state_dict(), tuner.history, counter.graphs))
    (ref_weights, ref_history, _), (weights, history, graphs) = runs
    assert len({round(h["factor"], 6) for h in ref_history}) > 3  # the factor moved from step to step
    assert history == ref_history
    for name, ref in ref_weights.items():
        torch.testing.assert_close(weights[name], ref, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert graphs[2:] == [graphs[2]] * (len(graphs) - 2), graphs  # no recompilation after the second step


class _ValLosses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.graphs: list[int] = []
        self.dropped: list[list[int]] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, *args) -> None:
        self.dropped.append([int(s.num_dropped) for s in outputs["router_stats"]])

    def on_validation_end(self, trainer, pl_module) -> None:
        self.losses.append(float(trainer.callback_metrics["val/loss"]))
        self.graphs.append(compiled_graphs())


def test_tuned_eval_capacity_factor_under_compile_validates_as_without() -> None:
    # tune_eval: every validation runs with the factor tuned so far, a new eval_capacity_factor each time.
    runs = []
    val = batch_loader([_batch(100 + i, rows=4, length=17) for i in range(2)])
    for backend in (False, "aot_eager"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        module = CausalLMModule(arch="mixtral-tiny", overrides=MIXTRAL, compile=backend)
        tuner = CapacityFactorTuner(target_drop_rate=0.0, min_factor=0.5, interval=1, smoothing=0.0, tune_eval=True)
        record = _ValLosses()
        trainer = quiet_trainer([tuner, record], max_steps=5, limit_val_batches=2, val_check_interval=1)
        trainer.fit(module, batch_loader([_batch(step, rows=4, length=17) for step in range(5)]), val)
        eval_factors = {name: layer.config.eval_capacity_factor for name, layer in moe_layers(module)}
        runs.append((record.losses, record.dropped, record.graphs, tuner.history, eval_factors, dict(tuner.factors)))
    (ref_losses, ref_dropped, _, ref_history, _, _), (losses, dropped, graphs, history, eval_factors, factors) = runs
    assert len({round(h["factor"], 6) for h in ref_history}) > 3  # each validation saw another factor
    assert history == ref_history
    assert len({tuple(d) for d in ref_dropped}) > 2  # and the factors dropped different numbers of copies
    assert dropped == ref_dropped
    assert len(losses) == len(ref_losses) == 5
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=1e-5, rtol=1e-5)
    assert eval_factors == factors  # the last tuned factors are the eval ones
    assert graphs[2:] == [graphs[1]] * (len(graphs) - 2), graphs  # no recompilation after the second validation
