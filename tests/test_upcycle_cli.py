"""``--model.upcycle_from``: an MoE fit starts from a dense run's checkpoint and reloads from its own."""

import pytest
import torch

from lightning_moe.cli import run_cli
from lightning_moe.module import CausalLMModule
from lightning_moe.nn.moe import MoELayer


@pytest.fixture(autouse=True)
def shared_cache(tmp_path_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_MOE_CACHE", str(tmp_path_factory.getbasetemp() / "lightning-moe-cache"))
    monkeypatch.chdir(tmp_path)


def _fit(tmp_path, name, *extra):
    return run_cli([
        "fit", "--model", "lightning_moe.module.CausalLMModule", "--trainer.accelerator", "cpu",
        "--data.max_bytes", "200000", "--data.block_size", "32", "--data.batch_size", "4",
        "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "3",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / name),
        "--model.warmup_steps", "1", *extra,
    ])  # fmt: skip


def test_fit_upcycle_from_a_dense_checkpoint_and_reload_the_upcycled_run(tmp_path):
    dense = _fit(tmp_path, "dense", "--model.arch", "mixtral-tiny-dense")
    dense_ckpt = tmp_path / "dense.ckpt"
    dense.trainer.save_checkpoint(dense_ckpt)

    module = CausalLMModule(upcycle_from=str(dense_ckpt), upcycle={"num_experts": 4})
    assert module.hparams.arch == "mixtral-tiny-dense"
    assert module.hparams.upcycle["num_experts"] == 4 and module.hparams.upcycle["top_k"] == 2
    assert "upcycle_from" not in module.hparams
    ids = torch.randint(0, 1024, (2, 16))
    dense_module = dense.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(ids).logits, dense_module(ids).logits, atol=1e-5, rtol=0)

    moe = _fit(tmp_path, "moe", "--model.upcycle_from", str(dense_ckpt))
    assert moe.trainer.global_step == 3
    assert sum(isinstance(m, MoELayer) for m in moe.model.modules()) == 2
    moe_ckpt = tmp_path / "moe.ckpt"
    moe.trainer.save_checkpoint(moe_ckpt)
    dense_ckpt.unlink()  # the upcycled run reloads without the dense checkpoint
    reloaded = CausalLMModule.load_from_checkpoint(moe_ckpt, map_location="cpu")
    for key, value in moe.model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value)


def test_upcycle_from_errors(tmp_path):
    with pytest.raises(ValueError, match="upcycle_from='nope.ckpt' is invalid: no such file"):
        CausalLMModule(upcycle_from="nope.ckpt")
    with pytest.raises(ValueError, match="unknown keys \\['experts'\\]"):
        CausalLMModule(arch="mixtral-tiny-dense", upcycle={"experts": 4})
    with pytest.raises(ValueError, match="does not support an MoE model"):
        CausalLMModule(arch="mixtral-tiny", upcycle={})


def test_resuming_an_upcycled_run_with_its_own_command_and_checkpoint_file(tmp_path):
    # The dense run built with the dense override: its overrides travel into the upcycled run's checkpoint, and
    # the resume command (the upcycle command plus --ckpt_path FILE) used to refuse them next to upcycle_from.
    dense = _fit(tmp_path, "dense", "--model.arch", "mixtral-tiny", "--model.overrides", "{dense: active}")
    dense_ckpt = tmp_path / "dense.ckpt"
    dense.trainer.save_checkpoint(dense_ckpt)
    command = ["--model.upcycle_from", str(dense_ckpt), "--model.upcycle", "{num_experts: 4}"]
    moe = _fit(tmp_path, "moe", *command)
    moe_ckpt = tmp_path / "moe.ckpt"
    moe.trainer.save_checkpoint(moe_ckpt)
    resumed = _fit(tmp_path, "moe", *command, "--ckpt_path", str(moe_ckpt), "--trainer.max_steps", "4")
    assert resumed.trainer.global_step == 4
    assert resumed.model.hparams.overrides == {"dense": "active"} and resumed.model.hparams.upcycle["num_experts"] == 4
    assert sum(isinstance(m, MoELayer) for m in resumed.model.modules()) == 2


def test_validate_with_upcycle_from_does_not_call_the_model_freshly_initialised(tmp_path, recwarn):
    # The weights come from the dense checkpoint; the warning for a run without weights was wrong here.
    dense = _fit(tmp_path, "dense", "--model.arch", "mixtral-tiny-dense")
    dense_ckpt = tmp_path / "dense.ckpt"
    dense.trainer.save_checkpoint(dense_ckpt)
    recwarn.clear()
    cli = run_cli([
        "validate", "--model", "lightning_moe.module.CausalLMModule", "--trainer.accelerator", "cpu",
        "--data.max_bytes", "200000", "--data.block_size", "32", "--data.batch_size", "4",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "validate"), "--model.upcycle_from", str(dense_ckpt),
    ])  # fmt: skip
    assert not [w for w in recwarn if "freshly initialised" in str(w.message)]
    assert "val/loss" in cli.trainer.callback_metrics
