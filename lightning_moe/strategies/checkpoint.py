"""Reading the sharded checkpoints of :class:`~lightning_moe.strategies.ExpertParallelStrategy` anywhere.

With ``save_distributed_checkpoint=True`` (the default) every rank writes its own shards through
``torch.distributed.checkpoint`` (DCP): nothing is gathered on rank 0. The directory holds the
LightningModule's state dict under ``"state_dict"``, optimizer states under ``"optimizer_{i}"`` and the
trainer's metadata in ``meta.pt``. DCP stores every tensor with its global shape, so:

* Another world size or expert-parallel size reads it through the Trainer (``ckpt_path=...``): the strategy
  asks DCP for its own shards of the same global tensors, and DCP reshards.
* A plain single-process module reads it with :func:`load_distributed_checkpoint` (or
  :func:`consolidate_checkpoint` for the full tensors), without any process group;
  :func:`full_checkpoint` gives the dict a single-file checkpoint would hold (what ``lightning-moe generate``
  reads from a checkpoint directory).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

STATE_DICT_KEY = "state_dict"
METADATA_FILE = "meta.pt"  # Lightning's non-tensor checkpoint entries (hyperparameters, loops, callbacks, ...)


def staging_path(path: str | Path) -> Path:
    """Where a save of ``path`` writes before it is swapped into place: ``.<name>.tmp`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def previous_path(path: str | Path) -> Path:
    """Where a sharded save moves the previous ``path`` during its swap: ``.<name>.old`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.old")


def interrupted_swap(path: str | Path) -> Path | None:
    """The checkpoint to resume from when a sharded save of ``path`` was killed in the middle of its swap.

    A folder cannot replace another in one rename: the save moves the previous checkpoint to
    :func:`previous_path`, then the staging folder into place. Killed between the two, ``path`` is missing;
    the staging folder is then complete (every rank had finished writing before the swap began), so it is the
    newest checkpoint, else the previous one.

    Returns:
        The staging or previous folder when ``path`` is missing and the previous folder is there, else ``None``.
    """
    path, previous, staging = Path(path), previous_path(path), staging_path(path)
    if path.exists() or not previous.is_dir():
        return None
    return staging if staging.is_dir() and (staging / ".metadata").is_file() else previous


def check_checkpoint_files(path: str | Path) -> None:
    """Check that a distributed checkpoint directory holds every shard file its ``.metadata`` lists, whole.

    DCP itself finds a missing or cut shard only while reading it, and reports it inside a long
    ``CheckpointException``; this names the files before any work.

    Raises:
        FileNotFoundError: If ``path`` is not a distributed checkpoint directory, or shard files are missing.
        ValueError: If a shard file is shorter than the bytes the metadata places in it (a cut copy).
    """
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"path={str(path)!r} is invalid: not a distributed checkpoint directory")
    needed: dict[str, int] = {}
    for info in (dcp.FileSystemReader(path).read_metadata().storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    missing = sorted(name for name in needed if not (path / name).is_file())
    if missing:
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} is incomplete: its metadata lists shard files that are not there: "
            f"{', '.join(missing)} (a copy that left out some ranks' files, or an interrupted save)"
        )
    short = sorted(name for name, size in needed.items() if (path / name).stat().st_size < size)
    if short:
        raise ValueError(
            f"checkpoint {str(path)!r} is incomplete: shard files shorter than the metadata says: {', '.join(short)}"
        )


def consolidate_checkpoint(path: str | Path, key: str = STATE_DICT_KEY) -> dict[str, Tensor]:
    """The full (unsharded) tensors of a distributed checkpoint's module state dict, on the CPU.

    Args:
        path: The checkpoint directory (what ``trainer.save_checkpoint`` or ``ModelCheckpoint`` wrote).
        key: The top-level entry to read (``"state_dict"``: the LightningModule's weights and buffers).

    Returns:
        ``{name: tensor}`` with the LightningModule's parameter and buffer names (``"model.embed.weight"``,
        ...), ready for ``load_state_dict`` on an unwrapped module.

    Raises:
        FileNotFoundError: If ``path`` is not a distributed checkpoint directory, or shard files are missing.
        ValueError: If a shard file is cut short.
        KeyError: If the checkpoint has no tensor under ``key``.
    """
    path = Path(path)
    check_checkpoint_files(path)
    reader = dcp.FileSystemReader(path)
    prefix = f"{key}."
    full = {
        name[len(prefix) :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for name, meta in reader.read_metadata().state_dict_metadata.items()
        if name.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not full:
        raise KeyError(f"key={key!r} is invalid: the checkpoint at {str(path)!r} has no tensors under it")
    # Empty CPU tensors of the global shapes: DCP copies every saved shard into its place.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load({key: full}, storage_reader=reader, no_dist=True)
    return full


def load_distributed_checkpoint(module: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load a distributed checkpoint into a plain (unsharded, single-process) module.

    Args:
        module: A freshly built LightningModule of the same architecture (not parallelised).
        path: The checkpoint directory.
        strict: Passed to ``load_state_dict``.

    Returns:
        ``module``.

    Example::

        trainer = Trainer(devices=8, strategy=ExpertParallelStrategy(expert_parallel_size=4))
        trainer.fit(model)
        trainer.save_checkpoint("run.ckpt")  # a directory of shards
        ...
        model = load_distributed_checkpoint(CausalLMModule(arch="mixtral-tiny"), "run.ckpt")
    """
    module.load_state_dict(consolidate_checkpoint(path), strict=strict)
    return module


def full_checkpoint(path: str | Path) -> dict[str, Any]:
    """A distributed checkpoint as the dict a single-file Lightning checkpoint of the run would hold.

    The non-tensor entries (hyperparameters, loop and callback states, and what the module's
    ``on_save_checkpoint`` added, such as the tokenizer) come from ``meta.pt``, the module's full tensors from
    :func:`consolidate_checkpoint`. The sharded optimizer states are left out: the result is for inference
    or ``LightningModule.load_from_checkpoint``, not for resuming (resume through the Trainer instead).

    Args:
        path: The checkpoint directory.

    Raises:
        FileNotFoundError: If ``path`` is not a distributed checkpoint directory written by Lightning.
    """
    path = Path(path)
    check_checkpoint_files(path)
    if not (path / METADATA_FILE).is_file():  # before reading the tensors, which may take long
        raise FileNotFoundError(
            f"path={str(path)!r} is invalid: no {METADATA_FILE} (not written by a Lightning Trainer)"
        )
    state_dict = consolidate_checkpoint(path)
    meta = torch.load(path / METADATA_FILE, map_location="cpu", weights_only=False)
    return {**meta, STATE_DICT_KEY: state_dict}


def optimizer_state_by_name(
    saved: dict[str, Any], optimizer: torch.optim.Optimizer, module: nn.Module
) -> dict[str, Any]:
    """Key a position-keyed optimizer state dict (``Optimizer.state_dict()``) by parameter name.

    Position ``i`` of the saved ``param_groups`` is matched to the parameter at the same place in ``optimizer``'s
    groups (built the same way from the same architecture), named as in ``module`` without wrapper prefixes.
    A state already keyed by name is returned as it is.

    Raises:
        ValueError: If the groups differ in number or size, or a saved state tensor has another shape than the
            parameter it is matched to (the checkpoint comes from another architecture or optimizer setup).
    """
    state, saved_groups = saved["state"], saved["param_groups"]
    if not all(isinstance(key, int) for key in state):
        return saved
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    saved_sizes = [len(group["params"]) for group in saved_groups]
    if sizes != saved_sizes:
        raise ValueError(
            f"the checkpoint's optimizer has parameter groups of sizes {saved_sizes} and this run's {sizes}: "
            "they must match"
        )
    names = {id(param): clean_name(name) for name, param in module.named_parameters()}
    name_at: dict[int, str] = {}
    for group, saved_group in zip(optimizer.param_groups, saved_groups, strict=True):
        for param, position in zip(group["params"], saved_group["params"], strict=True):
            name = name_at[position] = names[id(param)]
            for field, value in state.get(position, {}).items():
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(
                        f"optimizer state {field!r} of {name} has shape {tuple(value.shape)} in the checkpoint, but "
                        f"the parameter's is {tuple(param.shape)}"
                    )
    return {
        "state": {name_at[position]: value for position, value in state.items()},
        "param_groups": [{**group, "params": [name_at[p] for p in group["params"]]} for group in saved_groups],
    }


def clean_name(name: str) -> str:
    """A parameter name without the wrappers' prefixes (as ``torch.distributed.checkpoint`` names it)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
