"""How MoE layer time grows with the number of experts at fixed active parameters.

Top-2 routing, expert hidden 512, D=512, 8192 tokens, float32, forward+backward: every token does the same
work whatever the expert count, so a grouped path should stay nearly flat while a per-expert loop grows.
The grouped layer and the reference loop run interleaved for each expert count; ratios are to 8 experts.
Run::

    python benchmarks/expert_scaling.py
"""

from __future__ import annotations

import argparse

import torch
from moe_layer import fwd_bwd, measure  # a sibling script in benchmarks/

from lightning_moe.nn import ExpertsConfig, MoEConfig, MoELayer, RouterConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", default="8,32,128,256")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"top-2, expert hidden 512, D=512, {args.tokens} tokens, float32, fwd+bwd, median of {args.repeats}")
    print("| experts | grouped (s) | loop (s) | grouped vs 8 experts | loop vs 8 experts |")
    print("|---|---|---|---|---|")
    base: dict[str, float] = {}
    for num_experts in (int(e) for e in args.experts.split(",")):
        torch.manual_seed(0)
        cfg = MoEConfig(dim=512, router=RouterConfig(num_experts=num_experts, top_k=2),
                        experts=ExpertsConfig(hidden_dim=512))  # fmt: skip
        grouped = MoELayer(cfg)
        loop = MoELayer(MoEConfig(**{**cfg.__dict__, "dispatch": "loop"}))
        loop.load_state_dict(grouped.state_dict())
        x = torch.randn(args.tokens, 512, requires_grad=True)
        grad = torch.randn(args.tokens, 512)
        t = measure({"grouped": fwd_bwd(grouped, x, grad), "loop": fwd_bwd(loop, x, grad)}, args.repeats, 1)
        base = base or t
        print(f"| {num_experts} | {t['grouped']:.3f} | {t['loop']:.3f} | {t['grouped'] / base['grouped']:.2f}x | "
              f"{t['loop'] / base['loop']:.2f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
