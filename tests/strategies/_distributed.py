"""Run a function in ``world_size`` gloo processes on 127.0.0.1 (spawned, with a free port and a timeout)."""

from __future__ import annotations

import datetime
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60), init_method="env://"
    )
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Success: leave without interpreter finalisation. Tearing down C++ state of gloo/DCP helper threads at
    # exit occasionally aborts ("terminate called without an active exception") after all work succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` processes; re-raise the first failure.

    ``fn`` must be a module-level function (it is pickled into freshly spawned interpreters).
    """
    mp.start_processes(
        _worker, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True, start_method="spawn"
    )


def ep_trainer(
    world: int,
    ep: int | str,
    max_steps: int,
    callbacks: list | None = None,
    strategy_kwargs: dict | None = None,
    **kwargs,
):
    """A quiet CPU ``Trainer`` with ``ExpertParallelStrategy`` for the tests (each rank gets its own data)."""
    import lightning.pytorch as pl

    from lightning_moe.strategies import ExpertParallelStrategy

    return pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=ExpertParallelStrategy(expert_parallel_size=ep, **(strategy_kwargs or {})),
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=callbacks,
        **kwargs,
    )
