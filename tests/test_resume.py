"""Resuming and checkpoint safety: `fit --ckpt_path last` continues exactly; saves are atomic."""

import warnings

import fsspec.implementations.local
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_moe.callbacks import LastCheckpoint
from lightning_moe.data import TextDataModule
from lightning_moe.module import CausalLMModule

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i * i}  # square\n" for i in range(60))


class Crash(Exception):
    pass


class CrashAfter(Callback):
    """Kills the run once ``step`` optimizer steps are done (after the checkpoint at that step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"killed at step {self.step}")


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _data(tmp_path, vocab_size=300):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "corpus.txt").write_text(TEXT)
    return TextDataModule(sources=[str(tmp_path / "corpus.txt")], vocab_size=vocab_size, block_size=16, batch_size=8,
                          val_fraction=0.1, cache_dir=str(tmp_path / "cache"))  # fmt: skip


def _fit(tmp_path, max_steps, ckpt_path=None, every=None, crash_after=None, checkpoint=ModelCheckpoint, callbacks=(),
         overrides=None, **module_args):  # fmt: skip
    torch.manual_seed(0)
    recorder = LossRecorder()
    callbacks = [recorder, *callbacks] + ([CrashAfter(crash_after)] if crash_after else [])
    if every:
        callbacks.append(checkpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=every))
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks,
                        default_root_dir=tmp_path)  # fmt: skip
    overrides = {"dim": 32, "ffn_hidden": 32, **(overrides or {})}
    module = CausalLMModule(arch="mixtral-tiny", overrides=overrides, warmup_steps=3, **module_args)
    trainer.fit(module, _data(tmp_path), ckpt_path=ckpt_path)
    return trainer, recorder.losses


def test_resume_from_last_repeats_the_uninterrupted_losses(tmp_path):
    data = _data(tmp_path)
    data.setup("fit")
    batches_per_epoch = len(data.train_set) // data.batch_size
    total = 2 * batches_per_epoch + 3  # the resumed part crosses an epoch boundary
    stop = batches_per_epoch - 2  # interrupt mid-epoch
    _, uninterrupted = _fit(tmp_path / "a", total)
    with pytest.raises(Crash):
        _fit(tmp_path / "b", total, every=stop, crash_after=stop)
    last = tmp_path / "b" / "ckpt" / "last.ckpt"
    assert last.is_file()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, resumed = _fit(tmp_path / "b", total, ckpt_path=str(last))
    assert len(resumed) == total - stop
    assert resumed == uninterrupted[stop:]
    # The loader resumes mid-epoch exactly, and says so: no "dataloader is not resumable" warning.
    assert not [w for w in caught if "not resumable" in str(w.message)]


def _batches_per_epoch(tmp_path):
    data = _data(tmp_path)
    data.setup("fit")
    return len(data.train_set) // data.batch_size


def test_last_checkpoint_saves_the_final_step_between_periodic_saves(tmp_path):
    # Lightning's ModelCheckpoint skips its end-of-training save once any last.ckpt was written: the steps after
    # the last periodic save were lost.
    _fit(tmp_path / "plain", 6, every=4)
    assert torch.load(tmp_path / "plain" / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 4
    _fit(tmp_path / "ours", 6, every=4, checkpoint=LastCheckpoint)
    assert torch.load(tmp_path / "ours" / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 6
    # A second run of the same settings rewrites last.ckpt (no last-v1.ckpt beside it).
    _fit(tmp_path / "ours", 5, every=4, checkpoint=LastCheckpoint)
    assert sorted(p.name for p in (tmp_path / "ours" / "ckpt").iterdir()) == ["last.ckpt"]
    assert torch.load(tmp_path / "ours" / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 5


class BatchRecorder(Callback):
    """Each training batch's tensor and the learning rate it trains with."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(batch.clone())
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("where", ["mid-epoch", "epoch end"])
def test_extending_a_finished_run_continues_its_data_and_takes_the_new_schedule(tmp_path, where):
    # A run that ends at max_steps is saved with its epoch counted as finished; extended with a larger max_steps
    # it must still see the rest of that epoch's batches first, in the uninterrupted run's order (it used to
    # start the next epoch's permutation). Its weights differ from the uninterrupted run's (the cosine schedule
    # ran to the smaller max_steps), but from the first resumed step on it trains at the new schedule's rates.
    batches_per_epoch = _batches_per_epoch(tmp_path)
    stop = 3 if where == "mid-epoch" else batches_per_epoch
    total = batches_per_epoch + 5
    uninterrupted = BatchRecorder()
    _fit(tmp_path / "a", total, callbacks=[uninterrupted])
    _fit(tmp_path / "b", stop, every=1000, checkpoint=LastCheckpoint)
    resumed = BatchRecorder()
    _fit(tmp_path / "b", total, every=1000, checkpoint=LastCheckpoint, callbacks=[resumed],
         ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))  # fmt: skip
    assert len(resumed.batches) == total - stop
    assert all(torch.equal(a, b) for a, b in zip(resumed.batches, uninterrupted.batches[stop:], strict=True))
    assert resumed.lrs == pytest.approx(uninterrupted.lrs[stop:], rel=1e-12)


def test_resuming_from_a_checkpoint_at_an_epoch_boundary_repeats_the_uninterrupted_losses(tmp_path):
    batches_per_epoch = _batches_per_epoch(tmp_path)
    total = batches_per_epoch + 4
    _, uninterrupted = _fit(tmp_path / "a", total)
    with pytest.raises(Crash):
        _fit(tmp_path / "b", total, every=batches_per_epoch, crash_after=batches_per_epoch)
    _, resumed = _fit(tmp_path / "b", total, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert resumed == uninterrupted[batches_per_epoch:]


def test_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    trainer, _ = _fit(tmp_path, 2)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    before = torch.load(path, weights_only=False)["state_dict"]

    original_write = fsspec.implementations.local.LocalFileOpener.write

    def write_half_then_die(self, data):
        original_write(self, data[: len(data) // 2])
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(fsspec.implementations.local.LocalFileOpener, "write", write_half_then_die)
    with torch.no_grad():
        for p in trainer.lightning_module.parameters():
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(path)
    monkeypatch.undo()
    after = torch.load(path, weights_only=False)["state_dict"]
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert CausalLMModule.load_from_checkpoint(path) is not None


def test_data_with_another_tokenizer_is_refused_on_resume_and_validate(tmp_path):
    _fit(tmp_path, 2, every=1)
    last = str(tmp_path / "ckpt" / "last.ckpt")
    module = CausalLMModule(arch="mixtral-tiny", overrides={"dim": 32, "ffn_hidden": 32}, warmup_steps=3)
    options = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                   limit_val_batches=1, num_sanity_val_steps=0)  # fmt: skip
    match = r"the data's tokenizer differs from the checkpoint's.*'vocab_size': \(300, 280\)"
    with pytest.raises(ValueError, match=match):
        L.Trainer(max_steps=3, **options).fit(module, _data(tmp_path, vocab_size=280), ckpt_path=last)
    with pytest.raises(ValueError, match=match):
        L.Trainer(**options).validate(module, _data(tmp_path, vocab_size=280), ckpt_path=last)
    # The same data settings pass.
    assert L.Trainer(**options).validate(module, _data(tmp_path), ckpt_path=last)[0]["val/loss"] > 0


def test_a_checkpoint_of_another_network_is_refused_by_name(tmp_path):
    # `--ckpt_path last` takes the network from the command line: a different one gets an error naming the field,
    # not a size mismatch from deep inside load_state_dict.
    _fit(tmp_path, 1, every=1)
    other = CausalLMModule(arch="mixtral-tiny", overrides={"dim": 32, "ffn_hidden": 32, "num_experts": 4})
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, limit_val_batches=0)  # fmt: skip
    with pytest.raises(ValueError, match=r"overrides=\{.*'num_experts': 4\} is invalid for this checkpoint, which"):
        trainer.fit(other, _data(tmp_path), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))


def test_resume_draws_the_random_numbers_of_the_uninterrupted_run(tmp_path):
    # Router jitter draws from torch's generator, which no checkpoint holds: each batch's draws are seeded from the
    # run's seed and the batch's place, so the resumed steps repeat the uninterrupted ones (they used to differ).
    jitter = {"router_jitter": 0.5}
    _, uninterrupted = _fit(tmp_path / "a", 8, overrides=jitter)
    with pytest.raises(Crash):
        _fit(tmp_path / "b", 8, every=4, crash_after=4, overrides=jitter)
    _, resumed = _fit(tmp_path / "b", 8, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"), overrides=jitter)
    assert resumed == uninterrupted[4:]
    _, without = _fit(tmp_path / "c", 8)
    assert without[1:] != uninterrupted[1:]  # the jitter does change the losses


def test_the_capacity_tuner_resumes_its_open_window(tmp_path):
    from lightning_moe.callbacks import CapacityFactorTuner

    def tuner():
        return CapacityFactorTuner(interval=4, smoothing=0.0, target_drop_rate=0.05)

    capacity = {"capacity_factor": 1.0}
    uninterrupted_tuner = tuner()
    _, uninterrupted = _fit(tmp_path / "a", 9, overrides=capacity, callbacks=[uninterrupted_tuner])
    with pytest.raises(Crash):  # killed at step 6, halfway through the window that closes at step 8
        _fit(tmp_path / "b", 9, every=6, crash_after=6, overrides=capacity, callbacks=[tuner()])
    resumed_tuner = tuner()
    _, resumed = _fit(tmp_path / "b", 9, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"), overrides=capacity,
                      callbacks=[resumed_tuner])  # fmt: skip
    assert resumed_tuner.history[-1]["step"] == 8
    assert resumed_tuner.history[-1] == uninterrupted_tuner.history[-1]
    assert resumed == uninterrupted[6:]


class PoisonGradient(Callback):
    """Makes one gradient nan after the backward of step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            pl_module.model.layers[0].attn_norm.weight.grad[0] = float("nan")


def test_a_non_finite_gradient_is_never_applied_or_checkpointed(tmp_path):
    from lightning_moe.module import NonFiniteLossError

    # raise: stops before the optimizer step, naming the parameter; the last checkpoint holds the step before.
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient of model.layers.0.attn_norm.weight at step 3"):
        _fit(tmp_path / "raise", 6, every=1, checkpoint=LastCheckpoint, callbacks=[PoisonGradient(3)])
    saved = torch.load(tmp_path / "raise" / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())

    # skip: the step leaves every parameter as it was, and training goes on with finite weights.
    class Snapshot(Callback):
        def __init__(self) -> None:
            self.before: dict[int, dict[str, torch.Tensor]] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.before[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    snapshot = Snapshot()
    with pytest.warns(UserWarning, match=r"skipping optimizer step: non-finite gradient of model.layers.0.attn_norm"):
        trainer, _ = _fit(tmp_path / "skip", 6, callbacks=[PoisonGradient(3), snapshot], nan_policy="skip")
    before, after = snapshot.before[3], snapshot.before[4]
    assert all(torch.equal(before[k], after[k]) for k in before if "model." in k)
    assert not all(torch.equal(snapshot.before[4][k], snapshot.before[5][k]) for k in before if "model." in k)
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())


def test_a_save_moved_across_filesystems_and_killed_leaves_last_ckpt_whole(tmp_path, monkeypatch):
    # Lightning writes into $TMPDIR and moves the file into place; across filesystems that move is a copy, and a
    # kill during it cut last.ckpt. LastCheckpoint renames a complete file beside it instead.
    _fit(tmp_path, 2, every=1, checkpoint=LastCheckpoint)
    last = tmp_path / "ckpt" / "last.ckpt"
    before = torch.load(last, weights_only=False)["state_dict"]

    def copy_half_then_die(src, dst):
        data = open(src, "rb").read()
        with open(dst, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsspec.implementations.local.shutil, "move", copy_half_then_die)
    with pytest.raises(OSError, match="No space left"):
        _fit(tmp_path, 3, every=1, checkpoint=LastCheckpoint, ckpt_path=str(last))
    monkeypatch.undo()
    after = torch.load(last, weights_only=False)
    assert after["global_step"] == 2
    assert all(torch.equal(after["state_dict"][k], before[k]) for k in before)


def test_last_finds_the_checkpoint_of_a_sharded_save_killed_during_its_swap(tmp_path):
    from lightning_moe.strategies.checkpoint import interrupted_swap, previous_path, staging_path

    folder = tmp_path / "ckpt"
    last = folder / "last.ckpt"
    staging, previous = staging_path(last), previous_path(last)
    for path in (staging, previous):
        path.mkdir(parents=True)
    assert interrupted_swap(last) == previous  # the staging folder holds no .metadata: not a finished save
    (staging / ".metadata").write_bytes(b"")
    assert interrupted_swap(last) == staging  # finished (the swap starts after every rank wrote): the newest
    callback = LastCheckpoint(dirpath=folder, save_last=True)
    trainer = L.Trainer(callbacks=[callback], logger=False, enable_progress_bar=False)
    assert callback._find_last_checkpoints(trainer) == {str(staging)}
    last.mkdir()  # swapped in: nothing to recover
    assert interrupted_swap(last) is None
    assert callback._find_last_checkpoints(trainer) == {str(last)}


def test_the_final_step_is_saved_as_a_periodic_save_of_that_step_would_be(tmp_path):
    # Saved after the loops had finished, the final checkpoint's counters were a step ahead: a resumed run logged
    # every step one later (and one more per resume) and counted the epoch as done.
    def loops(path):
        state = torch.load(path, weights_only=False)
        return state["global_step"], state["epoch"], state["loops"]["fit_loop"]["epoch_loop.state_dict"]

    _fit(tmp_path / "periodic", 5, every=5, checkpoint=LastCheckpoint)
    _fit(tmp_path / "final", 5, every=1000, checkpoint=LastCheckpoint)
    assert loops(tmp_path / "final" / "ckpt" / "last.ckpt") == loops(tmp_path / "periodic" / "ckpt" / "last.ckpt")


def test_starting_weights_are_refused_with_data_of_another_tokenizer(tmp_path):
    # upcycle_from and init_from start from trained weights: data tokenized otherwise would scramble every token.
    from lightning_moe.interop import to_hf

    options = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                   limit_val_batches=0, num_sanity_val_steps=0)  # fmt: skip
    dense = CausalLMModule(arch="mixtral-tiny-dense", overrides={"dim": 32, "ffn_hidden": 32})
    trainer = L.Trainer(max_steps=1, **options)
    trainer.fit(dense, _data(tmp_path))
    trainer.save_checkpoint(tmp_path / "dense.ckpt")
    to_hf(
        CausalLMModule(arch="mixtral-tiny", overrides={"dim": 32, "ffn_hidden": 32}, warmup_steps=1), tmp_path / "none"
    )
    trained = CausalLMModule(arch="mixtral-tiny", overrides={"dim": 32, "ffn_hidden": 32})
    L.Trainer(max_steps=1, **options).fit(trained, _data(tmp_path))
    to_hf(trained, tmp_path / "hf")  # a fit module carries its tokenizer: written as tokenizer.json
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and not (tmp_path / "none" / "tokenizer.json").exists()
    for start in ({"upcycle_from": str(tmp_path / "dense.ckpt")}, {"init_from": str(tmp_path / "hf")}):
        ((key, value),) = start.items()
        with pytest.raises(ValueError, match=rf"{key}='{value}' is invalid with this data: its weights were trained"):
            L.Trainer(max_steps=1, **options).fit(CausalLMModule(**start), _data(tmp_path, vocab_size=280))
        L.Trainer(max_steps=1, **options).fit(CausalLMModule(**start), _data(tmp_path))  # the same data: fine
    with pytest.warns(UserWarning, match=r"init_from='.*none' holds no tokenizer: the data's tokenizer must be"):
        L.Trainer(max_steps=1, **options).fit(CausalLMModule(init_from=str(tmp_path / "none")), _data(tmp_path))
