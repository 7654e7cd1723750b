"""A ``ModelCheckpoint`` whose ``last.ckpt`` always holds the end of the run."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override


class LastCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with two fixes for resumable runs.

    - ``last.ckpt`` is written when training ends, unless the final step was already saved. Lightning's own
      end-of-training save is skipped once any ``last.ckpt`` was written during the run, so with
      ``every_n_train_steps: 250`` a 260-step run kept step 250 and lost the last 10 steps.
    - ``enable_version_counter`` defaults to ``False``: a new run of the same config rewrites ``last.ckpt``
      rather than writing ``last-v1.ckpt`` beside it, so ``last.ckpt`` is always the latest run's.

    Every argument is ``ModelCheckpoint``'s.

    Example::

        from lightning_moe.callbacks import LastCheckpoint

        trainer = Trainer(callbacks=[LastCheckpoint(dirpath="ckpt", save_last=True, save_top_k=0,
                                                    every_n_train_steps=250)])
    """

    def __init__(self, *args: Any, enable_version_counter: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)
