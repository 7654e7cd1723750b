"""bf16-mixed against float32 training on CPU: step time and loss agreement over the same steps.

For each decoder family a tiny preset is scaled to ~50M parameters (4 layers, width 512; the expert shapes
of ``train_step_vs_hf.py``) and trained twice the way ``lightning-moe fit`` trains it: a
:class:`~lightning_moe.module.CausalLMModule`, the embedded-corpus :class:`~lightning_moe.data.TextDataModule`
and a Lightning ``Trainer`` on the CPU, once with ``precision="32-true"`` and once with
``precision="bf16-mixed"`` (``--trainer.precision bf16-mixed`` on the command line). Both runs start from the
same weights, see the same batches in the same order (same data seed) and the same random numbers (same
global seed). A callback records every step's training loss (cross-entropy plus auxiliary losses) and wall
time; the first ``--skip`` steps are warm-up and left out of the median step time.

During the first step of each run the callback also checks the precision the model really ran in: the
output of every MoE layer must be bfloat16 under bf16-mixed (and float32 otherwise), the loss float32, and
every matrix multiply (the LM head's, inside the chunked loss, too) is tallied by dtype, so the report shows
the share of matmul FLOPs (forward and backward) done in bfloat16. The router and the softmax of the
cross-entropy stay float32 on purpose; the matmuls left in float32 are listed under the table. The two
precisions of a family run back to back, their order alternating from family to family. Run::

    python benchmarks/bf16_mixed.py                          # mixtral, qwen-moe, deepseek, glam; 50 steps
    python benchmarks/bf16_mixed.py --families mixtral-tiny --steps 20
    python benchmarks/bf16_mixed.py --quick --threads 1      # unscaled presets, 5 short steps: a smoke run
    python benchmarks/bf16_mixed.py --quick --families glam --steps 3 --batch-size 2 --seq-len 16 --data-bytes 100000
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from _args import positive_int  # a sibling module in benchmarks/
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from typing_extensions import override

from lightning_moe.callbacks import LoadBalancingBias
from lightning_moe.data import TextDataModule
from lightning_moe.module import CausalLMModule
from lightning_moe.nn.moe import MoELayer

DIM, LAYERS, HEADS, KV_HEADS = 512, 4, 8, 4
COMMON: dict[str, Any] = {"dim": DIM, "num_layers": LAYERS, "num_heads": HEADS}
# The shapes of benchmarks/train_step_vs_hf.py (Hugging Face defaults: no sliding window, no dense-only
# Qwen layers), plus GLaM with 4x-wide GELU experts.
SCALED: dict[str, dict[str, Any]] = {
    "mixtral-tiny": dict(COMMON, num_kv_heads=KV_HEADS, ffn_hidden=1024, num_experts=8, top_k=2, sliding_window=None),
    "qwen-moe-tiny": dict(
        COMMON,
        num_kv_heads=KV_HEADS,
        dense_hidden=1408,
        expert_hidden=176,
        shared_expert_hidden=704,
        num_experts=60,
        top_k=4,
        mlp_only_layers=[],
    ),
    "deepseek-tiny": dict(
        COMMON,
        dense_hidden=1408,
        moe_hidden=128,
        num_experts=64,
        top_k=6,
        n_shared_experts=2,
        n_group=8,
        topk_group=4,
        first_k_dense=1,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=64,
    ),
    "glam-tiny": dict(COMMON, ffn_hidden=2048, num_experts=8, top_k=2),
}
# Callbacks that are part of a family's training algorithm in its configs/*.yaml (monitors are left out).
TRAINING_CALLBACKS: dict[str, list[type[Callback]]] = {"deepseek-tiny": [LoadBalancingBias]}
PRECISIONS = ("32-true", "bf16-mixed")
DATA_BYTES, VOCAB = 16_000_000, 1024  # as in configs/*.yaml, so the tokenized corpus is shared with the CLI

aten = torch.ops.aten
_MATMULS = {aten.mm: (0, 1), aten.addmm: (1, 2), aten.bmm: (0, 1), aten.baddbmm: (1, 2)}


class MatmulDtypes(TorchDispatchMode):
    """Tallies the FLOPs of every matrix multiply (``mm``, ``addmm``, ``bmm``, ``baddbmm``) by input dtype.

    Attention kernels (``scaled_dot_product_*``) are counted by dtype too, as calls. Shapes of float32
    matmuls are kept, to name what did not run in bfloat16.
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops: dict[torch.dtype, int] = defaultdict(int)
        self.attention: dict[torch.dtype, int] = defaultdict(int)
        self.fp32_shapes: dict[tuple[str, tuple[int, ...], tuple[int, ...]], int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        packet = func.overloadpacket
        if packet in _MATMULS:
            i, j = _MATMULS[packet]
            a, b = args[i], args[j]
            flops = 2 * a.numel() * b.shape[-1]  # (..., M, K) @ (..., K, N): 2 M K N per batch entry
            self.flops[a.dtype] += flops
            if a.dtype == torch.float32:
                self.fp32_shapes[(packet.__name__, tuple(a.shape), tuple(b.shape))] += flops
        elif "scaled_dot_product" in packet.__name__:
            self.attention[args[0].dtype] += 1
        return func(*args, **(kwargs or {}))

    def bf16_share(self) -> float:
        """Share of the tallied matmul FLOPs done in bfloat16."""
        total = sum(self.flops.values())
        return self.flops[torch.bfloat16] / total if total else float("nan")


class StepRecorder(Callback):
    """Records each step's training loss and wall time, and the precision of the first step.

    The time of step ``i`` runs from the end of step ``i - 1`` (the start of step 0) to the end of step ``i``,
    so it holds the data fetch, forward, backward, clipping and optimizer step. During step 0 forward hooks
    record the dtype of the loss and of every MoE layer's output, and :class:`MatmulDtypes` tallies the
    matmuls; that step is warm-up and slowed by the tally, so leave it out of timings.
    """

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.times: list[float] = []
        self.dtypes: dict[str, set[torch.dtype]] = defaultdict(set)
        self.matmuls = MatmulDtypes()
        self._last = 0.0
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0:
            self._hooks.append(
                pl_module.model.register_forward_hook(lambda m, i, out: self.dtypes["loss"].add(out.loss.dtype))
            )
            for module in pl_module.modules():
                if isinstance(module, MoELayer):
                    hook = module.register_forward_hook(lambda m, i, out: self.dtypes["moe_out"].add(out[0].dtype))
                    self._hooks.append(hook)
            self.matmuls.__enter__()
            self._last = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0:
            self.matmuls.__exit__(None, None, None)
            for hook in self._hooks:
                hook.remove()
        self.losses.append(float(outputs["loss"]))
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now


@dataclass
class Run:
    """One training run's record."""

    precision: str
    losses: list[float]
    times: list[float]
    dtypes: dict[str, set[torch.dtype]]
    matmuls: MatmulDtypes = field(repr=False)


def train(
    arch: str,
    overrides: dict[str, Any],
    init: dict[str, Tensor],
    data: TextDataModule,
    precision: str,
    steps: int,
    seed: int,
) -> Run:
    """Train ``steps`` steps from the weights ``init`` as ``lightning-moe fit`` would, and record them.

    Raises:
        RuntimeError: If an MoE layer's output is not in the precision's compute dtype, or the loss not float32.
    """
    L.seed_everything(seed, verbose=False)
    # lr 1e-3 (the tiny configs use 3e-3, too high for width 512: a loss spike at the end of warmup).
    module = CausalLMModule(arch=arch, overrides=overrides, lr=1e-3, warmup_steps=max(1, steps // 5))
    module.load_state_dict(init)
    recorder = StepRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_steps=steps,
        gradient_clip_val=1.0,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder, *(cls() for cls in TRAINING_CALLBACKS.get(arch, []))],
    )
    trainer.fit(module, datamodule=data)
    compute = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    for what, dtypes in recorder.dtypes.items():
        expected = compute if what == "moe_out" else torch.float32
        if dtypes != {expected}:
            raise RuntimeError(f"{arch} with precision={precision!r}: {what} ran in {dtypes}, expected {expected}")
    if set(recorder.dtypes) != {"loss", "moe_out"}:
        raise RuntimeError(f"{arch}: the precision check saw only {sorted(recorder.dtypes)}")
    return Run(precision, recorder.losses, recorder.times, dict(recorder.dtypes), recorder.matmuls)


def row(arch: str, params: int, fp32: Run, bf16: Run, skip: int, tokens: int) -> str:
    """One markdown table row: median step times after ``skip`` steps, throughput, loss agreement."""
    t32, t16 = statistics.median(fp32.times[skip:]), statistics.median(bf16.times[skip:])
    diffs = [abs(a - b) for a, b in zip(fp32.losses, bf16.losses, strict=True)]
    rel = statistics.fmean(d / abs(a) for d, a in zip(diffs, fp32.losses, strict=True))
    cells = [arch.removesuffix("-tiny"), f"{params / 1e6:.1f}M", f"{t32:.3f}", f"{t16:.3f}", f"{t32 / t16:.2f}x"]
    cells += [f"{tokens / t32:.0f}", f"{tokens / t16:.0f}", f"{fp32.losses[-1]:.4f}", f"{bf16.losses[-1]:.4f}"]
    cells += [f"{max(diffs):.4f}", f"{100 * rel:.2f}%", f"{100 * bf16.matmuls.bf16_share():.1f}%"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    """Parse the options, run every family in both precisions and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(SCALED), help="comma-separated tiny presets (or families)")
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="training steps per run (default 50; 5 with --quick)"
    )
    parser.add_argument("--skip", type=int, default=None, help="warm-up steps left out of the timing (default 3)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="sequences per batch (default 8)")
    parser.add_argument("--seq-len", type=positive_int, default=None, help="tokens per sequence (default 256)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument(
        "--data-bytes", type=positive_int, default=DATA_BYTES, help=f"bytes of corpus text (default {DATA_BYTES})"
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--quick", action="store_true", help="unscaled presets, batch 4 x 64 tokens, 5 steps")
    parser.add_argument("--json", default=None, help="also write every run's per-step losses and times here")
    args = parser.parse_args()
    quick = args.quick
    steps = args.steps if args.steps is not None else (5 if quick else 50)
    skip = args.skip if args.skip is not None else (1 if quick else 3)
    batch_size = args.batch_size if args.batch_size is not None else (4 if quick else 8)
    seq_len = args.seq_len if args.seq_len is not None else (64 if quick else 256)
    families = [f if f.endswith("-tiny") else f"{f}-tiny" for f in args.families.split(",")]
    unknown = set(families) - set(SCALED)
    if unknown:
        parser.error(f"--families: unknown {sorted(unknown)}; choose from {', '.join(SCALED)}")
    if not 1 <= skip < steps:  # step 0 also runs the precision check, which slows it
        parser.error(f"--skip={skip} is invalid: must be in [1, steps={steps})")

    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|smaller than the logging interval).*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # lightning's own use of a deprecated torch API
    data = TextDataModule(max_bytes=args.data_bytes, vocab_size=VOCAB, block_size=seq_len, batch_size=batch_size)
    data.prepare_data()
    data.setup("fit")

    tokens = batch_size * seq_len
    print(
        f"torch {torch.__version__}, {args.threads} threads, {tokens} tokens/step ({batch_size} x {seq_len}), "
        f"{steps} steps, median step time after {skip} warm-up steps, "
        f"{'unscaled tiny presets (--quick)' if quick else f'scaled to {LAYERS} layers x {DIM}'}"
    )
    columns = ["family", "params", "fp32 step (s)", "bf16 step (s)", "speed-up", "fp32 tok/s", "bf16 tok/s"]
    columns += [f"fp32 loss@{steps}", f"bf16 loss@{steps}", "max abs Δloss", "mean rel Δloss", "bf16 matmul FLOPs"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns), flush=True)
    notes, record = [], {}
    for index, arch in enumerate(families):
        overrides = {} if quick else SCALED[arch]
        L.seed_everything(args.seed, verbose=False)
        initial = CausalLMModule(arch=arch, overrides=overrides)
        init = initial.state_dict()
        params = sum(p.numel() for p in initial.model.parameters())  # tied weights once, buffers left out
        order = PRECISIONS if index % 2 == 0 else PRECISIONS[::-1]
        runs = {p: train(arch, overrides, init, data, p, steps, args.seed) for p in order}
        fp32, bf16 = runs["32-true"], runs["bf16-mixed"]
        print(row(arch, params, fp32, bf16, skip, tokens), flush=True)
        left = sorted(bf16.matmuls.fp32_shapes.items(), key=lambda item: -item[1])
        total = sum(bf16.matmuls.flops.values())
        shown = ", ".join(f"{op} {list(a)}@{list(b)} ({100 * f / total:.1f}%)" for (op, a, b), f in left[:4])
        fused = ", ".join(f"{n} in {str(k).removeprefix('torch.')}" for k, n in bf16.matmuls.attention.items())
        fused = f"fused attention kernel calls: {fused}" if fused else "no fused attention kernel (SDPA math path)"
        notes.append(f"{arch}: float32 matmuls: {shown or 'none'}; {fused}")
        record[arch] = {
            "params": params,
            "runs": {p: {"losses": r.losses, "times": r.times} for p, r in runs.items()},
        }
    print("\nIn the bf16-mixed runs (step 1, forward and backward; % of that run's matmul FLOPs):")
    print("\n".join(f"- {note}" for note in notes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "families": record}, f)


if __name__ == "__main__":
    main()
