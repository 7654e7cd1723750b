"""The training loop of the LightningModules against independent computations on tiny models.

A hand-written AdamW loop, one batch of twice the size, the schedule's formula, token-weighted means; and the
``lightning-moe`` subcommands' argument checks before any work.
"""

import copy
import functools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_moe.module import CausalLMModule, Seq2SeqLMModule
from tests._helpers import QUIET, batch_loader, lr_schedule, quiet_trainer, seeded_mixtral

TINY = {"num_layers": 2, "dim": 32, "ffn_hidden": 32}
VOCAB = 1024  # mixtral-tiny's
SWITCH_TINY = {"num_layers": 2, "dim": 32, "ffn_hidden": 32, "num_heads": 2}


pytestmark = QUIET
_module = functools.partial(seeded_mixtral, overrides=TINY)


def _trainer(max_steps=-1, callbacks=(), **kwargs):
    return quiet_trainer(callbacks, max_steps=max_steps, **kwargs)


class _StepRecorder(Callback):
    """The learning rate and the global gradient norm each optimizer step took (before clipping)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_trainer_steps_match_a_hand_written_adamw_loop_with_clipping(precision):
    # Same model, same batches: torch.optim.AdamW with decay on the matrices only (not embeddings, not norms),
    # the schedule's formula, and clip_grad_norm_ over every parameter (the clip changes every step here).
    lr, warmup, steps, clip = 1e-2, 2, 4, 0.3
    torch.manual_seed(1)
    batches = [torch.randint(0, VOCAB, (4, 9)) for _ in range(steps)]
    module = _module(lr=lr, warmup_steps=warmup, weight_decay=0.1, betas=(0.8, 0.9), min_lr_ratio=0.2)
    reference = copy.deepcopy(module.model)
    recorder = _StepRecorder()
    trainer = _trainer(steps, [recorder], precision=precision, gradient_clip_val=clip)
    trainer.fit(module, batch_loader(batches))
    assert trainer.optimizers[0].defaults["fused"] is True  # the module clips the fused optimizer itself

    matrices = [p for n, p in reference.named_parameters() if p.dim() >= 2 and n != "embed.weight"]
    others = [p for n, p in reference.named_parameters() if not (p.dim() >= 2 and n != "embed.weight")]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}], lr=lr, betas=(0.8, 0.9)
    )
    coef = module.coefs["load_balance"]
    hand_lrs, hand_norms = [], []
    for step, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule(step, lr, warmup, steps, 0.2)
        hand_lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            out = reference(batch[:, :-1], targets=batch[:, 1:])
            loss = out.loss + coef * sum(s.losses["load_balance"] for s in out.router_stats)
        loss.backward()
        hand_norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)))
        optimizer.step()
    assert recorder.lrs == pytest.approx(hand_lrs, rel=1e-12)
    assert min(hand_norms) > clip
    assert recorder.norms == pytest.approx(hand_norms, rel=1e-5)
    atol = 2e-6 if precision == "32-true" else 1e-4  # bf16: a few elements whose tiny gradients round otherwise
    for (name, mine), theirs in zip(module.model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, atol=atol, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_gradient_accumulation_equals_one_batch_of_twice_the_size():
    # Cross-entropy, z-loss and the sequence-wise balance loss are means over tokens and sequences: two
    # accumulated half batches give the update of the whole batch. (The load-balancing loss is a product of two
    # means per micro-batch, so it is switched off here: per micro-batch it cannot equal the whole batch's.)
    torch.manual_seed(2)
    whole = [torch.randint(0, VOCAB, (8, 9)) for _ in range(3)]
    halves = [half for batch in whole for half in (batch[:4], batch[4:])]
    args = dict(lr=1e-2, warmup_steps=1, load_balance_coef=0.0, z_loss_coef=0.01, seq_balance_coef=0.05)
    one, two = _module(**args), _module(**args)
    rec_one, rec_two = _StepRecorder(), _StepRecorder()
    _trainer(3, [rec_one], gradient_clip_val=0.5).fit(one, batch_loader(whole))
    _trainer(3, [rec_two], gradient_clip_val=0.5, accumulate_grad_batches=2).fit(two, batch_loader(halves))
    assert rec_two.lrs == rec_one.lrs and len(rec_one.lrs) == 3
    assert rec_two.norms == pytest.approx(rec_one.norms, rel=1e-4)
    for (name, a), b in zip(one.model.named_parameters(), two.model.parameters(), strict=True):
        # AdamW divides by the root of the squared-gradient average, so an embedding row whose gradient is nearly
        # zero turns the rounding of the two summation orders into lr-sized relative noise (2.7e-5 on one of
        # this CPU's entries): hence 5e-5, still 200x below one step's update of lr = 1e-2.
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, msg=name)


def test_schedule_with_max_epochs_and_accumulation_follows_the_formula():
    # 5 batches an epoch, 2 accumulated: 3 optimizer steps an epoch (the last takes one batch), 6 in 2 epochs.
    torch.manual_seed(3)
    batches = [torch.randint(0, VOCAB, (2, 5)) for _ in range(5)]
    lr, warmup = 1e-3, 2
    module = _module(lr=lr, warmup_steps=warmup, min_lr_ratio=0.3, overrides={**TINY, "num_layers": 1})
    recorder = _StepRecorder()
    trainer = _trainer(callbacks=[recorder], max_epochs=2, accumulate_grad_batches=2)
    trainer.fit(module, batch_loader(batches))
    assert trainer.global_step == 6
    assert recorder.lrs == pytest.approx([lr_schedule(s, lr, warmup, 6, 0.3) for s in range(6)], rel=1e-12)


def test_optimizer_changes_no_decay_parameter_and_no_score_bias_by_decay_alone():
    # With every gradient zero, AdamW's step is the decay alone: matrices shrink by lr * weight_decay; norms,
    # embeddings, and DeepSeek's score-correction bias (a buffer the bias rule owns) stay as they were.
    torch.manual_seed(0)
    module = CausalLMModule(arch="deepseek-tiny", lr=0.5, weight_decay=0.2)
    with torch.no_grad():
        for _, layer in module.moe_layers:
            layer.router.score_bias.uniform_(-1, 1)
    before = {n: t.clone() for n, t in module.model.state_dict().items()}
    optimizer = module.configure_optimizers()["optimizer"]
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    step_lr = optimizer.param_groups[0]["lr"]  # the schedule's first rate
    assert step_lr == pytest.approx(0.5 / (module.hparams.warmup_steps + 1))
    optimizer.step()
    after = module.model.state_dict()
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    shrunk = 0
    for name, param in module.model.named_parameters():
        if param.dim() >= 2 and "embed" not in name:
            assert id(param) in decayed, name
            torch.testing.assert_close(after[name], before[name] * (1 - step_lr * 0.2), msg=name)
            shrunk += 1
        else:
            torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)
    assert shrunk > 0
    biases = [n for n in before if n.endswith("score_bias")]
    assert biases and all(torch.equal(after[n], before[n]) for n in biases)


def test_validation_loss_is_the_token_mean_over_batches_of_different_sizes():
    torch.manual_seed(4)
    batches = [torch.randint(0, VOCAB, (3, 17)), torch.randint(0, VOCAB, (1, 17))]
    module = _module()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(module, batch_loader(batches), verbose=False)
    (tested,) = trainer.test(module, batch_loader(batches), verbose=False)

    def cross_entropy(rows):
        with torch.no_grad():
            logits = module.model(rows[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), rows[:, 1:].reshape(-1))

    expected = cross_entropy(torch.cat(batches))
    mean_of_batches = sum(cross_entropy(b) for b in batches) / len(batches)
    assert abs(float(mean_of_batches) - float(expected)) > 1e-4  # the two means differ on these batches
    assert metrics["val/loss"] == pytest.approx(float(expected), rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(math.exp(float(expected)), rel=1e-5)
    assert tested["test/loss"] == pytest.approx(float(expected), rel=1e-5)
    assert tested["test/ppl"] == pytest.approx(math.exp(float(expected)), rel=1e-5)


def test_predict_continues_a_prompt_up_to_the_models_max_seq_len():
    # `predict` continues half of each block; with a block as long as max_seq_len < 64 the 32 new tokens would
    # run past the model's positions: the continuation stops at max_seq_len instead of failing mid-predict.
    module = _module(overrides={**TINY, "num_layers": 1, "max_seq_len": 40})
    prompts = torch.randint(0, VOCAB, (2, 20))
    out = module.predict_step(prompts, 0)
    assert out.shape == (2, 40)
    assert torch.equal(out, module.generate(prompts, max_new_tokens=20))
    short = torch.randint(0, VOCAB, (2, 5))
    assert module.predict_step(short, 0).shape == (2, 5 + 32)


def test_an_upcycled_seq2seq_checkpoint_loads_without_its_dense_checkpoint(tmp_path):
    # The upcycled run's hyperparameters describe the model (arch, overrides, the completed upcycle arguments);
    # upcycle_from is not kept, so the dense checkpoint may be gone when the upcycled one is loaded.
    torch.manual_seed(0)
    dense = Seq2SeqLMModule(arch="switch-tiny", overrides={"dense": "active", **SWITCH_TINY})
    trainer = _trainer()
    trainer.strategy.connect(dense)
    trainer.save_checkpoint(tmp_path / "dense.ckpt")
    upcycled = Seq2SeqLMModule(upcycle_from=str(tmp_path / "dense.ckpt"), upcycle={"num_experts": 4, "top_k": 1})
    assert "upcycle_from" not in upcycled.hparams
    assert upcycled.hparams.arch == "switch-tiny" and upcycled.hparams.overrides == dense.hparams.overrides
    assert upcycled.hparams.upcycle == {
        "num_experts": 4,
        "top_k": 1,
        "noise_std": 0.0,
        "split_hidden": False,
        "zero_router": False,
    }  # as CausalLMModule keeps it: every argument of zoo.upcycle
    assert upcycled.hparams.noise_density == 0.15
    trainer.strategy.connect(upcycled)
    trainer.save_checkpoint(tmp_path / "upcycled.ckpt")
    (tmp_path / "dense.ckpt").unlink()
    loaded = Seq2SeqLMModule.load_from_checkpoint(tmp_path / "upcycled.ckpt")
    inputs, decoder = torch.randint(0, 900, (2, 11)), torch.randint(0, 900, (2, 5))
    upcycled.eval(), loaded.eval()  # no router jitter
    torch.testing.assert_close(loaded(inputs, decoder).logits, upcycled(inputs, decoder).logits)


def test_upcycling_a_dense_switch_checkpoint_defaults_to_top_1(tmp_path):
    # README: upcycle's num_experts and top_k default to the preset's; Switch routes each token to one expert.
    dense = Seq2SeqLMModule(arch="switch-tiny", overrides={"dense": "active", **SWITCH_TINY})
    trainer = _trainer()
    trainer.strategy.connect(dense)
    trainer.save_checkpoint(tmp_path / "dense.ckpt")
    upcycled = Seq2SeqLMModule(upcycle_from=str(tmp_path / "dense.ckpt"))
    assert upcycled.hparams.upcycle["top_k"] == 1
    assert upcycled.hparams.upcycle["num_experts"] == upcycled.config.num_experts
    assert [layer.router.config.top_k for _, layer in upcycled.moe_layers] == [1, 1]


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_a_missing_ckpt_path_is_refused_before_tokenizing(tmp_path, monkeypatch, subcommand):
    from lightning_moe.cli import run_cli
    from lightning_moe.data import TextDataModule

    def forbid(*args, **kwargs):
        raise AssertionError("the run went past its checks")

    monkeypatch.setattr(TextDataModule, "prepare_data", forbid)
    monkeypatch.setattr(TextDataModule, "setup", forbid)
    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).resolve().parents[1] / "configs/mixtral-tiny.yaml")
    missing = str(tmp_path / "nope.ckpt")
    with pytest.raises(ValueError, match=rf"ckpt_path='{missing}' is invalid: no such file or checkpoint directory"):
        run_cli([subcommand, "--config", config, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", missing])
