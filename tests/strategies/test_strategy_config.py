"""ExpertParallelStrategy registration and argument checks (single process)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry

from lightning_moe.strategies import ExpertParallelStrategy, optimizer_state_by_name


def test_strategy_is_registered_as_expert_parallel() -> None:
    assert "expert_parallel" in StrategyRegistry
    strategy = StrategyRegistry.get("expert_parallel")
    assert isinstance(strategy, ExpertParallelStrategy) and strategy.expert_parallel_size == "auto"


@pytest.mark.parametrize("size", [0, -2, "all", True])
def test_bad_expert_parallel_size_is_rejected(size: object) -> None:
    with pytest.raises(ValueError, match="expert_parallel_size=.* is invalid"):
        ExpertParallelStrategy(expert_parallel_size=size)  # type: ignore[arg-type]


def test_bad_dtype_is_rejected() -> None:
    with pytest.raises(ValueError, match="param_dtype='fp8' is invalid"):
        ExpertParallelStrategy(param_dtype="fp8")


@pytest.mark.parametrize("name", ["reshard_after_forward", "activation_checkpointing", "save_distributed_checkpoint"])
def test_switches_must_be_bools(name: str) -> None:
    # 'no' is truthy: it would have turned the switch on.
    with pytest.raises(ValueError, match=rf"{name}='no' is invalid: must be True or False"):
        ExpertParallelStrategy(**{name: "no"})


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


def _two_group_adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    # Biases first, then weights: positions in the state dict are not the module's parameter order.
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    return torch.optim.AdamW([{"params": biases, "weight_decay": 0.0}, {"params": weights}], lr=0.1)


def test_optimizer_state_by_name_follows_the_groups_not_the_module_order() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = _two_group_adamw(model)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    by_name = optimizer_state_by_name(saved, _two_group_adamw(model), model)
    assert [group["params"] for group in by_name["param_groups"]] == [["0.bias", "1.bias"], ["0.weight", "1.weight"]]
    for name, param in model.named_parameters():  # each moment belongs to the parameter of that name
        assert torch.equal(by_name["state"][name]["exp_avg"], optimizer.state[param]["exp_avg"])
    assert optimizer_state_by_name(by_name, optimizer, model) is by_name  # already by name


def test_optimizer_state_by_name_refuses_another_setup() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = _two_group_adamw(model)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    one_group = torch.optim.AdamW(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"groups of sizes \[2, 2\] and this run's \[4\]"):
        optimizer_state_by_name(optimizer.state_dict(), one_group, model)
    wider = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    with pytest.raises(ValueError, match=r"'exp_avg' of 0.bias has shape \(4,\) in the checkpoint.*\(5,\)"):
        optimizer_state_by_name(optimizer.state_dict(), _two_group_adamw(wider), wider)
