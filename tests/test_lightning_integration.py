"""Our modules under the Trainer features and stock callbacks a Lightning user adds."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
from torch.utils.data import DataLoader, IterableDataset

from lightning_moe.module import CausalLMModule, Seq2SeqLMModule
from tests._helpers import lr_schedule
from tests.callbacks._helpers import SEQ, VOCAB, loader, trainer

LR = 1.0
MIN_LR_RATIO = 0.1


def _module(**kwargs: Any) -> CausalLMModule:
    """A 2-layer, 8-expert, top-2 Mixtral of ~60k parameters, peak lr 1 and no warmup (rates easy to read)."""
    torch.manual_seed(0)
    base = dict(vocab_size=VOCAB, dim=32, num_layers=2, num_heads=2, num_kv_heads=1, ffn_hidden=32, max_seq_len=64)
    options: dict[str, Any] = dict(lr=LR, warmup_steps=0, min_lr_ratio=MIN_LR_RATIO, load_balance_coef=0.0)
    options.update(kwargs)
    return CausalLMModule(arch="mixtral-tiny", overrides=base, **options)


def _cosine(step: int, total: int, warmup: int = 0) -> float:
    """The rate the README documents: linear warmup, then cosine from ``LR`` to ``MIN_LR_RATIO * LR`` over ``total``."""
    return lr_schedule(step, LR, warmup, total, MIN_LR_RATIO)


class RateRecorder(Callback):
    """The learning rate of every optimizer step, as the optimizer applies it."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.rates.append(optimizer.param_groups[0]["lr"])


class Blocks(IterableDataset):
    """``count`` random ``(SEQ + 1,)`` token blocks, with no ``__len__`` (as a streamed data set)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        for _ in range(self.count):
            yield torch.randint(0, VOCAB, (SEQ + 1,), generator=generator)


def test_schedule_of_data_without_length_and_max_epochs_decays_over_1000_steps(tmp_path: Path) -> None:
    # Lightning estimates max_steps (-1) for data of unknown length: a schedule of -1 steps dropped the rate to its
    # minimum after the warmup. The length is unknown, so the documented fallback applies: 1000 steps, a warning.
    module, rates = _module(warmup_steps=2), RateRecorder()
    fit = trainer(tmp_path, [rates], max_steps=-1, max_epochs=1)
    with pytest.warns(UserWarning, match=r"no step limit .* decays over 1000 optimizer steps"):
        fit.fit(module, DataLoader(Blocks(24), batch_size=4))
    assert fit.global_step == 6
    assert rates.rates == pytest.approx([_cosine(step, 1000, warmup=2) for step in range(6)])


def test_schedule_spans_the_steps_of_a_gradient_accumulation_scheduler(tmp_path: Path) -> None:
    # 8 batches an epoch: epoch 0 steps every batch, epoch 1 every second one, so 8 + 4 optimizer steps. Lightning's
    # estimate takes epoch 0's accumulation for both (16), and the rate stopped short of its minimum.
    module, rates = _module(), RateRecorder()
    fit = trainer(tmp_path, [rates, GradientAccumulationScheduler({1: 2})], max_steps=-1, max_epochs=2)
    fit.fit(module, loader(num_batches=8))
    total = 8 + math.ceil(8 / 2)
    assert fit.global_step == total
    assert rates.rates == pytest.approx([_cosine(step, total) for step in range(total)])


def _mean_cross_entropy(module: CausalLMModule, batches: DataLoader) -> float:
    """The mean next-token cross-entropy over every target of ``batches``, from the logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = module.model(batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, VOCAB).double(), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total, count = total + float(loss), count + batch[:, 1:].numel()
    return total / count


def test_several_validation_and_test_loaders_each_log_their_token_weighted_loss(tmp_path: Path) -> None:
    # Lightning names each loader's metric with its /dataloader_idx_N suffix and returns one dict per loader.
    module = _module().eval()
    first, second = loader(num_batches=2, seed=1), loader(num_batches=3, seed=2)
    expected = [_mean_cross_entropy(module, first), _mean_cross_entropy(module, second)]
    evaluate = trainer(tmp_path, [], max_steps=1, limit_val_batches=None, limit_test_batches=None)
    for stage, results in (
        ("val", evaluate.validate(module, [first, second])),
        ("test", evaluate.test(module, [first, second])),
    ):
        assert len(results) == 2
        for index, (result, loss) in enumerate(zip(results, expected, strict=True)):
            assert result[f"{stage}/loss/dataloader_idx_{index}"] == pytest.approx(loss, rel=1e-5)
            assert result[f"{stage}/ppl/dataloader_idx_{index}"] == pytest.approx(math.exp(loss), rel=1e-5)
            assert f"{stage}/loss" not in result


def test_seq2seq_validation_of_several_loaders_gives_each_the_loss_it_gives_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = Seq2SeqLMModule(arch="switch-tiny", overrides={"num_layers": 1, "dim": 32, "num_heads": 2}).eval()
    loaders = [
        DataLoader(torch.randint(0, 200, (count, SEQ), generator=torch.Generator().manual_seed(seed)), batch_size=2)
        for seed, count in ((1, 4), (2, 6))
    ]
    evaluate = trainer(tmp_path, [], max_steps=1, limit_val_batches=None)
    alone = [evaluate.validate(module, one)[0]["val/loss"] for one in loaders]
    together = evaluate.validate(module, loaders)
    assert [result[f"val/loss/dataloader_idx_{i}"] for i, result in enumerate(together)] == pytest.approx(alone)
    assert alone[0] != pytest.approx(alone[1])


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_validation_and_test_loss_sums_stay_float32_under_half_precision_weights(
    tmp_path: Path, precision: str
) -> None:
    # "bf16-true"/"16-true" cast the module, and with it the loss metrics' sums: 20 batches of 1024 tokens summed in
    # float16 overflowed to inf, in bfloat16 the mean drifted by 0.2%.
    module = _module()
    batches = loader(num_batches=20, batch_size=64, seed=1)
    evaluate = trainer(tmp_path, [], max_steps=1, precision=precision, limit_val_batches=None, limit_test_batches=None)
    val = evaluate.validate(module, batches, verbose=False)[0]["val/loss"]
    test = evaluate.test(module, batches, verbose=False)[0]["test/loss"]
    expected = _mean_cross_entropy(module, batches)  # the module's weights are half precision now
    assert next(module.parameters()).dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float16)
    assert val == pytest.approx(expected, rel=1e-5) and test == pytest.approx(expected, rel=1e-5)
