"""How MoE layer time grows with the number of experts at fixed active parameters.

Two series, D=512, 8192 tokens, float32, forward+backward, ratios to 8 experts:

* ``--mode wide`` (default): top-2, expert hidden 512 at every expert count. Every token does the same work,
  but the total expert weights grow with the count (201M at 256 experts), and so do the weight reads and
  the weight gradient written every backward.
* ``--mode fine``: fine-grained segmentation (DeepSeekMoE): ``E`` experts of hidden ``4096 / E``, top ``E / 4``,
  so both the active and the total parameters stay fixed; only the routing granularity grows.

The grouped layer and the reference loop run interleaved for each expert count. Run::

    python benchmarks/expert_scaling.py
    python benchmarks/expert_scaling.py --mode fine --experts 8,32,64,128
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
    parser.add_argument("--mode", choices=("wide", "fine"), default="wide")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = "top-2, expert hidden 512" if args.mode == "wide" else "top E/4, expert hidden 4096/E"
    print(f"{shape}, D=512, {args.tokens} tokens, float32, fwd+bwd, median of {args.repeats}")
    print("| experts | grouped (s) | loop (s) | grouped vs 8 experts | loop vs 8 experts |")
    print("|---|---|---|---|---|")
    base: dict[str, float] = {}
    for num_experts in (int(e) for e in args.experts.split(",")):
        torch.manual_seed(0)
        top_k, hidden = (2, 512) if args.mode == "wide" else (num_experts // 4, 4096 // num_experts)
        cfg = MoEConfig(dim=512, router=RouterConfig(num_experts=num_experts, top_k=top_k),
                        experts=ExpertsConfig(hidden_dim=hidden))  # fmt: skip
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
