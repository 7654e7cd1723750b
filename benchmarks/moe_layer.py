"""MoE layer forward+backward time against a dense SwiGLU FFN of equal active FLOPs and the reference loop.

Everything is measured side by side in one run: for each shape, the dense FFN and the grouped MoE layer
run forward+backward on the same input, interleaved, then the grouped layer and the reference loop (same
weights) likewise; the median of several repeats is reported with the ratios (grouped/loop from the
second pair). Run::

    python benchmarks/moe_layer.py                # the three shapes of the README table
    python benchmarks/moe_layer.py --repeats 3 --tokens 2048   # a quicker look
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lightning_moe.nn import ExpertsConfig, FeedForward, MoEConfig, MoELayer, RouterConfig


@dataclass
class Shape:
    name: str
    num_experts: int
    top_k: int
    expert_hidden: int
    shared_hidden: int
    dense_hidden: int
    dim: int = 512


SHAPES = [
    Shape("mixtral-like (E=8, top-2)", 8, 2, 1024, 0, 2048),
    Shape("deepseek-like (E=64, top-6, 2 shared)", 64, 6, 256, 512, 2048),
    Shape("many experts (E=256, top-8)", 256, 8, 128, 0, 1024),
]


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        out = module(x)
        y = out[0] if isinstance(out, tuple) else out
        y.backward(grad)
        module.zero_grad(set_to_none=True)
        x.grad = None

    return step


def measure(steps: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, float]:
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():  # interleaved so drift hits every variant alike
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run_shape(shape: Shape, tokens: int, repeats: int, warmup: int, skip_loop: bool) -> dict[str, float]:
    torch.manual_seed(0)
    moe_cfg = MoEConfig(
        dim=shape.dim,
        router=RouterConfig(num_experts=shape.num_experts, top_k=shape.top_k),
        experts=ExpertsConfig(hidden_dim=shape.expert_hidden, activation="silu", gated=True),
        shared_hidden_dim=shape.shared_hidden,
    )
    grouped = MoELayer(moe_cfg)
    dense = FeedForward(shape.dim, shape.dense_hidden, "silu", gated=True)
    x = torch.randn(tokens, shape.dim, requires_grad=True)
    grad = torch.randn(tokens, shape.dim)
    times = measure({"dense": fwd_bwd(dense, x, grad), "grouped": fwd_bwd(grouped, x, grad)}, repeats, warmup)
    if not skip_loop:
        # A second pair, so the loop's many allocations do not disturb the dense-vs-grouped pair: on CPU,
        # freed large blocks go back to the OS and page-fault on reuse, and the loop changes that pattern.
        loop = MoELayer(MoEConfig(**{**moe_cfg.__dict__, "dispatch": "loop"}))
        loop.load_state_dict(grouped.state_dict())
        pair = measure({"grouped": fwd_bwd(grouped, x, grad), "loop": fwd_bwd(loop, x, grad)}, repeats, warmup)
        times["grouped/loop"] = pair["grouped"] / pair["loop"]
        times["loop"] = pair["loop"]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-loop", action="store_true", help="leave out the reference loop")
    parser.add_argument("--shapes", default="0,1,2", help="comma-separated indices into the shape table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.tokens} tokens, float32, forward+backward, "
        f"median of {args.repeats}"
    )
    header = f"| {'shape':40s} | dense (s) | grouped (s) | loop (s) | grouped/dense | loop/dense | grouped/loop |"
    print(header)
    print("|" + "|".join("-" * (len(col)) for col in header.split("|")[1:-1]) + "|")
    for shape in [SHAPES[int(i)] for i in args.shapes.split(",")]:
        t = run_shape(shape, args.tokens, args.repeats, args.warmup, args.skip_loop)
        loop = t.get("loop", float("nan"))
        print(
            f"| {shape.name:40s} | {t['dense']:9.3f} | {t['grouped']:11.3f} | {loop:8.3f} | "
            f"{t['grouped'] / t['dense']:13.2f} | {loop / t['dense']:10.2f} | {t.get('grouped/loop', loop):12.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
