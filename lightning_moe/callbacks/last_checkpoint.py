"""A ``ModelCheckpoint`` whose ``last.ckpt`` always holds the end of the run."""

from __future__ import annotations

import os
from typing import Any
from weakref import proxy

import lightning.pytorch as pl
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_moe.strategies.checkpoint import interrupted_swap, staging_path


class LastCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with fixes for resumable runs.

    - ``last.ckpt`` is written at the final step (``max_steps``, at the end of its batch like a periodic save, so
      a resumed run logs at the same steps) or when training ends otherwise. Lightning's own
      end-of-training save is skipped once any ``last.ckpt`` was written during the run, so with
      ``every_n_train_steps: 250`` a 260-step run kept step 250 and lost the last 10 steps.
    - ``enable_version_counter`` defaults to ``False``: a new run of the same config rewrites ``last.ckpt``
      rather than writing ``last-v1.ckpt`` beside it, so ``last.ckpt`` is always the latest run's.
    - A checkpoint file is written as ``.<name>.tmp`` beside its final name and renamed over it, one atomic
      step on the same filesystem. Lightning writes a temporary file in ``$TMPDIR`` and moves it into place,
      which is a copy when ``$TMPDIR`` is on another filesystem: a run killed during that copy left a cut
      ``last.ckpt`` and no good checkpoint.
    - ``fit --ckpt_path last`` finds the checkpoint of an expert-parallel save killed in the middle of its
      folder swap (see :func:`~lightning_moe.strategies.checkpoint.interrupted_swap`), where ``last.ckpt`` is
      missing for a moment.
    - With gradient accumulation nothing is saved between the micro-batches of one optimizer step: their
      gradients are not in a checkpoint, so a resume from there trained that step on the remaining micro-batches
      only. Lightning saved there right after a resume (the first micro-batch still sees the restored step
      count, which it had not saved in this run) and at a validation or time interval that fell mid-step.

    Every argument is ``ModelCheckpoint``'s.

    Example::

        from lightning_moe.callbacks import LastCheckpoint

        trainer = Trainer(callbacks=[LastCheckpoint(dirpath="ckpt", save_last=True, save_top_k=0,
                                                    every_n_train_steps=250)])
    """

    def __init__(self, *args: Any, enable_version_counter: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # The final step is saved here, at the end of its batch as periodic saves are: saved after the loops have
        # finished (on_train_end), its loop counters are one step ahead, and every step a resumed run logged moved.
        last_step = 0 < trainer.max_steps <= trainer.global_step
        if self.save_last and last_step and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)

    @override
    def _should_skip_saving_checkpoint(self, trainer: pl.Trainer) -> bool:
        return super()._should_skip_saving_checkpoint(trainer) or between_micro_batches(trainer)

    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        sharded = getattr(trainer.strategy, "_save_distributed_checkpoint", False)  # swaps its own folder
        if sharded or not _is_local_file_protocol(filepath):
            super()._save_checkpoint(trainer, filepath)
            return
        staging = str(staging_path(filepath))
        trainer.save_checkpoint(staging, self.save_weights_only)
        if trainer.is_global_zero:
            os.replace(staging, filepath)
        trainer.strategy.barrier("LastCheckpoint: swapped")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    @override
    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        found = super()._find_last_checkpoints(trainer)
        if self.dirpath is not None and _is_local_file_protocol(self.dirpath):
            recovered = interrupted_swap(os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION))
            if recovered is not None:
                found.add(os.path.normpath(recovered))
        return found


def between_micro_batches(trainer: pl.Trainer) -> bool:
    """Whether training stands between the micro-batches of one optimizer step (gradients accumulated, not applied).

    True from the end of a micro-batch that did not step the optimizer until the end of the one that does.
    """
    if trainer.accumulate_grad_batches <= 1 or trainer.state.fn != TrainerFn.FITTING:
        return False
    return trainer.fit_loop.epoch_loop._should_accumulate()
