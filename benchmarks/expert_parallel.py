"""Expert-parallel training step on CPU/gloo: all-to-all volume and the time in dispatch, experts and combine.

Spawns ``--world`` gloo processes on 127.0.0.1, builds a zoo model, shards it with
:func:`~lightning_moe.strategies.apply_expert_parallel` (EP = world) and FSDP2, and runs training steps
(forward, backward, SGD) under :mod:`torch.profiler`. The all-to-all dispatcher labels its forward phases
``moe/dispatch``, ``moe/experts`` and ``moe/combine``; backward phases are read from the autograd events
(the all-to-all backward ops and the grouped-expert backward). Volume is the bytes this rank sends to
*other* ranks in the forward all-to-alls (dispatch: its copies for other ranks' experts; combine: the outputs
of the copies it received from other ranks); backward moves the same again. Times are
CPU wall time of the labelled regions averaged per step; ``fwd dispatch`` includes the blocking count
exchange, so it also absorbs waiting for slower ranks (load imbalance). Run::

    python benchmarks/expert_parallel.py
    python benchmarks/expert_parallel.py --arch qwen-moe-tiny --tokens 2048 --steps 5
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import socket
import time
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _args import non_negative_int, positive_int  # a sibling module in benchmarks/
from torch.profiler import ProfilerActivity, profile

from lightning_moe import zoo
from lightning_moe.strategies import apply_expert_parallel, apply_fsdp, moe_layers

SEQ = 128  # tokens per sequence of the random batch


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _phase(name: str) -> str | None:
    if name.startswith("moe/"):
        return f"fwd {name[4:]}"
    # Backward nodes appear once under this prefix and again nested inside it: count the outer one.
    if not name.startswith("autograd::engine::evaluate_function:"):
        return None
    if "all_to_all" in name:
        return "bwd all-to-all"
    if "GroupedExpertMLPBackward" in name:
        return "bwd experts"
    return None


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "ep"))
        torch.manual_seed(0)
        model = zoo.build(zoo.config(args.arch, **({"dim": args.dim} if args.dim else {})))
        apply_expert_parallel(model, mesh["ep"])
        apply_fsdp(model, mesh._flatten("world"), mesh["dp"])
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        tokens = torch.randint(0, model.embed.num_embeddings, (args.tokens // SEQ, SEQ + 1))
        counts_E = None  # copies this rank sent to each expert, summed over the MoE layers and timed steps
        row_bytes = model.embed.embedding_dim * 4  # float32 rows

        def step():  # noqa: ANN202
            out = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            return out

        for _ in range(args.warmup):
            step()
        dist.barrier()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                out = step()
                # The dispatcher sends the kept copies only (dropped ones never leave their rank).
                kept_E = sum(stats.kept_per_expert for stats in out.router_stats)
                counts_E = kept_E if counts_E is None else counts_E + kept_E
        elapsed = (time.perf_counter() - start) / args.steps
        counts_RE = [torch.zeros_like(counts_E) for _ in range(world)]
        dist.all_gather(counts_RE, counts_E)
        sent_bytes = sent_rows(torch.stack(counts_RE), rank) * row_bytes
        times: dict[str, float] = defaultdict(float)
        for event in prof.key_averages():
            phase = _phase(event.key)
            if phase is not None:
                times[phase] += event.cpu_time_total / 1e3 / args.steps
        summary = torch.tensor([elapsed * 1e3, sent_bytes / args.steps / 2**20, *(times[k] for k in PHASES)])
        gathered = [torch.zeros_like(summary) for _ in range(world)]
        dist.all_gather(gathered, summary)
        if rank == 0:
            layers = len(moe_layers(model))
            print(f"{args.arch}: world={world} (EP={world}), {args.tokens} tokens/rank/step, {layers} MoE layers, gloo")
            print("| rank | step ms | a2a MiB sent (fwd) | " + " | ".join(f"{k} ms" for k in PHASES) + " |")
            print("|" + "---|" * (3 + len(PHASES)))
            for r, row in enumerate(gathered):
                print(f"| {r} | " + " | ".join(f"{v:.1f}" for v in row.tolist()) + " |")
    finally:
        dist.destroy_process_group()


PHASES = ["fwd dispatch", "fwd experts", "fwd combine", "bwd all-to-all", "bwd experts"]


def sent_rows(counts_RE: torch.Tensor, rank: int) -> int:
    """Rows ``rank`` sends to other ranks in the forward's two all-to-alls, from every rank's expert counts.

    Args:
        counts_RE: ``(R, E)`` copies each rank sent to each expert; rank ``d`` owns the ``d``-th block of
            ``E / R`` experts.
        rank: The sending rank.

    Returns:
        The dispatch rows (this rank's copies for other ranks' experts) plus the combine rows (the outputs of
        the copies this rank received from other ranks, sent back to them).
    """
    world = counts_RE.shape[0]
    rows_RR = counts_RE.reshape(world, world, -1).sum(-1)  # [source rank, destination rank]
    own = rows_RR[rank, rank]
    return int(round(float(rows_RR[rank].sum() - own + rows_RR[:, rank].sum() - own)))


def check_model(arch: str, dim: int | None, world: int) -> str | None:
    """Why ``arch`` (at width ``dim``) cannot run on ``world`` ranks here (``None`` when it can).

    The model is built on the meta device (no memory, no time) to read its MoE layers.
    """
    try:
        config = zoo.config(arch, **({"dim": dim} if dim else {}))
        with torch.device("meta"):
            model = zoo.build(config)
    except ValueError as error:
        return f"argument --arch: {arch!r} is invalid: {error}"
    if "decoder_input_ids" in inspect.signature(model.forward).parameters:
        return f"argument --arch: {arch!r} is invalid: an encoder-decoder model; this script runs decoder-only presets"
    counts = sorted({layer.config.router.num_experts for layer in moe_layers(model)})
    if not counts:
        return f"argument --arch: {arch!r} is invalid: it has no MoE layers"
    if any(count % world for count in counts):
        return f"argument --world: {world} is invalid: it must divide the expert count {counts} of {arch}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mixtral-tiny")
    parser.add_argument("--dim", type=positive_int, default=None, help="override the model width")
    parser.add_argument("--world", type=positive_int, default=2)
    parser.add_argument(
        "--tokens", type=positive_int, default=1024, help=f"tokens per rank per step (multiple of {SEQ})"
    )
    parser.add_argument("--steps", type=positive_int, default=5)
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads per process")
    args = parser.parse_args()
    if args.tokens % SEQ:
        parser.error(f"argument --tokens: {args.tokens} is invalid: must be a multiple of {SEQ} (sequences of {SEQ})")
    problem = check_model(args.arch, args.dim, args.world)
    if problem:
        parser.error(problem)
    mp.start_processes(_worker, args=(args.world, _free_port(), args), nprocs=args.world, start_method="fork")


if __name__ == "__main__":
    main()
