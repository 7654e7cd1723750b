"""`fit --ckpt_path` under ExpertParallelStrategy continues exactly: every rank sees the batches it would have."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_moe.data import TextDataModule
from lightning_moe.module import CausalLMModule
from lightning_moe.strategies import ExpertParallelStrategy
from tests.strategies._distributed import run_distributed

pytestmark = pytest.mark.multiprocess

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i * i}  # square\n" for i in range(60))


class _Crash(Exception):
    pass


class _CrashAfter(pl.Callback):
    """Kills the run on every rank once ``step`` optimizer steps are done (after the checkpoint at that step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise _Crash(f"killed at step {self.step}")


class _Recorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.first_tokens: list[list[int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.first_tokens.append(batch[:, 0].tolist())


def _data(root: Path) -> TextDataModule:
    return TextDataModule(sources=[str(root / "corpus.txt")], vocab_size=300, block_size=16, batch_size=4,
                          val_fraction=0.1, cache_dir=str(root / "cache"))  # fmt: skip


def _fit(root: Path, world: int, max_steps: int, ckpt_path: str | None = None, crash_after: int | None = None):
    torch.manual_seed(0)
    recorder = _Recorder()
    callbacks: list[pl.Callback] = [recorder]
    if crash_after:
        callbacks += [
            _CrashAfter(crash_after),
            ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=crash_after),
        ]
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=world,
                         strategy=ExpertParallelStrategy(expert_parallel_size=world), logger=False,
                         enable_checkpointing=bool(crash_after), enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks,
                         default_root_dir=root)  # fmt: skip
    module = CausalLMModule(arch="mixtral-tiny", overrides={"dim": 32, "ffn_hidden": 32}, warmup_steps=3)
    trainer.fit(module, _data(root), ckpt_path=ckpt_path)
    return trainer, recorder


def _resume_repeats_the_uninterrupted_batches(rank: int, world: int, root: str) -> None:
    root_path = Path(root)
    data = _data(root_path)
    data.prepare_data()
    data.setup("fit")
    batches_per_epoch = len(data.train_set) // (data.batch_size * world)
    total = 2 * batches_per_epoch + 3  # the resumed part crosses an epoch boundary
    stop = batches_per_epoch - 2  # interrupted mid-epoch
    _, uninterrupted = _fit(root_path, world, total)
    assert len(uninterrupted.losses) == total
    with pytest.raises(_Crash):
        _fit(root_path, world, total, crash_after=stop)
    ckpt = root_path / "ckpt" / "last.ckpt"
    assert ckpt.exists()
    _, resumed = _fit(root_path, world, total, ckpt_path=str(ckpt))
    print(
        "DBG",
        rank,
        stop,
        batches_per_epoch,
        len(uninterrupted.first_tokens),
        len(resumed.first_tokens),
        uninterrupted.first_tokens[stop - 1 : stop + 3],
        resumed.first_tokens[:3],
        flush=True,
    )
    assert resumed.first_tokens == uninterrupted.first_tokens[stop:]
    assert resumed.losses == pytest.approx(uninterrupted.losses[stop:], abs=1e-6)


def test_expert_parallel_resume_repeats_the_uninterrupted_batches(tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_text(TEXT)
    TextDataModule(sources=[str(tmp_path / "corpus.txt")], vocab_size=300, block_size=16, batch_size=4,
                   val_fraction=0.1, cache_dir=str(tmp_path / "cache")).prepare_data()  # fmt: skip
    run_distributed(_resume_repeats_the_uninterrupted_batches, 2, str(tmp_path))
