"""Every ``lightning-moe`` subcommand's flags: outputs land where documented, bad values are refused before work.

And fit's end-of-fit summary, a printed config rerun, ``generate`` against a greedy loop over the full forward.
"""

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_moe.cli import generate_main, main, run_cli
from lightning_moe.compare import load_config
from lightning_moe.data import TextDataModule
from lightning_moe.data.tokenizer import EOS_TOKEN
from lightning_moe.module import CausalLMModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MIXTRAL = str(CONFIGS / "mixtral-tiny.yaml")


@pytest.fixture(autouse=True)
def shared_cache(tmp_path_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_MOE_CACHE", str(tmp_path_factory.getbasetemp() / "lightning-moe-cache"))
    monkeypatch.chdir(tmp_path)  # the configs write logs and checkpoints relative to the working directory


class Forbidden(Exception):
    pass


def _forbid(*args, **kwargs):
    raise Forbidden("the run went past its checks")


def _tiny(*extra):
    return [
        "--data.max_bytes", "60000", "--data.block_size", "32", "--data.batch_size", "4",
        "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_model_summary", "false", *extra,
    ]  # fmt: skip


def test_a_saved_config_rerun_under_another_name_leaves_the_first_runs_checkpoint_alone(tmp_path):
    # Lightning saves each run's config.yaml for reruns. The checkpoint folder follows the final run name, so a
    # rerun of that file under another name must write its own folder, not overwrite the first run's last.ckpt.
    config = str(CONFIGS / "mixtral-tiny.yaml")
    first = run_cli(["fit", "--config", config, *_tiny("--trainer.max_steps", "1")])
    first_ckpt = Path(first.trainer.checkpoint_callback.last_model_path)
    assert first_ckpt == tmp_path / "lightning_logs/mixtral-tiny/checkpoints/last.ckpt"
    first_bytes = first_ckpt.read_bytes()
    saved = Path(first.trainer.log_dir) / "config.yaml"
    second = run_cli(["fit", "--config", str(saved), "--trainer.max_steps", "2", "--trainer.logger.init_args.name",
                      "again"])  # fmt: skip
    assert second.trainer.global_step == 2  # started afresh: --ckpt_path was not given
    second_ckpt = Path(second.trainer.checkpoint_callback.last_model_path)
    assert second_ckpt == tmp_path / "lightning_logs/again/checkpoints/last.ckpt"
    assert first_ckpt.read_bytes() == first_bytes
    assert torch.load(first_ckpt, weights_only=True)["global_step"] == 1
    # validate --ckpt_path last under that name finds that run's checkpoint.
    validate = run_cli(["validate", "--config", str(saved), "--trainer.logger.init_args.name", "again",
                        "--ckpt_path", "last"])  # fmt: skip
    assert Path(validate.trainer.ckpt_path) == second_ckpt
    assert "val/loss" in validate.trainer.callback_metrics


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_ckpt_path_last_without_a_last_checkpoint_is_refused_before_evaluating(tmp_path, monkeypatch, subcommand):
    # Lightning only warns and then evaluates a freshly initialised model: the numbers would pass for the run's.
    monkeypatch.setattr(TextDataModule, "prepare_data", _forbid)
    config = str(CONFIGS / "mixtral-tiny.yaml")
    folder = re.escape(str(tmp_path / "lightning_logs/nothing/checkpoints"))
    match = rf"ckpt_path='last' is invalid for {subcommand}: no last checkpoint in {folder}"
    with pytest.raises(ValueError, match=match):
        run_cli([subcommand, "--config", config, *_tiny("--trainer.logger.init_args.name", "nothing"),
                 "--ckpt_path", "last"])  # fmt: skip


@pytest.mark.parametrize("value", ["0", "-2"])
def test_accumulate_grad_batches_below_one_is_refused_before_tokenizing(monkeypatch, value):
    # Lightning takes any int; 0 ended the first training batch with ZeroDivisionError, after the sanity check.
    monkeypatch.setattr(TextDataModule, "prepare_data", _forbid)
    config = str(CONFIGS / "mixtral-tiny.yaml")
    with pytest.raises(ValueError, match=rf"trainer.accumulate_grad_batches={value} is invalid: must be an int >= 1"):
        run_cli(["fit", "--config", config, *_tiny("--trainer.accumulate_grad_batches", value)])


@pytest.mark.parametrize("value", ["-1.0", "-0.5"])
def test_a_negative_gradient_clip_val_is_refused_before_tokenizing(monkeypatch, value):
    # Lightning returns without clipping for a value <= 0: a negative value would silently train unclipped.
    monkeypatch.setattr(TextDataModule, "prepare_data", _forbid)
    config = str(CONFIGS / "mixtral-tiny.yaml")
    with pytest.raises(ValueError, match=rf"trainer.gradient_clip_val={float(value)!r} is invalid: must be a finite"):
        run_cli(["fit", "--config", config, *_tiny("--trainer.gradient_clip_val", value)])


def _not_checkpoints(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"pytorch-lightning_version": "2.6", "state_dict": {"w": torch.zeros(1000)}}, good)
    (tmp_path / "cut.ckpt").write_bytes(good.read_bytes()[:2000])
    (tmp_path / "text.ckpt").write_text("model: mixtral-tiny\n")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    torch.save([1, 2], tmp_path / "list.ckpt")
    return ["cut.ckpt", "text.ckpt", "empty.ckpt", "list.ckpt"]


def test_upcycle_from_a_file_that_is_no_checkpoint_is_refused_by_name(tmp_path):
    for name in _not_checkpoints(tmp_path):
        path = str(tmp_path / name)
        with pytest.raises(ValueError, match=rf"upcycle_from='{path}' is invalid: not a .*checkpoint"):
            CausalLMModule(upcycle_from=path)


def test_upcycle_from_on_the_command_line_names_the_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(TextDataModule, "prepare_data", _forbid)
    path = str(tmp_path / "notes.ckpt")
    Path(path).write_text("def f(x):\n    return x\n")
    with pytest.raises(ValueError, match=rf"upcycle_from='{path}' is invalid: not a .*checkpoint"):
        run_cli(["fit", "--config", str(CONFIGS / "mixtral-tiny.yaml"), *_tiny("--model.init_args.upcycle_from", path)])


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        # The model's limits: refused by compare's own field names, before the first run tokenizes the corpus.
        (["--vocab_size", "2048"], r"vocab_size=2048 is invalid: more than mixtral-tiny's vocab_size=1024"),
        (["--arch", "deepseek-tiny", "--block_size", "2048"],
         r"block_size=2048 is invalid: longer than deepseek-tiny's max_seq_len=1024"),
        (["--data_seed", "-1"], r"data_seed=-1 is invalid: must be >= 0"),
        # Two runs of one seed are the same run: a spread of 0 and one TensorBoard folder written twice.
        (["--seeds", "[0, 1, 0]"], r"seeds=\[0, 1, 0\] is invalid: each seed must appear once"),
    ],
)  # fmt: skip
def test_compare_settings_the_model_or_data_cannot_take_are_refused_before_any_run(tmp_path, monkeypatch, argv, match):
    monkeypatch.setattr(TextDataModule, "prepare_data", _forbid)
    monkeypatch.setattr(CausalLMModule, "__init__", _forbid)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        main(["compare", "--out_dir", str(out), "--max_steps", "1", *argv])
    assert not out.exists()  # nothing was written


def test_compare_config_file_errors_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match=r"config='nope.yaml' is invalid: no such file"):
        load_config(["--config", "nope.yaml"])
    listed = tmp_path / "list.yaml"
    listed.write_text("- arch: mixtral-tiny\n")
    with pytest.raises(ValueError, match=rf"config='{listed}' is invalid: expected a mapping of CompareConfig fields"):
        load_config(["--config", str(listed)])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--trainer.max_steps", "0"], r"trainer.max_steps=0 is invalid for fit: it trains no step"),
        (["--trainer.max_epochs", "0"], r"trainer.max_epochs=0 is invalid for fit: it trains no step"),
        # The config validates by steps (check_val_every_n_epoch: null); both ways divided by zero in the first step.
        (["--trainer.val_check_interval", "0"], r"trainer.val_check_interval=0 is invalid: an int must be >= 1"),
        (["--trainer.val_check_interval", "0", "--trainer.check_val_every_n_epoch", "1"],
         r"trainer.val_check_interval=0 is invalid: an int must be >= 1"),
    ],
)  # fmt: skip
def test_fit_settings_that_train_nothing_or_crash_are_refused_before_tokenizing(monkeypatch, args, match):
    monkeypatch.setattr(TextDataModule, "prepare_data", _forbid)
    with pytest.raises(ValueError, match=match):
        run_cli(["fit", "--config", MIXTRAL, *_tiny(*args)])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--model.init_args.overrides", "{num_experts: 0}"], r"num_experts=0 is invalid: must be >= 1"),
        (["--model.init_args.overrides", "{num_experts: 8.0}"], r"num_experts=8.0 is invalid: must be an int"),
        (["--model.init_args.overrides", "{top_k: 9}"], r"top_k=9 is invalid: must be <= num_experts \(8\)"),
        (["--model.init_args.overrides", "{num_expert: 4}"],
         r"override num_expert=4 is invalid for MixtralConfig: valid keys are .*num_experts"),
        (["--model.arch", "mixtral"], r"arch='mixtral' is not a known preset; closest: mixtral-tiny"),
    ],
)  # fmt: skip
def test_bad_model_overrides_are_refused_by_name_before_tokenizing(monkeypatch, args, match):
    monkeypatch.setattr(TextDataModule, "prepare_data", _forbid)
    with pytest.raises(ValueError, match=match):
        run_cli(["fit", "--config", MIXTRAL, *_tiny(*args)])


def _summary(capsys):
    out = capsys.readouterr().out
    return out[out.rindex("=" * 72 + "\n", 0, out.rindex("=" * 72)) :]


def test_the_summary_says_when_its_validation_loss_is_not_the_final_models(capsys):
    # Validated at step 2, ended at step 3: the loss printed is step 2's, which the summary presented as the result.
    cli = run_cli(["fit", "--config", MIXTRAL, *_tiny("--trainer.max_steps", "3", "--trainer.val_check_interval", "2")])
    assert cli.trainer.global_step == 3
    summary = _summary(capsys)
    assert "validation loss" in summary
    assert "that validation ran at step 2, not at the final step 3" in summary
    # Validated at the final step: nothing to add.
    run_cli(["fit", "--config", MIXTRAL, *_tiny("--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                                               "--trainer.logger.init_args.name", "exact")])  # fmt: skip
    summary = _summary(capsys)
    assert "validation loss" in summary and "that validation ran" not in summary and "no validation" not in summary
    # `--trainer.max_steps 100`, as the configs suggest, stops before their val_check_interval of 500.
    run_cli(["fit", "--config", MIXTRAL, *_tiny("--trainer.max_steps", "2", "--trainer.logger.init_args.name", "none")])
    summary = _summary(capsys)
    assert not [line for line in summary.splitlines() if line.startswith("validation loss")]
    assert "no validation ran up to step 2 (trainer.val_check_interval=500)" in summary


def test_the_summarys_validate_command_runs_as_printed_and_validates_the_final_model(capsys):
    # A README command without the run's config fails (LightningCLI needs the model and data settings): the summary
    # prints one that names the config the run saved, so it validates with the data the run trained on.
    cli = run_cli(["fit", "--config", MIXTRAL, *_tiny("--trainer.max_steps", "2", "--data.block_size", "16")])
    (line,) = [line for line in _summary(capsys).splitlines() if line.startswith("validate: ")]
    argv = shlex.split(line.removeprefix("validate: "))
    assert argv[:2] == ["lightning-moe", "validate"]
    assert argv[argv.index("--ckpt_path") + 1] == cli.trainer.checkpoint_callback.last_model_path
    validated = run_cli(argv[1:])
    assert validated.datamodule.block_size == 16
    expected = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]["val/loss"]
    assert float(validated.trainer.callback_metrics["val/loss"]) == pytest.approx(expected, rel=1e-6)


def test_resuming_with_max_steps_the_checkpoint_has_reached_is_refused_before_any_work(monkeypatch):
    run_cli(["fit", "--config", MIXTRAL, *_tiny("--trainer.max_steps", "3", "--trainer.logger.init_args.name", "r")])
    monkeypatch.setattr(TextDataModule, "prepare_data", _forbid)
    for max_steps in ("3", "2"):
        match = (
            rf"trainer.max_steps={max_steps} is invalid for resuming from '.*last\.ckpt': the checkpoint is at step 3"
        )
        args = _tiny("--trainer.max_steps", max_steps, "--trainer.logger.init_args.name", "r")
        with pytest.raises(ValueError, match=match + ", so the run would train no step"):
            run_cli(["fit", "--config", MIXTRAL, *args, "--ckpt_path", "last"])


def test_the_summarys_generate_command_runs_as_printed_from_a_folder_with_spaces(tmp_path, capsys):
    save_dir = str(tmp_path / "my logs")
    cli = run_cli(["fit", "--config", MIXTRAL, *_tiny("--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
                                                     "--trainer.logger.init_args.save_dir", save_dir)])  # fmt: skip
    (line,) = [line for line in _summary(capsys).splitlines() if line.startswith("generate: ")]
    argv = shlex.split(line.removeprefix("generate: "))
    assert argv[:2] == ["lightning-moe", "generate"]
    assert argv[argv.index("--ckpt_path") + 1] == cli.trainer.checkpoint_callback.last_model_path
    assert " " in cli.trainer.checkpoint_callback.last_model_path
    assert generate_main([*argv[2:], "--max_new_tokens", "2"]).startswith("def ")


def test_a_printed_config_reruns_to_the_same_model_and_losses(tmp_path, capsys):
    args = ["fit", "--config", MIXTRAL, *_tiny("--trainer.max_steps", "2", "--data.block_size", "16",
            "--model.init_args.overrides", "{num_layers: 1, top_k: 1}", "--model.init_args.lr", "0.01")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    first = run_cli(args)
    again = run_cli(["fit", "--config", str(printed), "--trainer.logger.init_args.name", "again"])
    assert again.model.hparams.overrides == {"num_layers": 1, "top_k": 1} and again.model.hparams.lr == 0.01
    assert again.datamodule.block_size == 16
    for key in ("train/loss", "train/total_loss"):
        assert torch.equal(first.trainer.callback_metrics[key], again.trainer.callback_metrics[key])
    for (name, a), b in zip(first.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_generate_continues_greedily_as_a_loop_over_the_full_forward(tmp_path):
    cli = run_cli(["fit", "--config", MIXTRAL, *_tiny("--trainer.max_steps", "2", "--trainer.limit_val_batches", "0")])
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    text = generate_main(["--ckpt_path", ckpt, "--prompt", "def read(path):", "--max_new_tokens", "12"])
    # Reference: no key/value cache, the whole sequence through the model for every new token, argmax.
    module = CausalLMModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    tokenizer = cli.datamodule.tokenizer
    ids = torch.tensor([tokenizer.encode("def read(path):").ids])
    with torch.no_grad():
        for _ in range(12):
            next_id = module.model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            if int(next_id) == tokenizer.token_to_id(EOS_TOKEN):
                break
    assert text == tokenizer.decode(ids[0].tolist())
    # Sampling repeats with its seed.
    sample = ["--ckpt_path", ckpt, "--max_new_tokens", "8", "--temperature", "1.0", "--top_k", "50", "--seed", "3"]
    assert generate_main(sample) == generate_main(sample)


_SIGTERM_AT_STEP_2 = """
import os, signal
import lightning.pytorch as pl

class SigtermAtStep2(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
"""


def test_a_fit_stopped_by_sigterm_exits_with_143_not_0(tmp_path):
    # Lightning ends a SIGTERMed fit with a SystemExit of no status: `fit ... && validate ...` or a scheduler would
    # take the stopped run for a finished one.
    (tmp_path / "sigterm_callback.py").write_text(_SIGTERM_AT_STEP_2)
    argv = ["fit", "--config", MIXTRAL, *_tiny("--trainer.max_steps", "50"),
            "--trainer.callbacks+=sigterm_callback.SigtermAtStep2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "lightning_moe", *argv], capture_output=True, text=True, timeout=300,
                          env=env)  # fmt: skip
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert "stopped by SIGTERM" in done.stderr
    assert "validation loss" not in done.stdout  # no summary of a finished run
