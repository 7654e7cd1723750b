"""Failure safety of checkpoints: a resume continues the uninterrupted run exactly, a broken `last` is named."""

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_moe.callbacks import LastCheckpoint
from lightning_moe.cli import run_cli
from lightning_moe.data import TextDataModule
from lightning_moe.module import CausalLMModule

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i * i}  # square\n" for i in range(60))
CONFIG = str(Path(__file__).resolve().parents[1] / "configs/mixtral-tiny.yaml")


class Crash(Exception):
    pass


class CrashAtBatch(Callback):
    """Kills the run at the start of its ``batch``-th micro-batch (counted from 0 in this run)."""

    def __init__(self, batch: int) -> None:
        self.batch, self.seen = batch, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen == self.batch:
            raise Crash(f"killed at micro-batch {self.batch} of this run (step {trainer.global_step})")
        self.seen += 1


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _data(tmp_path: Path) -> TextDataModule:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "corpus.txt").write_text(TEXT)
    return TextDataModule(sources=[str(tmp_path / "corpus.txt")], vocab_size=300, block_size=16, batch_size=4,
                          val_fraction=0.1, cache_dir=str(tmp_path / "cache"))  # fmt: skip


def _fit(tmp_path: Path, max_steps: int, *, crash_at: int | None = None, checkpoint: LastCheckpoint | None = None,
         ckpt_path: str | None = None, **trainer_args) -> tuple[list[float], dict[str, torch.Tensor]]:  # fmt: skip
    """Train mixtral-tiny (shrunk) with two micro-batches per step; the losses of each micro-batch and the weights."""
    torch.manual_seed(0)
    recorder = LossRecorder()
    callbacks = [recorder] + ([checkpoint] if checkpoint else []) + ([CrashAtBatch(crash_at)] if crash_at else [])
    options = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   limit_val_batches=0, num_sanity_val_steps=0, accumulate_grad_batches=2)  # fmt: skip
    trainer = L.Trainer(max_steps=max_steps, callbacks=callbacks, enable_checkpointing=checkpoint is not None,
                        default_root_dir=tmp_path, **{**options, **trainer_args})  # fmt: skip
    module = CausalLMModule(arch="mixtral-tiny", overrides={"dim": 32, "ffn_hidden": 32, "num_layers": 1},
                            warmup_steps=1)  # fmt: skip
    trainer.fit(module, _data(tmp_path), ckpt_path=ckpt_path)
    return recorder.losses, {k: v.clone() for k, v in module.state_dict().items()}


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_a_run_killed_right_after_a_resume_under_gradient_accumulation_resumes_exactly(tmp_path):
    # After a resume at step 1, Lightning's ModelCheckpoint rewrote last.ckpt at the end of the first micro-batch
    # (the restored step count is a multiple of every_n_train_steps and had not been saved in this run): a
    # checkpoint between the micro-batches of step 2, without their gradients. Killed there and resumed, step 2
    # trained on its second micro-batch only, and every later weight differed from the uninterrupted run's.
    def checkpoint():
        return LastCheckpoint(dirpath=tmp_path / "b" / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)

    uninterrupted, weights = _fit(tmp_path / "a", 2)
    assert len(uninterrupted) == 4
    with pytest.raises(Crash):
        _fit(tmp_path / "b", 2, crash_at=2, checkpoint=checkpoint())  # last.ckpt at step 1, killed in step 2
    with pytest.raises(Crash):
        _fit(tmp_path / "b", 2, crash_at=1, checkpoint=checkpoint(), ckpt_path="last")  # killed between micro-batches
    resumed, resumed_weights = _fit(tmp_path / "b", 2, checkpoint=checkpoint(), ckpt_path="last")
    assert resumed == uninterrupted[2:]
    _assert_same_weights(resumed_weights, weights)


def test_a_validation_between_micro_batches_leaves_last_ckpt_at_a_whole_step(tmp_path):
    # val_check_interval counts micro-batches: validations after the 3rd and the 9th fall inside steps 2 and 5, and
    # the checkpoints they wrote (the default every_n_epochs=1 saves at every validation) resumed without that
    # micro-batch's gradient. Only the validation after the 6th, at the end of step 3, may save.
    def checkpoint():
        return LastCheckpoint(dirpath=tmp_path / "b" / "ckpt", save_last=True, save_top_k=1)

    validating = dict(limit_val_batches=1, val_check_interval=3)
    uninterrupted, weights = _fit(tmp_path / "a", 5, **validating)
    with pytest.raises(Crash):
        _fit(tmp_path / "b", 5, crash_at=9, checkpoint=checkpoint(), **validating)  # killed after micro-batch 9
    saved = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=False)["global_step"]
    resumed, resumed_weights = _fit(tmp_path / "b", 5, checkpoint=checkpoint(), ckpt_path="last", **validating)
    assert resumed == uninterrupted[2 * saved :]
    _assert_same_weights(resumed_weights, weights)
    assert saved == 3


class Forbidden(Exception):
    pass


def _forbid(*args, **kwargs):
    raise Forbidden("the run went past its checks")


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_a_cut_last_checkpoint_is_refused_by_name_before_tokenizing(tmp_path, monkeypatch, subcommand):
    # `--ckpt_path FILE` with a cut file was refused by name before any work; `--ckpt_path last` finding one went on
    # to tokenize the corpus and failed in Lightning's loader with a zip error that named no file.
    monkeypatch.setenv("LIGHTNING_MOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(TextDataModule, "prepare_data", _forbid)
    good = tmp_path / "good.ckpt"
    torch.save({"pytorch-lightning_version": "2.6", "state_dict": {"w": torch.zeros(1000)}}, good)
    last = tmp_path / "lightning_logs" / "mixtral-tiny" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ValueError, match=rf"ckpt_path='{last}' is invalid: not a readable checkpoint"):
        run_cli([subcommand, "--config", CONFIG, "--data.max_bytes", "300000", "--ckpt_path", "last"])
    # A whole checkpoint passes the check (and the run goes on to its data).
    last.write_bytes(good.read_bytes())
    with pytest.raises(Forbidden):
        run_cli([subcommand, "--config", CONFIG, "--data.max_bytes", "300000", "--ckpt_path", "last"])


def test_a_failed_sharded_save_after_an_interrupted_swap_keeps_the_newest_checkpoint(tmp_path, monkeypatch):
    # A sharded save killed between its two renames leaves the previous folder (.last.ckpt.old) and the new complete
    # one (.last.ckpt.tmp), which `--ckpt_path last` resumes from. The resumed run's first save cleared that staging
    # folder before writing: failing halfway, it left only the older checkpoint to resume from.
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_moe.strategies import ExpertParallelStrategy
    from lightning_moe.strategies.checkpoint import interrupted_swap, previous_path, staging_path

    last = tmp_path / "last.ckpt"
    for folder, step in ((previous_path(last), 1), (staging_path(last), 2)):
        folder.mkdir()
        (folder / ".metadata").write_bytes(b"")  # what DCP writes once every rank's shards are written
        (folder / "step").write_text(str(step))
    assert interrupted_swap(last) == staging_path(last)

    def write_half_then_fail(self, checkpoint, filepath, storage_options=None):
        Path(filepath).mkdir()
        (Path(filepath) / "__0_0.distcp").write_bytes(b"half a shard")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ModelParallelStrategy, "save_checkpoint", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        ExpertParallelStrategy().save_checkpoint({"global_step": 3}, last)
    resumable = interrupted_swap(last) or last
    assert (resumable / "step").read_text() == "2"
