"""Resuming and checkpoint safety: `fit --ckpt_path last` continues exactly; saves are atomic."""

import warnings

import fsspec.implementations.local
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_moe.callbacks import LastCheckpoint
from lightning_moe.data import TextDataModule
from lightning_moe.module import CausalLMModule

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i * i}  # square\n" for i in range(60))


class Crash(Exception):
    pass


class CrashAfter(Callback):
    """Kills the run once ``step`` optimizer steps are done (after the checkpoint at that step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"killed at step {self.step}")


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _data(tmp_path, vocab_size=300):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "corpus.txt").write_text(TEXT)
    return TextDataModule(sources=[str(tmp_path / "corpus.txt")], vocab_size=vocab_size, block_size=16, batch_size=8,
                          val_fraction=0.1, cache_dir=str(tmp_path / "cache"))  # fmt: skip


def _fit(tmp_path, max_steps, ckpt_path=None, every=None, crash_after=None, checkpoint=ModelCheckpoint, callbacks=()):
    torch.manual_seed(0)
    recorder = LossRecorder()
    callbacks = [recorder, *callbacks] + ([CrashAfter(crash_after)] if crash_after else [])
    if every:
        callbacks.append(checkpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=every))
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks,
                        default_root_dir=tmp_path)  # fmt: skip
    module = CausalLMModule(arch="mixtral-tiny", overrides={"dim": 32, "ffn_hidden": 32}, warmup_steps=3)
    trainer.fit(module, _data(tmp_path), ckpt_path=ckpt_path)
    return trainer, recorder.losses


def test_resume_from_last_repeats_the_uninterrupted_losses(tmp_path):
    data = _data(tmp_path)
    data.setup("fit")
    batches_per_epoch = len(data.train_set) // data.batch_size
    total = 2 * batches_per_epoch + 3  # the resumed part crosses an epoch boundary
    stop = batches_per_epoch - 2  # interrupt mid-epoch
    _, uninterrupted = _fit(tmp_path / "a", total)
    with pytest.raises(Crash):
        _fit(tmp_path / "b", total, every=stop, crash_after=stop)
    last = tmp_path / "b" / "ckpt" / "last.ckpt"
    assert last.is_file()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, resumed = _fit(tmp_path / "b", total, ckpt_path=str(last))
    assert len(resumed) == total - stop
    assert resumed == uninterrupted[stop:]
    # The loader resumes mid-epoch exactly, and says so: no "dataloader is not resumable" warning.
    assert not [w for w in caught if "not resumable" in str(w.message)]


def _batches_per_epoch(tmp_path):
    data = _data(tmp_path)
    data.setup("fit")
    return len(data.train_set) // data.batch_size


def test_last_checkpoint_saves_the_final_step_between_periodic_saves(tmp_path):
    # Lightning's ModelCheckpoint skips its end-of-training save once any last.ckpt was written: the steps after
    # the last periodic save were lost.
    _fit(tmp_path / "plain", 6, every=4)
    assert torch.load(tmp_path / "plain" / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 4
    _fit(tmp_path / "ours", 6, every=4, checkpoint=LastCheckpoint)
    assert torch.load(tmp_path / "ours" / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 6
    # A second run of the same settings rewrites last.ckpt (no last-v1.ckpt beside it).
    _fit(tmp_path / "ours", 5, every=4, checkpoint=LastCheckpoint)
    assert sorted(p.name for p in (tmp_path / "ours" / "ckpt").iterdir()) == ["last.ckpt"]
    assert torch.load(tmp_path / "ours" / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 5


class BatchRecorder(Callback):
    """Each training batch's tensor and the learning rate it trains with."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch.clone())
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("where", ["mid-epoch", "epoch end"])
def test_extending_a_finished_run_continues_its_data_and_takes_the_new_schedule(tmp_path, where):
    # A run that ends at max_steps is saved with its epoch counted as finished; extended with a larger max_steps
    # it must still see the rest of that epoch's batches first, in the uninterrupted run's order (it used to
    # start the next epoch's permutation). Its weights differ from the uninterrupted run's (the cosine schedule
    # ran to the smaller max_steps), but from the first resumed step on it trains at the new schedule's rates.
    batches_per_epoch = _batches_per_epoch(tmp_path)
    stop = 3 if where == "mid-epoch" else batches_per_epoch
    total = batches_per_epoch + 5
    uninterrupted = BatchRecorder()
    _fit(tmp_path / "a", total, callbacks=[uninterrupted])
    _fit(tmp_path / "b", stop, every=1000, checkpoint=LastCheckpoint)
    resumed = BatchRecorder()
    _fit(tmp_path / "b", total, every=1000, checkpoint=LastCheckpoint, callbacks=[resumed],
         ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))  # fmt: skip
    assert len(resumed.batches) == total - stop
    assert all(torch.equal(a, b) for a, b in zip(resumed.batches, uninterrupted.batches[stop:], strict=True))
    assert resumed.lrs == pytest.approx(uninterrupted.lrs[stop:], rel=1e-12)


def test_resuming_from_a_checkpoint_at_an_epoch_boundary_repeats_the_uninterrupted_losses(tmp_path):
    batches_per_epoch = _batches_per_epoch(tmp_path)
    total = batches_per_epoch + 4
    _, uninterrupted = _fit(tmp_path / "a", total)
    with pytest.raises(Crash):
        _fit(tmp_path / "b", total, every=batches_per_epoch, crash_after=batches_per_epoch)
    _, resumed = _fit(tmp_path / "b", total, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert resumed == uninterrupted[batches_per_epoch:]


def test_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    trainer, _ = _fit(tmp_path, 2)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    before = torch.load(path, weights_only=False)["state_dict"]

    original_write = fsspec.implementations.local.LocalFileOpener.write

    def write_half_then_die(self, data):
        original_write(self, data[: len(data) // 2])
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(fsspec.implementations.local.LocalFileOpener, "write", write_half_then_die)
    with torch.no_grad():
        for p in trainer.lightning_module.parameters():
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(path)
    monkeypatch.undo()
    after = torch.load(path, weights_only=False)["state_dict"]
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert CausalLMModule.load_from_checkpoint(path) is not None


def test_data_with_another_tokenizer_is_refused_on_resume_and_validate(tmp_path):
    _fit(tmp_path, 2, every=1)
    last = str(tmp_path / "ckpt" / "last.ckpt")
    module = CausalLMModule(arch="mixtral-tiny", overrides={"dim": 32, "ffn_hidden": 32}, warmup_steps=3)
    options = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                   limit_val_batches=1, num_sanity_val_steps=0)  # fmt: skip
    match = r"the data's tokenizer differs from the checkpoint's.*'vocab_size': \(300, 280\)"
    with pytest.raises(ValueError, match=match):
        L.Trainer(max_steps=3, **options).fit(module, _data(tmp_path, vocab_size=280), ckpt_path=last)
    with pytest.raises(ValueError, match=match):
        L.Trainer(**options).validate(module, _data(tmp_path, vocab_size=280), ckpt_path=last)
    # The same data settings pass.
    assert L.Trainer(**options).validate(module, _data(tmp_path), ckpt_path=last)[0]["val/loss"] > 0


def test_a_checkpoint_of_another_network_is_refused_by_name(tmp_path):
    # `--ckpt_path last` takes the network from the command line: a different one gets an error naming the field,
    # not a size mismatch from deep inside load_state_dict.
    _fit(tmp_path, 1, every=1)
    other = CausalLMModule(arch="mixtral-tiny", overrides={"dim": 32, "ffn_hidden": 32, "num_experts": 4})
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, limit_val_batches=0)  # fmt: skip
    with pytest.raises(ValueError, match=r"overrides=\{.*'num_experts': 4\} is invalid for this checkpoint, which"):
        trainer.fit(other, _data(tmp_path), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
