"""The ``lightning-moe`` command: LightningCLI (fit, validate, test, predict) plus ``generate``.

``lightning-moe fit --config configs/mixtral-tiny.yaml`` trains a zoo model on the embedded corpus;
``--model.arch NAME`` picks any preset. ``lightning-moe generate --ckpt_path PATH --prompt TEXT`` loads a
checkpoint (the tokenizer is stored inside it) and prints a continuation. ``lightning-moe compare --config
configs/compare/mixtral-tiny.yaml`` trains an MoE preset against its dense baselines (:mod:`lightning_moe.compare`).
"""

from __future__ import annotations

import argparse
import importlib
import io
import math
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lightning_moe import zoo
from lightning_moe.data import TextDataModule, unigram_entropy
from lightning_moe.data.datamodule import PaddedPredictSampler
from lightning_moe.data.tokenizer import EOS_TOKEN
from lightning_moe.module import RESUMABLE_FIELDS, CausalLMModule, MoELanguageModule, check_generation
from lightning_moe.strategies.checkpoint import METADATA_FILE

# Model arguments that define the network. `fit --ckpt_path FILE` takes these from the checkpoint (the weights
# must fit them) and everything else (learning rate, schedule, loss coefficients, ...) from this run's settings.
ARCHITECTURE_ARGS = ("arch", "overrides", "init_from", "upcycle")


class MoECLI(LightningCLI):
    """LightningCLI with the omegaconf parser, run-named checkpoint folders and an end-of-fit summary.

    * A ``ModelCheckpoint`` without a ``dirpath`` writes to ``<logger save_dir>/<logger name>/checkpoints``, from
      the final settings (command-line overrides included): one folder per run name, where ``fit --ckpt_path
      last`` finds that run's ``last.ckpt``.
    * ``fit --ckpt_path FILE`` rebuilds the network the checkpoint was trained with (``ARCHITECTURE_ARGS``) but
      keeps this run's other model arguments, so a resume can change the learning rate or the loss coefficients
      (LightningCLI alone replaces every model argument with the checkpoint's). ``validate``, ``test`` and
      ``predict`` take all of them from the checkpoint.
    """

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "lightning_logs", "name": "lightning-moe"},
                },
            }
        )

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path:
            _check_ckpt_path_exists(str(ckpt_path))  # else Lightning finds out after the corpus is tokenized
        if ckpt_path and (Path(ckpt_path).is_dir() or Path(ckpt_path).is_file()):
            read_checkpoint(ckpt_path)  # a clear error for a cut, empty or foreign file before any work
        # A sharded checkpoint (a folder, written by ExpertParallelStrategy) keeps its hyperparameters in meta.pt.
        meta = Path(ckpt_path) / METADATA_FILE if ckpt_path and Path(ckpt_path).is_dir() else None
        if meta is not None and meta.is_file():
            _check_sharded_checkpoint_strategy(ckpt_path, self.config[subcommand].trainer.strategy)
        elif subcommand != "fit" or not (ckpt_path and Path(ckpt_path).is_file()):
            super()._parse_ckpt_path()
            return
        source = meta if meta is not None else ckpt_path
        hparams = torch.load(source, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        hparams.pop("_instantiator", None)
        keys = ARCHITECTURE_ARGS if subcommand == "fit" else [key for key in hparams if key != "_class_path"]
        model = {key: hparams[key] for key in keys if key in hparams}
        if subcommand == "fit" and "upcycle" in hparams:
            model["upcycle_from"] = None  # the checkpoint's arch, overrides and upcycle rebuild the upcycled model
        if subcommand == "fit" and "arch" in hparams:
            model["overrides"] = self._resume_overrides(subcommand, hparams)
        # Without a class path (a checkpoint saved outside this CLI) the configured module class stays.
        class_path = hparams.get("_class_path") or getattr(self.config[subcommand].model, "class_path", None)
        if model:
            model = {"class_path": class_path, "init_args": model} if class_path else model
            self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    def _resume_overrides(self, subcommand: str, hparams: dict[str, Any]) -> dict[str, Any] | None:
        """The checkpoint's ``overrides`` with this run's training-only ones (``RESUMABLE_FIELDS``) on top.

        ``fit --ckpt_path FILE`` takes the network from the checkpoint but the training settings from this run, and
        a capacity factor, loss coefficient or router noise given as an override is a training setting. Network
        fields this run sets otherwise than the checkpoint (and another ``arch``) are left out, with a warning.
        """
        init_args = getattr(self.config[subcommand].model, "init_args", self.config[subcommand].model)
        mine = dict(getattr(init_args, "overrides", None) or {})
        theirs = dict(hparams.get("overrides") or {})
        training = {key: value for key, value in mine.items() if key in RESUMABLE_FIELDS}
        ignored = []
        arch = getattr(init_args, "arch", None)
        if arch is not None and arch != hparams["arch"] and not getattr(init_args, "init_from", None):
            ignored.append(f"arch={arch!r} (the checkpoint's: {hparams['arch']!r})")
        network = {key: value for key, value in mine.items() if key not in RESUMABLE_FIELDS}
        if network:
            try:
                saved = zoo.config(hparams["arch"], **theirs)
            except (TypeError, ValueError):
                saved = None
            for key, value in network.items():
                theirs_value = getattr(saved, key, theirs.get(key)) if saved is not None else theirs.get(key)
                if value != theirs_value:
                    ignored.append(f"{key}={value!r} (the checkpoint's: {theirs_value!r})")
        if ignored:
            rank_zero_warn(
                f"--ckpt_path {self.config[subcommand].ckpt_path} takes the network from the checkpoint: this run's "
                f"{', '.join(ignored)} left out; only training settings (overrides of {sorted(RESUMABLE_FIELDS)}) "
                "apply on top of it. Use --ckpt_path last (the network is then this run's and must match)"
            )
        merged = theirs | training
        return merged or hparams.get("overrides")

    def before_instantiate_classes(self) -> None:
        """Give every ``ModelCheckpoint`` without a ``dirpath`` the run's folder (see the class docstring).

        Also warns when ``validate``, ``test`` or ``predict`` would run a freshly initialised model.
        """
        self._derived_dirpaths: list[Any] = []
        if self.subcommand is None:
            return
        config = self.config[self.subcommand]
        if self.subcommand != "fit" and not config.get("ckpt_path"):
            init_args = getattr(config.model, "init_args", config.model)
            if not (getattr(init_args, "init_from", None) or getattr(init_args, "upcycle_from", None)):
                rank_zero_warn(
                    f"`{self.subcommand}` without --ckpt_path (or model.init_args.init_from/upcycle_from) runs a "
                    "freshly initialised model: pass the checkpoint of a fit run"
                )
        trainer = config.trainer
        logger = trainer.logger[0] if isinstance(trainer.logger, list) and trainer.logger else trainer.logger
        init_args = getattr(logger, "init_args", None)
        save_dir = getattr(init_args, "save_dir", None)
        if save_dir is None:
            return
        folder = os.path.join(str(save_dir), str(getattr(init_args, "name", None) or ""), "checkpoints")
        for callback in trainer.callbacks or []:
            args = getattr(callback, "init_args", None)
            if args is not None and getattr(args, "dirpath", None) is None and _is_checkpoint(callback.class_path):
                args.dirpath = folder
                self._derived_dirpaths.append(args)

    def after_instantiate_classes(self) -> None:
        """Put back ``dirpath: null`` where the run's folder was filled in, for the ``config.yaml`` saved with the run.

        The callbacks have their folder; the saved config keeps deriving it from the run name, so a rerun of that
        file under another name writes its own folder rather than over this run's ``last.ckpt``.
        """
        for args in self._derived_dirpaths:
            args.dirpath = None
        self._derived_dirpaths.clear()

    def _check_run(self) -> None:
        """Check the model against the data and the process layout before any work (tokenizing, spawning).

        The same checks run again inside the run (``setup``, ``setup_environment``) for code that does not go through
        this CLI; here they fail before the corpus is tokenized and before other processes start.
        """
        trainer, model, data = self.trainer, self.model, self.datamodule
        accumulate = trainer.accumulate_grad_batches  # Lightning takes any value, and 0 fails inside the first step
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"trainer.accumulate_grad_batches={accumulate!r} is invalid: must be an int >= 1")
        clip = trainer.gradient_clip_val  # Lightning skips clipping for a negative value and clips to NaN for NaN
        if clip is not None and not (math.isfinite(clip) and clip >= 0):
            raise ValueError(
                f"trainer.gradient_clip_val={clip!r} is invalid: must be a finite number > 0, or 0 or null for no "
                "clipping"
            )
        if self.subcommand == "fit":
            self._check_fit_length()
        resume_from = self._check_last_checkpoint()
        if self.subcommand == "fit" and resume_from is not None:
            self._check_resume_length(resume_from)
        if not isinstance(model, MoELanguageModule):
            return
        model.check_world_size(trainer.world_size)
        if self.subcommand == "fit":  # the callbacks' own checks run at fit start, after the corpus is tokenized
            for callback in trainer.callbacks:
                check_setup = getattr(callback, "check_setup", None)  # lightning_moe.callbacks
                if check_setup is not None:
                    check_setup(trainer, model)
        if isinstance(data, TextDataModule):
            vocab_size = data.vocab_size_arg
            if data.tokenizer_path is not None:
                from lightning_moe.data.tokenizer import load_tokenizer

                vocab_size = load_tokenizer(data.tokenizer_path).get_vocab_size()
            model.check_data(vocab_size, data.block_size, data.tokenizer_path)
        check_sizes = getattr(trainer.strategy, "check_sizes", None)  # ExpertParallelStrategy
        if check_sizes is not None:
            check_sizes(model.model)

    def _check_fit_length(self) -> None:
        """Check the ``fit`` settings Lightning takes but that train nothing or fail inside the first step.

        Raises:
            ValueError: For ``max_steps`` or ``max_epochs`` 0 (the corpus is tokenized, then no step runs) and an
                int ``val_check_interval`` below 1 (``ZeroDivisionError`` at the first training batch).
        """
        trainer = self.trainer
        for name in ("max_steps", "max_epochs"):
            if getattr(trainer, name) == 0:
                raise ValueError(
                    f"trainer.{name}=0 is invalid for fit: it trains no step; must be >= 1, or -1 for no limit"
                )
        interval = trainer.val_check_interval
        if isinstance(interval, int) and not isinstance(interval, bool) and interval < 1:
            raise ValueError(
                f"trainer.val_check_interval={interval!r} is invalid: an int must be >= 1 (training batches between "
                "validations); to validate less, raise it, or set trainer.limit_val_batches to 0 for no validation"
            )

    def _check_resume_length(self, path: Path) -> None:
        """Refuse a resumed fit whose ``max_steps`` its checkpoint has reached: Lightning would train no step, exit 0.

        Raises:
            ValueError: Naming ``trainer.max_steps``, the checkpoint and its step.
        """
        max_steps = self.trainer.max_steps
        if max_steps < 0:
            return
        step = read_checkpoint(path).get("global_step")
        if isinstance(step, int) and step >= max_steps:
            raise ValueError(
                f"trainer.max_steps={max_steps} is invalid for resuming from {str(path)!r}: the checkpoint is at step "
                f"{step}, so the run would train no step; must be > {step} (the total, not the steps to add), or -1"
            )

    def _check_last_checkpoint(self) -> Path | None:
        """Check the checkpoint ``--ckpt_path last`` finds, before any work; return the checkpoint the run resumes.

        The newest one found (the one Lightning loads) is read as a ``--ckpt_path FILE`` is: a cut, empty or foreign
        file is refused by name here, not by Lightning's loader after the corpus was tokenized, and a sharded one
        (an expert-parallel folder) under a strategy that cannot read it, as an explicit path is. ``validate``,
        ``test`` or ``predict`` are refused when the run has no last checkpoint: Lightning then only warns and
        evaluates a freshly initialised model (for ``fit`` that starts a first run, which is kept).

        Returns:
            The checkpoint file or folder the run starts from (``--ckpt_path`` as given, or the one ``last`` finds);
            ``None`` for none, or one that is not on this machine.

        Raises:
            ValueError: Naming the checkpoint found, or the folders searched.
        """
        config = self.config[self.subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path != "last":
            path = Path(str(ckpt_path)) if ckpt_path else None
            return path if path is not None and path.exists() else None  # "best", "hpc", remote: Lightning's
        callbacks = [cb for cb in self.trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        found = [Path(path) for cb in callbacks for path in cb._find_last_checkpoints(self.trainer)]
        local = [path for path in found if path.exists()]  # remote folders are left to Lightning
        if local:
            newest = max(local, key=lambda path: path.stat().st_mtime)
            read_checkpoint(newest)
            if newest.is_dir():  # read_checkpoint found its meta.pt: a sharded checkpoint
                _check_sharded_checkpoint_strategy(str(newest), config.trainer.strategy)
            return newest
        if found or self.subcommand == "fit":
            return None
        folders = ", ".join(str(cb.dirpath) for cb in callbacks) or "no checkpoint folder (no ModelCheckpoint)"
        raise ValueError(
            f"ckpt_path='last' is invalid for {self.subcommand}: no last checkpoint in {folders}; give the run name "
            "its fit ran under (--trainer.logger.init_args.name) or the checkpoint file"
        )

    def before_fit(self) -> None:  # noqa: D102
        self._check_run()
        self._validation_step = _LastValidationStep()  # for the summary: is its validation loss the final model's?
        self.trainer.callbacks.append(self._validation_step)

    def before_validate(self) -> None:  # noqa: D102
        self._check_run()

    def before_test(self) -> None:  # noqa: D102
        self._check_run()

    def before_predict(self) -> None:  # noqa: D102
        self._check_run()

    def after_fit(self) -> None:
        """Print validation loss against the unigram entropy, and where the logs and checkpoint are."""
        trainer, data = self.trainer, self.datamodule
        if trainer.global_rank != 0 or trainer.fast_dev_run:
            return
        val = trainer.callback_metrics.get("val/loss")
        lines = ["", "=" * 72]
        if val is not None and isinstance(data, TextDataModule) and data.val_set is not None:
            entropy = unigram_entropy(data.val_tokens())
            lines.append(f"validation loss {float(val):.3f} nats/token (perplexity {torch.exp(val).item():.1f})")
            lines.append(f"unigram entropy of the validation tokens {entropy:.3f} nats/token (a context-free model)")
            step = getattr(getattr(self, "_validation_step", None), "step", None)
            if step is not None and step != trainer.global_step:
                lines.append(
                    f"(that validation ran at step {step}, not at the final step {trainer.global_step}: the validate "
                    "command below gives the final model's)"
                )
                lines += self._validate_command()
        elif trainer.limit_val_batches and isinstance(data, TextDataModule) and data.val_set is not None:
            lines.append(
                f"no validation ran up to step {trainer.global_step} (trainer.val_check_interval="
                f"{trainer.val_check_interval!r}): the validate command below gives the validation loss"
            )
            lines += self._validate_command()
        if trainer.logger is not None and trainer.logger.log_dir:
            if isinstance(trainer.logger, TensorBoardLogger):
                lines.append(
                    f"TensorBoard logs: {trainer.logger.log_dir}  (tensorboard --logdir {trainer.logger.save_dir})"
                )
            else:
                lines.append(f"logs ({type(trainer.logger).__name__}): {trainer.logger.log_dir}")
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.last_model_path:
            lines.append(f"last checkpoint: {checkpoint.last_model_path}")
            if isinstance(self.model, CausalLMModule):  # generate continues prompts with decoder models
                lines.append(
                    f"generate: lightning-moe generate --ckpt_path {shlex.quote(checkpoint.last_model_path)} "
                    "--prompt 'def '"
                )
        lines.append("=" * 72)
        print("\n".join(lines))

    def _validate_command(self) -> list[str]:
        """The summary's ``validate:`` line: this run's saved config and last checkpoint; none where either is missing.

        The saved config holds the data and model settings the run trained with, which ``validate`` must match.
        """
        trainer = self.trainer
        checkpoint = trainer.checkpoint_callback
        log_dir = trainer.logger.log_dir if trainer.logger is not None else None
        if not (isinstance(checkpoint, ModelCheckpoint) and checkpoint.last_model_path and log_dir):
            return []
        config = Path(log_dir) / "config.yaml"  # LightningCLI's SaveConfigCallback writes it there
        if not config.is_file():
            return []
        return [
            f"validate: lightning-moe validate --config {shlex.quote(str(config))} "
            f"--ckpt_path {shlex.quote(checkpoint.last_model_path)}"
        ]

    def predict(self, **kwargs: Any) -> list[Any] | None:
        """``trainer.predict``, then the continuations decoded: the first few printed, all written to a file.

        Each prediction is a prompt (the first half of a validation block) followed by its greedy continuation
        (``Seq2SeqLMModule``: what the decoder writes for that encoder input); decoded with the checkpoint's
        tokenizer they go to ``predictions.txt`` in the run's log folder, one prompt and continuation per record.
        """
        trainer = self.trainer
        predictions = trainer.predict(**kwargs)
        module, data = trainer.lightning_module, self.datamodule
        # Every rank takes part in what follows (log_dir and the gather are collective under several processes).
        if not isinstance(module, MoELanguageModule) or module.tokenizer_json is None:
            return predictions
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(module.tokenizer_json)  # the data's tokenizer, or the checkpoint's
        half = max(1, data.block_size // 2) if isinstance(data, TextDataModule) else 0
        rows = [ids for ids_BT in predictions or [] for ids in ids_BT.tolist()]
        keys, padding = _prediction_order(trainer, len(rows))
        records = [
            (key, (tokenizer.decode(ids[:half]), tokenizer.decode(ids[half:])))
            for key, pad, ids in zip(keys, padding, rows, strict=True)
            if not pad  # a repeated prompt that evened out the ranks' batches: predicted on another rank
        ]
        log_dir = trainer.log_dir
        if trainer.world_size > 1 and torch.distributed.is_initialized():  # each rank predicted its own prompts
            shares: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(shares, records)
            records = [record for share in shares for record in share]
        records = [record for _, record in sorted(records, key=lambda keyed: keyed[0])]
        if trainer.global_rank != 0 or not records:
            return predictions
        folder = Path(log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "predictions.txt"
        rule = "-" * 72
        text = "".join(f"{rule}\nPROMPT\n{prompt}\nCONTINUATION\n{more}\n" for prompt, more in records)
        path.write_text(text)
        shown = "".join(f"{rule}\n{prompt}[...]{more}\n" for prompt, more in records[:3])
        print(f"{shown}{rule}\n{len(records)} continuations written to {path}")
        return predictions


class _LastValidationStep(Callback):
    """Records the global step of a fit's last validation (sanity checks left out), for the end-of-fit summary."""

    def __init__(self) -> None:
        self.step: int | None = None

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step


def _prediction_order(trainer: Any, count: int) -> tuple[list[tuple[int, int]], list[bool]]:
    """A sort key for each of this rank's ``count`` predictions (all ranks' sorted: the data's order), and padding.

    With the data module's :class:`~lightning_moe.data.datamodule.PaddedPredictSampler` the key is the prompt's
    index, and the padding flags mark the prompts repeated to give every rank as many batches. With another loader
    the predictions keep their rank's order, rank after rank.
    """
    loader = trainer.predict_dataloaders
    # Lightning rebuilds a prediction loader around a batch sampler (which records the indices) over its sampler.
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    if isinstance(sampler, PaddedPredictSampler):
        return [(0, index) for index in list(sampler)[:count]], sampler.padding()[:count]
    return [(trainer.global_rank, position) for position in range(count)], [False] * count


def _check_sharded_checkpoint_strategy(ckpt_path: str, strategy: Any) -> None:
    """Raise unless ``strategy`` (a trainer config value) can read the sharded checkpoint at ``ckpt_path``."""
    from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

    if isinstance(strategy, str):
        cls = StrategyRegistry[strategy]["strategy"] if strategy in StrategyRegistry else None
    elif isinstance(strategy, ModelParallelStrategy):
        return
    else:
        cls = _import_class(getattr(strategy, "class_path", ""))
    if not (isinstance(cls, type) and issubclass(cls, ModelParallelStrategy)):
        raise ValueError(
            f"ckpt_path={ckpt_path!r} is invalid with trainer.strategy={strategy!r}: it is a sharded checkpoint (a "
            "folder written by ExpertParallelStrategy); read it with that strategy (--config "
            "configs/expert-parallel.yaml) or convert it into one file with lightning_moe.strategies.full_checkpoint"
        )


def _check_ckpt_path_exists(ckpt_path: str) -> None:
    """Raise unless ``ckpt_path`` is a file or folder, one of Lightning's names (``last``, ...) or a remote URL.

    Raises:
        ValueError: Naming ``ckpt_path``, for a local path with nothing there.
    """
    if ckpt_path in ("best", "last", "hpc") or ckpt_path.startswith("registry") or "://" in ckpt_path:
        return
    if not Path(ckpt_path).exists():
        raise ValueError(f"ckpt_path={ckpt_path!r} is invalid: no such file or checkpoint directory")


def _import_class(class_path: str) -> type | None:
    """The class a config's ``class_path`` names (``None`` if it names none)."""
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None) if module else None
    return cls if isinstance(cls, type) else None


def _is_checkpoint(class_path: str) -> bool:
    """Whether ``class_path`` names a ``ModelCheckpoint`` (or a subclass)."""
    cls = _import_class(class_path)
    return cls is not None and issubclass(cls, ModelCheckpoint)


def read_checkpoint(path: str | os.PathLike, field: str = "ckpt_path") -> dict[str, Any]:
    """Read a checkpoint of ``lightning-moe fit``: a file, or the ``meta.pt`` of a sharded folder (tensors mapped).

    Raises:
        ValueError: Naming ``field`` and the path, if it is not a readable Lightning checkpoint (cut, empty, another
            kind of file, a folder without the metadata of a sharded save).
    """
    source = Path(path)
    if source.is_dir():
        source = source / METADATA_FILE
        if not source.is_file():
            raise ValueError(
                f"{field}={str(path)!r} is invalid: a folder without {METADATA_FILE}, so not a sharded checkpoint of "
                "lightning-moe fit (an interrupted save leaves its complete folders under other names)"
            )
    try:
        checkpoint = torch.load(source, weights_only=True, map_location="cpu", mmap=True)
    except Exception as error:  # noqa: BLE001  (torch.load raises many kinds for a file that is not its own)
        raise ValueError(
            f"{field}={str(path)!r} is invalid: not a readable checkpoint of lightning-moe fit "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'})"
        ) from error
    if not isinstance(checkpoint, dict) or "pytorch-lightning_version" not in checkpoint:
        raise ValueError(
            f"{field}={str(path)!r} is invalid: a torch file, but not a checkpoint of lightning-moe fit (Lightning "
            "writes 'pytorch-lightning_version', 'state_dict' and 'hyper_parameters' into it)"
        )
    return checkpoint


def generate_main(argv: Sequence[str]) -> str:
    """``lightning-moe generate``: continue a prompt from a checkpoint; returns (and prints) the text."""
    parser = argparse.ArgumentParser(prog="lightning-moe generate", description="Continue a prompt from a checkpoint.")
    parser.add_argument(
        "--ckpt_path", required=True, help="a checkpoint written by lightning-moe fit: a file, or a sharded directory"
    )
    parser.add_argument("--prompt", default="def ", help="text to continue")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv))
    if not args.prompt:
        raise ValueError("prompt='' is invalid: generate continues a prompt of at least one character")
    check_generation(args.max_new_tokens, args.temperature, args.top_k)
    if args.top_k is not None and args.temperature == 0:
        raise ValueError(
            f"top_k={args.top_k} is invalid with temperature=0: greedy decoding takes the top token; pass "
            "--temperature > 0 to sample among the top_k"
        )
    path = Path(args.ckpt_path)
    if not (path.is_dir() or path.is_file()):
        raise ValueError(f"ckpt_path={args.ckpt_path!r} is invalid: no such file or checkpoint directory")
    hparams = read_checkpoint(path).get("hyper_parameters", {})  # a file's tensors are only mapped here
    if str(hparams.get("_class_path", "")).endswith("Seq2SeqLMModule"):
        raise ValueError(
            f"ckpt_path={args.ckpt_path!r} is invalid: it is a Seq2SeqLMModule (encoder-decoder) run, and generate "
            "continues prompts with decoder models (CausalLMModule runs)"
        )
    source: Path | io.BytesIO = path
    if path.is_dir():  # expert-parallel runs write one shard per rank: gather the full weights in memory
        from lightning_moe.strategies import full_checkpoint

        source = io.BytesIO()
        torch.save(full_checkpoint(path), source)
        source.seek(0)
    from tokenizers import Tokenizer

    module = CausalLMModule.load_from_checkpoint(source, map_location="cpu")
    if module.tokenizer_json is None:
        raise ValueError(f"ckpt_path={args.ckpt_path!r} is invalid: the checkpoint holds no tokenizer")
    tokenizer = Tokenizer.from_str(module.tokenizer_json)
    tokenizer.no_truncation()  # a tokenizer.json may carry truncation or padding: the prompt is encoded whole
    tokenizer.no_padding()
    torch.manual_seed(args.seed)
    prompt_ids = torch.tensor([tokenizer.encode(args.prompt).ids], dtype=torch.long)
    # A continuation ends at the end of its document, as the model learnt to mark it.
    stop_id = tokenizer.token_to_id(EOS_TOKEN)
    out = module.generate(prompt_ids, args.max_new_tokens, args.temperature, args.top_k, stop_id=stop_id)
    text = tokenizer.decode(out[0].tolist())
    print(text)
    return text


def run_cli(argv: Sequence[str] | None) -> MoECLI:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ``test``, ``predict``) and return the CLI.

    Args:
        argv: The arguments after the program name; ``None`` reads the command line (``sys.argv``) itself, so
            LightningCLI does not warn about arguments given twice.
    """
    return MoECLI(
        MoELanguageModule,
        TextDataModule,
        subclass_mode_model=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=None if argv is None else list(argv),
    )


# LightningCLI's help lists its own subcommands only; main() dispatches these before it.
MORE_SUBCOMMANDS = """
more subcommands (each takes --help):
  generate  text from a checkpoint: lightning-moe generate --ckpt_path CKPT --prompt 'def '
  compare   an MoE preset against its dense baselines: lightning-moe compare --config configs/compare/mixtral-tiny.yaml
  demo      route a batch through one MoE layer and print the per-expert load: lightning-moe demo
  zoo       the model zoo's presets, their shapes and parameter counts: lightning-moe zoo [NAME|FAMILY ...]"""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``lightning-moe`` and ``python -m lightning_moe``."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "generate":
        generate_main(argv[1:])
    elif argv and argv[0] == "compare":
        from lightning_moe.compare import main as compare_main

        compare_main(argv[1:])
    elif argv and argv[0] == "demo":
        from lightning_moe.demo import main as demo_main

        demo_main(argv[1:])
    elif argv and argv[0] == "zoo":
        from lightning_moe.zoo.listing import main as zoo_main

        zoo_main(argv[1:])
    elif not argv or argv[0] in ("-h", "--help"):
        try:
            run_cli(None if from_command_line else argv)  # LightningCLI's help (or its error), then ours
        finally:
            print(MORE_SUBCOMMANDS)
    else:
        try:
            run_cli(None if from_command_line else argv)
        except SIGTERMException as stop:  # Lightning's, a SystemExit without a status: a stopped run would exit 0
            print("stopped by SIGTERM: the checkpoints saved before it are kept (fit: resume with --ckpt_path last)",
                  file=sys.stderr)  # fmt: skip
            raise SystemExit(128 + signal.SIGTERM) from stop
