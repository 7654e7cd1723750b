"""The data module against independent counts: plain LightningModules, partial caches, user text edge cases."""

import warnings

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_moe.data import TextDataModule, expand_sources, read_documents

TEXT = "".join(f"line {i} of text with words {i * 7 % 13} and more {i % 5}\n" for i in range(120))


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    return tmp_path


def _data(corpus, **kwargs):
    kwargs = {
        "sources": [str(corpus / "a.txt")],
        "vocab_size": 300,
        "block_size": 16,
        "batch_size": 2,
        "val_fraction": 0.1,
        "cache_dir": str(corpus / "cache"),
        **kwargs,
    }
    return TextDataModule(**kwargs)


class PlainModule(L.LightningModule):
    """A user's own LightningModule (none of lightning_moe's data counters): records each training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, tuple[int, ...]]] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.extend((self.current_epoch, tuple(row)) for row in batch.tolist())
        return (self.w**2).sum() + 0 * batch.float().sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    kwargs = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "default_root_dir": str(tmp_path),
        **kwargs,
    }
    return L.Trainer(**kwargs)


def _fit(trainer, module, data, **kwargs) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data, **kwargs)


def _block_ids(data, rows) -> list[int]:
    """The training block each row is (blocks of this corpus are all different)."""
    index = {tuple(data.train_set[i].tolist()): i for i in range(len(data.train_set))}
    assert len(index) == len(data.train_set)
    return [index[row] for row in rows]


def _epoch_order(data, epoch: int) -> list[int]:
    """The training blocks epoch ``epoch`` visits on one process: the permutation seeded ``seed + epoch``, full
    batches (an independent restatement of the documented order)."""
    order = torch.randperm(len(data.train_set), generator=torch.Generator().manual_seed(data.seed + epoch)).tolist()
    return order[: len(order) // data.batch_size * data.batch_size]


def test_a_plain_module_with_gradient_accumulation_visits_each_epochs_permutation_whole(corpus, tmp_path):
    data = _data(corpus)
    module = PlainModule()
    # 4 does not divide an epoch's batches: Lightning steps after the epoch's last, shorter accumulation too, and the
    # step count then overstates the batches run (the next epochs started part-way and skipped blocks).
    _fit(_trainer(tmp_path, max_epochs=2, accumulate_grad_batches=4), module, data)
    batches = len(data.train_set) // data.batch_size
    assert batches % 4 != 0
    for epoch in range(2):
        ids = _block_ids(data, [row for e, row in module.seen if e == epoch])
        assert len(ids) == batches * data.batch_size, f"epoch {epoch}"
        assert ids == _epoch_order(data, epoch), f"epoch {epoch}"


def test_a_plain_module_resumed_mid_epoch_with_accumulation_sees_the_uninterrupted_runs_batches(corpus, tmp_path):
    data = _data(corpus)
    data.setup("fit")
    batches = len(data.train_set) // data.batch_size
    steps_per_epoch = -(-batches // 4)
    resume_step = steps_per_epoch + 3  # three steps into the second epoch
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=resume_step, save_top_k=-1)
    full = PlainModule()
    trainer = _trainer(tmp_path, max_epochs=2, accumulate_grad_batches=4, callbacks=[every], enable_checkpointing=True)
    _fit(trainer, full, data)
    (path,) = (tmp_path / "ckpt").glob(f"*step={resume_step}*.ckpt")
    resumed = PlainModule()
    _fit(_trainer(tmp_path, max_epochs=2, accumulate_grad_batches=4), resumed, _data(corpus), ckpt_path=str(path))
    consumed = batches + 3 * 4
    assert len(resumed.seen) == len(full.seen) - consumed * data.batch_size
    assert resumed.seen == full.seen[consumed * data.batch_size :]


def test_a_cache_whose_tokenizer_file_is_gone_is_built_again_at_setup(corpus):
    first = _data(corpus)
    first.setup("fit")
    (tokenizer_file,) = (corpus / "cache").glob("tokenizer-*.json")
    tokenizer_file.unlink()  # a cache cleaned by hand, or copied without it
    again = _data(corpus)
    again.setup("fit")  # no prepare_data: setup builds what the cache lacks
    assert tokenizer_file.is_file()
    assert again.tokenizer.get_vocab() == first.tokenizer.get_vocab()
    assert np.array_equal(again.train_set.block_ids, first.train_set.block_ids)
    assert torch.equal(again.train_set[0], first.train_set[0])


def test_one_file_named_twice_is_one_document(corpus, monkeypatch):
    (corpus / "b.txt").write_text("another document\n" * 50)
    (corpus / "link.txt").symlink_to(corpus / "a.txt")
    (corpus / "sub").mkdir()
    monkeypatch.chdir(corpus)
    files = expand_sources(["a.txt", str(corpus / "a.txt"), "./sub/../a.txt", "link.txt", "b.txt"])
    assert len(files) == 2 and {f.resolve() for f in files} == {corpus / "a.txt", corpus / "b.txt"}
    assert list(read_documents(files)) == [TEXT, "another document\n" * 50]


def test_a_folder_as_a_source_is_refused_with_a_glob_to_use(corpus):
    (corpus / "docs").mkdir()
    (corpus / "docs" / "c.txt").write_text(TEXT)
    with pytest.raises(ValueError, match=r"sources entry '.*docs' is invalid: it is a folder.*'.*docs/\*\*/\*\.txt'"):
        _data(corpus, sources=[str(corpus / "docs")]).prepare_data()
    assert expand_sources([str(corpus / "docs" / "**" / "*.txt")]) == [corpus / "docs" / "c.txt"]


class TwoStepModule(PlainModule):
    """Manual optimization that steps two optimizers per batch (a GAN's pattern): two trainer steps per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.v = torch.nn.Parameter(torch.zeros(1))
        self.automatic_optimization = False

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        super().training_step(batch, batch_idx)
        for optimizer, weight in zip(self.optimizers(), (self.w, self.v), strict=True):
            optimizer.zero_grad()
            self.manual_backward((weight - 1).pow(2).sum())
            optimizer.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD([self.w], lr=0.1), torch.optim.SGD([self.v], lr=0.1)]


def test_a_module_stepping_twice_per_batch_visits_each_epochs_permutation(corpus, tmp_path):
    data = _data(corpus)
    module = TwoStepModule()
    _fit(_trainer(tmp_path, max_epochs=2), module, data)
    batches = len(data.train_set) // data.batch_size
    assert module.trainer.global_step == 2 * 2 * batches
    for epoch in range(2):
        ids = _block_ids(data, [row for e, row in module.seen if e == epoch])
        assert ids == _epoch_order(data, epoch), f"epoch {epoch}"
