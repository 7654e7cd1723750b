"""Helpers of the multi-process tests: gloo processes on 127.0.0.1, a quiet expert-parallel ``Trainer``, modules
whose SGD step is the gradient, and named checks run in one set of processes.

``run_distributed`` spawns the processes (a free port and a timeout); ``run_checks`` runs every check of a test
module in one set of them (spawning costs more than the checks) and ``assert_check_ok`` reports one check.
"""

from __future__ import annotations

import datetime
import importlib
import os
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_moe.data.span_corruption import span_corruption
from lightning_moe.module import CausalLMModule, Seq2SeqLMModule


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
    """A quiet CPU ``Trainer`` with ``ExpertParallelStrategy`` for the tests (each rank gets its own data, unless
    ``use_distributed_sampler=True`` is given)."""
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
        callbacks=callbacks,
        **{"use_distributed_sampler": False, **kwargs},
    )


def _run_checks(rank: int, world_size: int, module: str, out: str) -> None:
    for name, check in importlib.import_module(module).CHECKS.items():
        try:
            check(rank, world_size, Path(out))
            result = "ok"
        except BaseException:  # noqa: BLE001  (reported by the test of this check)
            result = traceback.format_exc()
        (Path(out) / f"{name}.rank{rank}.txt").write_text(result)
        dist.barrier()


def run_checks(module: str, world_size: int, out: Path) -> Path:
    """Run each check of ``module``'s ``CHECKS`` (name to ``check(rank, world_size, out)``) in one set of processes.

    Every check runs on every rank, in order, even after another failed; each writes ``ok`` or its traceback to
    ``out/<name>.rank<rank>.txt`` for ``assert_check_ok``. Should the processes end early (a check that hangs until
    the collective timeout), the checks before have their results and ``out/processes.txt`` says why.
    ``module`` is the test module's ``__name__``: the spawned processes import ``CHECKS`` from it (a dict of
    lambdas does not pickle). Returns ``out``.
    """
    try:
        run_distributed(_run_checks, world_size, module, str(out))
    except Exception:  # noqa: BLE001  (reported by the tests of the checks without a result)
        (out / "processes.txt").write_text(traceback.format_exc())
    return out


def assert_check_ok(results: Path, name: str, world_size: int = 2) -> None:
    """Fail with the traceback of the first rank on which ``run_checks``'s check ``name`` did not pass."""
    for rank in range(world_size):
        path = results / f"{name}.rank{rank}.txt"
        crash = results / "processes.txt"
        text = path.read_text() if path.exists() else "no result: " + (crash.read_text() if crash.exists() else "")
        if text != "ok":
            pytest.fail(f"rank {rank}:\n{text}", pytrace=False)


class SGDModule(CausalLMModule):
    """SGD with lr 1: the parameter update is the gradient itself, so the test sees any gradient error."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)


class Seq2SeqSGDModule(Seq2SeqLMModule):
    """SGD with lr 1, and span corruption seeded by each row's content, so a row is corrupted the same way
    on whichever rank it lands (the module's own corruption draws from each process's global generator)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def _loss(self, batch: torch.Tensor, generator: torch.Generator | None = None):
        pairs = [span_corruption(row[None], self.config.vocab_size - 1, generator=torch.Generator().manual_seed(
            int(row.sum()))) for row in batch]  # fmt: skip
        inputs, targets = (torch.cat(parts) for parts in zip(*pairs, strict=True))
        start = torch.full_like(targets[:, :1], self.decoder_start_id)
        out = self.model(inputs, torch.cat([start, targets[:, :-1]], dim=1), targets=targets)
        return out.loss, out.router_stats, targets.numel()
