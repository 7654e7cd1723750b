"""ExpertParallelStrategy registration and argument checks (single process)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry

from lightning_moe.strategies import ExpertParallelStrategy


def test_strategy_is_registered_as_expert_parallel() -> None:
    assert "expert_parallel" in StrategyRegistry
    strategy = StrategyRegistry.get("expert_parallel")
    assert isinstance(strategy, ExpertParallelStrategy) and strategy.expert_parallel_size == "auto"


@pytest.mark.parametrize("size", [0, -2, "all"])
def test_bad_expert_parallel_size_is_rejected(size: object) -> None:
    with pytest.raises(ValueError, match="expert_parallel_size=.* is invalid"):
        ExpertParallelStrategy(expert_parallel_size=size)  # type: ignore[arg-type]


def test_bad_dtype_is_rejected() -> None:
    with pytest.raises(ValueError, match="param_dtype='fp8' is invalid"):
        ExpertParallelStrategy(param_dtype="fp8")


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
@pytest.mark.parametrize("max_norm", [0.1, 100.0])
def test_clip_grad_norm_matches_torch_on_plain_tensors(norm_type: float, max_norm: float) -> None:
    from lightning_moe.strategies import clip_grad_norm_

    torch.manual_seed(0)
    ours, theirs = [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(3)], []
    for p in ours:
        p.grad = torch.randn_like(p)
        theirs.append(torch.nn.Parameter(p.detach().clone()))
        theirs[-1].grad = p.grad.clone()
    ours.append(torch.nn.Parameter(torch.zeros(2)))  # no gradient: skipped
    total = clip_grad_norm_(ours, max_norm, norm_type)
    torch.testing.assert_close(total, torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type))
    for a, b in zip(ours, theirs, strict=False):
        torch.testing.assert_close(a.grad, b.grad)
