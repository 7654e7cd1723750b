"""Sharded checkpoints of ExpertParallelStrategy: saved at EP=2, read back at EP=1, EP=4 and EP=2 x DP=2."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from lightning_moe.cli import generate_main
from lightning_moe.module import CausalLMModule
from lightning_moe.strategies import (
    check_checkpoint_files,
    consolidate_checkpoint,
    full_checkpoint,
    load_distributed_checkpoint,
)
from tests.strategies._distributed import ep_trainer, run_distributed

pytestmark = pytest.mark.multiprocess

ARCH = "mixtral-tiny"
OVERRIDES = {"vocab_size": 64, "dim": 32, "num_heads": 2, "num_kv_heads": 1, "ffn_hidden": 32, "num_experts": 4}
ROWS_PER_RANK, SEQ = 2, 17


def _module(seed: int) -> CausalLMModule:
    torch.manual_seed(seed)
    return CausalLMModule(arch=ARCH, overrides=OVERRIDES, lr=1e-2, warmup_steps=0)


def _probe() -> torch.Tensor:
    """The input every world size computes logits for."""
    return torch.randint(0, OVERRIDES["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(11))


@torch.no_grad()
def _logits(module: CausalLMModule) -> torch.Tensor:
    module.eval()
    return module(_probe()).logits


def _trainer(world: int, ep: int, max_steps: int, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    return ep_trainer(world, ep, max_steps, callbacks)


def _data(rank: int, world: int) -> DataLoader:
    batch = torch.randint(0, OVERRIDES["vocab_size"], (world * ROWS_PER_RANK, SEQ))
    return DataLoader(batch[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK], batch_size=ROWS_PER_RANK)


def _tokenizer() -> Tokenizer:
    """One word per token id, so any generated id decodes."""
    vocab = {f"w{i}": i for i in range(OVERRIDES["vocab_size"])}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = Whitespace()
    return tokenizer


def _train_and_save(rank: int, world: int, ckpt: str, logits_file: str) -> None:
    module = _module(seed=0)
    module.tokenizer_json = _tokenizer().to_str()  # as TextDataModule hands it over in lightning-moe fit
    trainer = _trainer(world, ep=world, max_steps=1)
    trainer.fit(module, train_dataloaders=_data(rank, world))
    trainer.save_checkpoint(ckpt)
    assert isinstance(module.model.layers[0].ffn.experts.w1, DTensor)
    logits = _logits(module)
    if rank == 0:
        torch.save(logits, logits_file)


def _resume_and_compare(rank: int, world: int, ep: int, ckpt: str, logits_file: str) -> None:
    module = _module(seed=1)  # different weights: everything must come from the checkpoint
    trainer = _trainer(world, ep=ep, max_steps=1)
    # Resuming at max_steps=1 restores weights, optimizer and loop state, and trains no further step.
    trainer.fit(module, train_dataloaders=_data(rank, world), ckpt_path=ckpt)
    assert trainer.global_step == 1
    # Experts sharded over the new expert-parallel mesh, then FSDP over its data-parallel replicas.
    assert trainer.strategy.expert_parallel_mesh.size() == ep
    assert module.model.layers[0].ffn.experts.w1.to_local().shape[0] == OVERRIDES["num_experts"] // world
    torch.testing.assert_close(_logits(module), torch.load(logits_file), atol=1e-5, rtol=1e-5)

    # The AdamW moments were resharded too: gathered, they equal the saved full tensors.
    saved = consolidate_checkpoint(ckpt, key="optimizer_0")
    optim = get_optimizer_state_dict(
        trainer.strategy.model, trainer.optimizers[0], options=StateDictOptions(full_state_dict=True)
    )
    assert optim["state"]
    for name, state in optim["state"].items():
        for field in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[field], saved[f"state.{name}.{field}"], atol=0, rtol=0)


@pytest.fixture(scope="module")
def saved_at_ep2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A checkpoint of one AdamW step at EP=2 (world 2), and the logits the trained model gives on the probe."""
    root = tmp_path_factory.mktemp("ep2")
    ckpt, logits = root / "step1.ckpt", root / "logits.pt"
    run_distributed(_train_and_save, 2, str(ckpt), str(logits))
    return ckpt, logits


def test_checkpoint_is_sharded_per_rank(saved_at_ep2: tuple[Path, Path]) -> None:
    ckpt, _ = saved_at_ep2
    assert ckpt.is_dir()
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (ckpt / ".metadata").is_file() and (ckpt / "meta.pt").is_file()


def test_ep2_checkpoint_loads_into_a_plain_module(saved_at_ep2: tuple[Path, Path]) -> None:
    ckpt, logits_file = saved_at_ep2
    expected = torch.load(logits_file)
    module = _module(seed=1)
    assert not torch.allclose(_logits(module), expected, atol=1e-3)
    load_distributed_checkpoint(module, ckpt)
    torch.testing.assert_close(_logits(module), expected, atol=1e-5, rtol=1e-5)


def test_consolidate_checkpoint_gives_full_tensors(saved_at_ep2: tuple[Path, Path]) -> None:
    ckpt, _ = saved_at_ep2
    full = consolidate_checkpoint(ckpt)
    plain = _module(seed=1).state_dict()
    assert full.keys() == plain.keys()
    assert all(full[name].shape == plain[name].shape for name in plain)


@pytest.mark.parametrize(("world", "ep"), [(4, 4), (4, 2)])
def test_ep2_checkpoint_resumes_at_another_mesh(saved_at_ep2: tuple[Path, Path], world: int, ep: int) -> None:
    ckpt, logits_file = saved_at_ep2
    run_distributed(_resume_and_compare, world, ep, str(ckpt), str(logits_file))


def test_consolidate_checkpoint_rejects_a_non_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a distributed checkpoint directory"):
        consolidate_checkpoint(tmp_path)


def test_consolidate_checkpoint_rejects_a_missing_key(saved_at_ep2: tuple[Path, Path]) -> None:
    with pytest.raises(KeyError, match="no tensors under it"):
        consolidate_checkpoint(saved_at_ep2[0], key="nothing")


def test_a_missing_or_cut_shard_file_is_named_before_reading(saved_at_ep2: tuple[Path, Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy.ckpt"
    shutil.copytree(saved_at_ep2[0], copy)
    shards = sorted(p.name for p in copy.glob("*.distcp"))
    assert len(shards) == 2  # one per rank
    check_checkpoint_files(copy)  # whole: no error
    with open(copy / shards[1], "r+b") as shard:
        shard.truncate(10)
    with pytest.raises(ValueError, match=f"shorter than the metadata says: {shards[1]}"):
        consolidate_checkpoint(copy)
    (copy / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=f"shard files that are not there: {shards[1]}"):
        full_checkpoint(copy)


def test_full_checkpoint_holds_the_metadata_and_full_weights(saved_at_ep2: tuple[Path, Path]) -> None:
    ckpt, logits_file = saved_at_ep2
    full = full_checkpoint(ckpt)
    assert full["hyper_parameters"]["overrides"] == OVERRIDES and full["global_step"] == 1
    module = CausalLMModule.load_from_checkpoint(_as_file(full), map_location="cpu")
    torch.testing.assert_close(_logits(module), torch.load(logits_file), atol=1e-5, rtol=1e-5)
    assert module.tokenizer_json == _tokenizer().to_str()


def test_generate_reads_a_sharded_checkpoint_directory(saved_at_ep2: tuple[Path, Path]) -> None:
    ckpt, _ = saved_at_ep2
    text = generate_main(["--ckpt_path", str(ckpt), "--prompt", "w1 w2 w3", "--max_new_tokens", "6"])
    module = load_distributed_checkpoint(_module(seed=1), ckpt)  # the same weights, read independently
    prompt = torch.tensor([_tokenizer().encode("w1 w2 w3").ids])
    expected = _tokenizer().decode(module.generate(prompt, max_new_tokens=6)[0].tolist())
    assert text == expected and len(text.split()) == 9


def _as_file(checkpoint: dict) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return buffer


def _save_with_a_failure_in_between(rank: int, world: int, ckpt: str) -> None:
    import lightning.pytorch.strategies.model_parallel as model_parallel

    module = _module(seed=0)
    trainer = _trainer(world, ep=world, max_steps=1)
    trainer.fit(module, train_dataloaders=_data(rank, world))
    trainer.save_checkpoint(ckpt)
    first = consolidate_checkpoint(ckpt) if rank == 0 else None
    with torch.no_grad():
        for param in module.parameters():
            param.add_(1.0)  # what a second save would write, distinguishable from the first
    save = model_parallel._distributed_checkpoint_save

    def save_then_fail(state: dict, path: Path) -> None:  # every rank writes its shard, then the disk is full
        save(state, path)
        raise OSError(28, "No space left on device (simulated)")

    model_parallel._distributed_checkpoint_save = save_then_fail
    with pytest.raises(OSError, match="simulated"):
        trainer.save_checkpoint(ckpt)
    model_parallel._distributed_checkpoint_save = save
    trainer.strategy.barrier()
    if rank == 0:  # the failed save left the previous checkpoint as it was
        again = consolidate_checkpoint(ckpt)
        assert all(torch.equal(again[name], first[name]) for name in first)
    trainer.strategy.barrier()
    trainer.save_checkpoint(ckpt)  # the next save replaces it and clears the failed one's staging folder
    if rank == 0:
        last = consolidate_checkpoint(ckpt)
        name = "model.embed.weight"
        torch.testing.assert_close(last[name], first[name] + 1.0)
        assert sorted(p.name for p in Path(ckpt).parent.iterdir()) == [Path(ckpt).name]


def test_a_failed_sharded_save_leaves_the_previous_checkpoint_intact(tmp_path: Path) -> None:
    # Lightning writes a sharded checkpoint in place: a save that fails halfway left last.ckpt mixing two steps.
    run_distributed(_save_with_a_failure_in_between, 2, str(tmp_path / "last.ckpt"))


def _revive_and_dense_under_expert_parallelism(rank: int, world: int) -> None:
    import contextlib

    from lightning_moe.callbacks import ExpertCollapseDetector

    trainer = _trainer(world, ep=world, max_steps=1, callbacks=[ExpertCollapseDetector(action="revive")])
    with pytest.raises(ValueError, match=r"action='revive' is invalid with sharded experts"):
        trainer.fit(_module(seed=0), train_dataloaders=_data(rank, world))
    dense = CausalLMModule(arch=ARCH, overrides={**OVERRIDES, "dense": "active"}, lr=1e-2, warmup_steps=0)
    warns = pytest.warns(UserWarning, match=r"expert_parallel_size=2 has no effect: the model has no MoE layer")
    with warns if rank == 0 else contextlib.nullcontext():  # rank_zero_warn
        _trainer(world, ep=world, max_steps=1).fit(dense, train_dataloaders=_data(rank, world))


def test_revive_is_refused_and_a_dense_model_warns_under_expert_parallelism() -> None:
    run_distributed(_revive_and_dense_under_expert_parallelism, 2)


def test_a_sharded_checkpoint_with_a_single_device_strategy_is_refused_up_front(
    saved_at_ep2: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_moe.cli import run_cli

    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).resolve().parents[2] / "configs/mixtral-tiny.yaml")
    for subcommand in ("fit", "validate"):
        with pytest.raises(ValueError, match=r"is invalid with trainer.strategy='auto': it is a sharded checkpoint"):
            run_cli([subcommand, "--config", config, "--ckpt_path", str(saved_at_ep2[0])])


def _validate_through_the_cli(rank: int, world: int, ckpt: str, cache: str) -> None:
    import os

    from lightning_moe.cli import run_cli

    os.environ["LIGHTNING_MOE_CACHE"] = cache
    os.chdir(Path(ckpt).parent)
    configs = Path(__file__).resolve().parents[2] / "configs"
    args = ["validate", "--config", str(configs / "mixtral-tiny.yaml"), "--config",
            str(configs / "expert-parallel.yaml"), "--ckpt_path", ckpt, "--data.max_bytes", "100000",
            "--data.block_size", "16"]  # fmt: skip
    # The model comes from the folder's meta.pt (vocab_size 64), not from the config (1024): the data's tokenizer
    # is then too large for it, which setup says before any work.
    with pytest.raises(ValueError, match=r"the model's vocab_size=64 \(mixtral-tiny\)"):
        run_cli(args)


def test_validate_reads_the_architecture_of_a_sharded_checkpoint(
    saved_at_ep2: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    cache = str(tmp_path_factory.getbasetemp() / "lightning-moe-cache")
    run_distributed(_validate_through_the_cli, 2, str(saved_at_ep2[0]), cache)


def _global_batches(world: int) -> torch.Tensor:
    """Two global batches of ``world * ROWS_PER_RANK`` rows: ``(2, world * ROWS_PER_RANK, SEQ)``."""
    shape = (2, world * ROWS_PER_RANK, SEQ)
    return torch.randint(0, OVERRIDES["vocab_size"], shape, generator=torch.Generator().manual_seed(3))


def _file_data(rank: int, world: int) -> DataLoader:
    """This rank's share of each global batch, one batch each, in order."""
    rows = _global_batches(world)[:, rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]
    return DataLoader(rows.reshape(-1, SEQ), batch_size=ROWS_PER_RANK)


def _resume_file_under_expert_parallelism(rank: int, world: int, ckpt: str, expected_file: str) -> None:
    module = _module(seed=1)  # different weights: everything must come from the checkpoint
    trainer = _trainer(world, ep=world, max_steps=3)
    trainer.fit(module, train_dataloaders=_file_data(rank, world), ckpt_path=ckpt)
    assert trainer.global_step == 3
    assert isinstance(module.model.layers[0].ffn.experts.w1, DTensor)
    expected = torch.load(expected_file)
    for name, param in module.model.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        torch.testing.assert_close(
            full.detach(), expected[name], atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_a_single_device_checkpoint_file_resumes_under_expert_parallelism(tmp_path: Path) -> None:
    # Two AdamW steps on one device, saved as one file; the third step taken on one device from that file, and
    # at EP=2 from the same file, gives the same weights: the AdamW moments (two parameter groups, keyed by
    # position in the file) reach the right experts' and layers' shards.
    world = 2

    def single_device(max_steps: int) -> pl.Trainer:
        return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False)  # fmt: skip

    data = DataLoader(_global_batches(world).reshape(-1, SEQ), batch_size=world * ROWS_PER_RANK)
    module = _module(seed=0)
    trainer = single_device(2)
    trainer.fit(module, train_dataloaders=data)
    ckpt = tmp_path / "single.ckpt"
    trainer.save_checkpoint(ckpt)
    assert len(torch.load(ckpt, weights_only=False)["optimizer_states"][0]["param_groups"]) == 2

    resumed = _module(seed=1)
    single_device(3).fit(resumed, train_dataloaders=data, ckpt_path=ckpt)
    expected = tmp_path / "expected.pt"
    torch.save({name: p.detach() for name, p in resumed.model.named_parameters()}, expected)
    run_distributed(_resume_file_under_expert_parallelism, world, str(ckpt), str(expected))


def _predict_through_the_cli(rank: int, world: int, folder: str, cache: str) -> None:
    import os

    from lightning_moe.cli import run_cli

    os.environ["LIGHTNING_MOE_CACHE"] = cache
    os.chdir(folder)
    configs = Path(__file__).resolve().parents[2] / "configs"
    with pytest.warns(UserWarning, match="runs a freshly initialised model"):
        cli = run_cli(["predict", "--config", str(configs / "mixtral-tiny.yaml"), "--config",
                       str(configs / "expert-parallel.yaml"), "--data.max_bytes", "100000", "--data.block_size", "16",
                       "--data.batch_size", "3", "--trainer.limit_predict_batches", "1"])  # fmt: skip
    log_dir = cli.trainer.log_dir  # collective: on every rank
    if rank == 0:  # every rank's continuations, gathered: one batch of 3 prompts per rank
        written = (Path(log_dir) / "predictions.txt").read_text()
        assert written.count("PROMPT\n") == 3 * world


def test_predict_under_expert_parallelism_writes_every_ranks_continuations(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cache = str(tmp_path_factory.getbasetemp() / "lightning-moe-cache")
    run_distributed(_predict_through_the_cli, 2, str(tmp_path), cache)


def test_load_from_checkpoint_reads_a_sharded_checkpoint_folder(saved_at_ep2: tuple[Path, Path]) -> None:
    # Lightning's own load_from_checkpoint failed on a folder with a bare IsADirectoryError.
    ckpt, logits_file = saved_at_ep2
    module = CausalLMModule.load_from_checkpoint(ckpt, map_location="cpu")
    torch.testing.assert_close(_logits(module), torch.load(logits_file), atol=1e-5, rtol=1e-5)
    assert module.tokenizer_json == _tokenizer().to_str() and module.hparams.overrides == OVERRIDES


def test_load_from_checkpoint_names_what_a_folder_lacks(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(FileNotFoundError, match="is invalid"):
        CausalLMModule.load_from_checkpoint(tmp_path)
