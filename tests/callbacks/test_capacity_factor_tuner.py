import lightning as L
import pytest
import torch

from lightning_moe.callbacks import CapacityFactorTuner
from lightning_moe.callbacks.capacity_factor_tuner import drop_rate, smallest_factor
from lightning_moe.nn import ExpertsConfig, MoEConfig, MoELayer, RouterConfig
from tests.callbacks._helpers import StatsRecorder, loader, read_events, scalars, skew_routers, tiny_mixtral, trainer


def measured_drop_rate(recorder: StatsRecorder, steps: range) -> float:
    records = [r for r in recorder.batches if r["step"] in steps]
    dropped = sum(sum(r["dropped"]) for r in records)
    routed = sum(int((ids >= 0).sum()) for r in records for ids in r["expert_ids"])
    return dropped / routed


def test_tuner_brings_the_drop_rate_of_a_skewed_router_to_the_target(tmp_path):
    torch.manual_seed(0)
    module = tiny_mixtral(lr=1e-4, capacity_factor=1.0)
    skew_routers(module)  # four of eight experts take all tokens: capacity 1.0 drops about half the copies
    recorder = StatsRecorder()
    tuner = CapacityFactorTuner(target_drop_rate=0.01, interval=2, max_factor=4.0)
    trainer(tmp_path, [recorder, tuner], max_steps=12).fit(module, loader(12, batch_size=8))
    before = measured_drop_rate(recorder, range(1, 3))
    after = measured_drop_rate(recorder, range(3, 13))  # from the first adjustment on
    assert before > 0.3
    assert after <= 0.02, (before, after, tuner.history)
    # Each layer now has its own config (zoo builds share one), holding the tuned factor.
    (name0, layer0), (name1, layer1) = module.moe_layers
    assert layer0.config is not layer1.config
    assert (
        layer0.config.capacity_factor == tuner.factors[name0] and layer1.config.capacity_factor == tuner.factors[name1]
    )
    assert 1.5 < tuner.factors[name0] <= 4.0
    logged = scalars(read_events(tmp_path), "capacity/layer_0/factor")
    assert sorted(logged) == [2, 4, 6, 8, 10, 12] and logged[12] == pytest.approx(tuner.factors[name0])


def test_tuner_lowers_an_oversized_factor_towards_the_least_capacity(tmp_path):
    torch.manual_seed(0)
    module = tiny_mixtral(lr=1e-4, capacity_factor=4.0)  # balanced router: far more capacity than needed
    tuner = CapacityFactorTuner(target_drop_rate=0.05, interval=1, smoothing=0.0)
    trainer(tmp_path, [tuner], max_steps=3).fit(module, loader(3))
    assert all(f < 2.5 for f in tuner.factors.values()), tuner.factors


def test_factors_survive_a_checkpoint_round_trip_and_are_applied_on_resume(tmp_path):
    torch.manual_seed(0)
    module = tiny_mixtral(capacity_factor=1.0)
    skew_routers(module)
    tuner = CapacityFactorTuner(interval=2)
    trainer(tmp_path, [tuner], max_steps=4, enable_checkpointing=True).fit(module, loader(4))
    ckpt = next((tmp_path / "tb" / "version_0" / "checkpoints").glob("*.ckpt"))
    fresh = tiny_mixtral(capacity_factor=1.0)
    restored = CapacityFactorTuner(interval=2)
    trainer(tmp_path / "again", [restored], max_steps=4).fit(fresh, loader(4), ckpt_path=ckpt)
    assert restored.factors == tuner.factors and restored.history == tuner.history
    assert all(layer.config.capacity_factor == restored.factors[name] for name, layer in fresh.moe_layers)
    assert restored.factors["model.layers.0.ffn"] > 1.0


def test_validate_and_test_from_a_checkpoint_run_at_the_restored_factors(tmp_path):
    torch.manual_seed(0)
    module = tiny_mixtral(capacity_factor=1.0)  # no eval factor of its own: evaluation uses the (tuned) one
    skew_routers(module)
    tuner = CapacityFactorTuner(interval=2)
    trainer(tmp_path, [tuner], max_steps=4, enable_checkpointing=True).fit(module, loader(4))
    ckpt = next((tmp_path / "tb" / "version_0" / "checkpoints").glob("*.ckpt"))
    assert tuner.factors["model.layers.0.ffn"] > 1.0
    val = loader(2, seed=1)
    (expected,) = trainer(tmp_path / "ref", [], max_steps=1, limit_val_batches=None).validate(
        module, val, verbose=False
    )
    for stage in ("validate", "test"):
        fresh = tiny_mixtral(capacity_factor=1.0)
        restored = CapacityFactorTuner(interval=2)
        (got,) = getattr(trainer(tmp_path / stage, [restored], max_steps=1, limit_val_batches=None), stage)(
            fresh, val, ckpt_path=ckpt, verbose=False
        )
        assert {name: layer.config.capacity_factor for name, layer in fresh.moe_layers} == tuner.factors
        key = "val/loss" if stage == "validate" else "test/loss"
        assert got[key] == pytest.approx(expected["val/loss"], rel=1e-6)


def test_drop_rate_and_smallest_factor_replay_the_capacity_rule():
    # Two batches of 8 tokens, top-2 over 4 experts: balanced capacity is 4 copies per expert at factor 1.
    rows = torch.tensor([[8, 8, 4, 2, 2], [8, 4, 4, 4, 4]], dtype=torch.float64)
    assert drop_rate(rows, 1.0, 2, 4) == pytest.approx(4 / 32)
    assert drop_rate(rows, 1.5, 2, 4) == pytest.approx(2 / 32)  # capacity 6
    assert drop_rate(rows, 2.0, 2, 4) == 0.0  # capacity 8
    factor = smallest_factor(rows, 0.0, 2, 4, 1.0, 4.0)
    assert drop_rate(rows, factor, 2, 4) == 0.0 and 1.75 < factor <= 1.752  # capacity 7 is not enough
    assert smallest_factor(rows, 0.5, 2, 4, 1.0, 4.0) == 1.0


def test_dropless_model_warns_that_there_is_nothing_to_tune(tmp_path):
    with pytest.warns(UserWarning, match="no MoE layer has a capacity_factor"):
        trainer(tmp_path, [CapacityFactorTuner()], max_steps=1).fit(tiny_mixtral(), loader(1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_drop_rate": 1.0}, r"target_drop_rate=1.0 is invalid"),
        ({"min_factor": 0.0}, r"min_factor=0.0 is invalid"),
        ({"min_factor": 2.0, "max_factor": 1.0}, r"max_factor=1.0 is invalid: must be >= min_factor \(2.0\)"),
        ({"interval": 0}, "interval=0 is invalid"),
        ({"smoothing": 1.0}, "smoothing=1.0 is invalid"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CapacityFactorTuner(**kwargs)


class _PerSequenceCapacity(L.LightningModule):
    """One top-1 MoE layer over 2 experts, capacity counted per sequence; sequence b routes all its tokens to b."""

    def __init__(self) -> None:
        super().__init__()
        router = RouterConfig(num_experts=2, top_k=1)
        config = MoEConfig(dim=2, router=router, experts=ExpertsConfig(hidden_dim=4), capacity_factor=1.0,
                           capacity_scope="sequence")  # fmt: skip
        self.moe = MoELayer(config)
        self.moe.router.gate.weight.requires_grad_(False).copy_(torch.tensor([[10.0, 0.0], [-10.0, 0.0]]))
        self.dropped: list[float] = []

    def training_step(self, batch, batch_idx):
        x = batch.new_tensor([[1.0, 0.0]] * 4 + [[-1.0, 0.0]] * 4).view(2, 4, 2)
        y, stats = self.moe(x)
        self.dropped.append(float(stats.num_dropped) / float(stats.tokens_per_expert.sum()))
        return {"loss": y.pow(2).mean(), "router_stats": [stats.detach()]}

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.0)


def test_per_sequence_capacity_is_replayed_sequence_by_sequence(tmp_path):
    # Over the batch both experts get 4 of 8 tokens (no drop at factor 1), but each sequence sends its 4 tokens
    # to one expert whose per-sequence capacity is ceil(1.0 * 4 / 2) = 2: half the copies drop. Any factor above
    # 1.5 gives capacity 4 and drops none. The batch rule saw no drop and kept factor 1.
    model = _PerSequenceCapacity()
    tuner = CapacityFactorTuner(target_drop_rate=0.0, interval=1, smoothing=0.0, max_factor=4.0)
    trainer(tmp_path, [tuner], max_steps=2).fit(model, torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=1))
    assert model.dropped == [0.5, 0.0]
    assert tuner.history[0]["drop_rate"] == pytest.approx(0.5)
    assert 1.5 < tuner.history[0]["factor"] <= 1.502
    assert tuner.history[1]["drop_rate"] == 0.0
