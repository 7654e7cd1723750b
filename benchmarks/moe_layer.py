"""MoE layer forward+backward time and peak memory against a dense SwiGLU FFN of equal active FLOPs and the loop.

For each shape and token count, the dense FFN and the grouped MoE layer run forward+backward on the same
input, interleaved, then the grouped layer and the reference loop (same weights) likewise; the median of
several repeats is reported with the ratios (grouped/loop from the second pair). The dense FFN's hidden
size is the MoE layer's active hidden size, ``top_k * F + shared``, so both do the same expert FLOPs; the
router (and Qwen's shared-expert gate) is part of the MoE layer's cost.

Peak memory is measured apart from the timing, in one more forward+backward per variant under
:mod:`torch.profiler` with ``profile_memory=True``: the peak of the CPU allocator's live bytes during the
step, over its value when the step starts. Inputs and parameters exist before the step and are left out;
activations, the output, and the input and parameter gradients are in. Run::

    python benchmarks/moe_layer.py                          # the four shapes, 512 to 16384 tokens
    python benchmarks/moe_layer.py --quick --threads 1      # smoke run: 512 and 2048 tokens, 2 repeats
    python benchmarks/moe_layer.py --shapes mixtral --tokens 8192 --skip-loop
    python benchmarks/moe_layer.py --reuse-grad-memory   # grouped layer with reuse_expert_grad_memory
    python benchmarks/moe_layer.py --bf16 --tokens 8192   # under CPU autocast to bfloat16
    python benchmarks/moe_layer.py --bf16 --gate-precision compute   # routers' gate matmul in bf16 too
    python benchmarks/moe_layer.py --device cuda --bf16   # on a GPU: torch._grouped_mm experts, CUDA peak memory

On CUDA every timed step ends with a device synchronisation, and peak memory is the caching allocator's peak
of allocated bytes over its value before the step (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from _args import device, non_negative_int, positive_int, positive_ints  # a sibling module in benchmarks/
from torch.profiler import ProfilerActivity, profile

from lightning_moe.nn import ExpertsConfig, FeedForward, MoEConfig, MoELayer, RouterConfig, reuse_expert_grad_memory

MiB = 2**20
VARIANTS = ("dense", "grouped", "loop")
TARGET_TOKENS = 8192


def deepseek_v3_router(num_experts: int, top_k: int) -> RouterConfig:
    """DeepSeek-V3 routing: sigmoid scores, selection-only bias, 8 groups (top-4 by top-2 sum), scaled weights."""
    return RouterConfig(
        num_experts=num_experts,
        top_k=top_k,
        score_func="sigmoid",
        score_bias=True,
        n_group=8,
        topk_group=4,
        group_score="top2_sum",
        normalize_topk=True,
        routed_scaling_factor=2.5,
    )


@dataclass(frozen=True)
class Shape:
    """One benchmarked MoE layer and its dense equivalent.

    Attributes:
        key: Short name for ``--shapes``.
        label: Description for the tables.
        router: The MoE layer's router.
        expert_hidden: Hidden size ``F`` of each routed expert.
        shared_hidden: Hidden size of the shared expert (0 = none).
        shared_gate: Scale the shared expert by a sigmoid gate (Qwen-MoE).
        target: Upper bound for grouped/dense at :data:`TARGET_TOKENS` tokens (``None``: no target).
        dim: Model width ``D``.
    """

    key: str
    label: str
    router: RouterConfig
    expert_hidden: int
    shared_hidden: int = 0
    shared_gate: bool = False
    target: float | None = None
    dim: int = 512

    @property
    def dense_hidden(self) -> int:
        """Hidden size of the dense FFN with the same active expert FLOPs."""
        return self.router.top_k * self.expert_hidden + self.shared_hidden

    def moe_config(self, dispatch: str = "grouped") -> MoEConfig:
        """The MoE layer's config with the given dispatcher."""
        return MoEConfig(
            dim=self.dim,
            router=dataclasses.replace(self.router),
            experts=ExpertsConfig(hidden_dim=self.expert_hidden, activation="silu", gated=True),
            shared_hidden_dim=self.shared_hidden,
            shared_gate=self.shared_gate,
            dispatch=dispatch,
        )


SHAPES = [
    # Mixtral: softmax over the chosen top-2 logits.
    Shape(
        "mixtral",
        "Mixtral-like: E=8, top-2, F=1024",
        RouterConfig(num_experts=8, top_k=2, softmax_after_topk=True),
        expert_hidden=1024,
        target=1.05,
    ),
    # Qwen1.5-MoE-A2.7B scaled to D=512 (2048 -> 512, so F 1408 -> 352, shared 5632 -> 1408): softmax over
    # all 60 experts, then top-4 without renormalisation, plus a sigmoid-gated shared expert.
    Shape(
        "qwen",
        "Qwen-like: E=60, top-4, F=352, gated shared 1408",
        RouterConfig(num_experts=60, top_k=4),
        expert_hidden=352,
        shared_hidden=1408,
        shared_gate=True,
        target=1.25,
    ),
    # DeepSeek-V3's routing and its one shared expert of the routed experts' size, at 64 experts.
    Shape(
        "deepseek-v3",
        "DeepSeek-V3-like: E=64, top-8, F=224, groups 8/4, 1 shared",
        deepseek_v3_router(64, 8),
        expert_hidden=224,
        shared_hidden=224,
        target=1.25,
    ),
    # Many small experts with DeepSeek-V3's routing, no shared expert.
    Shape(
        "many-experts",
        "Many experts: E=256, top-8, F=128, groups 8/4",
        deepseek_v3_router(256, 8),
        expert_hidden=128,
        target=1.6,
    ),
]


@dataclass
class Result:
    """Timings (s, medians), ratios and peak memory (MiB) of one shape at one token count."""

    shape: Shape
    tokens: int
    seconds: dict[str, float]
    grouped_over_loop: float
    peak_mib: dict[str, float]

    def ratio(self, num: str, den: str) -> float:
        """Time ratio ``num / den`` (grouped/loop from its own interleaved pair); NaN when one is missing."""
        if (num, den) == ("grouped", "loop"):
            return self.grouped_over_loop
        return self.seconds.get(num, math.nan) / self.seconds.get(den, math.nan)


def fwd_bwd(
    module: torch.nn.Module, x: torch.Tensor | list[torch.Tensor], grad: torch.Tensor, bf16: bool = False
) -> Callable[[], None]:
    """One forward+backward of ``module`` that frees every gradient it made before returning.

    With a list of inputs, each call takes the next one (so routing, and each expert's row count, changes
    between calls as in training); with ``bf16`` the forward runs under autocast to bfloat16 on the inputs'
    device.
    """
    inputs = x if isinstance(x, list) else [x]
    calls = [0]

    def step() -> None:
        x_in = inputs[calls[0] % len(inputs)]
        calls[0] += 1
        with torch.autocast(x_in.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = module(x_in)
        y = out[0] if isinstance(out, tuple) else out
        y.backward(grad.to(y.dtype))
        module.zero_grad(set_to_none=True)
        x_in.grad = None

    return step


def synchronize() -> None:
    """Wait for queued GPU work (if CUDA is in use) so a wall-clock interval covers it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure(steps: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per step, the variants interleaved so drift hits every variant alike.

    The order is reversed on every other repeat, so no variant always runs right after the same one.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(repeats):
        for name, step in list(steps.items())[:: -1 if repeat % 2 else 1]:
            synchronize()
            start = time.perf_counter()
            step()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: Kineto logs a line on every profiler start and stop."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def peak_memory_bytes(fn: Callable[[], None], device: str = "cpu") -> int:
    """Peak growth of live tensor memory while ``fn`` runs, in bytes.

    On CUDA: the caching allocator's peak allocated bytes over the allocated bytes before ``fn``.

    The profiler's CPU memory events carry the allocator's running ``Total Allocated``; tensors that existed
    before the profile started count in neither the total nor its frees, so the total's peak over its value
    before the first event is the step's own peak.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)["traceEvents"]
    memory = [e for e in trace if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0]  # CPU
    if not memory:
        return 0
    events = [e["args"] for e in sorted(memory, key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))]
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - start


def _check_memory_method() -> None:
    """Check :func:`peak_memory_bytes` on steps whose peaks are known exactly (it matched to the byte)."""
    tokens, dim, hidden = 256, 512, 1024
    x = torch.randn(tokens, dim, requires_grad=True)
    w = torch.randn(dim, hidden, requires_grad=True)
    g = torch.randn(tokens, hidden)
    out_bytes = tokens * hidden * 4

    def two_live() -> None:  # y and y + y alive together
        y = x.detach() @ w.detach()
        z = y + y
        del y, z

    def one_live() -> None:  # the first product is freed before the second
        y = x.detach() @ w.detach()
        del y
        y = x.detach() @ w.detach()
        del y

    def linear_fwd_bwd() -> None:  # y, x.grad and w.grad alive together
        y = x @ w
        y.backward(g)
        x.grad = w.grad = None

    expected = {
        "two_live": (two_live, 2 * out_bytes),
        "one_live": (one_live, out_bytes),
        "linear_fwd_bwd": (linear_fwd_bwd, 4 * (tokens * hidden + tokens * dim + dim * hidden)),
    }
    for name, (fn, want) in expected.items():
        got = peak_memory_bytes(fn)
        if got != want:
            raise RuntimeError(f"peak-memory method is off on {name}: measured {got} bytes, expected {want}")


def run_shape(
    shape: Shape,
    token_counts: list[int],
    repeats: int,
    warmup: int,
    skip_loop: bool,
    reuse_grad_memory: bool = False,
    bf16: bool = False,
    device: str = "cpu",
) -> list[Result]:
    """Time and measure one shape at every token count (modules built once, same weights throughout)."""
    torch.manual_seed(0)
    grouped = MoELayer(shape.moe_config("grouped")).to(device)
    if reuse_grad_memory:
        reuse_expert_grad_memory(grouped)
    dense = FeedForward(shape.dim, shape.dense_hidden, "silu", gated=True).to(device)
    loop = None
    if not skip_loop:
        loop = MoELayer(shape.moe_config("loop")).to(device)
        loop.load_state_dict(grouped.state_dict())
    results = []
    for tokens in token_counts:
        # bf16: four inputs in turn, so the experts' row counts change between steps as in training (oneDNN
        # caches a bf16 kernel per shape; one fixed input would always hit the cache).
        x = [torch.randn(tokens, shape.dim, device=device, requires_grad=True) for _ in range(4 if bf16 else 1)]
        grad = torch.randn(tokens, shape.dim, device=device)
        steps = {"dense": fwd_bwd(dense, x, grad, bf16), "grouped": fwd_bwd(grouped, x, grad, bf16)}
        seconds = measure(steps, repeats, warmup)
        grouped_over_loop = math.nan
        if loop is not None:
            # A second pair, so the loop's many allocations do not disturb the dense-vs-grouped pair: on CPU,
            # freed large blocks go back to the OS and page-fault on reuse, and the loop changes that pattern.
            steps["loop"] = fwd_bwd(loop, x, grad, bf16)
            pair = measure({"grouped": steps["grouped"], "loop": steps["loop"]}, repeats, warmup)
            grouped_over_loop = pair["grouped"] / pair["loop"]
            seconds["loop"] = pair["loop"]
        peak_mib = {name: peak_memory_bytes(step, device) / MiB for name, step in steps.items()}
        results.append(Result(shape, tokens, seconds, grouped_over_loop, peak_mib))
    return results


COLUMNS = [
    ("dense (s)", lambda r: r.seconds.get("dense", math.nan), ".3f"),
    ("grouped (s)", lambda r: r.seconds.get("grouped", math.nan), ".3f"),
    ("loop (s)", lambda r: r.seconds.get("loop", math.nan), ".3f"),
    ("grouped/dense", lambda r: r.ratio("grouped", "dense"), ".2f"),
    ("loop/dense", lambda r: r.ratio("loop", "dense"), ".2f"),
    ("grouped/loop", lambda r: r.ratio("grouped", "loop"), ".2f"),
    ("dense MiB", lambda r: r.peak_mib.get("dense", math.nan), ".0f"),
    ("grouped MiB", lambda r: r.peak_mib.get("grouped", math.nan), ".0f"),
    ("loop MiB", lambda r: r.peak_mib.get("loop", math.nan), ".0f"),
]


def _cell(value: float, fmt: str) -> str:
    return "-" if math.isnan(value) else format(value, fmt)


def progress_header() -> str:
    """Header and rule of the table printed while measuring."""
    header = f"| {'shape':14s} | {'tokens':>6s} | " + " | ".join(name for name, _, _ in COLUMNS) + " |"
    rule = "|" + "|".join("-" * len(col) for col in header.split("|")[1:-1]) + "|"
    return f"{header}\n{rule}"


def progress_row(result: Result) -> str:
    """One aligned row of the table printed while measuring."""
    cells = [f"{_cell(get(result), fmt):>{len(name)}s}" for name, get, fmt in COLUMNS]
    return f"| {result.shape.key:14s} | {result.tokens:6d} | " + " | ".join(cells) + " |"


def markdown_table(results: list[Result]) -> str:
    """The results as a compact markdown table for the README; each shape's label on its first row."""
    lines = [
        "| shape | tokens | " + " | ".join(name for name, _, _ in COLUMNS) + " |",
        "|---|---:|" + "---:|" * len(COLUMNS),
    ]
    previous = None
    for r in results:
        label = "" if r.shape is previous else f"{r.shape.label} (dense F={r.shape.dense_hidden})"
        previous = r.shape
        lines.append(f"| {label} | {r.tokens} | " + " | ".join(_cell(get(r), fmt) for _, get, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def target_report(results: list[Result]) -> list[str]:
    """One line per shape with a target: its grouped/dense ratio at :data:`TARGET_TOKENS` tokens."""
    lines = []
    for r in results:
        if r.tokens == TARGET_TOKENS and r.shape.target is not None:
            ratio = r.ratio("grouped", "dense")
            verdict = "met" if ratio <= r.shape.target else "MISSED"
            lines.append(f"{r.shape.key}: grouped/dense {ratio:.2f} (target <= {r.shape.target:.2f}) {verdict}")
    return lines


def select_shapes(spec: str) -> list[Shape]:
    """Shapes from comma-separated indices into :data:`SHAPES` or their keys."""
    by_key = {shape.key: shape for shape in SHAPES}
    shapes = []
    for item in spec.split(","):
        item = item.strip()
        if item.isdigit() and int(item) < len(SHAPES):
            shapes.append(SHAPES[int(item)])
        elif item in by_key:
            shapes.append(by_key[item])
        else:
            raise SystemExit(f"--shapes item {item!r} is invalid: use 0..{len(SHAPES) - 1} or one of {list(by_key)}")
    return shapes


def main() -> None:
    """Parse the options, check the memory method, and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tokens", type=positive_ints, default=None, help="comma-separated token counts (512,1024,...,16384)"
    )
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed repeats per variant (7)")
    parser.add_argument("--warmup", type=non_negative_int, default=None, help="untimed steps per variant and pair (2)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument(
        "--device", type=device, default="cpu", help="cpu or cuda (cuda:N); models and inputs live there"
    )
    parser.add_argument("--skip-loop", action="store_true", help="leave out the reference loop")
    parser.add_argument("--bf16", action="store_true", help="forward under CPU autocast to bfloat16 (bf16-mixed)")
    parser.add_argument(
        "--reuse-grad-memory", action="store_true", help="the grouped layer keeps its weight-gradient memory"
    )
    parser.add_argument(
        "--gate-precision",
        choices=("float32", "compute"),
        default="float32",
        help="the MoE routers' gate matmul (RouterConfig.gate_precision): float32, or the autocast dtype",
    )
    parser.add_argument("--shapes", default="0,1,2,3", help="comma-separated indices or keys into the shape table")
    parser.add_argument("--quick", action="store_true", help="smoke run: 512,2048 tokens, 2 repeats, 1 warmup")
    args = parser.parse_args()
    quick = {"tokens": [512, 2048], "repeats": 2, "warmup": 1}
    full = {"tokens": [512, 1024, 2048, 4096, 8192, 16384], "repeats": 7, "warmup": 2}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    token_counts = args.tokens
    shapes = select_shapes(args.shapes)
    if args.gate_precision != "float32":
        shapes = [
            dataclasses.replace(shape, router=dataclasses.replace(shape.router, gate_precision=args.gate_precision))
            for shape in shapes
        ]

    torch.set_num_threads(args.threads)
    on_cuda = torch.device(args.device).type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device} is invalid: torch {torch.__version__} sees no CUDA device")
    if not on_cuda:
        _check_memory_method()
    where = torch.cuda.get_device_name(args.device) if on_cuda else f"CPU, {args.threads} threads"
    memory = "CUDA allocator peak over the step's start" if on_cuda else "live-tensor growth over one step (profiler)"
    print(
        f"torch {torch.__version__}, {where}, {'bf16-mixed' if args.bf16 else 'float32'}, D=512, "
        f"forward+backward, median of {args.repeats} after {args.warmup} warm-up; peak MiB = {memory}"
    )
    if args.reuse_grad_memory:
        print("grouped layer keeps its weight-gradient memory between steps: its peak MiB leaves that memory out")
    if args.gate_precision != "float32":
        print(f"router gate matmul in the {args.gate_precision} dtype (RouterConfig.gate_precision)")
    for shape in shapes:
        print(f"{shape.key}: {shape.label}; dense FFN F={shape.dense_hidden}")
    print(progress_header(), flush=True)
    results = []
    start = time.perf_counter()
    for shape in shapes:
        for result in run_shape(
            shape,
            token_counts,
            args.repeats,
            args.warmup,
            args.skip_loop,
            args.reuse_grad_memory,
            args.bf16,
            args.device,
        ):
            print(progress_row(result), flush=True)
            results.append(result)
    print(f"\ntook {time.perf_counter() - start:.0f} s\n")
    print(markdown_table(results))
    targets = target_report(results)
    if targets:
        print(f"\ntargets at {TARGET_TOKENS} tokens:")
        print("\n".join(targets))


if __name__ == "__main__":
    main()
