"""Shared MoE building blocks: configs, routers, losses, capacity, experts, dispatch and the MoE layer."""

from lightning_moe.nn.capacity import capacity_keep_mask, expert_capacity, priority_order
from lightning_moe.nn.compile import compile_blocks
from lightning_moe.nn.config import ExpertsConfig, MoEConfig, RouterConfig
from lightning_moe.nn.dispatch import Dispatcher, GroupedDispatcher, LoopDispatcher
from lightning_moe.nn.experts import GroupedExperts, grouped_expert_mlp, reuse_expert_grad_memory
from lightning_moe.nn.ffn import FeedForward, activation_fn
from lightning_moe.nn.losses import (
    bias_update,
    load_balancing_loss,
    router_entropy,
    router_z_loss,
    sequence_balance_loss,
)
from lightning_moe.nn.moe import MoELayer, MoEStats
from lightning_moe.nn.router import Router, Routing

__all__ = [
    "Dispatcher",
    "ExpertsConfig",
    "FeedForward",
    "GroupedDispatcher",
    "GroupedExperts",
    "LoopDispatcher",
    "MoEConfig",
    "MoELayer",
    "MoEStats",
    "Router",
    "RouterConfig",
    "Routing",
    "activation_fn",
    "grouped_expert_mlp",
    "bias_update",
    "capacity_keep_mask",
    "compile_blocks",
    "expert_capacity",
    "load_balancing_loss",
    "priority_order",
    "reuse_expert_grad_memory",
    "router_entropy",
    "router_z_loss",
    "sequence_balance_loss",
]
