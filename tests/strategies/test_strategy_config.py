"""ExpertParallelStrategy registration and argument checks (single process)."""

from __future__ import annotations

import pytest
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
