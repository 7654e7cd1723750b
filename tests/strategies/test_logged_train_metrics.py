"""Training metrics logged under expert parallelism are the global batch's (all ranks), not rank 0's."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_moe.module import CausalLMModule
from tests.strategies._distributed import ep_trainer, run_distributed

VOCAB, SEQ, ROWS = 64, 16, 2
TINY = {"vocab_size": VOCAB, "dim": 32, "num_heads": 2, "num_kv_heads": 1, "ffn_hidden": 32, "num_experts": 4}


class _Recording(CausalLMModule):
    """Keeps this rank's cross-entropy, trained target count and aux losses of each training step."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.local: list[dict[str, float]] = []

    def training_step(self, batch, batch_idx):
        ce, _, router_stats, (num_tokens, *_) = self._loss(batch)
        aux, terms = self.aux_loss(router_stats)
        self.local.append(
            {"ce": float(ce), "targets": num_tokens, "aux": float(aux), "load_balance": float(terms["load_balance"])}
        )
        return super().training_step(batch, batch_idx)


class _Logged(Callback):
    """What each step logged, as the logger would receive it."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


def _logged_metrics(rank: int, world: int) -> None:
    ids = torch.randint(0, VOCAB, (3 * ROWS, SEQ), generator=torch.Generator().manual_seed(rank + 1))
    # Step 0: both ranks train every target; rank 1's cross-entropy differs by its own data. Step 1: rank 1
    # trains a few targets only, so the mean over all targets differs from the mean of the ranks' means. Step 2:
    # rank 1's batch has no trained target (every label -100), so train/loss must be rank 0's alone.
    labels = ids.clone()
    if rank == 1:
        labels[ROWS : 2 * ROWS, 3:] = -100
        labels[2 * ROWS :] = -100
    batches = [{"input_ids": ids[i : i + ROWS], "labels": labels[i : i + ROWS]} for i in range(0, 3 * ROWS, ROWS)]
    torch.manual_seed(0)
    module = _Recording(arch="mixtral-tiny", overrides=TINY, lr=1e-3, warmup_steps=0, load_balance_coef=0.01)
    logged = _Logged()
    trainer = ep_trainer(world, 2, max_steps=3, callbacks=[logged], log_every_n_steps=1)
    trainer.fit(module, DataLoader(batches, batch_size=None))

    everyone: list = [None] * world
    dist.all_gather_object(everyone, module.local)
    for step in range(3):
        ranks = [everyone[r][step] for r in range(world)]
        targets = sum(r["targets"] for r in ranks)
        ce = sum(r["ce"] * r["targets"] for r in ranks) / targets  # the mean over every rank's targets
        assert math.isclose(logged.steps[step]["train/loss"], ce, rel_tol=1e-5)
        mean_balance = sum(r["load_balance"] for r in ranks) / world
        assert math.isclose(logged.steps[step]["train/aux/load_balance"], mean_balance, rel_tol=1e-5)
        # What the step trains: that cross-entropy plus the mean of the ranks' weighted auxiliary losses.
        total = ce + sum(r["aux"] for r in ranks) / world
        assert math.isclose(logged.steps[step]["train/total_loss"], total, rel_tol=1e-5)
    # The ranks' losses differ, so a rank-0-only value would fail the check above at step 0; at step 1 the mean
    # of the ranks' means would.
    assert not math.isclose(everyone[0][0]["ce"], everyone[1][0]["ce"], rel_tol=1e-3)
    step1 = [everyone[r][1] for r in range(world)]
    assert 0 < step1[1]["targets"] < step1[0]["targets"]
    assert not math.isclose(
        sum(r["ce"] for r in step1) / world,
        sum(r["ce"] * r["targets"] for r in step1) / sum(r["targets"] for r in step1),
        rel_tol=1e-3,
    )
    assert everyone[1][2]["targets"] == 0 and everyone[0][2]["targets"] > 0


@pytest.mark.multiprocess
def test_logged_training_loss_is_the_mean_over_all_targets_and_aux_terms_the_mean_over_ranks() -> None:
    run_distributed(_logged_metrics, 2)
