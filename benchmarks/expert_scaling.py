"""How MoE layer time grows with the number of experts at fixed active parameters.

Two series, D=512, 8192 tokens, float32, forward+backward, ratios to the first count (8 experts by default):

* ``--mode wide`` (default): top-2, expert hidden 512 at every expert count. Every token does the same work,
  but the total expert weights grow with the count (201M at 256 experts), and so do the weight reads and
  the weight gradient written every backward.
* ``--mode fine``: fine-grained segmentation (DeepSeekMoE): ``E`` experts of hidden ``4096 / E``, top ``E / 4``,
  so both the active and the total parameters stay fixed; only the routing granularity grows.

For each expert count the grouped layer runs interleaved with the same layer keeping its weight-gradient
memory between steps (:func:`~lightning_moe.nn.reuse_expert_grad_memory`, what ``CausalLMModule`` does by
default), then with the reference loop. ``--interleaved R`` instead builds the kept-memory layer of every
count and runs them all interleaved, ``R`` rounds, so the ratios to the first count come from the same
stretch of machine time (the time of one count alone drifts between runs). Run::

    python benchmarks/expert_scaling.py
    python benchmarks/expert_scaling.py --experts 8,256 --interleaved 3
    python benchmarks/expert_scaling.py --mode fine --experts 8,32,64,128
    python benchmarks/expert_scaling.py --device cuda --bf16   # on a GPU (torch._grouped_mm experts)
"""

from __future__ import annotations

import argparse

import torch
from _args import device, non_negative_int, positive_int, positive_ints  # a sibling module in benchmarks/
from moe_layer import fwd_bwd, measure  # a sibling script in benchmarks/

from lightning_moe.nn import ExpertsConfig, MoEConfig, MoELayer, RouterConfig, reuse_expert_grad_memory


def layer_config(num_experts: int, mode: str) -> MoEConfig:
    """The series' layer at ``num_experts`` (see the module docstring)."""
    top_k, hidden = (2, 512) if mode == "wide" else (num_experts // 4, 4096 // num_experts)
    return MoEConfig(dim=512, router=RouterConfig(num_experts=num_experts, top_k=top_k),
                     experts=ExpertsConfig(hidden_dim=hidden))  # fmt: skip


def inputs(args: argparse.Namespace) -> list[torch.Tensor]:
    """The layer's inputs: four in turn under bf16, as ``moe_layer.py`` does.

    Each expert's row count then changes between steps as in training: oneDNN caches a bf16 kernel per shape,
    which one fixed input would always hit.
    """
    count = 4 if args.bf16 else 1
    return [torch.randn(args.tokens, 512, device=args.device, requires_grad=True) for _ in range(count)]


def check_counts(counts: list[int], mode: str) -> str | None:
    """Why ``counts`` do not fit the series of ``mode`` (``None`` when they do)."""
    for num_experts in counts:
        if mode == "wide" and num_experts < 2:
            return f"{num_experts} is invalid: --mode wide routes top-2, so every count must be >= 2"
        if mode == "fine" and (num_experts % 4 or 4096 % num_experts):
            return (
                f"{num_experts} is invalid: --mode fine (top E/4, hidden 4096/E) needs counts that are multiples "
                "of 4 and divide 4096 (4, 8, 16, ..., 4096)"
            )
    return None


def interleaved(args: argparse.Namespace) -> None:
    """Every count's layer with kept gradient memory, all interleaved; one line of ratios per round."""
    counts = args.experts
    steps = {}
    for num_experts in counts:
        torch.manual_seed(0)
        layer = MoELayer(layer_config(num_experts, args.mode)).to(args.device)
        reuse_expert_grad_memory(layer)
        steps[num_experts] = fwd_bwd(layer, inputs(args), torch.randn(args.tokens, 512, device=args.device), args.bf16)
    header = ["round", *(f"{e} experts (s)" for e in counts), *(f"{e} vs {counts[0]}" for e in counts[1:])]
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for round_ in range(args.interleaved):
        t = measure(steps, args.repeats, 1)
        cells = [
            str(round_ + 1),
            *(f"{t[e]:.3f}" for e in counts),
            *(f"{t[e] / t[counts[0]]:.2f}x" for e in counts[1:]),
        ]
        print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=positive_ints, default="8,32,128,256", help="comma-separated counts")
    parser.add_argument("--tokens", type=positive_int, default=8192)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--mode", choices=("wide", "fine"), default="wide")
    parser.add_argument("--device", type=device, default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--bf16", action="store_true", help="forward under autocast to bfloat16")
    parser.add_argument(
        "--interleaved", type=non_negative_int, default=0, metavar="R", help="R rounds of all counts interleaved"
    )
    args = parser.parse_args()
    problem = check_counts(args.experts, args.mode)
    if problem:
        parser.error(f"argument --experts: {problem}")
    torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device} is invalid: torch {torch.__version__} sees no CUDA device")
    shape = "top-2, expert hidden 512" if args.mode == "wide" else "top E/4, expert hidden 4096/E"
    precision = "bf16-mixed" if args.bf16 else "float32"
    print(f"{shape}, D=512, {args.tokens} tokens, {precision}, {args.device}, fwd+bwd, median of {args.repeats}")
    if args.interleaved:
        interleaved(args)
        return
    first = f"{args.experts[0]} experts"
    print(f"| experts | grouped (s) | grouped, reused grad memory (s) | loop (s) | grouped vs {first} | "
          f"reused vs {first} | loop vs {first} |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    base: dict[str, float] = {}
    for num_experts in args.experts:
        torch.manual_seed(0)
        cfg = layer_config(num_experts, args.mode)
        grouped = MoELayer(cfg).to(args.device)
        reused = MoELayer(cfg).to(args.device)
        reuse_expert_grad_memory(reused)
        loop = MoELayer(MoEConfig(**{**cfg.__dict__, "dispatch": "loop"})).to(args.device)
        for layer in (reused, loop):
            layer.load_state_dict(grouped.state_dict())
        x = inputs(args)
        grad = torch.randn(args.tokens, 512, device=args.device)
        steps = {name: fwd_bwd(layer, x, grad, args.bf16) for name, layer in (("grouped", grouped), ("reused", reused))}
        t = measure(steps, args.repeats, 1)
        # The loop in its own pair: its many allocations would change the page-fault pattern of the others.
        loop_step = fwd_bwd(loop, x, grad, args.bf16)
        t["loop"] = measure({"grouped": steps["grouped"], "loop": loop_step}, args.repeats, 1)["loop"]
        base = base or t
        print(f"| {num_experts} | {t['grouped']:.3f} | {t['reused']:.3f} | {t['loop']:.3f} | "
              f"{t['grouped'] / base['grouped']:.2f}x | {t['reused'] / base['reused']:.2f}x | "
              f"{t['loop'] / base['loop']:.2f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
