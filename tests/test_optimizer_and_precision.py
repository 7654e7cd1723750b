"""Optimizer, schedule, precision and non-finite checks of the LightningModule in tiny real Trainer runs.

Each test compares against an independent computation: the schedule's formula by hand, a float32 run, torch's
``clip_grad_norm_`` on the unscaled gradients, an uninterrupted run.
"""

import functools
import math
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_moe.module import CausalLMModule, NonFiniteLossError
from tests._helpers import QUIET, batch_loader, lr_schedule, quiet_trainer, seeded_mixtral

TINY = {"num_layers": 1, "dim": 32, "ffn_hidden": 32}
VOCAB = 1024  # mixtral-tiny's

pytestmark = QUIET
_module = functools.partial(seeded_mixtral, overrides=TINY)


def _batches(n, rows=2, seed=1):
    torch.manual_seed(seed)
    return [torch.randint(0, VOCAB, (rows, 9)) for _ in range(n)]


def _norm(grads):
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


class _Recorder(Callback):
    """Each step's loss, learning rate, gradient norm before clipping and gradients after clipping."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.norms: list[float] = []
        self.clipped: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if outputs is not None:
            self.losses.append(float(outputs["loss"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.norms.append(_norm([p.grad for p in pl_module.parameters() if p.grad is not None]))

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        # Called before each zero_grad: from the second on, with the gradients the last step took (clipped).
        grads = [p.grad.detach().float().clone() for p in pl_module.parameters() if p.grad is not None]
        if grads:
            self.clipped.append(grads)


class _FiniteButLargeGradient(Callback):
    """Sets the embedding's gradient to finite values whose norm (~1.7e5) is past float16's largest, 65504."""

    def __init__(self, poison: float | None = None) -> None:
        self.poison = poison

    def on_after_backward(self, trainer, pl_module) -> None:
        grad = pl_module.model.embed.weight.grad
        grad.zero_()
        grad[0, :] = 30000.0
        if self.poison is not None:
            grad[1, 0] = self.poison


@pytest.mark.parametrize("nan_policy", ["raise", "skip"])
def test_a_float16_gradient_whose_norm_overflows_float16_is_finite_and_applied(nan_policy):
    # Every element is finite: no error naming "a parameter on another rank", no skipped step.
    module = _module(lr=1e-2, warmup_steps=0, nan_policy=nan_policy)
    trainer = quiet_trainer([_FiniteButLargeGradient()], max_steps=1, precision="16-true")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*16-true.*")
        warnings.filterwarnings("error", message=r".*skipping optimizer step.*")
        trainer.fit(module, batch_loader(_batches(1)))
    embed = module.model.embed.weight.detach().float()
    assert torch.isfinite(embed).all()
    # AdamW's first step moves every element with a gradient by about lr against its sign.
    torch.manual_seed(0)
    start = CausalLMModule(arch="mixtral-tiny", overrides=TINY).model.embed.weight.detach().half().float()
    assert (embed[0] - start[0]).max() < -5e-3


def test_a_non_finite_float16_gradient_is_still_refused_by_name():
    module = _module(lr=1e-2, warmup_steps=0)
    trainer = quiet_trainer([_FiniteButLargeGradient(poison=float("inf"))], max_steps=1, precision="16-true")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*16-true.*")
        with pytest.raises(NonFiniteLossError, match=r"non-finite gradient of model\.embed\.weight at step 0"):
            trainer.fit(module, batch_loader(_batches(1)))


def _run(precision, batches, clip=None, **kwargs):
    module = _module(lr=1e-2, warmup_steps=1, **kwargs)
    recorder = _Recorder()
    if precision == "16-mixed-scaler":  # on the CPU "16-mixed" becomes bf16-mixed; a float16 plugin keeps float16
        options = {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**10))]}
    else:
        options = {"precision": precision}
    trainer = quiet_trainer([recorder], max_steps=len(batches), gradient_clip_val=clip, **options)
    trainer.fit(module, batch_loader(batches))
    return module, trainer, recorder


@functools.cache
def _float32_reference() -> _Recorder:
    """The float32 run the other precisions are compared with (3 steps, clipped at 0.5)."""
    return _run("32-true", _batches(3, rows=4), clip=0.5)[2]


def test_float16_loss_scaling_clips_the_unscaled_gradients_with_torchs_norm():
    _, trainer, scaled = _run("16-mixed-scaler", _batches(3, rows=4), clip=0.5)
    reference = _float32_reference()
    assert trainer.precision == "16-mixed" and trainer.precision_plugin.scaler is not None
    assert trainer.optimizers[0].defaults["fused"] is False  # the scaler unscales before the clip
    assert scaled.norms == pytest.approx(reference.norms, rel=2e-3)  # unscaled: the float32 run's norms
    assert min(scaled.norms) > 0.5
    assert len(scaled.clipped) == 2
    for grads in scaled.clipped:
        assert _norm(grads) == pytest.approx(0.5, rel=1e-4)


@pytest.mark.parametrize(
    ("precision", "state_dtype", "rel"),
    [
        ("bf16-mixed", torch.float32, 1e-3),
        ("bf16-true", torch.bfloat16, 1e-3),
        ("16-mixed-scaler", torch.float32, 1e-4),
    ],
)
def test_three_steps_track_float32_with_optimizer_states_in_the_weights_dtype(precision, state_dtype, rel):
    module, trainer, recorder = _run(precision, _batches(3, rows=4), clip=0.5)
    reference = _float32_reference()
    assert all(math.isfinite(loss) for loss in recorder.losses) and len(recorder.losses) == 3
    assert recorder.losses == pytest.approx(reference.losses, rel=rel)
    states = [t for s in trainer.optimizers[0].state.values() for k, t in s.items() if k != "step"]
    assert states and {t.dtype for t in states} == {state_dtype}
    assert {p.dtype for p in module.parameters()} == {state_dtype}


def test_value_clipping_applies_to_the_fused_optimizer_under_bf16_mixed():
    module = _module(lr=1e-2, warmup_steps=1)
    recorder = _Recorder()
    trainer = quiet_trainer(
        [recorder], max_steps=2, precision="bf16-mixed", gradient_clip_val=1e-3, gradient_clip_algorithm="value"
    )
    trainer.fit(module, batch_loader(_batches(2)))
    assert trainer.optimizers[0].defaults["fused"] is True
    assert max(recorder.norms) > 1e-2 and len(recorder.clipped) == 1
    for grads in recorder.clipped:
        assert max(float(g.abs().max()) for g in grads) <= 1e-3 * (1 + 1e-6)
        assert any(float(g.abs().max()) == pytest.approx(1e-3) for g in grads)


@pytest.mark.parametrize(
    ("warmup", "min_ratio"),
    [(0, 0.1), (2, 0.0), (4, 0.1), (6, 0.3), (1, 1.0)],
    ids=["no-warmup", "to-zero", "warmup-equals-steps", "warmup-past-steps", "constant"],
)
def test_each_steps_learning_rate_is_the_schedules_formula(warmup, min_ratio):
    lr, steps = 2e-3, 4
    module = _module(lr=lr, warmup_steps=warmup, min_lr_ratio=min_ratio)
    recorder = _Recorder()
    trainer = quiet_trainer([recorder], max_steps=steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, batch_loader(_batches(steps)))
    hand = [lr_schedule(s, lr, warmup, steps, min_ratio) for s in range(steps)]
    assert recorder.lrs == pytest.approx(hand, rel=1e-12)
    warned = any(f"warmup_steps={warmup} is not below" in str(w.message) for w in caught)
    assert warned == (warmup >= steps)
    if warmup >= steps:
        assert all(a < b for a, b in zip(recorder.lrs, recorder.lrs[1:], strict=False)) and recorder.lrs[-1] < lr
    if warmup == 0:
        assert recorder.lrs[0] == lr


class _StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0:
            trainer.should_stop = True


def test_resume_under_a_gradient_accumulation_scheduler_continues_the_schedule_exactly(tmp_path):
    # 3 batches an epoch; 1 accumulated in epoch 0 (3 steps), then 2 (2 steps, the last takes one batch): 5 steps.
    # Stopped after epoch 0 and resumed, the steps take the rates of the whole run's schedule.
    batches, lr, warmup = _batches(3), 1e-2, 1

    def fit(callbacks, ckpt_path=None):
        recorder = _Recorder()
        accumulation = GradientAccumulationScheduler({0: 1, 1: 2})
        trainer = quiet_trainer(
            [recorder, accumulation, *callbacks], max_epochs=2, enable_checkpointing=bool(callbacks)
        )
        trainer.fit(_module(lr=lr, warmup_steps=warmup, min_lr_ratio=0.2), batch_loader(batches), ckpt_path=ckpt_path)
        return recorder.lrs, trainer.global_step

    first, _ = fit([_StopAfterFirstEpoch(), ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    rest, steps = fit([], ckpt_path=str(tmp_path / "last.ckpt"))
    assert len(first) == 3 and steps == 5
    assert first + rest == pytest.approx([lr_schedule(s, lr, warmup, 5, 0.2) for s in range(5)], rel=1e-12)
