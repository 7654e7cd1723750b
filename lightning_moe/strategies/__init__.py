"""Expert parallelism and FSDP2: the only package that knows about process groups.

Importing it registers ``"expert_parallel"`` in Lightning's ``StrategyRegistry``.
"""

from lightning_moe.strategies.checkpoint import (
    check_checkpoint_files,
    consolidate_checkpoint,
    full_checkpoint,
    load_distributed_checkpoint,
    optimizer_state_by_name,
)
from lightning_moe.strategies.dispatch import AllToAllDispatcher
from lightning_moe.strategies.expert_parallel import (
    ExpertParallelStrategy,
    apply_activation_checkpointing,
    apply_expert_parallel,
    apply_fsdp,
    clip_grad_norm_,
    moe_layers,
)

__all__ = [
    "AllToAllDispatcher",
    "ExpertParallelStrategy",
    "apply_activation_checkpointing",
    "apply_expert_parallel",
    "apply_fsdp",
    "check_checkpoint_files",
    "clip_grad_norm_",
    "consolidate_checkpoint",
    "full_checkpoint",
    "load_distributed_checkpoint",
    "moe_layers",
    "optimizer_state_by_name",
]
