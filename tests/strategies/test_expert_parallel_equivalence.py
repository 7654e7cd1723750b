"""ExpertParallelStrategy at EP=2 against one process, in combinations the one-step tests leave out.

Gradient accumulation (with ``LoadBalancingBias`` and with clipping), capacity counted per rank, padded dict batches
with uneven real tokens per rank (one rank all padding), Switch with capacity under activation checkpointing,
EP=1 x DP=2 with clipping, clipping by value, Lightning's own distributed sampler; and the refusal of data that
would give the ranks different numbers of batches (every forward is a collective: one rank would wait forever).

All checks run in one pair of gloo processes (``run_checks``: spawning costs more than the checks), one test per
check reads its result.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from lightning_moe.callbacks import LoadBalancingBias
from lightning_moe.nn.moe import MoELayer
from tests.strategies._distributed import Seq2SeqSGDModule, SGDModule, assert_check_ok, ep_trainer, run_checks

pytestmark = pytest.mark.multiprocess

VOCAB, ROWS, SEQ = 64, 2, 17
MIXTRAL = {"vocab_size": VOCAB, "dim": 32, "num_heads": 2, "num_kv_heads": 1, "ffn_hidden": 32, "num_experts": 4}
DEEPSEEK = {"vocab_size": VOCAB, "num_layers": 2, "num_experts": 8}
# Capacity counted over each forward's tokens (capacity_scope="batch"), a factor that drops copies.
GLAM = {"vocab_size": VOCAB, "dim": 32, "num_heads": 2, "ffn_hidden": 32, "num_experts": 4, "random_routing": False,
        "capacity_factor": 1.0}  # fmt: skip
SWITCH = {"vocab_size": VOCAB, "dim": 32, "num_heads": 2, "head_dim": 16, "ffn_hidden": 32, "num_experts": 4,
          "capacity_factor": 1.0, "router_jitter": 0.0}  # fmt: skip


def _build(arch: str, overrides: dict) -> SGDModule | Seq2SeqSGDModule:
    torch.manual_seed(0)
    cls = Seq2SeqSGDModule if arch.startswith("switch") else SGDModule
    return cls(arch=arch, overrides=overrides, load_balance_coef=0.5, z_loss_coef=1e-3)


def _loss(module: SGDModule | Seq2SeqSGDModule, batch, shares: list[float] | None = None) -> torch.Tensor:
    """What ``training_step`` trains: cross-entropy, weighted auxiliary losses and the MTP loss.

    ``shares``: the weights of the cross-entropy and of each MTP depth's loss, this rank's targets of that loss
    times the world size over all ranks' targets of it, for a causal LM (``global_token_shares``; default 1).
    """
    out = module._loss(batch)
    shares = shares or [1.0] * (1 + (len(out[1]) if len(out) == 4 else 0))
    loss = out[0] * shares[0] + module.aux_loss(out[-2])[0]
    if len(out) == 4 and out[1]:
        mtp = torch.stack([depth * share for depth, share in zip(out[1], shares[1:], strict=True)]).mean()
        loss = loss + module.mtp_loss_coef * mtp
    return loss


def _sgd_step(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= p.grad
                p.grad = None


def _assert_same_weights(module: torch.nn.Module, ref: torch.nn.Module, tol: float = 1e-5) -> None:
    ref_params = dict(ref.model.named_parameters())
    for name, param in module.model.named_parameters():
        full = (param.full_tensor() if isinstance(param, DTensor) else param).detach()
        name = name.replace("_checkpoint_wrapped_module.", "")
        torch.testing.assert_close(
            full, ref_params[name].detach(), atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}"
        )


def _fit(module, data, world: int, **kwargs) -> None:
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=ROWS)
    ep_trainer(world, kwargs.pop("ep", world), max_steps=kwargs.pop("max_steps", 1), **kwargs).fit(
        module, train_dataloaders=loader
    )


class _SummedCounts:
    """A reference's ``reduce_counts``: first records each rank's counts, then gives their sum over the ranks."""

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []
        self.totals: list[torch.Tensor] | None = None

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.totals is None:
            self.calls.append(tensor.detach().clone())
            return tensor
        return self.totals.pop(0)

    def sum_over(self, world: int) -> None:
        per_rank = len(self.calls) // world
        sums = [sum(self.calls[r * per_rank + k] for r in range(world)) for k in range(per_rank)]
        self.totals = sums * world


def _per_rank_step(ref, local_batches: list, shares: list[list[float]] | None = None) -> None:
    """One process, data-parallel semantics: each rank's batch its own forward, the mean of their losses, the
    load-balancing loss with the expert counts summed over the ranks (as the strategy's ``reduce_counts``); SGD.
    ``shares``: each rank's cross-entropy and MTP depth weights (default 1)."""
    shares = shares or [None] * len(local_batches)
    hooks = []
    for layer in ref.modules():
        if isinstance(layer, MoELayer):
            layer.reduce_counts = _SummedCounts()
            hooks.append(layer.reduce_counts)
    with torch.no_grad():
        for batch in local_batches:
            _loss(ref, batch)
    for hook in hooks:
        hook.sum_over(len(local_batches))
    (sum(_loss(ref, batch, w) for batch, w in zip(local_batches, shares, strict=True)) / len(local_batches)).backward()
    for layer in ref.modules():
        if isinstance(layer, MoELayer):
            layer.reduce_counts = None
    _sgd_step(ref)


def _slice(batch: torch.Tensor, rank: int) -> torch.Tensor:
    return batch[rank * ROWS : (rank + 1) * ROWS]


# -- gradient accumulation ------------------------------------------------------------------------------------------


def _accumulation(rank: int, world: int, arch: str, overrides: dict, bias: bool = False, clip: float | None = None):
    acc = 2
    batches = torch.randint(0, VOCAB, (acc, world * ROWS, SEQ), generator=torch.Generator().manual_seed(3))
    # One process: the two global micro-batches, each loss / 2, then the bias update and clipping, one SGD step.
    ref = _build(arch, overrides)
    for batch in batches:
        (_loss(ref, batch) / acc).backward()
    if bias:
        for layer in ref.modules():
            if isinstance(layer, MoELayer) and layer.router.score_bias is not None:
                layer.update_bias(0.01)
    if clip is not None:
        assert torch.nn.utils.clip_grad_norm_(ref.parameters(), clip) > 2 * clip  # the clipping changes the step
    _sgd_step(ref)

    module = _build(arch, overrides)
    callbacks = [LoadBalancingBias(gamma=0.01)] if bias else []
    local = batches[:, rank * ROWS : (rank + 1) * ROWS].reshape(-1, SEQ)
    _fit(module, local, world, accumulate_grad_batches=acc, callbacks=callbacks, gradient_clip_val=clip)
    _assert_same_weights(module, ref)
    if bias:
        pairs = [(a, b) for a, b in zip(module.modules(), ref.modules(), strict=True) if isinstance(a, MoELayer)]
        assert any(a.router.score_bias is not None for a, _ in pairs)
        for a, b in pairs:
            if a.router.score_bias is not None:
                assert b.router.score_bias.abs().sum() > 0  # the update moved them
                torch.testing.assert_close(a.router.score_bias, b.router.score_bias, atol=1e-7, rtol=0)


# -- capacity counted per rank -------------------------------------------------------------------------------------


def _batch_capacity(rank: int, world: int, arch: str, overrides: dict, activation_checkpointing: bool = False):
    batch = torch.randint(0, VOCAB, (world * ROWS, SEQ), generator=torch.Generator().manual_seed(11))
    local_batches = [_slice(batch, r) for r in range(world)]
    ref = _build(arch, overrides)
    with torch.no_grad():
        dropped = [sum(int(s.num_dropped) for s in ref._loss(b)[-2]) for b in [*local_batches, batch]]
    assert sum(dropped[:-1]) > 0 and sum(dropped[:-1]) != dropped[-1]  # drops per rank differ from one process's
    _per_rank_step(ref, local_batches)

    module = _build(arch, overrides)
    _fit(module, local_batches[rank], world, strategy_kwargs={"activation_checkpointing": activation_checkpointing})
    _assert_same_weights(module, ref)


# -- padded dict batches, uneven real tokens per rank ----------------------------------------------------------------


def _padded(rank: int, world: int, arch: str, overrides: dict, empty_rank: bool = False):
    ids = torch.randint(0, VOCAB, (world * ROWS, SEQ - 1), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    if empty_rank:
        mask[ROWS:] = 0  # rank 1: nothing but padding (no trained target, no routed token)
    else:
        mask[0, 5:] = 0  # rank 0: right padding
        mask[2, :12] = 0  # rank 1: left padding
        mask[3, :-2] = 0  # rank 1: two real tokens
    labels = ids.masked_fill(mask == 0, -100)
    local_batches = [
        {"input_ids": _slice(ids, r), "attention_mask": _slice(mask, r), "labels": _slice(labels, r)}
        for r in range(world)
    ]
    # The cross-entropy and each MTP depth's loss are the means over every rank's real targets of that loss: each
    # rank's mean weighted by its targets, counted here by hand. Position i trains labels[i + 1] where token i is
    # real; MTP depth k trains it on labels[i + k + 1] where tokens i and i + k are real as well.
    depths = overrides.get("mtp_depth", 0)
    targets = []  # per rank: [cross-entropy's, depth 1's, ...]
    for batch in local_batches:
        hit, real = batch["labels"][:, 1:] != -100, batch["attention_mask"][:, :-1].bool()
        targets.append([int((hit & real).sum())])
        targets[-1] += [int((hit[:, k:] & real[:, :-k] & real[:, k:]).sum()) for k in range(1, depths + 1)]
    assert len({n[0] for n in targets}) == world  # uneven, so the mean of the ranks' means would differ
    totals = [sum(column) for column in zip(*targets, strict=True)]
    shares = [[n * world / t for n, t in zip(row, totals, strict=True)] for row in targets]
    if depths and not empty_rank:  # each depth's own share, not the cross-entropy's: weighting by that would fail
        assert all(row[k] != row[0] for row in shares for k in range(1, depths + 1))
    ref = _build(arch, overrides)
    _per_rank_step(ref, local_batches, shares=shares)

    module = _build(arch, overrides)
    _fit(module, DataLoader([local_batches[rank]], batch_size=None), world)
    _assert_same_weights(module, ref)


# -- clipping: EP=1 x DP=2, and by value ----------------------------------------------------------------------------


def _clipped(rank: int, world: int, ep: int, algorithm: str, clip: float):
    batch = torch.randint(0, VOCAB, (world * ROWS, SEQ), generator=torch.Generator().manual_seed(3))
    ref = _build("mixtral-tiny", MIXTRAL)
    _loss(ref, batch).backward()
    grads = [p.grad.clone() for p in ref.parameters() if p.grad is not None]
    if algorithm == "norm":
        torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
    else:
        torch.nn.utils.clip_grad_value_(ref.parameters(), clip)
    assert any(not torch.equal(g, p.grad) for g, p in zip(grads, ref.parameters(), strict=False))  # clipping acts
    _sgd_step(ref)

    module = _build("mixtral-tiny", MIXTRAL)
    _fit(module, _slice(batch, rank), world, ep=ep, gradient_clip_val=clip, gradient_clip_algorithm=algorithm)
    _assert_same_weights(module, ref)


# -- Lightning's distributed sampler: each rank its share of one dataset ------------------------------------------


def _default_sampler(rank: int, world: int, out: Path):
    batch = torch.randint(0, VOCAB, (world * ROWS, SEQ), generator=torch.Generator().manual_seed(3))
    ref = _build("mixtral-tiny", MIXTRAL)
    _loss(ref, batch).backward()
    _sgd_step(ref)
    module = _build("mixtral-tiny", MIXTRAL)
    trainer = ep_trainer(world, "auto", max_steps=1, use_distributed_sampler=True)
    trainer.fit(module, train_dataloaders=DataLoader(batch, batch_size=ROWS))  # the same dataset on every rank
    _assert_same_weights(module, ref)


# -- data that gives the ranks different numbers of batches is refused --------------------------------------------


def _uneven(rank: int, world: int, out: Path):
    data = torch.randint(0, VOCAB, (3 * ROWS, SEQ), generator=torch.Generator().manual_seed(3))
    uneven = DataLoader(data[: (1 + rank) * ROWS], batch_size=ROWS)  # rank 0: one batch, rank 1: two
    even = DataLoader(data[:ROWS], batch_size=ROWS)
    counts = r"the ranks would run \[\[1\], \[2\]\] batches"
    module = _build("mixtral-tiny", MIXTRAL)
    with pytest.raises(ValueError, match=rf"validation data is invalid.*{counts}.*trainer\.limit_val_batches=1"):
        ep_trainer(world, world, max_steps=1).fit(module, train_dataloaders=even, val_dataloaders=uneven)
    with pytest.raises(ValueError, match=rf"test data is invalid.*{counts}.*trainer\.limit_test_batches=1"):
        ep_trainer(world, world, max_steps=1).test(module, dataloaders=uneven, verbose=False)
    with pytest.raises(ValueError, match=rf"training data is invalid.*{counts}.*trainer\.limit_train_batches=1"):
        ep_trainer(world, world, max_steps=-1, max_epochs=1).fit(module, train_dataloaders=uneven)
    # max_steps ends the run before the shorter rank's epoch does: nothing waits, so it trains.
    trainer = ep_trainer(world, world, max_steps=1)
    trainer.fit(module, train_dataloaders=uneven)
    assert trainer.global_step == 1


CHECKS: dict[str, Callable[[int, int, Path], None]] = {
    "accumulation_bias": lambda r, w, _: _accumulation(r, w, "deepseek-tiny", DEEPSEEK, bias=True),
    "accumulation_clip": lambda r, w, _: _accumulation(r, w, "mixtral-tiny", MIXTRAL, clip=0.05),
    "batch_capacity": lambda r, w, _: _batch_capacity(r, w, "glam-tiny", GLAM),
    "switch_capacity_ac": lambda r, w, _: _batch_capacity(r, w, "switch-tiny", SWITCH, activation_checkpointing=True),
    "padded": lambda r, w, _: _padded(r, w, "mixtral-tiny", MIXTRAL),
    "padded_mtp": lambda r, w, _: _padded(r, w, "deepseek-tiny", {**DEEPSEEK, "mtp_depth": 2}),
    "padded_empty_rank": lambda r, w, _: _padded(r, w, "deepseek-tiny", {**DEEPSEEK, "mtp_depth": 1}, empty_rank=True),
    "clip_norm_ep1": lambda r, w, _: _clipped(r, w, 1, "norm", 0.05),
    "clip_value": lambda r, w, _: _clipped(r, w, 2, "value", 0.01),
    "default_sampler": _default_sampler,
    "uneven": _uneven,
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_checks(__name__, 2, tmp_path_factory.mktemp("expert_parallel_equivalence"))


def test_gradient_accumulation_with_load_balancing_bias_matches_single_process(results: Path) -> None:
    # Two micro-batches per step: the bias update sums the loads of both and of both ranks.
    assert_check_ok(results, "accumulation_bias")


def test_gradient_accumulation_with_clipping_matches_single_process(results: Path) -> None:
    assert_check_ok(results, "accumulation_clip")


def test_batch_capacity_under_expert_parallelism_counts_each_ranks_tokens(results: Path) -> None:
    # As the README says: drops differ from one process on the global batch; they are each rank's forward's.
    assert_check_ok(results, "batch_capacity")


def test_switch_with_capacity_and_activation_checkpointing_counts_each_ranks_tokens(results: Path) -> None:
    assert_check_ok(results, "switch_capacity_ac")


def test_padded_batches_with_uneven_real_tokens_train_the_mean_over_all_real_targets(results: Path) -> None:
    assert_check_ok(results, "padded")


def test_multi_token_prediction_losses_weigh_each_depths_own_targets_across_ranks(results: Path) -> None:
    # Depth k trains fewer targets than the cross-entropy, and the ranks' padding takes different shares of them.
    assert_check_ok(results, "padded_mtp")


def test_a_rank_holding_only_padding_trains_as_one_process_would(results: Path) -> None:
    assert_check_ok(results, "padded_empty_rank")


def test_clipping_by_norm_at_ep1_dp2_matches_single_process(results: Path) -> None:
    assert_check_ok(results, "clip_norm_ep1")


def test_clipping_by_value_matches_single_process(results: Path) -> None:
    assert_check_ok(results, "clip_value")


def test_lightnings_distributed_sampler_gives_each_rank_its_share(results: Path) -> None:
    assert_check_ok(results, "default_sampler")


def test_data_with_uneven_batch_counts_per_rank_is_refused_before_the_first_batch(results: Path) -> None:
    # Validation, test and training: one rank would run a forward the other never joins, and wait forever.
    assert_check_ok(results, "uneven")
