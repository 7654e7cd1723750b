"""ExpertLoadMonitor under ExpertParallelStrategy logs the global batch's loads, as one process would."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_moe.callbacks import ExpertLoadMonitor
from lightning_moe.module import CausalLMModule
from tests.strategies._distributed import ep_trainer, run_distributed

pytestmark = pytest.mark.multiprocess

OVERRIDES = {"vocab_size": 64, "dim": 32, "num_heads": 2, "num_kv_heads": 1, "ffn_hidden": 32, "num_experts": 4}
ROWS_PER_RANK, SEQ = 3, 17


def _module() -> CausalLMModule:
    torch.manual_seed(0)
    return CausalLMModule(arch="mixtral-tiny", overrides=OVERRIDES)


@torch.no_grad()
def _single_process_loads(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, E)`` load shares and ``(L,)`` mean router entropy of one training forward on the whole batch."""
    module = _module().train()
    stats = module.model(batch[:, :-1]).router_stats
    routed_LE = torch.stack([s.tokens_per_expert.double() for s in stats])
    return routed_LE / routed_LE.sum(1, keepdim=True), torch.stack([s.router_entropy.double() for s in stats])


def _monitor_sees_global_loads(rank: int, world: int) -> None:
    torch.manual_seed(3)
    batch = torch.randint(0, OVERRIDES["vocab_size"], (world * ROWS_PER_RANK, SEQ))
    share_LE, entropy_L = _single_process_loads(batch)
    local = batch[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]
    assert not torch.allclose(_single_process_loads(local)[0], share_LE)  # this rank alone sees other loads

    monitor = ExpertLoadMonitor(logging_interval=1, log_histograms=False, log_heatmap=False)
    trainer = ep_trainer(world, "auto", max_steps=1, callbacks=[monitor])
    trainer.fit(_module(), train_dataloaders=DataLoader(local, batch_size=ROWS_PER_RANK))

    # Each rank routed only its own rows, yet every rank logs the loads of the whole batch.
    assert monitor.last_load is not None
    torch.testing.assert_close(monitor.last_load.double(), share_LE, atol=1e-6, rtol=0)
    for i, entropy in enumerate(entropy_L.tolist()):
        assert monitor.last_metrics[f"moe/layer_{i}/entropy"] == pytest.approx(entropy, rel=1e-5)
        for e in range(OVERRIDES["num_experts"]):
            assert monitor.last_metrics[f"moe/layer_{i}/load/expert_{e}"] == pytest.approx(float(share_LE[i, e]))


def test_load_monitor_under_expert_parallel_matches_single_process() -> None:
    run_distributed(_monitor_sees_global_loads, 2)
