"""The ``lightning-moe`` command: LightningCLI (fit, validate, test, predict) plus ``generate``.

``lightning-moe fit --config configs/mixtral-tiny.yaml`` trains a zoo model on the embedded corpus;
``--model.arch NAME`` picks any preset. ``lightning-moe generate --ckpt_path PATH --prompt TEXT`` loads a
checkpoint (the tokenizer is stored inside it) and prints a continuation. ``lightning-moe compare --config
configs/compare/mixtral-tiny.yaml`` trains an MoE preset against its dense baselines (:mod:`lightning_moe.compare`).
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from lightning_moe.data import TextDataModule, unigram_entropy
from lightning_moe.module import CausalLMModule, MoELanguageModule


class MoECLI(LightningCLI):
    """LightningCLI with the omegaconf parser and an end-of-fit summary."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "lightning_logs", "name": "lightning-moe"},
                },
            }
        )

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
        if trainer.logger is not None and trainer.logger.log_dir:
            lines.append(
                f"TensorBoard logs: {trainer.logger.log_dir}  (tensorboard --logdir {trainer.logger.save_dir})"
            )
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.last_model_path:
            lines.append(f"last checkpoint: {checkpoint.last_model_path}")
            lines.append(f"generate: lightning-moe generate --ckpt_path {checkpoint.last_model_path} --prompt 'def '")
        lines.append("=" * 72)
        print("\n".join(lines))


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
    path = Path(args.ckpt_path)
    if path.is_dir():  # expert-parallel runs write one shard per rank: gather the full weights in memory
        from lightning_moe.strategies import full_checkpoint

        source: Path | io.BytesIO = io.BytesIO()
        torch.save(full_checkpoint(path), source)
        source.seek(0)
    elif path.is_file():
        source = path
    else:
        raise ValueError(f"ckpt_path={args.ckpt_path!r} is invalid: no such file or checkpoint directory")
    from tokenizers import Tokenizer

    module = CausalLMModule.load_from_checkpoint(source, map_location="cpu")
    if module.tokenizer_json is None:
        raise ValueError(f"ckpt_path={args.ckpt_path!r} is invalid: the checkpoint holds no tokenizer")
    tokenizer = Tokenizer.from_str(module.tokenizer_json)
    torch.manual_seed(args.seed)
    prompt_ids = torch.tensor([tokenizer.encode(args.prompt).ids], dtype=torch.long)
    out = module.generate(prompt_ids, args.max_new_tokens, args.temperature, args.top_k)
    text = tokenizer.decode(out[0].tolist())
    print(text)
    return text


def run_cli(argv: Sequence[str]) -> MoECLI:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ``test``, ``predict``) and return the CLI."""
    return MoECLI(
        MoELanguageModule,
        TextDataModule,
        subclass_mode_model=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=list(argv),
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``lightning-moe`` and ``python -m lightning_moe``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "generate":
        generate_main(argv[1:])
    elif argv and argv[0] == "compare":
        from lightning_moe.compare import main as compare_main

        compare_main(argv[1:])
    elif argv and argv[0] == "demo":
        from lightning_moe.demo import main as demo_main

        demo_main(argv[1:])
    else:
        run_cli(argv)
