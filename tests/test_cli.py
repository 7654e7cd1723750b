"""The lightning-moe command: every config runs, tiny presets learn through the CLI, generation works."""

import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_moe.cli import generate_main, main, run_cli

ALL_CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
# Model configs are named after their preset; the others (e.g. expert-parallel.yaml) are trainer presets that
# combine with a model config.
CONFIGS = [p for p in ALL_CONFIGS if p.stem.endswith("-tiny")]


class LossRecorder(Callback):
    """Keeps every training loss (used through --trainer.callbacks+)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.fixture(autouse=True)
def shared_cache(tmp_path_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_MOE_CACHE", str(tmp_path_factory.getbasetemp() / "lightning-moe-cache"))
    monkeypatch.chdir(tmp_path)  # the configs write logs and checkpoints relative to the working directory


def _small(tmp_path, *extra):
    return [
        "--data.max_bytes", "300000",
        "--data.block_size", "64",
        "--data.batch_size", "8",
        "--trainer.default_root_dir", str(tmp_path),
        *extra,
    ]  # fmt: skip


def test_there_is_a_config_per_family():
    from lightning_moe import zoo

    assert {p.stem for p in CONFIGS} >= {"mixtral-tiny"}
    assert {p.stem for p in ALL_CONFIGS} - {p.stem for p in CONFIGS} == {"expert-parallel"}
    archs = {zoo.family_of(p.stem) for p in CONFIGS if p.stem in zoo.names()}
    assert archs == set(zoo.families())


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_parses_and_runs_fast_dev_run(config, tmp_path):
    cli = run_cli(["fit", "--config", str(config), *_small(tmp_path), "--trainer.fast_dev_run", "2"])
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 2
    # last.ckpt is rewritten during training, not only at its end: an interrupted run has something to resume.
    (checkpoint,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    max_steps = yaml.safe_load(config.read_text())["trainer"]["max_steps"]
    assert checkpoint.save_last and 0 < checkpoint._every_n_train_steps < max_steps


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_tiny_preset_learns_through_the_cli(config, tmp_path):
    recorder = "tests.test_cli.LossRecorder"
    args = ["fit", "--config", str(config), *_small(tmp_path), "--trainer.max_steps", "30",
            "--trainer.val_check_interval", "30", "--trainer.limit_val_batches", "2",
            "--model.init_args.warmup_steps", "5", "--trainer.callbacks+", recorder]  # fmt: skip
    cli = run_cli(args)
    losses = next(cb for cb in cli.trainer.callbacks if isinstance(cb, LossRecorder)).losses
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
    assert "val/loss" in cli.trainer.callback_metrics
    ckpt = Path(cli.trainer.checkpoint_callback.last_model_path)
    assert ckpt.is_file()


def test_fit_ckpt_path_last_resumes_the_previous_run(tmp_path):
    config = str(Path(__file__).resolve().parents[1] / "configs/mixtral-tiny.yaml")
    common = ["--config", config, *_small(tmp_path), "--trainer.limit_val_batches", "1"]
    first = run_cli(["fit", *common, "--trainer.max_steps", "4", "--trainer.val_check_interval", "4"])
    assert (
        Path(first.trainer.checkpoint_callback.last_model_path).parent
        == tmp_path / "lightning_logs/mixtral-tiny/checkpoints"
    )
    second = run_cli(["fit", *common, "--trainer.max_steps", "6", "--trainer.val_check_interval", "2",
                      "--ckpt_path", "last", "--trainer.callbacks+", "tests.test_cli.LossRecorder"])  # fmt: skip
    assert second.trainer.global_step == 6
    losses = next(cb for cb in second.trainer.callbacks if isinstance(cb, LossRecorder)).losses
    assert len(losses) == 2  # steps 5 and 6 only: the run continued from step 4


def test_generate_from_a_trained_checkpoint(tmp_path, capsys):
    config = str(Path(__file__).resolve().parents[1] / "configs/mixtral-tiny.yaml")
    cli = run_cli(["fit", "--config", config, *_small(tmp_path), "--trainer.max_steps", "20",
                   "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "20"])  # fmt: skip
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    text = generate_main(["--ckpt_path", ckpt, "--prompt", "def ", "--max_new_tokens", "12"])
    assert text.startswith("def ") and len(text) > len("def ")
    assert text in capsys.readouterr().out
    sampled = generate_main(["--ckpt_path", ckpt, "--prompt", "import ", "--max_new_tokens", "5",
                             "--temperature", "0.8", "--top_k", "20"])  # fmt: skip
    assert sampled.startswith("import ")
    # A tokenizer.json that truncates (as many on the Hub do) still encodes the whole prompt.
    from tokenizers import Tokenizer

    saved = torch.load(ckpt, weights_only=False)
    tokenizer = Tokenizer.from_str(saved["tokenizer_json"])
    tokenizer.enable_truncation(2)
    saved["tokenizer_json"] = tokenizer.to_str()
    torch.save(saved, tmp_path / "truncating.ckpt")
    prompt = "def main(x, y):\n    return"
    truncating = str(tmp_path / "truncating.ckpt")
    whole = generate_main(["--ckpt_path", truncating, "--prompt", prompt, "--max_new_tokens", "3"])
    assert whole.startswith(prompt)


def test_validate_test_and_predict_subcommands_load_a_checkpoint(tmp_path):
    config = str(Path(__file__).resolve().parents[1] / "configs/mixtral-tiny.yaml")
    common = ["--config", config, *_small(tmp_path), "--trainer.limit_val_batches", "1"]
    fit = run_cli(["fit", *common, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"])
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    validate = run_cli(["validate", *common, "--ckpt_path", ckpt])
    assert "val/loss" in validate.trainer.callback_metrics
    test = run_cli(["test", *common, "--trainer.limit_test_batches", "1", "--ckpt_path", ckpt])
    assert "test/loss" in test.trainer.callback_metrics
    predict = run_cli(["predict", *common, "--trainer.limit_predict_batches", "1", "--ckpt_path", ckpt])
    assert predict.trainer.state.finished
    # The continuations are decoded and written, each record the prompt (half a validation block) and more text.
    written = (Path(predict.trainer.log_dir) / "predictions.txt").read_text()
    records = written.split("-" * 72 + "\n")[1:]
    assert len(records) == 8  # one batch of --data.batch_size 8
    data = predict.datamodule
    first = data.tokenizer.decode(data.val_set[0][: data.block_size // 2].tolist())
    assert records[0].startswith(f"PROMPT\n{first}\nCONTINUATION\n")


def test_bf16_mixed_precision_trains_on_cpu(tmp_path):
    config = str(Path(__file__).resolve().parents[1] / "configs/mixtral-tiny.yaml")
    cli = run_cli(["fit", "--config", config, *_small(tmp_path), "--trainer.precision", "bf16-mixed",
                   "--trainer.fast_dev_run", "3"])  # fmt: skip
    assert cli.trainer.global_step == 3
    assert cli.trainer.precision == "bf16-mixed"


def test_end_of_fit_summary_compares_loss_with_unigram_entropy(tmp_path, capsys):
    config = str(Path(__file__).resolve().parents[1] / "configs/mixtral-tiny.yaml")
    main(["fit", "--config", config, *_small(tmp_path), "--trainer.max_steps", "4",
          "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "4"])  # fmt: skip
    out = capsys.readouterr().out
    assert "validation loss" in out and "unigram entropy of the validation tokens" in out
    assert "last.ckpt" in out and "tensorboard --logdir" in out


def test_unknown_preset_on_the_command_line_fails_before_training(tmp_path):
    config = str(Path(__file__).resolve().parents[1] / "configs/mixtral-tiny.yaml")
    with pytest.raises(ValueError, match=r"arch='mixtral-8x7' is not a known preset; closest: mixtral-8x7b"):
        run_cli(["fit", "--config", config, *_small(tmp_path), "--model.init_args.arch", "mixtral-8x7"])


def test_tokenizer_larger_than_the_model_vocab_fails_before_training(tmp_path):
    config = str(Path(__file__).resolve().parents[1] / "configs/mixtral-tiny.yaml")
    with pytest.raises(ValueError, match=r"data.vocab_size=2048 is invalid: the tokenizer's vocabulary exceeds"):
        run_cli(["fit", "--config", config, *_small(tmp_path), "--data.vocab_size", "2048"])


def test_block_size_beyond_the_model_fails_before_training(tmp_path):
    config = str(Path(__file__).resolve().parents[1] / "configs/mixtral-tiny.yaml")
    args = ["fit", "--config", config, *_small(tmp_path), "--model.init_args.overrides", "{max_seq_len: 32}"]
    with pytest.raises(ValueError, match=r"data.block_size=64 is invalid: longer than the model's max_seq_len=32"):
        run_cli(args)


def test_missing_checkpoint_for_generate(tmp_path):
    with pytest.raises(ValueError, match=r"ckpt_path='nope.ckpt' is invalid: no such file or checkpoint directory"):
        generate_main(["--ckpt_path", "nope.ckpt"])
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"ckpt_path='.*notes.txt' is invalid: not a readable checkpoint"):
        generate_main(["--ckpt_path", str(tmp_path / "notes.txt")])


def _broken_checkpoints(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"pytorch-lightning_version": "2.6", "state_dict": {"w": torch.zeros(1000)}}, good)
    files = {
        "cut.ckpt": (good.read_bytes()[:2000], "not a readable checkpoint"),
        "text.ckpt": (b"def f(x):\n    return x\n", "not a readable checkpoint"),
        "empty.ckpt": (b"", "not a readable checkpoint"),
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save([1, 2], tmp_path / "list.ckpt")
    torch.save({"foo": 1}, tmp_path / "foreign.ckpt")
    (tmp_path / "folder.ckpt").mkdir()
    return {name: match for name, (_, match) in files.items()} | {
        "list.ckpt": "a torch file, but not a checkpoint of lightning-moe fit",
        "foreign.ckpt": "a torch file, but not a checkpoint of lightning-moe fit",
        "folder.ckpt": "a folder without meta.pt, so not a sharded checkpoint",
    }


@pytest.mark.parametrize("subcommand", ["fit", "validate", "generate"])
def test_a_broken_or_foreign_checkpoint_is_refused_by_name(tmp_path, subcommand):
    config = str(Path(__file__).resolve().parents[1] / "configs/mixtral-tiny.yaml")
    for name, match in _broken_checkpoints(tmp_path).items():
        path = str(tmp_path / name)
        with pytest.raises(ValueError, match=rf"ckpt_path='{path}' is invalid: {match}"):
            if subcommand == "generate":
                generate_main(["--ckpt_path", path])
            else:
                run_cli([subcommand, "--config", config, *_small(tmp_path), "--ckpt_path", path])


class Forbidden(Exception):
    pass


def _forbid(*args, **kwargs):
    raise Forbidden("the run went past its checks")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--data.vocab_size", "2048"], r"data.vocab_size=2048 is invalid: the tokenizer's vocabulary exceeds"),
        (["--data.block_size", "2000"], r"data.block_size=2000 is invalid: longer than the model's max_seq_len=1024"),
        (["--model.init_args.nan_policy", "skip", "--config", "EP"], r"nan_policy='skip' is invalid with 2 processes"),
        (["--config", "EP", "--trainer.devices", "3"], r"num_experts=8 is invalid for expert_parallel_size=3"),
        (["--config", "EP", "--trainer.strategy.init_args.expert_parallel_size", "4"],
         r"expert_parallel_size=4 is invalid: must divide the world size 2"),
    ],
)  # fmt: skip
def test_mismatches_are_refused_before_tokenizing_or_starting_processes(tmp_path, monkeypatch, args, match):
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    from lightning_moe.data import TextDataModule

    monkeypatch.setattr(TextDataModule, "prepare_data", _forbid)
    monkeypatch.setattr(_SubprocessScriptLauncher, "launch", _forbid)
    configs = Path(__file__).resolve().parents[1] / "configs"
    args = [str(configs / "expert-parallel.yaml") if a == "EP" else a for a in args]
    with pytest.raises(ValueError, match=match):
        run_cli(["fit", "--config", str(configs / "mixtral-tiny.yaml"), *_small(tmp_path), *args])


def _config_with_callback(tmp_path, name, **init_args):
    """mixtral-tiny.yaml with the init_args of its callback ``name`` changed, written under ``tmp_path``."""
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "mixtral-tiny.yaml").read_text())
    callback = next(cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("." + name))
    callback["init_args"].update(init_args)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("case", ["bias_without_score_bias", "revive_with_sharded_experts", "missing_layer"])
def test_callback_settings_the_model_cannot_take_are_refused_before_tokenizing(tmp_path, monkeypatch, case):
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_moe.data import TextDataModule

    monkeypatch.setattr(TextDataModule, "prepare_data", _forbid)
    monkeypatch.setattr(_SubprocessScriptLauncher, "launch", _forbid)
    configs = Path(__file__).resolve().parents[1] / "configs"
    if case == "bias_without_score_bias":  # LoadBalancingBias needs DeepSeek-V3 style routers
        args, error, match = (
            ["--config", str(configs / "deepseek-tiny.yaml"), "--model.init_args.arch", "mixtral-tiny"],
            MisconfigurationException,
            r"LoadBalancingBias needs routers with a score-correction bias",
        )
    elif case == "revive_with_sharded_experts":
        config = _config_with_callback(tmp_path, "ExpertCollapseDetector", action="revive")
        args, error, match = (
            ["--config", config, "--config", str(configs / "expert-parallel.yaml")],
            ValueError,
            r"action='revive' is invalid with sharded experts",
        )
    else:  # mixtral-tiny has 2 MoE layers
        config = _config_with_callback(tmp_path, "ExpertSpecialization", layers=[5])
        args, error, match = (["--config", config], ValueError, r"5")
    with pytest.raises(error, match=match):
        run_cli(["fit", *args, *_small(tmp_path)])


class LrRecorder(Callback):
    """Keeps the learning rate each training step ran with (used through --trainer.callbacks+)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _recorded_lrs(cli):
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, LrRecorder)).lrs


def test_checkpoints_go_to_the_folder_of_the_final_run_name(tmp_path):
    # The run name given on the command line names the checkpoint folder too, so `--ckpt_path last` of one
    # run name never picks another run's last.ckpt.
    config = str(Path(__file__).resolve().parents[1] / "configs/mixtral-tiny.yaml")
    common = ["--config", config, *_small(tmp_path), "--trainer.limit_val_batches", "1"]
    named = run_cli(["fit", *common, "--trainer.max_steps", "2", "--trainer.logger.init_args.name", "myexp"])
    assert Path(named.trainer.checkpoint_callback.dirpath) == tmp_path / "lightning_logs/myexp/checkpoints"
    other = run_cli(["fit", *common, "--trainer.max_steps", "3", "--model.init_args.overrides", "{num_layers: 1}",
                     "--trainer.logger.init_args.name", "other"])  # fmt: skip
    other_folder = Path(other.trainer.checkpoint_callback.last_model_path).parent
    assert other_folder == tmp_path / "lightning_logs/other/checkpoints"
    resumed = run_cli(["fit", *common, "--trainer.max_steps", "3", "--ckpt_path", "last",
                       "--trainer.logger.init_args.name", "myexp"])  # fmt: skip
    assert resumed.trainer.global_step == 3  # myexp's 2-layer run went on from step 2 (the other has 1 layer)


@pytest.mark.parametrize("how", ["last", "file"])
def test_resume_takes_this_runs_learning_rate_and_keeps_the_schedule(tmp_path, how):
    # README: resume with a lower learning rate. The saved optimizer and scheduler carry the old rate; the
    # resumed steps must run at new_lr * schedule(step), exactly the rates a run started with new_lr has there.
    config = str(Path(__file__).resolve().parents[1] / "configs/mixtral-tiny.yaml")
    recorder = ["--trainer.callbacks+", "tests.test_cli.LrRecorder"]
    # Inside the warmup the schedule does not depend on max_steps, so a 3-step run can stand for the first half.
    common = ["--config", config, *_small(tmp_path), "--trainer.limit_val_batches", "1",
              "--model.init_args.warmup_steps", "10"]  # fmt: skip
    first = run_cli(["fit", *common, "--trainer.max_steps", "3"])
    assert first.trainer.global_step == 3
    ckpt = "last" if how == "last" else first.trainer.checkpoint_callback.last_model_path
    resumed = run_cli(["fit", *common, "--trainer.max_steps", "6", "--ckpt_path", ckpt, "--model.init_args.lr",
                       "1e-4", "--model.init_args.weight_decay", "0.05", *recorder])  # fmt: skip
    fresh = run_cli(["fit", *common, "--trainer.max_steps", "6", "--model.init_args.lr", "1e-4",
                     "--trainer.logger.init_args.name", "fresh", *recorder])  # fmt: skip
    assert resumed.model.hparams.lr == 1e-4 and resumed.trainer.global_step == 6
    assert _recorded_lrs(resumed) == pytest.approx(_recorded_lrs(fresh)[3:], rel=1e-12)
    assert resumed.trainer.optimizers[0].param_groups[0]["weight_decay"] == 0.05


def test_resume_from_a_file_takes_this_runs_training_overrides_and_names_the_network_ones_left_out(tmp_path):
    # README: with --ckpt_path FILE the network comes from the checkpoint, the training settings from this run.
    config = str(Path(__file__).resolve().parents[1] / "configs/mixtral-tiny.yaml")
    common = ["--config", config, *_small(tmp_path), "--trainer.limit_val_batches", "1"]
    first = run_cli(["fit", *common, "--trainer.max_steps", "2", "--model.init_args.overrides",
                     "{num_experts: 4, router_jitter: 0.0}"])  # fmt: skip
    ckpt = first.trainer.checkpoint_callback.last_model_path
    with pytest.warns(UserWarning, match=r"num_experts=16 \(the checkpoint's: 4\) left out") as record:
        resumed = run_cli(["fit", *common, "--trainer.max_steps", "3", "--ckpt_path", ckpt,
                           "--model.init_args.overrides", "{num_experts: 16, router_jitter: 0.01, num_layers: 2}",
                           "--trainer.logger.init_args.name", "resumed"])  # fmt: skip
    (left_out,) = [str(w.message) for w in record if "takes the network from the checkpoint" in str(w.message)]
    assert "num_layers" not in left_out  # the checkpoint's own value: nothing left out
    assert resumed.trainer.global_step == 3
    assert resumed.model.config.num_experts == 4  # the checkpoint's network
    assert resumed.model.config.router_jitter == 0.01  # this run's training setting
    assert first.model.config.router_jitter == 0.0


def test_a_preset_of_the_other_kind_is_refused_before_training(tmp_path):
    config = str(Path(__file__).resolve().parents[1] / "configs/mixtral-tiny.yaml")
    with pytest.raises(ValueError, match=r"arch='switch-tiny' is invalid for CausalLMModule: it is an encoder-decoder"):
        run_cli(["fit", "--config", config, *_small(tmp_path), "--model.init_args.arch", "switch-tiny"])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--prompt", ""], r"prompt='' is invalid"),
        (["--max_new_tokens", "0"], r"max_new_tokens=0 is invalid: must be an int >= 1"),
        (["--temperature", "-1"], r"temperature=-1.0 is invalid: must be a finite number >= 0"),
        (["--temperature", "nan"], r"temperature=nan is invalid: must be a finite number >= 0"),
        (["--top_k", "0"], r"top_k=0 is invalid: must be an int >= 1"),
        (["--top_k", "5"], r"top_k=5 is invalid with temperature=0: greedy decoding takes the top token"),
    ],
)
def test_generate_arguments_are_checked_before_loading(args, match):
    with pytest.raises(ValueError, match=match):
        generate_main(["--ckpt_path", "nope.ckpt", *args])


def test_generate_refuses_an_encoder_decoder_checkpoint(tmp_path, capsys):
    config = str(Path(__file__).resolve().parents[1] / "configs/switch-tiny.yaml")
    cli = run_cli(["fit", "--config", config, *_small(tmp_path), "--trainer.max_steps", "1",
                   "--trainer.limit_val_batches", "1"])  # fmt: skip
    cli.after_fit()
    assert "last checkpoint" in capsys.readouterr().out and "generate:" not in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"it is a Seq2SeqLMModule \(encoder-decoder\) run"):
        generate_main(["--ckpt_path", cli.trainer.checkpoint_callback.last_model_path])
    # Loaded on its own, the module decodes from the start id it trained with (the tokenizer's padding token).
    from lightning_moe.module import Seq2SeqLMModule

    trained_start = cli.datamodule.tokenizer.token_to_id("<|pad|>")
    assert cli.model.decoder_start_id == trained_start != 0
    loaded = Seq2SeqLMModule.load_from_checkpoint(cli.trainer.checkpoint_callback.last_model_path)
    assert loaded.decoder_start_id == trained_start
    assert loaded.generate(torch.tensor([[5, 6, 7]]), 2)[0, 0] == trained_start
    # predict writes what the decoder makes of each input (it silently wrote nothing for Seq2SeqLMModule).
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    predict = run_cli(["predict", "--config", config, *_small(tmp_path), "--trainer.limit_predict_batches", "1",
                       "--ckpt_path", ckpt])  # fmt: skip
    written = (Path(predict.trainer.log_dir) / "predictions.txt").read_text()
    assert written.count("PROMPT") == 8 and written.count("CONTINUATION") == 8


class SlowOptimizerStep(Callback):
    """Sleeps 0.2 s before every optimizer step (used through --trainer.callbacks+)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        time.sleep(0.2)


def test_the_summary_names_the_logger_and_throughput_covers_the_whole_step(tmp_path, capsys):
    config = str(Path(__file__).resolve().parents[1] / "configs/mixtral-tiny.yaml")
    cli = run_cli(["fit", "--config", config, *_small(tmp_path), "--trainer.max_steps", "2",
                   "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
                   "--trainer.callbacks+", "tests.test_cli.SlowOptimizerStep",
                   "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir",
                   str(tmp_path / "csv")])  # fmt: skip
    out = capsys.readouterr().out
    assert "logs (CSVLogger):" in out and "TensorBoard" not in out
    tokens = 8 * 64  # batch 8 x block 64, one process
    assert float(cli.trainer.callback_metrics["train/tokens_per_sec"]) < tokens / 0.2  # the optimizer step counts


def test_validate_without_a_checkpoint_warns_that_the_model_is_untrained(tmp_path):
    config = str(Path(__file__).resolve().parents[1] / "configs/mixtral-tiny.yaml")
    with pytest.warns(UserWarning, match=r"`validate` without --ckpt_path .* runs a freshly initialised model"):
        run_cli(["validate", "--config", config, *_small(tmp_path), "--trainer.limit_val_batches", "1"])


def test_the_console_entry_reads_the_command_line_itself(tmp_path, monkeypatch, recwarn):
    # LightningCLI warns when it gets the arguments both from `args` and from sys.argv: the console entry
    # leaves sys.argv to it.
    config = str(Path(__file__).resolve().parents[1] / "configs/mixtral-tiny.yaml")
    argv = ["lightning-moe", "fit", "--config", config, *_small(tmp_path), "--trainer.fast_dev_run", "1"]
    monkeypatch.setattr("sys.argv", argv)
    main()
    assert not [w for w in recwarn if "provide both args and command line arguments" in str(w.message)]


def test_top_level_help_lists_the_subcommands_main_dispatches_itself(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "fit" in out  # LightningCLI's part
    for name in ("generate", "compare", "demo", "zoo"):
        assert f"  {name}  " in out


def test_a_tokenizer_file_larger_than_the_model_is_named(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models

    from lightning_moe.data import TextDataModule

    vocab = {f"w{i}": i for i in range(1999)} | {"<|endoftext|>": 1999, "<|unk|>": 2000}
    path = tmp_path / "big.json"
    Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>")).save(str(path))
    monkeypatch.setattr(TextDataModule, "prepare_data", _forbid)
    config = Path(__file__).resolve().parents[1] / "configs/mixtral-tiny.yaml"
    match = rf"data.tokenizer_path='{path}' is invalid: its 2001 tokens exceed the model's vocab_size=1024"
    with pytest.raises(ValueError, match=match):
        run_cli(["fit", "--config", str(config), *_small(tmp_path), "--data.tokenizer_path", str(path)])
