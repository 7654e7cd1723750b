"""Training-step time of zoo models with their blocks compiled (``torch.compile``) against uncompiled.

Each preset is built twice with the same weights: one as it is, one through
:func:`lightning_moe.nn.compile.compile_blocks` (what ``--model.compile true`` does: every block compiled, the
routed experts' dispatch left eager). Both run the same training steps on the same batches, interleaved, the order
alternating between repeats: forward with the chunked loss plus the auxiliary losses, backward, fused AdamW step,
``zero_grad``. The table gives the first compiled step's time (mostly compilation), the median step times after
it, their ratio (compiled over eager; below 1 is faster) and the largest loss difference over the steps. Run::

    python benchmarks/compile_blocks.py                                   # the tiny presets, the main job's batch
    python benchmarks/compile_blocks.py --presets mixtral-tiny --bf16
    python benchmarks/compile_blocks.py --scaled --batch 8 --seq 256      # ~50M parameters, as bf16_mixed.py
    python benchmarks/compile_blocks.py --presets mixtral-tiny --batch 2 --seq 16 --steps 2 --backend aot_eager
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from _args import positive_int  # a sibling module in benchmarks/
from bf16_mixed import SCALED  # a sibling script in benchmarks/

from lightning_moe import zoo
from lightning_moe.nn.compile import compile_backends, compile_blocks

PRESETS = ("mixtral-tiny", "qwen-moe-tiny", "deepseek-tiny", "glam-tiny")


def preset(text: str) -> str:
    if text not in zoo.names() or zoo.config(text).dense is not None:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be an MoE decoder preset such as mixtral-tiny")
    return text


def backend(text: str) -> str:
    if text not in compile_backends():
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be one of {', '.join(compile_backends())}")
    return text


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor, bf16: bool) -> float:
    """One training step; returns the loss."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(ids[:, :-1], targets=ids[:, 1:])
        loss = out.loss + sum(sum(stats.losses.values()) for stats in out.router_stats)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.detach())


def measure(name: str, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    overrides = SCALED[name] if args.scaled else {}
    eager = zoo.build(name, **overrides)
    compiled = compile_blocks(copy.deepcopy(eager), backend=args.backend)
    vocab = zoo.config(name, **overrides).vocab_size
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (args.batch, args.seq + 1), generator=generator) for _ in range(args.steps + 1)]
    models = {"eager": eager, "compiled": compiled}
    optimizers = {key: torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True) for key, model in models.items()}
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    losses: dict[str, list[float]] = {"eager": [], "compiled": []}
    for index, ids in enumerate(batches):
        order = ("eager", "compiled") if index % 2 == 0 else ("compiled", "eager")
        for key in order:
            torch.manual_seed(index)  # the same router noise, where a preset has any
            start = time.perf_counter()
            losses[key].append(step(models[key], optimizers[key], ids, args.bf16))
            times[key].append(time.perf_counter() - start)
    eager_s, compiled_s = statistics.median(times["eager"][1:]), statistics.median(times["compiled"][1:])
    return {
        "first_compiled_s": times["compiled"][0],
        "eager_s": eager_s,
        "compiled_s": compiled_s,
        "ratio": compiled_s / eager_s,
        "max_loss_diff": max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"], strict=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", type=preset, nargs="+", default=list(PRESETS))
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--seq", type=positive_int, default=128)
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps after the first")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--backend", type=backend, default="inductor")
    parser.add_argument("--bf16", action="store_true", help="forward under autocast to bfloat16")
    parser.add_argument("--scaled", action="store_true", help="the presets scaled to ~50M parameters (bf16_mixed.py)")
    args = parser.parse_args()
    if args.scaled and not set(args.presets) <= set(SCALED):
        parser.error(f"argument --presets: {args.presets} is invalid with --scaled: must be among {sorted(SCALED)}")
    torch.set_num_threads(args.threads)
    precision = "bf16-mixed" if args.bf16 else "float32"
    scale = ", scaled to ~50M parameters" if args.scaled else ""
    print(f"batch {args.batch} x {args.seq}, {args.threads} threads, {precision}, backend {args.backend}{scale}")
    print("| preset | first compiled step (s) | eager step (s) | compiled step (s) | compiled / eager | loss diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.presets:
        row = measure(name, args)
        print(
            f"| {name} | {row['first_compiled_s']:.1f} | {row['eager_s']:.4f} | {row['compiled_s']:.4f} | "
            f"{row['ratio']:.2f} | {row['max_loss_diff']:.1e} |"
        )


if __name__ == "__main__":
    main()
