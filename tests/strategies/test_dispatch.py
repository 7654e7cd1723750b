"""AllToAllDispatcher against the single-process MoE layer on the concatenated batch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_moe.nn.config import ExpertsConfig, MoEConfig, RouterConfig
from lightning_moe.nn.moe import MoELayer
from lightning_moe.strategies.dispatch import AllToAllDispatcher, ExpertParallelExperts
from tests.strategies._distributed import run_distributed

pytestmark = pytest.mark.multiprocess

NUM_EXPERTS, DIM, TOKENS = 4, 16, 12


def _layer(gated: bool = True) -> MoELayer:
    torch.manual_seed(0)
    config = MoEConfig(
        dim=DIM,
        router=RouterConfig(num_experts=NUM_EXPERTS, top_k=2),
        experts=ExpertsConfig(hidden_dim=32, gated=gated, init_std=0.2),
    )
    return MoELayer(config)


def _shard_experts(layer: MoELayer, rank: int, world: int) -> None:
    """Keep this rank's experts as plain local parameters."""
    local = NUM_EXPERTS // world
    for name in ("w1", "w3", "w2"):
        weight = getattr(layer.experts, name)
        if weight is not None:
            setattr(layer.experts, name, nn.Parameter(weight.detach()[rank * local : (rank + 1) * local].clone()))
    ExpertParallelExperts.convert(layer.experts)
    layer.dispatcher = AllToAllDispatcher()


def _check_against_reference(rank: int, world: int, x_TD: torch.Tensor, ref: MoELayer) -> MoELayer:
    """Run the EP layer on this rank's half and the reference on all of ``x_TD``; compare outputs and grads."""
    g_TD = torch.randn(x_TD.shape, generator=torch.Generator().manual_seed(1))
    x_ref = x_TD.clone().requires_grad_()
    y_ref, _ = ref(x_ref)
    (y_ref * g_TD).sum().backward()

    layer = copy.deepcopy(ref)
    layer.zero_grad(set_to_none=True)
    _shard_experts(layer, rank, world)
    rows = slice(rank * TOKENS, (rank + 1) * TOKENS)
    x_local = x_TD[rows].clone().requires_grad_()
    y_local, _ = layer(x_local)
    (y_local * g_TD[rows]).sum().backward()

    torch.testing.assert_close(y_local, y_ref[rows], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x_local.grad, x_ref.grad[rows], atol=1e-6, rtol=1e-5)
    # Each expert already sums the gradient over every rank's tokens (the backward all-to-all).
    local = NUM_EXPERTS // world
    experts = slice(rank * local, (rank + 1) * local)
    for name in ("w1", "w3", "w2"):
        weight = getattr(layer.experts, name)
        if weight is not None:
            torch.testing.assert_close(weight.grad, getattr(ref.experts, name).grad[experts], atol=1e-6, rtol=1e-5)
    # The router is replicated: its gradient is a sum over ranks.
    router_grad = layer.router.gate.weight.grad.clone()
    dist.all_reduce(router_grad)
    torch.testing.assert_close(router_grad, ref.router.gate.weight.grad, atol=1e-6, rtol=1e-5)
    return layer


def _matches_single_process(rank: int, world: int, gated: bool) -> None:
    x_TD = torch.randn(world * TOKENS, DIM, generator=torch.Generator().manual_seed(2))
    _check_against_reference(rank, world, x_TD, _layer(gated))


def _idle_rank(rank: int, world: int) -> None:
    ref = _layer()
    # Positive inputs and a router that scores experts 0 and 1 high: rank 1's experts get no token.
    with torch.no_grad():
        ref.router.gate.weight.copy_(torch.tensor([[1.0], [0.5], [-1.0], [-2.0]]).expand(NUM_EXPERTS, DIM))
    x_TD = torch.rand(world * TOKENS, DIM, generator=torch.Generator().manual_seed(3)) + 0.1
    layer = _check_against_reference(rank, world, x_TD, ref)
    if rank == 1:
        assert layer.experts.w1.grad.abs().sum() == 0
        assert torch.isfinite(layer.experts.w2.grad).all()


@pytest.mark.parametrize("gated", [True, False])
def test_all_to_all_dispatch_matches_single_process(gated: bool) -> None:
    run_distributed(_matches_single_process, 2, gated)


def test_rank_without_tokens_neither_hangs_nor_corrupts_gradients() -> None:
    run_distributed(_idle_rank, 2)


def _float64_under_autocast(rank: int, world: int) -> None:
    # Autocast leaves float64 alone, and so do the experts: the all-to-all must not send the copies in bf16.
    x_TD = torch.randn(world * TOKENS, DIM, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer = _check_against_reference(rank, world, x_TD, _layer().double())
        y, _ = layer(x_TD[:TOKENS])
    assert y.dtype == torch.float64


def test_float64_layer_under_autocast_stays_float64_through_the_all_to_all() -> None:
    run_distributed(_float64_under_autocast, 2)
