"""Expert-parallel predict, atomic cache writes, a sharded ``--ckpt_path last`` and the data split on resume."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_moe.data import TextDataModule
from lightning_moe.data.tokenizer import load_tokenizer, save_atomic, train_bpe

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TEXT = "def add(a, b):\n    return a + b\n\n# numbers: 1 2 3 4 5 6 7 8 9 10\nclass Point:\n    x: int\n" * 12
RULE = "-" * 72 + "\n"


def _data(tmp_path: Path, **kwargs) -> TextDataModule:
    (tmp_path / "corpus.txt").write_text(TEXT)
    kwargs = {"sources": [str(tmp_path / "corpus.txt")], "vocab_size": 300, "block_size": 8, "batch_size": 2,
              "cache_dir": str(tmp_path / "cache"), **kwargs}  # fmt: skip
    return TextDataModule(**kwargs)


# -- prediction under expert parallelism ----------------------------------------------------------------------


@pytest.mark.parametrize(("num_samples", "world"), [(5, 2), (6, 2), (7, 3), (1, 2), (2, 4)])
def test_padded_predict_sampler_gives_every_rank_as_many_samples_and_each_unpadded_once(num_samples, world):
    from lightning_moe.data.datamodule import PaddedPredictSampler

    shares = [PaddedPredictSampler(num_samples, world, rank) for rank in range(world)]
    per_rank = math.ceil(num_samples / world)
    for rank, sampler in enumerate(shares):
        indices, padding = list(sampler), sampler.padding()
        assert len(indices) == len(padding) == per_rank  # as many on every rank: as many batches
        # Rank r takes r, r + world, ... (round robin, as Lightning's prediction sampler), then repeats.
        assert [i for i, pad in zip(indices, padding, strict=True) if not pad] == list(range(rank, num_samples, world))
        assert all(0 <= i < num_samples for i in indices)
    kept = sorted(i for s in shares for i, pad in zip(list(s), s.padding(), strict=True) if not pad)
    assert kept == list(range(num_samples))


def _records(path: Path) -> list[tuple[str, str]]:
    """``(prompt, continuation)`` of each record of a ``predictions.txt``."""
    records = []
    for record in path.read_text().split(RULE)[1:]:
        prompt, more = record.removeprefix("PROMPT\n").split("\nCONTINUATION\n")
        records.append((prompt, more.removesuffix("\n")))
    return records


def _predict_args(tmp_path: Path, save_dir: Path, val_fraction: float) -> list[str]:
    return ["predict", "--config", str(CONFIGS / "mixtral-tiny.yaml"), "--data.sources", f"[{tmp_path / 'corpus.txt'}]",
            "--data.vocab_size", "300", "--data.block_size", "8", "--data.batch_size", "2",
            "--data.val_fraction", str(val_fraction), "--data.cache_dir", str(tmp_path / "cache"),
            "--model.init_args.overrides", "{num_layers: 1}", "--trainer.logger.init_args.save_dir", str(save_dir),
            "--trainer.enable_model_summary", "false"]  # fmt: skip


def _predict_through_the_cli(rank: int, world: int, args: list[str]) -> None:
    from lightning_moe.cli import run_cli

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a freshly initialised model (seed_everything: the same on every rank)
        run_cli([*args, "--config", str(CONFIGS / "expert-parallel.yaml")])


@pytest.mark.multiprocess
def test_expert_parallel_predict_with_uneven_batches_writes_each_prompt_once_as_one_process_does(tmp_path):
    from lightning_moe.cli import run_cli
    from tests.strategies._distributed import run_distributed

    data = _data(tmp_path)
    data.setup("validate")
    num_blocks = len(data.train_set) + len(data.val_set)
    val_fraction = 4.5 / num_blocks  # 5 prompts: 3 + 2 over two ranks, in batches of 2: 2 batches and 1
    with pytest.warns(UserWarning, match="runs a freshly initialised model"):
        single = run_cli(_predict_args(tmp_path, tmp_path / "single", val_fraction))
    prompts = [single.datamodule.tokenizer.decode(single.datamodule.val_set[i][:4].tolist()) for i in range(5)]
    assert len(single.datamodule.val_set) == 5
    expected = _records(Path(single.trainer.log_dir) / "predictions.txt")
    assert [prompt for prompt, _ in expected] == prompts  # every prompt, in order

    run_distributed(_predict_through_the_cli, 2, _predict_args(tmp_path, tmp_path / "ep", val_fraction))
    (written,) = (tmp_path / "ep").glob("*/version_*/predictions.txt")
    # Each prompt exactly once (the padded repeat dropped), in the data's order, with the same continuation.
    assert _records(written) == expected


# -- --ckpt_path last finding a sharded checkpoint -------------------------------------------------------------


def _forbid(*args, **kwargs):
    raise AssertionError("reached work that the checks should have prevented")


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_ckpt_path_last_finding_a_sharded_checkpoint_is_refused_under_a_single_device_strategy(
    tmp_path, monkeypatch, subcommand
):
    import lightning

    from lightning_moe.cli import run_cli
    from lightning_moe.strategies.checkpoint import METADATA_FILE

    monkeypatch.setattr(TextDataModule, "prepare_data", _forbid)
    monkeypatch.setattr(TextDataModule, "setup", _forbid)
    folder = tmp_path / "logs" / "run" / "checkpoints" / "last.ckpt"  # what ExpertParallelStrategy saves
    folder.mkdir(parents=True)
    torch.save({"pytorch-lightning_version": lightning.__version__, "hyper_parameters": {}}, folder / METADATA_FILE)
    args = [subcommand, "--config", str(CONFIGS / "mixtral-tiny.yaml"), "--trainer.logger.init_args.save_dir",
            str(tmp_path / "logs"), "--trainer.logger.init_args.name", "run", "--ckpt_path", "last"]  # fmt: skip
    with pytest.raises(ValueError, match=r"last\.ckpt' is invalid with trainer.strategy='auto': it is a sharded"):
        run_cli(args)


# -- atomic writes of the tokenizer and the token cache --------------------------------------------------------


def _second_writer_inside_the_first_rename(monkeypatch, target: Path, second_writer) -> list[Path]:
    """Make the first ``os.replace`` onto ``target`` run ``second_writer`` (same pid) before renaming."""
    monkeypatch.setattr(os, "getpid", lambda: 4242)  # two machines, or containers, with one pid
    real_replace, renamed = os.replace, []

    def replace(src, dst):
        if Path(dst) == target and not renamed:
            renamed.append(Path(src))
            second_writer()  # the other writer finishes its own write and rename first
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return renamed


def test_two_tokenizer_writers_with_the_same_pid_do_not_collide(tmp_path, monkeypatch):
    tokenizer = train_bpe([TEXT], 300)
    target = tmp_path / "cache" / "tokenizer.json"
    renamed = _second_writer_inside_the_first_rename(monkeypatch, target, lambda: save_atomic(tokenizer, target))
    save_atomic(tokenizer, target)
    assert renamed and load_tokenizer(target).to_str() == tokenizer.to_str()
    assert sorted(p.name for p in target.parent.iterdir()) == ["tokenizer.json"]  # no temporary file left


def test_two_token_cache_writers_with_the_same_pid_do_not_collide(tmp_path, monkeypatch):
    first, second = _data(tmp_path), _data(tmp_path)
    cache = tmp_path / "cache"
    first.prepare_data()  # the tokenizer, then the token file: written by the two writers below
    (tokens_file,) = cache.glob("tokens-*.bin")
    expected = np.fromfile(tokens_file, dtype=np.uint16)
    tokens_file.unlink()
    _second_writer_inside_the_first_rename(monkeypatch, tokens_file, second.prepare_data)
    first.prepare_data()
    assert np.array_equal(np.fromfile(tokens_file, dtype=np.uint16), expected)
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [tokens_file.name, *(p.name for p in cache.glob("*.json"))]
    )


def test_a_failed_token_cache_write_leaves_no_half_file_and_the_next_run_writes_it_whole(tmp_path, monkeypatch):
    import lightning_moe.data.datamodule as datamodule

    _data(tmp_path).prepare_data()
    cache = tmp_path / "cache"
    (tokens_file,) = cache.glob("tokens-*.bin")
    tokenizer = load_tokenizer(next(cache.glob("tokenizer-*.json")))
    expected = [*tokenizer.encode(TEXT).ids, tokenizer.token_to_id("<|endoftext|>")]  # the document, end-of-text
    tokens_file.unlink()
    before = sorted(cache.iterdir())
    monkeypatch.setattr(os, "getpid", lambda: 4242)
    monkeypatch.setattr(datamodule, "np", _NumpyWithAFullDisk())
    with pytest.raises(OSError, match="No space left"):
        _data(tmp_path).prepare_data()
    assert sorted(cache.iterdir()) == before  # neither the token file nor a half-written temporary one
    monkeypatch.undo()
    _data(tmp_path).prepare_data()
    assert np.fromfile(tokens_file, dtype=np.uint16).tolist() == expected


class _HalfWrittenArray(np.ndarray):
    """An array whose ``tofile`` writes half of it, then fails as a full disk does."""

    def tofile(self, path, *args, **kwargs) -> None:  # noqa: D102
        half = self.view(np.ndarray)
        half[: len(half) // 2].tofile(path)
        raise OSError(28, "No space left on device")


class _NumpyWithAFullDisk:
    """``numpy`` as the data module sees it, but the arrays it makes with ``asarray`` fail to be written."""

    def __getattr__(self, name: str):
        return getattr(np, name)

    def asarray(self, *args, **kwargs) -> np.ndarray:
        return np.asarray(*args, **kwargs).view(_HalfWrittenArray)


# -- the train/validation split on resume ----------------------------------------------------------------------


def _fit_one_step_and_save(tmp_path: Path):
    import lightning.pytorch as pl

    from lightning_moe.module import CausalLMModule

    torch.manual_seed(0)
    module = CausalLMModule(arch="mixtral-tiny", overrides={"num_layers": 1, "max_seq_len": 32})
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    data = _data(tmp_path)
    trainer.fit(module, datamodule=data)
    ckpt = tmp_path / "one.ckpt"
    trainer.save_checkpoint(ckpt)
    return module, data, ckpt


@pytest.mark.parametrize(("field", "value"), [("seed", 7), ("val_fraction", 0.3), ("block_size", 6)])
def test_a_resume_with_another_split_warns_naming_the_setting_and_both_values(tmp_path, field, value):
    import lightning.pytorch as pl

    module, saved_data, ckpt = _fit_one_step_and_save(tmp_path)
    changed = _data(tmp_path, **{field: value})
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=1)  # fmt: skip
    saved = getattr(saved_data, field)
    pattern = rf"split differs from the checkpoint's run: .*'{field}': \({saved}, {value}\).*validation blocks"
    with pytest.warns(UserWarning, match=pattern):
        trainer.validate(module, datamodule=changed, ckpt_path=ckpt)
    # The consequence the warning names, seen in the splits themselves: blocks trained on are now validated.
    if field != "block_size":
        assert set(changed.val_set.block_ids.tolist()) & set(saved_data.train_set.block_ids.tolist())


def test_a_resume_with_the_same_split_does_not_warn(tmp_path):
    import lightning.pytorch as pl

    module, saved_data, ckpt = _fit_one_step_and_save(tmp_path)
    same = _data(tmp_path, batch_size=3)  # the batch size does not change the split
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=1)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(module, datamodule=same, ckpt_path=ckpt)
    assert not [w for w in caught if "split differs" in str(w.message)]
    assert np.array_equal(same.val_set.block_ids, saved_data.val_set.block_ids)
