"""The fused kernel with and without expert batching (``ExpertsConfig.batch_experts``), side by side.

With batching, neighbouring experts with equal row counts run as one ``bmm`` per matmul, one expert per
thread, instead of each small matmul being split over the threads; on the CPU the dispatcher also pads pairs
of small neighbouring blocks to one count (weight-zero copies). Expert-choice routing gives every expert the
same count; token choice gives padded pairs where blocks are small. Forward+backward, float32, D=512, the
same weights for both variants, median of interleaved repeats (order alternating). Run::

    python benchmarks/expert_batching.py
    python benchmarks/expert_batching.py --tokens 4096 --repeats 5
    python benchmarks/expert_batching.py --cases 0,5 --tokens 512 --repeats 1   # two layers: a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from _args import positive_int  # a sibling module in benchmarks/
from moe_layer import SHAPES, fwd_bwd, measure  # a sibling script in benchmarks/

from lightning_moe.nn import ExpertsConfig, MoEConfig, MoELayer, RouterConfig


def cases() -> list[tuple[str, MoEConfig]]:
    """The layers compared, with labels.

    The layer benchmark's token-choice shapes, the scaling series' 256 experts of hidden 512, and expert-choice
    layers (capacity factor 1: every expert takes ``tokens * top_k / E`` tokens).
    """
    result = [(shape.label, shape.moe_config()) for shape in SHAPES]
    wide = MoEConfig(dim=512, router=RouterConfig(num_experts=256, top_k=2), experts=ExpertsConfig(hidden_dim=512))
    result.append(("256 experts, top-2, F=512", wide))
    for experts, top_k, hidden in ((64, 8, 224), (256, 8, 128), (256, 2, 512)):
        router = RouterConfig(num_experts=experts, top_k=top_k, kind="expert_choice")
        cfg = MoEConfig(dim=512, router=router, experts=ExpertsConfig(hidden_dim=hidden), capacity_factor=1.0)
        result.append((f"Expert choice: E={experts}, {top_k} per token, F={hidden}", cfg))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=positive_int, default=8192)
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument(
        "--cases", type=str, default=None, help="comma-separated indices into the layers (default: all)"
    )
    args = parser.parse_args()
    layers = cases()
    if args.cases is not None:
        indices = [int(i) for i in args.cases.split(",") if i.strip().isdigit()]
        if len(indices) != len(args.cases.split(",")) or any(i >= len(layers) for i in indices):
            parser.error(
                f"argument --cases: {args.cases!r} is invalid: use comma-separated indices 0..{len(layers) - 1}"
            )
        layers = [layers[i] for i in indices]
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float32, {args.tokens} tokens, fwd+bwd, "
          f"median of {args.repeats}")  # fmt: skip
    print("| layer | batched (s) | one expert at a time (s) | speed-up |")
    print("|---|---:|---:|---:|")
    for label, cfg in layers:
        torch.manual_seed(0)
        batched = MoELayer(cfg)
        single = MoELayer(dataclasses.replace(cfg, experts=dataclasses.replace(cfg.experts, batch_experts=False)))
        single.load_state_dict(batched.state_dict())
        x = torch.randn(args.tokens, cfg.dim, requires_grad=True)
        grad = torch.randn(args.tokens, cfg.dim)
        t = measure({"batched": fwd_bwd(batched, x, grad), "single": fwd_bwd(single, x, grad)}, args.repeats, 1)
        print(f"| {label} | {t['batched']:.3f} | {t['single']:.3f} | {t['single'] / t['batched']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
