"""``lightning-moe compare``: does the MoE model beat dense baselines built from the same blocks?

Trains, on the same data (same split, same batch order), seeds and token budget, the MoE preset and its dense
baselines (``dense="active"``: equal active parameters; ``dense="total"``: equal total parameters), then writes
into ``out_dir``: ``results.md`` (final validation loss, tokens/s, peak memory, active/total parameters, as mean
and spread over seeds), ``results.json`` (every curve), ``val_loss.png`` (validation loss against tokens and
against training wall-clock) and one TensorBoard directory ``tb/`` with a run per model and seed. With
``upcycle_steps > 0`` it also continues each seed's equal-active dense model for ``upcycle_steps`` more steps on
the batches that follow in its data order, once as it is and once upcycled into an MoE model
(:func:`lightning_moe.zoo.upcycle`), each with a fresh warmup and cosine schedule, and reports both curves
(``upcycle.md``, ``upcycle.png``).

    lightning-moe compare --config configs/compare/mixtral-tiny.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_moe import zoo
from lightning_moe.callbacks import LoadBalancingBias
from lightning_moe.data import TextDataModule
from lightning_moe.module import CausalLMModule
from lightning_moe.nn.config import check_field_types
from lightning_moe.nn.encoder_decoder import EncoderDecoderLM
from lightning_moe.nn.moe import MoELayer

VARIANTS = {None: "moe", "active": "dense-equal-active", "total": "dense-equal-total"}


@dataclass
class CompareConfig:
    """What to compare and for how long.

    Args:
        arch: The MoE preset (a decoder-only family).
        dense: Dense baselines to train next to it: ``"active"`` and/or ``"total"`` (see ``ModelConfig.dense``).
        seeds: Model-initialisation seeds; every model sees the same data order (``data_seed``) for each.
        max_steps: Training steps per run (the token budget is ``max_steps * batch_size * block_size``).
        val_every: Validate every this many steps.
        val_batches: Validation batches per validation.
        block_size: Tokens per sequence.
        batch_size: Sequences per batch.
        max_bytes: Text bytes read from the corpus.
        vocab_size: BPE vocabulary size.
        data_seed: Seed of the train/validation split and of the batch order.
        lr: Peak learning rate (the same for every model).
        warmup_steps: Linear warmup steps.
        upcycle_steps: Upcycling mode: steps to continue the equal-active dense model, dense versus upcycled (0: off).
        out_dir: Where the table, plot, curves and TensorBoard runs go.
    """

    arch: str = "mixtral-tiny"
    dense: list[str] = field(default_factory=lambda: ["active", "total"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    max_steps: int = 300
    val_every: int = 50
    val_batches: int = 20
    block_size: int = 128
    batch_size: int = 16
    max_bytes: int = 4_000_000
    vocab_size: int = 1024
    data_seed: int = 1234
    lr: float = 3e-3
    warmup_steps: int = 30
    upcycle_steps: int = 0
    out_dir: str = "compare"

    def __post_init__(self) -> None:
        check_field_types(self)
        for name, kind in (("dense", str), ("seeds", int)):
            values = getattr(self, name)
            if not isinstance(values, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
                raise ValueError(f"{name}={values!r} is invalid: expected a list of {kind.__name__}s")
        bad = [d for d in self.dense if d not in ("active", "total")]
        if bad:
            raise ValueError(f"dense={self.dense!r} is invalid: entries must be 'active' or 'total'")
        if self.upcycle_steps and "active" not in self.dense:
            raise ValueError("upcycle_steps > 0 is invalid without 'active' in dense: upcycling continues that model")
        if not self.seeds:
            raise ValueError("seeds=[] is invalid: give at least one seed")
        if not all(0 <= seed < 2**32 for seed in self.seeds):
            raise ValueError(f"seeds={self.seeds!r} is invalid: each seed must be in [0, 2**32 - 1]")
        if len(set(self.seeds)) != len(self.seeds):  # a repeated seed reruns the same run into the same folder
            raise ValueError(f"seeds={self.seeds!r} is invalid: each seed must appear once")
        for name in ("max_steps", "val_every", "val_batches", "block_size", "batch_size", "max_bytes", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be >= 1")
        for name in ("warmup_steps", "upcycle_steps", "data_seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be >= 0")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr!r} is invalid: must be > 0")
        model = zoo.config(self.arch)  # an unknown preset raises here, with close matches
        if model.dense is not None:
            raise ValueError(f"arch={self.arch!r} is invalid: give the MoE preset, not a dense baseline")
        with torch.device("meta"):  # nothing allocated
            if isinstance(zoo.build(self.arch), EncoderDecoderLM):
                raise ValueError(f"arch={self.arch!r} is invalid: compare trains decoder-only presets")
        _data(self)  # the data module's own checks (vocab_size >= 258, ...), which the first run would meet late
        # The runs check these too, but only once the corpus is tokenized, and by the data module's field names.
        if self.vocab_size > model.vocab_size:
            raise ValueError(
                f"vocab_size={self.vocab_size} is invalid: more than {self.arch}'s vocab_size={model.vocab_size}"
            )
        max_len = getattr(model, "max_seq_len", None)
        if max_len is not None and self.block_size > max_len:
            raise ValueError(
                f"block_size={self.block_size} is invalid: longer than {self.arch}'s max_seq_len={max_len}"
            )


class CurveRecorder(Callback):
    """Records (tokens, training seconds, validation loss) after each validation, and throughput and memory."""

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self.points: list[tuple[int, float, float]] = []
        self.peak_mib = 0.0
        self._start = 0.0

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        self._sync(pl_module)
        self.seconds += time.perf_counter() - self._start
        self.tokens += batch[:, :-1].numel()
        if pl_module.device.type == "cuda":
            self.peak_mib = max(self.peak_mib, torch.cuda.max_memory_allocated(pl_module.device) / 2**20)
        else:  # the process's peak resident set so far (Linux: KiB)
            self.peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        loss = trainer.callback_metrics.get("val/loss")
        if loss is None or trainer.sanity_checking:
            return
        self.points.append((self.tokens, self.seconds, float(loss)))
        if isinstance(trainer.logger, TensorBoardLogger):
            trainer.logger.experiment.add_scalar("compare/val_loss_by_tokens", float(loss), self.tokens)


def _data(cfg: CompareConfig) -> TextDataModule:
    """The data module every run trains on: the same corpus, split and batch order (``data_seed``)."""
    return TextDataModule(
        max_bytes=cfg.max_bytes,
        vocab_size=cfg.vocab_size,
        block_size=cfg.block_size,
        batch_size=cfg.batch_size,
        seed=cfg.data_seed,
    )


def _train(
    cfg: CompareConfig,
    label: str,
    seed: int,
    steps: int,
    module_kwargs: dict[str, Any],
    init_state: dict[str, torch.Tensor] | None = None,
    data_start: tuple[tuple[int, int], int] | None = None,
) -> dict[str, Any]:
    """One run; returns its curve and measurements (and its weights and tokenizer: ``"state"``, ``"tokenizer_json"``).

    ``data_start`` (a run's ``"data_end"``: its data position and samples seen) continues that run's data order.
    """
    L.seed_everything(seed, verbose=False)
    module = CausalLMModule(lr=cfg.lr, warmup_steps=cfg.warmup_steps, **module_kwargs)
    if init_state is not None:
        module.model.load_state_dict(init_state)
    if data_start is not None:
        module.train_data_position, module.train_samples_seen = data_start
    data = _data(cfg)
    recorder = CurveRecorder()
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=steps,
        val_check_interval=min(cfg.val_every, steps),
        check_val_every_n_epoch=None,
        limit_val_batches=cfg.val_batches,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        logger=TensorBoardLogger(Path(cfg.out_dir) / "tb", name=label, version=f"seed{seed}"),
        callbacks=[recorder, LoadBalancingBias()] if _balances_with_bias(module) else [recorder],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    if not recorder.points or recorder.points[-1][0] != recorder.tokens:  # val_every does not divide steps
        trainer.validate(module, datamodule=data, verbose=False)  # the final loss is the final step's
    counts = zoo.count_parameters(module.model)
    return {
        "label": label,
        "seed": seed,
        "curve": recorder.points,
        "final_val_loss": recorder.points[-1][2] if recorder.points else math.nan,
        "tokens_per_sec": recorder.tokens / max(recorder.seconds, 1e-9),
        "peak_mib": recorder.peak_mib,
        "active_params": counts.active,
        "total_params": counts.total,
        "state": {k: v.detach().cpu().clone() for k, v in module.model.state_dict().items()},
        "data_end": (module.train_data_position, module.train_samples_seen),
        "tokenizer_json": module.tokenizer_json,
    }


def _balances_with_bias(module: CausalLMModule) -> bool:
    """Whether the model balances its routers with DeepSeek-V3's score bias, which only ``LoadBalancingBias`` moves.

    Such a preset sets ``bias_update_speed`` and no load-balancing loss (``deepseek-tiny``); trained without the
    callback (which ``configs/deepseek-tiny.yaml`` has), the bias would stay zero and nothing but the small
    sequence-wise loss would balance the experts. The upcycled model keeps the family's score-bias routers.
    """
    if getattr(module.config, "bias_update_speed", 0.0) <= 0:
        return False
    return any(isinstance(m, MoELayer) and m.router.score_bias is not None for m in module.model.modules())


def _mean_spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {statistics.stdev(values):.2g}"


def _table(runs: list[dict[str, Any]], labels: list[str], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        "| model | active params | total params | final val loss | tokens/s | peak memory (MiB) | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label in labels:
        group = [r for r in runs if r["label"] == label]
        lines.append(
            f"| {label} | {group[0]['active_params']:,} | {group[0]['total_params']:,} | "
            f"{_mean_spread([r['final_val_loss'] for r in group])} | "
            f"{_mean_spread([r['tokens_per_sec'] for r in group])} | "
            f"{max(r['peak_mib'] for r in group):.0f} | {len(group)} |"
        )
    lines.append("")
    lines.append("Mean ± sample standard deviation over seeds. Peak memory: CUDA peak allocated, or on CPU the peak")
    lines.append("resident set of the process up to the end of the run (runs share one process, so it only grows).")
    return "\n".join(lines) + "\n"


def _plot(runs: list[dict[str, Any]], labels: list[str], path: Path, title: str) -> None:
    """Validation loss against tokens and against training seconds: the seed mean, with a min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label in labels:
        curves = [r["curve"] for r in runs if r["label"] == label]
        length = min(len(c) for c in curves)
        if length == 0:
            continue
        losses = torch.tensor([[p[2] for p in c[:length]] for c in curves])
        tokens = [p[0] for p in curves[0][:length]]
        seconds = torch.tensor([[p[1] for p in c[:length]] for c in curves]).mean(0).tolist()
        for ax, xs in ((axes[0], tokens), (axes[1], seconds)):
            (line,) = ax.plot(xs, losses.mean(0).tolist(), marker="o", markersize=3, label=label)
            ax.fill_between(xs, losses.min(0).values.tolist(), losses.max(0).values.tolist(), alpha=0.2,
                            color=line.get_color())  # fmt: skip
    axes[0].set_xlabel("training tokens")
    axes[1].set_xlabel("training wall-clock (s)")
    for ax in axes:
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: CompareConfig) -> dict[str, Path]:
    """Train every model for every seed and write the table, curves, plot(s) and TensorBoard runs.

    Returns:
        The written files by kind (``"table"``, ``"json"``, ``"plot"``, ``"tensorboard"``, and with upcycling
        ``"upcycle_table"``, ``"upcycle_plot"``).
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    variants = [None, *[d for d in ("active", "total") if d in cfg.dense]]
    labels = [VARIANTS[v] for v in variants]
    runs, upcycle_runs = [], []
    for seed in cfg.seeds:
        for variant in variants:
            overrides = {} if variant is None else {"dense": variant}
            result = _train(cfg, VARIANTS[variant], seed, cfg.max_steps, {"arch": cfg.arch, "overrides": overrides})
            state, data_end, tokenizer_json = result.pop("state"), result.pop("data_end"), result.pop("tokenizer_json")
            runs.append(result)
            if variant == "active" and cfg.upcycle_steps:
                upcycle_runs += _continue_dense(cfg, seed, state, data_end, tokenizer_json)
    files = {"tensorboard": out / "tb", "table": out / "results.md", "json": out / "results.json"}
    budget = cfg.max_steps * cfg.batch_size * cfg.block_size
    title = f"{cfg.arch} vs dense baselines, {budget:,} tokens, seeds {cfg.seeds}"
    files["table"].write_text(_table(runs, labels, title))
    files["plot"] = out / "val_loss.png"
    _plot(runs, labels, files["plot"], title)
    record = {"config": dataclasses.asdict(cfg), "runs": runs}
    if upcycle_runs:
        up_labels = ["dense-continued", "upcycled-moe"]
        up_title = f"continue {cfg.arch}-dense for {cfg.upcycle_steps} steps: dense vs upcycled MoE"
        files["upcycle_table"] = out / "upcycle.md"
        files["upcycle_table"].write_text(_table(upcycle_runs, up_labels, up_title))
        files["upcycle_plot"] = out / "upcycle.png"
        _plot(upcycle_runs, up_labels, files["upcycle_plot"], up_title)
        record["upcycle_runs"] = upcycle_runs
    files["json"].write_text(json.dumps(record, indent=1))
    return files


def _continue_dense(
    cfg: CompareConfig,
    seed: int,
    dense_state: dict[str, torch.Tensor],
    data_end: tuple[tuple[int, int], int],
    tokenizer_json: str | None,
) -> list[dict[str, Any]]:
    """Continue a trained equal-active dense model as it is and upcycled, for ``upcycle_steps`` steps each.

    Both continue the dense run's data order where it stopped (batches it has not trained on), each with a fresh
    optimizer and learning-rate schedule (warmup, then cosine over the continuation), as upcycling starts a new
    run with a new router.
    """
    kwargs = {"arch": cfg.arch, "overrides": {"dense": "active"}}
    results = []
    for label, extra in (("dense-continued", {}), ("upcycled-moe", {"upcycle": {}})):
        # The upcycled module builds the dense model, loads the weights, then upcycles: pass the weights in first.
        result = _train_from_dense(cfg, label, seed, {**kwargs, **extra}, dense_state, data_end, tokenizer_json)
        result.pop("state"), result.pop("data_end"), result.pop("tokenizer_json")
        results.append(result)
    return results


def _train_from_dense(
    cfg: CompareConfig,
    label: str,
    seed: int,
    kwargs: dict[str, Any],
    dense_state: dict[str, torch.Tensor],
    data_end: tuple[tuple[int, int], int],
    tokenizer_json: str | None,
) -> dict[str, Any]:
    checkpoint = Path(cfg.out_dir) / f".dense-seed{seed}.ckpt"
    hparams = {"arch": kwargs["arch"], "overrides": kwargs["overrides"], "upcycle": None, "init_from": None}
    # With the tokenizer, as lightning-moe fit saves it: the upcycled run checks its data against it.
    torch.save({"state_dict": {f"model.{k}": v for k, v in dense_state.items()}, "hyper_parameters": hparams,
                "tokenizer_json": tokenizer_json}, checkpoint)  # fmt: skip
    try:
        if "upcycle" in kwargs:
            return _train(cfg, label, seed, cfg.upcycle_steps, {"upcycle_from": str(checkpoint)}, data_start=data_end)
        return _train(cfg, label, seed, cfg.upcycle_steps, kwargs, init_state=dense_state, data_start=data_end)
    finally:
        checkpoint.unlink()


def load_config(argv: Sequence[str]) -> CompareConfig:
    """Parse ``--config FILE.yaml`` and per-field ``--FIELD VALUE`` options (values in YAML syntax)."""
    parser = argparse.ArgumentParser(prog="lightning-moe compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file with CompareConfig fields")
    for f in dataclasses.fields(CompareConfig):
        kind = str if f.type == "str" else yaml.safe_load  # a string field takes the text as given (--out_dir 2024)
        # SUPPRESS: an option given as null (``--max_steps null``) reaches the checks instead of meaning "not given"
        parser.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS, help=f"override {f.name} (YAML)")
    args = parser.parse_args(list(argv))
    values: dict[str, Any] = {}
    if args.config:
        if not Path(args.config).is_file():
            raise ValueError(f"config={args.config!r} is invalid: no such file")
        values = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(
                f"config={args.config!r} is invalid: expected a mapping of CompareConfig fields, not a "
                f"{type(values).__name__}"
            )
        known = {f.name for f in dataclasses.fields(CompareConfig)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"config={args.config!r} is invalid: unknown keys {sorted(unknown)}")
    values |= {k: v for k, v in vars(args).items() if k != "config"}
    for f in dataclasses.fields(CompareConfig):
        value = values.get(f.name)
        if f.type == "float" and isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                values[f.name] = float(value)
            except ValueError:
                pass  # CompareConfig names the field
        elif f.type.startswith("list") and isinstance(value, (int, str)):  # --seeds 3: a list of one
            values[f.name] = [value]
    return CompareConfig(**values)


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """Entry point of ``lightning-moe compare``; prints the table and where everything went."""
    import sys

    cfg = load_config(sys.argv[1:] if argv is None else argv)
    files = run(cfg)
    print(files["table"].read_text())
    if "upcycle_table" in files:
        print(files["upcycle_table"].read_text())
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return files
