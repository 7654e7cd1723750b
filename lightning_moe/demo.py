"""``lightning-moe demo``: route a batch through an MoE layer and show what the experts did.

It builds an MoE layer with a skewed router, routes a batch through it, prints the per-expert load, then
trains the router for a few steps with the load-balancing loss so the load evens out, and times
forward+backward of the grouped path against the reference loop.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Sequence

import torch

from lightning_moe.nn import ExpertsConfig, MoEConfig, MoELayer, MoEStats, RouterConfig


def _load_table(stats: MoEStats, width: int = 40) -> str:
    load = stats.tokens_per_expert
    share = load / load.sum().clamp_min(1)
    top = float(share.max()) or 1.0
    lines = []
    for e, (count, s) in enumerate(zip(load.tolist(), share.tolist(), strict=True)):
        kept = int(stats.kept_per_expert[e])
        bar = "#" * round(width * s / top)
        lines.append(f"  expert {e:3d} {bar:<{width}} {int(count):6d} copies ({s:6.1%}) kept {kept}")
    return "\n".join(lines)


def _time(layer: MoELayer, x: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        y, _ = layer(x)
        y.backward(torch.ones_like(y))
        times.append(time.perf_counter() - start)
        layer.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def _check_args(args: argparse.Namespace) -> None:
    """Raise unless every flag is in range, before any work; the error names the flag as the user typed it.

    The layer's configs check the same values again, but under their field names (``num_experts``, ``top_k``,
    ``hidden_dim``), which are not the flags of this command.

    Raises:
        ValueError: Naming the first invalid flag, its value and what is allowed.
    """

    def check(ok: bool, flag: str, value: object, allowed: str) -> None:
        if not ok:
            raise ValueError(f"{flag}={value!r} is invalid: {allowed}")

    for flag, value in (("--experts", args.experts), ("--dim", args.dim), ("--hidden", args.hidden)):
        check(value >= 1, flag, value, "must be >= 1")
    check(1 <= args.top_k <= args.experts, "--top-k", args.top_k, f"must be in [1, --experts] = [1, {args.experts}]")
    check(args.tokens >= 1, "--tokens", args.tokens, "must be >= 1")
    check(args.steps >= 1, "--steps", args.steps, "must be >= 1")
    factor = args.capacity_factor
    check(
        factor is None or (math.isfinite(factor) and factor > 0),
        "--capacity-factor",
        factor,
        "must be a finite number > 0, or left out for dropless routing",
    )
    check(-(2**63) <= args.seed < 2**64, "--seed", args.seed, "must be in [-2**63, 2**64 - 1] (torch.manual_seed)")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the demo."""
    parser = argparse.ArgumentParser(prog="lightning-moe demo", description=__doc__)
    parser.add_argument("--experts", type=int, default=8, help="routed experts (default 8)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument("--dim", type=int, default=128, help="model width (default 128)")
    parser.add_argument("--hidden", type=int, default=256, help="expert hidden width (default 256)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens in the batch (default 2048)")
    parser.add_argument("--capacity-factor", type=float, default=None, help="drop tokens above this factor")
    parser.add_argument("--steps", type=int, default=60, help="router training steps (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    _check_args(args)

    torch.manual_seed(args.seed)
    config = MoEConfig(
        dim=args.dim,
        router=RouterConfig(num_experts=args.experts, top_k=args.top_k),
        experts=ExpertsConfig(hidden_dim=args.hidden),
        capacity_factor=args.capacity_factor,
    )
    layer = MoELayer(config)
    # A skewed router, as after a bad initialisation: most tokens crowd onto a few experts.
    with torch.no_grad():
        layer.router.gate.weight.normal_(std=0.3)
        layer.router.gate.weight[0] += 0.5
    x = torch.randn(args.tokens, args.dim) + 0.5

    _, stats = layer(x)
    print(f"MoE layer: {args.experts} experts, top-{args.top_k}, D={args.dim}, F={args.hidden}, {args.tokens} tokens")
    print(f"\nLoad before balancing (load-balance loss {stats.losses['load_balance'].item():.3f}, 1.0 is uniform):")
    print(_load_table(stats))

    optimizer = torch.optim.Adam(layer.router.parameters(), lr=1e-2)
    for _ in range(args.steps):
        _, stats = layer(x)
        optimizer.zero_grad()
        (stats.losses["load_balance"] + 1e-3 * stats.losses["z_loss"]).backward()
        optimizer.step()
    _, stats = layer(x)
    print(
        f"\nLoad after {args.steps} router steps on the load-balance loss "
        f"(loss {stats.losses['load_balance'].item():.3f}, entropy {stats.router_entropy.item():.2f} nats):"
    )
    print(_load_table(stats))

    loop = MoELayer(MoEConfig(**{**config.__dict__, "dispatch": "loop"}))
    loop.load_state_dict(layer.state_dict())
    grouped_s, loop_s = _time(layer, x, 5), _time(loop, x, 5)
    print(
        f"\nForward+backward ({torch.get_num_threads()} threads): grouped {grouped_s * 1e3:.1f} ms, "
        f"reference loop {loop_s * 1e3:.1f} ms ({loop_s / grouped_s:.2f}x)"
    )


if __name__ == "__main__":
    main()
