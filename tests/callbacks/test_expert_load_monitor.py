import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_moe.callbacks import ExpertLoadMonitor
from lightning_moe.callbacks.heatmap import colormap, load_heatmap
from lightning_moe.nn import ExpertsConfig, MoEConfig, MoELayer, RouterConfig
from tests.callbacks._helpers import StatsRecorder, loader, read_events, scalars, tiny_mixtral, trainer

E = 8


def test_logged_scalars_histograms_and_heatmap_equal_counts_from_router_outputs(tmp_path):
    torch.manual_seed(0)
    module = tiny_mixtral(capacity_factor=1.0)  # capacity drops some copies, so kept != routed
    recorder = StatsRecorder()
    monitor = ExpertLoadMonitor(logging_interval=2)
    trainer(tmp_path, [recorder, monitor], max_steps=4).fit(module, loader(4))
    events = read_events(tmp_path)
    tags = set(events.Tags()["scalars"])

    for layer in range(2):
        prefix = f"moe/layer_{layer}"
        for step in (2, 4):
            window = range(step - 1, step + 1)
            routed = recorder.routed(layer, E, window)
            records = [r for r in recorder.batches if r["step"] in window]
            dropped = sum(r["dropped"][layer] for r in records)
            tokens = sum(r["tokens"][layer] for r in records)
            assert routed.sum() == 2 * tokens  # top-2, no padding
            share = routed / routed.sum()
            for e in range(E):
                assert scalars(events, f"{prefix}/load/expert_{e}")[step] == pytest.approx(float(share[e]), abs=1e-6)
            kept_total = sum(scalars(events, f"{prefix}/kept/expert_{e}")[step] for e in range(E))
            drop_rate = dropped / float(routed.sum())
            assert drop_rate > 0
            assert kept_total == pytest.approx(1 - drop_rate, abs=1e-5)
            assert scalars(events, f"{prefix}/drop_rate")[step] == pytest.approx(drop_rate, rel=1e-5)
            mean = float(routed.mean())
            assert scalars(events, f"{prefix}/imbalance")[step] == pytest.approx(float(routed.max()) / mean, rel=1e-5)
            cv = float(np.std(routed.numpy())) / mean
            assert scalars(events, f"{prefix}/cv")[step] == pytest.approx(cv, rel=1e-5)
            assert scalars(events, f"{prefix}/dead_experts")[step] == float((routed == 0).sum())
            entropy = sum(r["entropy"][layer] * r["tokens"][layer] for r in records) / tokens
            assert scalars(events, f"{prefix}/entropy")[step] == pytest.approx(entropy, rel=1e-5)
        assert {f"{prefix}/aux/load_balance", f"{prefix}/aux/z_loss", f"{prefix}/aux/seq_balance"} <= tags
        histogram = {e.step: e.histogram_value for e in events.Histograms(f"{prefix}/routed")}
        assert sorted(histogram) == [2, 4]
        assert list(histogram[4].bucket) == pytest.approx(recorder.routed(layer, E, range(3, 5)).tolist())
    # Bounded tags: the per-layer summaries and one load and kept scalar per expert, nothing per step.
    assert len([t for t in tags if t.startswith("moe/")]) == 2 * (8 + 2 * E)
    assert events.Tags()["images"] == ["moe/load_heatmap"]
    image = events.Images("moe/load_heatmap")[-1]
    assert (image.height, image.width) == tuple(load_heatmap(monitor.last_load.numpy()).shape[:2])
    assert monitor.last_load.shape == (2, E)


def test_gradient_accumulation_windows_close_at_optimizer_steps(tmp_path):
    torch.manual_seed(0)
    recorder = StatsRecorder()
    monitor = ExpertLoadMonitor(logging_interval=1)
    trainer(tmp_path, [recorder, monitor], max_steps=2, accumulate_grad_batches=2).fit(tiny_mixtral(), loader(4))
    events = read_events(tmp_path)
    assert [r["step"] for r in recorder.batches] == [0, 1, 1, 2]  # the step count after each micro-batch
    first = recorder.batches[0]["expert_ids"][0], recorder.batches[1]["expert_ids"][0]
    window1 = sum(torch.bincount(ids.flatten(), minlength=E).double() for ids in first)
    assert scalars(events, "moe/layer_0/load/expert_0")[1] == pytest.approx(float(window1[0] / window1.sum()), abs=1e-6)
    window2 = recorder.routed(0, E) - window1
    assert scalars(events, "moe/layer_0/load/expert_0")[2] == pytest.approx(float(window2[0] / window2.sum()), abs=1e-6)
    assert sorted(scalars(events, "moe/layer_0/imbalance")) == [1, 2]


def test_other_loggers_get_the_scalars_only(tmp_path):
    torch.manual_seed(0)
    monitor = ExpertLoadMonitor(logging_interval=2, max_expert_scalars=0)
    csv = CSVLogger(tmp_path, name="csv", version=0)
    trainer(tmp_path, [monitor], max_steps=2, logger=csv).fit(tiny_mixtral(), loader(2))
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"moe/layer_0/imbalance", "moe/layer_1/load_max", "moe/layer_1/load_min"} <= set(header)
    assert not any("/expert_" in column for column in header)


def test_heatmap_colours_starving_blue_balanced_white_overloaded_red():
    load = np.array([[0.0, 0.25, 0.25, 0.5], [0.25, 0.25, 0.25, 0.25]])
    image = load_heatmap(load, cell=10, vmax=2.0)
    assert image.dtype == np.uint8 and image.shape[1] == 4 * 10 + 1
    centre = lambda layer, expert: image[layer * 10 + 5, expert * 10 + 5].tolist()  # noqa: E731
    assert centre(0, 0) == colormap(np.array(0.0)).tolist()  # dead: darkest blue
    assert centre(1, 2) == [247, 247, 247]  # balanced: white
    assert centre(0, 3) == colormap(np.array(1.0)).tolist()  # twice the fair share: darkest red


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"logging_interval": 0}, "logging_interval=0 is invalid"), ({"max_expert_scalars": -1}, "max_expert_scalars")],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExpertLoadMonitor(**kwargs)


def test_heatmap_rejects_bad_input():
    with pytest.raises(ValueError, match=r"load_LE.shape=\(3,\) is invalid"):
        load_heatmap(np.ones(3))


def test_open_window_survives_a_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    monitor = ExpertLoadMonitor(logging_interval=4)
    trainer(tmp_path, [monitor], max_steps=3, enable_checkpointing=True).fit(tiny_mixtral(), loader(3))
    ckpt = next((tmp_path / "tb" / "version_0" / "checkpoints").glob("*.ckpt"))
    restored = ExpertLoadMonitor(logging_interval=4)
    trainer(tmp_path / "again", [restored], max_steps=3).fit(tiny_mixtral(), loader(3), ckpt_path=ckpt)
    assert restored._window is not None
    for key, value in monitor._window.items():
        torch.testing.assert_close(restored._window[key], value)
    assert float(restored._window["routed"].sum()) == 3 * 4 * 16 * 2 * 2  # 3 steps, 2 layers, top-2


def test_a_restored_window_is_counted_once_across_ranks():
    # The file holds rank 0's open window: from one process it resumes on rank 0 only (the closing sum over the
    # ranks would count it once per rank); from several it is only rank 0's share and starts afresh.
    from types import SimpleNamespace

    window = {
        "routed": torch.ones(2, 4),
        "kept": torch.ones(2, 4),
        "scalars": torch.zeros(2, 10),
        "experts": torch.tensor([4, 4]),
    }
    module = tiny_mixtral()
    for saved_world, rank, kept in [(1, 0, True), (1, 1, False), (2, 0, False), (None, 0, False)]:
        monitor = ExpertLoadMonitor(logging_interval=4)
        monitor.load_state_dict({"window": window, "window_world_size": saved_world})
        monitor.on_train_start(SimpleNamespace(world_size=2, global_rank=rank, global_step=3), module)
        assert (monitor._window is not None) == kept, (saved_world, rank)
        assert monitor.state_dict()["window_world_size"] == 2


class _TwoSizes(L.LightningModule):
    """Two MoE layers with 2 and 8 experts; keeps every batch's routed counts."""

    def __init__(self) -> None:
        super().__init__()

        def moe(num_experts: int) -> MoELayer:
            router = RouterConfig(num_experts=num_experts, top_k=1)
            return MoELayer(MoEConfig(dim=8, router=router, experts=ExpertsConfig(hidden_dim=8)))

        self.small, self.large = moe(2), moe(8)
        self.routed: list[list[torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        y, small = self.small(batch)
        y, large = self.large(y + batch)
        self.routed.append([small.tokens_per_expert.double(), large.tokens_per_expert.double()])
        return {"loss": y.pow(2).mean(), "router_stats": [small.detach(), large.detach()]}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def test_layers_with_different_expert_counts_are_measured_over_their_own_experts(tmp_path):
    torch.manual_seed(0)
    model = _TwoSizes()
    monitor = ExpertLoadMonitor(logging_interval=2)
    data = torch.utils.data.DataLoader(torch.randn(8, 16, 8), batch_size=4)
    trainer(tmp_path, [monitor], max_steps=2).fit(model, data)
    metrics = monitor.last_metrics
    for layer, num_experts in enumerate((2, 8)):
        routed = sum(step[layer] for step in model.routed)
        assert routed.numel() == num_experts and routed.sum() == 2 * 4 * 16
        prefix = f"moe/layer_{layer}"
        mean = float(routed.mean())
        assert metrics[f"{prefix}/imbalance"] == pytest.approx(float(routed.max()) / mean, rel=1e-6)
        assert metrics[f"{prefix}/cv"] == pytest.approx(float(np.std(routed.numpy())) / mean, rel=1e-6)
        assert metrics[f"{prefix}/dead_experts"] == float((routed == 0).sum())
        shares = [metrics[f"{prefix}/load/expert_{e}"] for e in range(num_experts)]
        assert shares == pytest.approx((routed / routed.sum()).tolist(), abs=1e-6)
        assert f"{prefix}/load/expert_{num_experts}" not in metrics
        torch.testing.assert_close(monitor.last_load[layer, :num_experts].double(), routed / routed.sum())
    assert monitor.last_load.shape == (2, 8) and monitor.last_load[0, 2:].isnan().all()
    # The heatmap draws the small layer's missing experts as grid grey, its two experts in colour.
    image = load_heatmap(monitor.last_load.numpy(), cell=4)
    assert (image[1:4, 2 * 4 + 1 : 8 * 4] == 128).all()
    assert not (image[1:4, 1:4] == 128).all()
