"""The lightning-moe command's edges: settings refused before work, the end-of-fit summary, reruns, generate."""

import shlex
from pathlib import Path

import pytest
import torch

from lightning_moe.cli import generate_main, main, run_cli
from lightning_moe.data import TextDataModule
from lightning_moe.data.tokenizer import EOS_TOKEN
from lightning_moe.module import CausalLMModule

MIXTRAL = str(Path(__file__).resolve().parents[1] / "configs" / "mixtral-tiny.yaml")


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
    assert "no validation ran in this run's 2 steps (trainer.val_check_interval=500)" in summary


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
