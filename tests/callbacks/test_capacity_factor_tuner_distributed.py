"""CapacityFactorTuner under ExpertParallelStrategy with ranks holding different numbers of sequences."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_moe.callbacks import CapacityFactorTuner
from lightning_moe.callbacks.capacity_factor_tuner import smallest_factor
from lightning_moe.module import Seq2SeqLMModule
from tests.strategies._distributed import ep_trainer, run_distributed

OVERRIDES = {
    "vocab_size": 64, "dim": 32, "num_heads": 2, "head_dim": 16, "ffn_hidden": 32, "num_experts": 4,
    "capacity_factor": 1.0, "capacity_scope": "sequence", "router_jitter": 0.0,
}  # fmt: skip
SEQ = 24


class _SequenceRows(Callback):
    """Each MoE layer's per-sequence rows (real tokens, then copies routed to each expert) of every training batch."""

    def __init__(self) -> None:
        self.rows: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for i, s in enumerate(outputs["router_stats"]):
            rows = torch.cat([s.sequence_num_tokens.double()[:, None], s.sequence_tokens_per_expert.double()], dim=1)
            self.rows.setdefault(i, []).append(rows)


def _uneven_rows(rank: int, world: int) -> None:
    batch = torch.randint(0, OVERRIDES["vocab_size"], (4, SEQ), generator=torch.Generator().manual_seed(3))
    local = batch[:3] if rank == 0 else batch[3:]  # 3 sequences on rank 0, 1 on rank 1
    recorder = _SequenceRows()
    tuner = CapacityFactorTuner(target_drop_rate=0.0, interval=1, smoothing=0.0, min_factor=0.5, max_factor=8.0)
    trainer = ep_trainer(world, "auto", max_steps=1, callbacks=[recorder, tuner])
    torch.manual_seed(0)
    trainer.fit(Seq2SeqLMModule(arch="switch-tiny", overrides=OVERRIDES), DataLoader(local, batch_size=len(local)))

    # The rows of both ranks, gathered independently of the tuner: every rank must pick the factor they give.
    everyone: list = [None] * world
    dist.all_gather_object(everyone, {i: torch.cat(rows) for i, rows in recorder.rows.items()})
    assert [len(everyone[r][0]) for r in range(world)] == [3, 1]
    expected = [
        smallest_factor(torch.cat([everyone[r][i] for r in range(world)]), 0.0, 1, OVERRIDES["num_experts"], 0.5, 8.0)
        for i in sorted(recorder.rows)
    ]
    assert list(tuner.factors.values()) == expected, (tuner.factors, expected)


@pytest.mark.multiprocess
def test_per_sequence_capacity_tuning_takes_every_ranks_sequences_when_their_counts_differ() -> None:
    run_distributed(_uneven_rows, 2)
