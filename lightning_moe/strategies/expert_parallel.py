"""Expert parallelism + FSDP2 as a Lightning strategy.

The device mesh is ``(dp, ep)``: ``ep`` ranks share the experts of every MoE layer (rank ``r`` of an
expert-parallel group owns ``num_experts / ep`` of them), ``dp = world / ep`` such groups hold copies of
the experts. Every rank reads its own slice of the global batch.

* Expert weights become DTensors sharded on the expert dimension over the ``ep`` sub-mesh, then FSDP2
  shards them further over their ``dp`` sub-mesh (2-D: the two sub-meshes share the root mesh, so the
  replicas of one expert in different expert-parallel groups are reduced together).
* Every other parameter is sharded by FSDP2 over all ranks (the flattened mesh).
* Gradients: FSDP2 averages over the mesh it shards on. A non-expert parameter sees the mean over all
  ``world`` ranks, as a single process on the global batch would. An expert sees the tokens of its whole
  expert-parallel group through the all-to-all, so its gradient is a *sum* over ``ep`` ranks before the
  ``dp`` average; :class:`~lightning_moe.strategies.dispatch.ExpertParallelExperts` multiplies it by ``1 / ep``
  (gloo has no ``PREMUL_SUM``, so FSDP's gradient divide factor cannot do this on CPU).
* Router statistics and auxiliary losses are computed on each rank's own tokens (data-parallel
  semantics, like a gradient-accumulation micro-batch). The cross-entropy, z-loss and sequence-balance
  loss average to the global-batch values when every rank holds as many real tokens (with padding they are
  a mean of per-rank means). An expert capacity (``capacity_scope="batch"``) is counted from each rank's
  tokens, so drops differ from one process on the global batch; ``capacity_scope="sequence"`` matches it
  exactly. The Switch load-balancing loss is a product of two means, so
  the strategy gives every MoE layer a ``reduce_counts`` hook (:class:`SumOverRanks`) that sums the expert
  counts over all ranks: the per-rank losses then average to the global batch's loss. Callbacks reduce
  ``MoEStats`` counts across ranks before logging.
* Activation checkpointing (optional) wraps each decoder block after expert sharding and before FSDP2
  (:func:`apply_activation_checkpointing`); recomputed forwards leave the MoE counters as they were.
* Checkpoints are sharded DCP directories that reshard on load (any world size or ``ep``); a plain
  single-process module reads them with :func:`~lightning_moe.strategies.checkpoint.load_distributed_checkpoint`.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from typing_extensions import override

from lightning_moe.nn.compile import blocks
from lightning_moe.nn.moe import MoELayer
from lightning_moe.strategies.checkpoint import (
    check_checkpoint_files,
    interrupted_swap,
    optimizer_state_by_name,
    previous_path,
    staging_path,
)
from lightning_moe.strategies.dispatch import AllToAllDispatcher, ExpertParallelExperts

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of ``model`` in module order."""
    return [module for module in model.modules() if isinstance(module, MoELayer)]


class SumOverRanks:
    """Sums a tensor over a process group (no gradient): the MoE layers' ``reduce_counts`` hook.

    With it, the load-balancing loss counts the expert loads of the global batch, so averaging the per-rank
    losses (as data parallelism does) gives the global batch's loss.

    Args:
        group: The process group (``None``: all ranks).
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    def __call__(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over the group's ranks (a new tensor)."""
        total = tensor.detach().clone()
        dist.all_reduce(total, group=self.group)
        return total


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh, expert_grad_scale: float | None = None) -> nn.Module:
    """Shard the experts of every MoE layer over ``ep_mesh`` and swap in the all-to-all dispatcher.

    The stacked expert weights (``w1``, ``w3``, ``w2``) become DTensors ``Shard(0)`` on ``ep_mesh``: rank
    ``r`` keeps experts ``r * E / ep ... (r + 1) * E / ep - 1``. Values come from the mesh's first rank, so
    every rank ends up with the same global weights. Routers and everything else are left alone.

    Args:
        model: Any module containing :class:`~lightning_moe.nn.moe.MoELayer` s (changed in place).
        ep_mesh: 1-D expert-parallel mesh.
        expert_grad_scale: Factor on the expert gradients (default ``1 / ep``: right when the loss is then
            averaged over data-parallel ranks, see the module docstring; ``1.0`` keeps raw sums).

    Returns:
        ``model``.

    Raises:
        ValueError: If a layer's expert count is not divisible by the mesh size, or the mesh is not 1-D.
    """
    if ep_mesh.ndim != 1:
        raise ValueError(f"ep_mesh.ndim={ep_mesh.ndim} is invalid: expected a 1-D expert-parallel mesh")
    ep = ep_mesh.size()
    scale = 1.0 / ep if expert_grad_scale is None else expert_grad_scale
    for layer in moe_layers(model):
        experts = layer.experts
        if experts.num_experts % ep:
            raise ValueError(_indivisible_experts(experts.num_experts, ep))
        for name in ("w1", "w3", "w2"):
            weight = getattr(experts, name)
            if weight is None or isinstance(weight, DTensor):
                continue
            sharded = distribute_tensor(weight.detach(), ep_mesh, [Shard(0)])
            setattr(experts, name, nn.Parameter(sharded, requires_grad=weight.requires_grad))
        ExpertParallelExperts.convert(experts, expert_grad_scale=scale)
        layer.dispatcher = AllToAllDispatcher(ep_mesh.get_group())
    return model


@contextmanager
def _keep_moe_counters(block: nn.Module) -> Iterator[None]:
    """Undo what a recomputed forward adds to the ``tokens_per_expert`` buffers of ``block``'s MoE layers."""
    saved = [(layer.tokens_per_expert, layer.tokens_per_expert.clone()) for layer in moe_layers(block)]
    try:
        yield
    finally:
        for buffer, value in saved:
            buffer.copy_(value)


def _recompute_contexts(block: nn.Module) -> tuple[Any, Any]:
    return nullcontext(), _keep_moe_counters(block)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute every decoder block's activations in backward instead of keeping them.

    Each entry of the outermost ``ModuleList`` s (the decoder, and encoder, layers) is wrapped in
    ``checkpoint_wrapper`` (non-reentrant ``torch.utils.checkpoint``), which keeps only the block's inputs.
    Call it after :func:`apply_expert_parallel` and before :func:`apply_fsdp`; the recomputed forward repeats
    the block's all-to-alls and count reductions in backward, in the same order on every rank.

    The recomputed forward is a training forward, so it would add the block's routed tokens to each MoE
    layer's ``tokens_per_expert`` buffer a second time: the buffers are restored after each recompute, so
    they count every token once, as without checkpointing. The state dict drops the wrapper's prefix, so
    checkpoints load with or without it.

    Args:
        model: The model (changed in place; idempotent).

    Returns:
        ``model``.
    """
    for module_list, index in list(blocks(model)):
        block = module_list[index]
        if not isinstance(block, CheckpointWrapper):
            module_list[index] = checkpoint_wrapper(block, context_fn=partial(_recompute_contexts, block))
    return model


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    expert_mesh: DeviceMesh,
    reshard_after_forward: bool = True,
    mp_policy: MixedPrecisionPolicy | None = None,
) -> nn.Module:
    """FSDP2: experts over ``expert_mesh``, each block of every ``ModuleList``, then the rest over ``mesh``.

    Call after :func:`apply_expert_parallel`. Inner modules are sharded before the modules that contain
    them, so each parameter belongs to exactly one FSDP group.

    Args:
        model: The model (changed in place).
        mesh: 1-D mesh of all ranks, for the non-expert parameters.
        expert_mesh: 1-D data-parallel mesh of the expert parameters (the ranks holding the same experts).
        reshard_after_forward: Free the gathered parameters after forward (re-gather in backward).
        mp_policy: FSDP2 mixed-precision policy.

    Returns:
        ``model``.
    """
    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for layer in moe_layers(model):
        fully_shard(layer.experts, mesh=expert_mesh, **kwargs)
    blocks = [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]
    for block in reversed(blocks):
        if not isinstance(block, FSDPModule) and any(p.requires_grad for p in block.parameters()):
            fully_shard(block, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float, norm_type: float = 2.0) -> Tensor:
    """Scale the gradients so that their total norm is at most ``max_norm``, as ``torch.nn.utils.clip_grad_norm_``.

    Also for DTensor gradients on several device meshes (expert weights on the expert-parallel mesh, the rest
    on the FSDP mesh): the norm of this rank's shards is taken per mesh and placement, reduced over the mesh
    dims the gradients are sharded on (not those they are replicated on), then the norms are combined. Nothing
    is read back to the host.

    Args:
        parameters: Parameters whose ``.grad`` to clip (those without one are skipped).
        max_norm: Largest total norm.
        norm_type: The ``p`` of the p-norm (``inf``: largest absolute value).

    Returns:
        The total norm before clipping.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    groups: dict[tuple, list[Tensor]] = {}
    for grad in grads:
        key = (grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else (None, ())
        groups.setdefault(key, []).append(grad)
    finite = math.isfinite(norm_type)
    norms = []
    for (mesh, placements), group in groups.items():
        local = [g.to_local() if mesh is not None else g for g in group]
        # FSDP2 leaves a rank an empty shard of a small weight; its inf-norm is undefined, its part of any norm 0.
        parts = [torch.linalg.vector_norm(g, norm_type) for g in local if g.numel()] or [local[0].new_zeros(())]
        norm = torch.linalg.vector_norm(torch.stack(parts), norm_type)
        sharded = [dim for dim, placement in enumerate(placements) if not placement.is_replicate()]
        if sharded:
            norm = norm.pow(norm_type) if finite else norm
            for dim in sharded:
                dist.all_reduce(norm, dist.ReduceOp.SUM if finite else dist.ReduceOp.MAX, mesh.get_group(dim))
            norm = norm.pow(1.0 / norm_type) if finite else norm
        norms.append(norm)
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in grads:
        (grad.to_local() if isinstance(grad, DTensor) else grad).mul_(scale.to(grad.dtype))
    return total


class ExpertParallelStrategy(ModelParallelStrategy):
    """Expert parallelism with all-to-all token dispatch, and FSDP2 for everything, from the Trainer.

    Registered as ``"expert_parallel"``. The LightningModule's ``model`` attribute (or, without one, each
    child module with parameters) is parallelised in :meth:`setup`, after the module's own
    ``configure_model``: experts sharded over the expert-parallel mesh, then FSDP2.

    Args:
        expert_parallel_size: Ranks sharing the experts of a layer (``"auto"``: all ranks). Must divide the
            world size and every layer's expert count.
        reshard_after_forward: FSDP2: free gathered parameters after forward.
        param_dtype: FSDP2 mixed precision: dtype of the gathered parameters for compute (``None``: as
            stored), e.g. ``"bfloat16"``.
        reduce_dtype: FSDP2 mixed precision: dtype of the gradient reduction (``None``: ``param_dtype``).
        activation_checkpointing: Recompute each decoder block in backward instead of storing its activations
            (see :func:`apply_activation_checkpointing`); the step's loss and update are unchanged.
        save_distributed_checkpoint: Save one shard per rank (``torch.distributed.checkpoint``) rather than
            a full checkpoint gathered on rank 0.
        process_group_backend: ``"gloo"``, ``"nccl"``, ... (default: by device).
        timeout: Collective timeout.

    Raises:
        ValueError: For a bad size or dtype name.

    Example::

        trainer = Trainer(accelerator="cpu", devices=4, strategy=ExpertParallelStrategy(expert_parallel_size=2))
        trainer = Trainer(accelerator="gpu", devices=8, strategy="expert_parallel")
    """

    strategy_name = "expert_parallel"

    def __init__(
        self,
        expert_parallel_size: Literal["auto"] | int = "auto",
        reshard_after_forward: bool = True,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        activation_checkpointing: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(seconds=1800),
    ) -> None:
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        size = expert_parallel_size
        if size != "auto" and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"expert_parallel_size={size!r} is invalid: must be 'auto' or an int >= 1")
        for name, flag in (
            ("reshard_after_forward", reshard_after_forward),
            ("activation_checkpointing", activation_checkpointing),
            ("save_distributed_checkpoint", save_distributed_checkpoint),
        ):
            if not isinstance(flag, bool):
                raise ValueError(f"{name}={flag!r} is invalid: must be True or False")
        for name, dtype in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if dtype is not None and dtype not in _DTYPES:
                raise ValueError(f"{name}={dtype!r} is invalid: must be None or one of {', '.join(_DTYPES)}")
        self.expert_parallel_size = expert_parallel_size
        self.reshard_after_forward = reshard_after_forward
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        self.activation_checkpointing = activation_checkpointing

    @property
    def expert_parallel_mesh(self) -> DeviceMesh:
        """The 1-D mesh of this rank's expert-parallel group."""
        return self.device_mesh["tensor_parallel"]

    @property
    def expert_data_parallel_mesh(self) -> DeviceMesh:
        """The 1-D mesh of the ranks holding the same experts as this one."""
        return self.device_mesh["data_parallel"]

    def check_sizes(self, model: nn.Module | None = None) -> int:
        """Check the expert-parallel size against the world size and ``model``'s expert counts; return it.

        Needs only the trainer's settings (``devices``, ``num_nodes``), so ``lightning-moe fit`` calls it before
        any process starts.

        Raises:
            ValueError: If the size does not divide the world size, or a layer's expert count.
        """
        world = self.num_nodes * self.num_processes
        ep = world if self.expert_parallel_size == "auto" else self.expert_parallel_size
        if world % ep:
            raise ValueError(f"expert_parallel_size={ep} is invalid: must divide the world size {world}")
        for layer in moe_layers(model) if model is not None else []:
            if layer.experts.num_experts % ep:
                raise ValueError(_indivisible_experts(layer.experts.num_experts, ep))
        return ep

    @override
    def setup_environment(self) -> None:
        # The parent builds a (data_parallel, tensor_parallel) mesh; its second dim is our expert-parallel dim.
        ep = self.check_sizes()
        world = self.num_nodes * self.num_processes
        self._data_parallel_size, self._tensor_parallel_size = world // ep, ep
        super().setup_environment()

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Expert parallelism is also data parallelism: every rank reads different samples.
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.lightning_module is not None
        self.parallelize(self.lightning_module)
        super().setup(trainer)
        # The expert weights are DTensors on the (data, expert) mesh, the rest on the flat world mesh: torch's
        # clip_grad_norm_ cannot stack norms from two meshes, so gradient clipping by norm goes through
        # clip_grad_norm_ below (an instance attribute, so every precision plugin's clip_gradients uses it).
        plugin = self.precision_plugin
        plugin.clip_grad_by_norm = lambda optimizer, clip_val: clip_grad_norm_(plugin.main_params(optimizer), clip_val)

    @override
    def on_predict_start(self) -> None:
        """Refuse a prediction whose ranks would run different numbers of batches, before the first batch.

        Every forward here is a collective (FSDP2 all-gathers, the MoE all-to-all), and Lightning spreads the
        prediction samples over the ranks without repeating any, so with a sample count that does not split evenly
        into batches one rank would run a batch the others never join, and wait forever. ``TextDataModule``'s
        prediction loader pads the ranks' shares to one length
        (:class:`~lightning_moe.data.datamodule.PaddedPredictSampler`); this refuses other loaders that do not.

        Raises:
            ValueError: Naming each rank's batch count and how to even them out.
        """
        super().on_predict_start()
        self._refuse_uneven_batches(
            "prediction",
            self.lightning_module.trainer.predict_loop.max_batches,
            "limit_predict_batches",
            "a sampler that pads the ranks' shares (lightning_moe.data.datamodule.PaddedPredictSampler, as "
            "TextDataModule does)",
        )

    @override
    def on_train_start(self) -> None:
        """Refuse training whose ranks would run different numbers of batches before the run ends (see prediction).

        A rank whose epoch ends first would leave the others waiting forever in their next forward. Uneven counts
        are let through when ``max_steps`` ends the run before the shortest rank's epoch does.

        Raises:
            ValueError: Naming each rank's batch count and how to even them out.
        """
        super().on_train_start()
        trainer = self.lightning_module.trainer
        needed = trainer.max_steps * trainer.accumulate_grad_batches if trainer.max_steps >= 0 else None
        self._refuse_uneven_batches("training", [trainer.fit_loop.max_batches], "limit_train_batches", needed=needed)

    @override
    def on_validation_start(self) -> None:
        """Refuse validation (sanity check included) whose ranks would run different numbers of batches.

        Raises:
            ValueError: Naming each rank's batch count and how to even them out.
        """
        super().on_validation_start()
        self._refuse_uneven_batches(
            "validation", self.lightning_module.trainer._evaluation_loop.max_batches, "limit_val_batches"
        )

    @override
    def on_test_start(self) -> None:
        """Refuse a test whose ranks would run different numbers of batches.

        Raises:
            ValueError: Naming each rank's batch count and how to even them out.
        """
        super().on_test_start()
        self._refuse_uneven_batches("test", self.lightning_module.trainer.test_loop.max_batches, "limit_test_batches")

    def _refuse_uneven_batches(
        self,
        stage: str,
        max_batches: list[int | float],
        limit: str,
        sampler: str = "Lightning's distributed sampler (use_distributed_sampler=True, the default)",
        needed: int | None = None,
    ) -> None:
        """Raise before the first batch if the ranks would run different numbers of ``stage`` batches.

        Every forward is a collective (FSDP2 all-gathers, the MoE all-to-all): a rank running a batch the others
        never join would wait forever (until the process group's timeout).

        Args:
            stage: What the data is for, in the message.
            max_batches: This rank's batch count per dataloader (``inf``: unknown length).
            limit: The ``Trainer`` argument that caps the count, in the message.
            sampler: A sampler that evens the ranks' shares out, in the message.
            needed: The batches the run takes if it may end sooner (``max_steps``): counts that differ only past
                it are let through.

        Raises:
            ValueError: Naming each rank's batch count and how to even them out.
        """
        if self.world_size < 2 or not dist.is_initialized():
            return
        mine = [n if math.isfinite(n) else -1 for n in max_batches]
        counts: list[Any] = [None] * self.world_size
        dist.all_gather_object(counts, mine)
        if all(count == counts[0] for count in counts):
            return
        fewest = min(min(count) for count in counts)
        if needed is not None and 0 <= needed <= fewest:
            return
        raise ValueError(
            f"the {stage} data is invalid under ExpertParallelStrategy: the ranks would run {counts} batches "
            "(per rank, per dataloader), and every forward waits for all ranks; give every rank as many, e.g. "
            f"with {sampler}, trainer.{limit}={fewest}, or a sample count that is a multiple of world x batch size"
        )

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | os.PathLike, storage_options: Any = None
    ) -> None:
        """Save as ``ModelParallelStrategy`` does, a sharded checkpoint into a staging folder swapped in at the end.

        Lightning writes the shards and the metadata straight into ``filepath``, so a save that fails or is
        killed halfway leaves a folder mixing two steps (``last.ckpt`` is rewritten every time). Here every rank
        writes into ``.<name>.tmp`` next to it; once all are done, rank 0 renames the previous checkpoint away,
        the staging folder into its place, and deletes the previous one. A failed save leaves the previous
        checkpoint as it was (and its staging folder, removed by the next save); one killed between the two
        renames leaves both folders, which ``LastCheckpoint`` resumes from (see
        :func:`~lightning_moe.strategies.checkpoint.interrupted_swap`), and which the next save first puts back
        under ``filepath``: the staging folder it clears may be the newest checkpoint.
        """
        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        path = Path(self.broadcast(filepath))
        staging = staging_path(path)
        if self.global_rank == 0:
            recovered = interrupted_swap(path)
            if recovered is not None:
                os.replace(recovered, path)
            _remove(staging)
        self.barrier("staging")
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier("saved")
        if self.global_rank == 0:
            previous = previous_path(path)  # killed before the next rename: see interrupted_swap
            _remove(previous)
            if path.exists() or path.is_symlink():
                os.replace(path, previous)
            os.replace(staging, path)
            _remove(previous)
        self.barrier("swapped")

    @override
    def load_checkpoint(self, checkpoint_path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a sharded checkpoint folder as ``ModelParallelStrategy`` does, or a single-device checkpoint file.

        A file's weights are spread onto the shards as Lightning does. Its optimizer state is keyed by parameter
        position, which Lightning matches to the module's parameters in order; that is wrong for any optimizer
        with several parameter groups (``CausalLMModule``'s AdamW has two), and loading failed with a size
        mismatch. Here the positions are matched to names group by group, through this run's optimizer. A folder
        missing some of its shard files is refused before any work (:func:`check_checkpoint_files`).
        """
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            check_checkpoint_files(path)
        if not path.is_file():
            return super().load_checkpoint(path, weights_only)
        from lightning.fabric.strategies.model_parallel import _load_raw_module_state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        assert self.lightning_module is not None and self.model is not None
        strict = self.lightning_module.strict_loading
        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        _load_raw_module_state(checkpoint.pop("state_dict"), self.model, strict=strict)
        options = StateDictOptions(broadcast_from_rank0=True, full_state_dict=True, strict=strict)
        saved_states = checkpoint.get("optimizer_states", [])
        if self.optimizers and len(saved_states) != len(self.optimizers):
            raise ValueError(
                f"checkpoint {str(path)!r} holds {len(saved_states)} optimizer states, but this run has "
                f"{len(self.optimizers)} optimizers"
            )
        for optimizer, saved in zip(self.optimizers, saved_states, strict=False):
            by_name = optimizer_state_by_name(saved, optimizer, self.model)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=by_name, options=options)
        return checkpoint

    def parallelize(self, module: nn.Module) -> None:
        """Expert parallelism, activation checkpointing if asked, then FSDP2 on ``module.model``; idempotent.

        Without a ``model`` attribute, each child of ``module`` with parameters is parallelised instead.
        """
        targets = [module.model] if isinstance(getattr(module, "model", None), nn.Module) else list(module.children())
        mp_policy = None
        if self.param_dtype is not None or self.reduce_dtype is not None:
            mp_policy = MixedPrecisionPolicy(
                param_dtype=_DTYPES.get(self.param_dtype or ""), reduce_dtype=_DTYPES.get(self.reduce_dtype or "")
            )
        world_mesh = self.device_mesh._flatten("world")
        if self.expert_parallel_mesh.size() > 1 and not any(moe_layers(target) for target in targets):
            rank_zero_warn(
                f"expert_parallel_size={self.expert_parallel_mesh.size()} has no effect: the model has no MoE layer "
                "(a dense model trains with plain FSDP2 here)"
            )
        for target in targets:
            if isinstance(target, FSDPModule) or not any(True for _ in target.parameters()):
                continue
            apply_expert_parallel(target, self.expert_parallel_mesh)
            for layer in moe_layers(target):
                layer.reduce_counts = SumOverRanks(world_mesh.get_group())
            if self.activation_checkpointing:
                apply_activation_checkpointing(target)
            apply_fsdp(target, world_mesh, self.expert_data_parallel_mesh, self.reshard_after_forward, mp_policy)


def _indivisible_experts(num_experts: int, ep: int) -> str:
    return (
        f"num_experts={num_experts} is invalid for expert_parallel_size={ep}: must be divisible; set "
        "ExpertParallelStrategy(expert_parallel_size=...) (--trainer.strategy.init_args.expert_parallel_size) to a "
        "divisor of both num_experts and the world size ('auto' is the world size)"
    )


def _remove(path: Path) -> None:
    """Delete a file, link or folder at ``path`` if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


if ExpertParallelStrategy.strategy_name not in StrategyRegistry:
    StrategyRegistry.register(
        ExpertParallelStrategy.strategy_name,
        ExpertParallelStrategy,
        description="Expert parallelism (all-to-all dispatch) + FSDP2 over a (data, expert) device mesh",
    )
