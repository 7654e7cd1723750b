"""``torch.compile`` for zoo models, block by block, with the expert dispatch left eager.

Each decoder (and encoder) block is compiled on its own, in place, as torchtitan does: wrappers applied later
(activation checkpointing, FSDP2) wrap the compiled blocks as they would the plain ones.

What runs inside the MoE layer's dispatch (sorting copies by expert, the grouped kernel's walk over host row
counts, the all-to-all of expert parallelism) depends on how many tokens each expert got this step; traced, every
step would recompile. :class:`~lightning_moe.nn.moe.MoELayer` therefore runs its dispatcher outside the compiled
graph: the attention, norms, router, losses and shared experts compile, the routed experts run as without
``torch.compile``. The results are the same as uncompiled (tested to float32 rounding).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import ParamSpec, TypeVar

import torch
from torch import nn

P = ParamSpec("P")
R = TypeVar("R")


def blocks(module: nn.Module) -> Iterator[tuple[nn.ModuleList, int]]:
    """``(list, index)`` of every entry of the outermost ``ModuleList`` s below ``module``: the model's blocks."""
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            yield from ((child, index) for index in range(len(child)))
        else:
            yield from blocks(child)


def compile_backends() -> list[str]:
    """The ``torch.compile`` backends this torch knows, debugging ones (``"eager"``, ``"aot_eager"``) included."""
    return sorted(name for name in torch._dynamo.list_backends(exclude_tags=()) if "TESTING" not in name)


def check_compile_backend(name: str, backend: str) -> None:
    """Refuse a backend ``torch.compile`` does not know, naming the argument ``name`` and the backends it does.

    Raises:
        ValueError: If ``backend`` is not one of :func:`compile_backends`.
    """
    known = compile_backends()
    if backend not in known:
        raise ValueError(f"{name}={backend!r} is invalid: must be a torch.compile backend, one of {', '.join(known)}")


def compile_blocks(model: nn.Module, backend: str = "inductor", **options: object) -> nn.Module:
    """Compile every block of ``model`` in place (``nn.Module.compile``); idempotent.

    Parameter names, the state dict and the modules' types are unchanged, so checkpoints, callbacks and the
    parallel strategies see the same model. The first forward compiles (inductor on two CPU cores: 8-50 s for the
    tiny presets); a new batch shape or a switch between training and evaluation compiles once more.

    Args:
        model: A zoo model (or any module whose blocks sit in ``nn.ModuleList`` s).
        backend: The ``torch.compile`` backend (:func:`compile_backends`).
        **options: More ``torch.compile`` arguments (``mode``, ``dynamic``, ...).

    Returns:
        ``model``.

    Raises:
        ValueError: For an unknown backend, or a model without blocks.
    """
    check_compile_backend("backend", backend)
    found = list(blocks(model))
    if not found:
        raise ValueError(f"model={type(model).__name__} is invalid: it has no blocks (ModuleList entries) to compile")
    for module_list, index in found:
        block = module_list[index]
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile(backend=backend, **options)
    return model


def uncompiled(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with every compiled module running its original code (``torch.compiler.set_stance("force_eager")``).

    For token-by-token generation: each new position (and key/value cache length) would compile the blocks
    again. Needs torch >= 2.6; with an older torch ``fn`` runs as it is.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        set_stance = getattr(torch.compiler, "set_stance", None)
        with set_stance("force_eager") if set_stance is not None else nullcontext():
            return fn(*args, **kwargs)

    return wrapper
