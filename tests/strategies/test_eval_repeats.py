"""Validation and test losses with several processes count every sample once, as on one device.

Lightning's ``DistributedSampler`` repeats the first samples so that every rank gets as many; the module leaves the
repeated rows out (``repeated_rows``).
"""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_moe.data.span_corruption import span_corruption
from lightning_moe.module import CausalLMModule, Seq2SeqLMModule
from lightning_moe.strategies import ExpertParallelStrategy
from tests.strategies._distributed import run_distributed

VOCAB, SEQ = 64, 16
TINY = {"vocab_size": VOCAB, "dim": 32, "num_heads": 2, "num_kv_heads": 1, "ffn_hidden": 32, "num_experts": 4}


def _blocks(count: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count, SEQ + 1), generator=torch.Generator().manual_seed(3))


def _one_device_loss(module: CausalLMModule, blocks: torch.Tensor) -> float:
    """The mean next-token cross-entropy over every block once, from the logits (an independent computation)."""
    module.eval()
    with torch.no_grad():
        logits = module.model(blocks[:, :-1]).logits
    return float(F.cross_entropy(logits.reshape(-1, VOCAB), blocks[:, 1:].reshape(-1)))


def _validate_and_test(rank: int, world: int, count: int, batch_size: int) -> None:
    torch.manual_seed(0)
    module = CausalLMModule(arch="mixtral-tiny", overrides=TINY)
    expected = _one_device_loss(copy.deepcopy(module), _blocks(count))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=ExpertParallelStrategy(expert_parallel_size=2),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(_blocks(count), batch_size=batch_size)
    (validated,) = trainer.validate(module, loader, verbose=False)
    (tested,) = trainer.test(module, loader, verbose=False)
    assert math.isclose(validated["val/loss"], expected, rel_tol=1e-5), (validated, expected)
    assert math.isclose(tested["test/loss"], expected, rel_tol=1e-5), (tested, expected)


@pytest.mark.multiprocess
def test_validation_and_test_losses_count_each_block_once_across_ranks() -> None:
    # 5 blocks on 2 ranks: rank 1 gets block 0 again. Batches of 2: its second batch is [3, 0 (repeated)].
    run_distributed(_validate_and_test, 2, 5, 2)


@pytest.mark.multiprocess
def test_a_batch_of_nothing_but_repeats_adds_nothing() -> None:
    # 3 blocks on 2 ranks, batches of 1: rank 1's second batch holds only the repeated block 0.
    run_distributed(_validate_and_test, 2, 3, 1)


@pytest.mark.multiprocess
def test_a_rank_whose_every_row_is_a_repeat_still_joins_the_loss() -> None:
    # 1 block on 2 ranks: rank 1's only row is the repeated block 0, so it has nothing to add to the mean; it must
    # still join rank 0's all-gather and all-reduce of the loss (it used to skip them and leave rank 0 waiting).
    run_distributed(_validate_and_test, 2, 1, 1)


def test_seq2seq_loss_leaves_the_dropped_rows_out() -> None:
    torch.manual_seed(0)
    module = Seq2SeqLMModule(arch="switch-tiny", overrides={"vocab_size": VOCAB, "dim": 32, "num_heads": 2,
                                                             "head_dim": 16, "ffn_hidden": 32, "num_experts": 4,
                                                             "capacity_factor": None, "eval_capacity_factor": None,
                                                             "router_jitter": 0.0})  # fmt: skip
    module.eval()
    batch = _blocks(3)
    drop = torch.tensor([False, True, False])
    with torch.no_grad():
        ce, _, num_tokens = module._loss(batch, torch.Generator().manual_seed(7), drop)
        inputs, targets = span_corruption(
            batch, VOCAB - 1, module.hparams.noise_density, module.hparams.mean_span_length,
            torch.Generator().manual_seed(7),
        )  # fmt: skip
        start = torch.full_like(targets[:, :1], module.decoder_start_id)
        logits = module.model(inputs, torch.cat([start, targets[:, :-1]], dim=1)).logits
    kept = targets[~drop]
    expected = F.cross_entropy(logits[~drop].reshape(-1, VOCAB), kept.reshape(-1), reduction="sum") / kept.numel()
    assert num_tokens == kept.numel()
    torch.testing.assert_close(ce, expected, rtol=1e-5, atol=1e-6)
