from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_moe.callbacks import ExpertCollapseDetector
from lightning_moe.module import CausalLMModule
from lightning_moe.nn import ExpertsConfig, MoEConfig, MoELayer, RouterConfig
from tests.callbacks._helpers import StatsRecorder, loader, read_events, scalars, skew_routers, tiny_mixtral, trainer

E = 8
STARVED = [2, 3, 4, 5]  # the middle coefficients of the skewed router


def collapsed_model():
    torch.manual_seed(0)
    module = tiny_mixtral(lr=1e-4)
    skew_routers(module)
    return module


def test_warn_fires_within_patience_and_names_layer_expert_and_step(tmp_path):
    detector = ExpertCollapseDetector(action="warn", patience=3, max_share=None)
    with pytest.warns(UserWarning, match=r"starving collapse in MoE layer 0 .*experts \[2, 3, 4, 5\], at step 3"):
        trainer(tmp_path, [detector], max_steps=4).fit(collapsed_model(), loader(4))
    first = [e for e in detector.events if e["layer"] == 0][0]
    assert first == {
        "step": 3, "layer": 0, "name": "model.layers.0.ffn", "experts": STARVED, "reason": "starving", "action": "warn",
    }  # fmt: skip
    assert {e["layer"] for e in detector.events if e["step"] == 3} == {0, 1}
    assert scalars(read_events(tmp_path), "collapse/events")[3] == 2.0


def test_stop_ends_training_at_the_end_of_the_patience_window(tmp_path):
    detector = ExpertCollapseDetector(action="stop", patience=2, max_share=None)
    fit = trainer(tmp_path, [detector], max_steps=10)
    with pytest.warns(UserWarning, match="action: stop"):
        fit.fit(collapsed_model(), loader(10))
    assert fit.global_step == 2


def test_dominant_expert_and_low_entropy_are_detected(tmp_path):
    torch.manual_seed(0)
    module = tiny_mixtral(lr=1e-4, top_k=1)
    skew_routers(module, coefs=(50.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -50.0))  # expert 0 or 7, confidently
    detector = ExpertCollapseDetector(action="warn", patience=2, min_load=0.0, max_share=0.3, min_entropy=0.5)
    with pytest.warns(UserWarning, match="collapse"):
        trainer(tmp_path, [detector], max_steps=2).fit(module, loader(2))
    reasons = {(e["reason"], e["layer"]) for e in detector.events}
    assert reasons == {("dominant", 0), ("dominant", 1), ("low_entropy", 0), ("low_entropy", 1)}


def test_revived_experts_receive_tokens_again(tmp_path):
    recorder = StatsRecorder()
    detector = ExpertCollapseDetector(action="revive", patience=3, max_share=None, noise=0.05)
    with pytest.warns(UserWarning, match="action: revive"):
        trainer(tmp_path, [recorder, detector], max_steps=8).fit(collapsed_model(), loader(8))
    first = {(e["layer"], tuple(e["experts"])) for e in detector.events if e["step"] == 3}
    assert first == {(0, tuple(STARVED)), (1, tuple(STARVED))}
    for layer in range(2):
        before = recorder.routed(layer, E, range(1, 4))  # steps 1..3, the patience window
        after = recorder.routed(layer, E, range(4, 9))
        assert before[STARVED].sum() == 0
        assert (after[STARVED] > 0).all(), after


def test_revive_copies_the_donor_and_zeroes_the_touched_optimizer_state():
    module = tiny_mixtral()
    layer = module.moe_layers[0][1]
    params = list(layer.parameters())
    optimizer = torch.optim.AdamW(params)
    layer(torch.randn(2, 4, 32))[0].sum().backward()
    optimizer.step()
    detector = ExpertCollapseDetector(action="revive", noise=0.0)
    detector._revive(SimpleNamespace(optimizers=[optimizer]), layer, index=0, expert=3, donor=1, step=7)
    torch.testing.assert_close(layer.experts.w1[3], layer.experts.w1[1])
    torch.testing.assert_close(layer.router.gate.weight[3], layer.router.gate.weight[1])
    for param in (layer.experts.w1, layer.experts.w2, layer.experts.w3, layer.router.gate.weight):
        state = optimizer.state[param]
        assert torch.all(state["exp_avg"][3] == 0) and torch.all(state["exp_avg_sq"][3] == 0)
        assert torch.any(state["exp_avg"][1] != 0)


def test_state_survives_a_checkpoint_round_trip(tmp_path):
    detector = ExpertCollapseDetector(action="warn", patience=5, max_share=None)
    with pytest.warns(UserWarning):
        trainer(tmp_path, [detector], max_steps=6, enable_checkpointing=True, default_root_dir=tmp_path).fit(
            collapsed_model(), loader(6)
        )
    ckpt = next((tmp_path / "tb" / "version_0" / "checkpoints").glob("*.ckpt"))
    restored = ExpertCollapseDetector(action="warn", patience=5, max_share=None)
    trainer(tmp_path / "again", [restored], max_steps=6).fit(collapsed_model(), loader(6), ckpt_path=ckpt)
    assert restored.events == detector.events and restored.events
    assert [s.tolist() for s in restored._starving] == [s.tolist() for s in detector._starving]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"action": "explode"}, r"action='explode' is invalid: must be one of 'warn', 'stop', 'revive'"),
        ({"patience": 0}, "patience=0 is invalid"),
        ({"min_load": 1.5}, r"min_load=1.5 is invalid"),
        ({"max_share": 0.0}, r"max_share=0.0 is invalid"),
        ({"min_entropy": 1.0}, r"min_entropy=1.0 is invalid"),
        ({"noise": -1.0}, r"noise=-1.0 is invalid"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExpertCollapseDetector(**kwargs)


def test_watching_a_model_without_moe_layers_warns(tmp_path):
    from lightning_moe.callbacks import ExpertLoadMonitor

    dense = tiny_mixtral(dense="active")
    with pytest.warns(UserWarning) as record:
        trainer(tmp_path, [ExpertCollapseDetector(), ExpertLoadMonitor()], max_steps=1).fit(dense, loader(1))
    messages = [str(w.message) for w in record]
    assert any("ExpertCollapseDetector: the model has no MoE layer" in m for m in messages)
    assert any("ExpertLoadMonitor: the model has no MoE layer" in m for m in messages)


class _ExpertChoiceModel(L.LightningModule):
    """One expert-choice MoE layer: every expert takes exactly its capacity of tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.moe = MoELayer(
            MoEConfig(
                dim=8,
                router=RouterConfig(num_experts=4, top_k=2, kind="expert_choice"),
                experts=ExpertsConfig(hidden_dim=8),
                expert_capacity=1,  # 1 of 16 tokens per expert: below any per-token load threshold
            )
        )

    def training_step(self, batch, batch_idx):
        y, stats = self.moe(batch)
        return {"loss": y.pow(2).mean(), "router_stats": [stats.detach()]}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("action", ["warn", "revive"])
def test_expert_choice_loads_are_never_a_collapse(tmp_path, action):
    # Expert choice fills every expert to its capacity, so a small capacity is not starvation (it used to flag
    # every expert, and "revive" then found no donor and divided by zero).
    torch.manual_seed(0)
    model = _ExpertChoiceModel()
    detector = ExpertCollapseDetector(action=action, patience=2)
    data = DataLoader(torch.randn(16, 16, 8), batch_size=4)
    trainer(tmp_path, [detector], max_steps=4).fit(model, data)
    assert detector.events == []
    assert [s.tolist() for s in detector._starving] == [[0, 0, 0, 0]]


class _SkipsFirstStep(CausalLMModule):
    """Skips both micro-batches of the first optimizer step (what ``nan_policy="skip"`` does on a bad batch)."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        return None if batch_idx in (0, 1) else out


def test_after_a_skipped_step_each_optimizer_step_is_checked_once_with_all_its_micro_batches():
    torch.manual_seed(0)
    base = tiny_mixtral(lr=1e-4)
    module = _SkipsFirstStep(arch="mixtral-tiny", overrides=dict(base.hparams.overrides), lr=1e-4, warmup_steps=0,
                             load_balance_coef=0.0, z_loss_coef=0.0)  # fmt: skip
    skew_routers(module)
    detector = ExpertCollapseDetector(action="warn", patience=3, max_share=None)
    checks = []
    check = detector._check
    detector._check = lambda tr, pl_module, routed, tokens: (
        checks.append(int(tokens[0, 0])),
        check(tr, pl_module, routed, tokens),
    )
    L.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, callbacks=[detector], enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accumulate_grad_batches=2,
              enable_checkpointing=False).fit(module, loader(8))  # fmt: skip
    rows, seq = next(iter(loader(8)))[:, :-1].shape  # inputs: all but the last token
    assert checks == [2 * rows * seq] * 3  # steps 2, 3 and 4, two micro-batches each
    # Starving from step 2 on, patience 3: nothing before step 4 (it fired at step 3 when step 2 counted twice).
    assert all(event["step"] >= 4 for event in detector.events)
