"""ExpertParallelStrategy corners at EP=2 on two gloo processes, each against an independent computation.

All checks run in one pair of processes (``run_checks``: spawning costs more than the checks), one test per check
reads its result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from lightning_moe.callbacks import LoadBalancingBias
from lightning_moe.module import CausalLMModule, Seq2SeqLMModule
from lightning_moe.nn.config import ExpertsConfig, MoEConfig, RouterConfig
from lightning_moe.nn.moe import MoELayer
from lightning_moe.strategies import apply_expert_parallel, clip_grad_norm_, load_distributed_checkpoint
from tests.strategies._distributed import Seq2SeqSGDModule, assert_check_ok, ep_trainer, run_checks

pytestmark = pytest.mark.multiprocess

VOCAB, ROWS_PER_RANK, SEQ = 64, 2, 17
MIXTRAL = {"vocab_size": VOCAB, "dim": 32, "num_heads": 2, "num_kv_heads": 1, "ffn_hidden": 32, "num_experts": 4}
# Capacity per sequence with a factor that drops copies; no jitter (it draws per rank).
SWITCH = {"vocab_size": VOCAB, "dim": 32, "num_heads": 2, "head_dim": 16, "ffn_hidden": 32, "num_experts": 4,
          "capacity_factor": 1.0, "capacity_scope": "sequence", "router_jitter": 0.0}  # fmt: skip
DEEPSEEK = {"vocab_size": VOCAB, "num_layers": 2, "num_experts": 8}


def _global_batch(world: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (world * ROWS_PER_RANK, SEQ), generator=torch.Generator().manual_seed(seed))


def _local(batch: torch.Tensor, rank: int) -> DataLoader:
    return DataLoader(batch[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK], batch_size=ROWS_PER_RANK)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()


# -- the test loss of several processes is the loss of all their batches --------------------------------------------


def _test_loss_is_global(rank: int, world: int, out: Path) -> None:
    batch = _global_batch(world, seed=1)
    for build, expected in (
        # Causal LM: one process on the global batch.
        (lambda: CausalLMModule(arch="mixtral-tiny", overrides=MIXTRAL), lambda ref: ref._loss(batch)[0]),
        # Span corruption is seeded by the batch index, the same on every rank: the mean of each rank's loss.
        (
            lambda: Seq2SeqLMModule(arch="switch-tiny", overrides=SWITCH),
            lambda ref: torch.stack([
                ref._loss(batch[r * ROWS_PER_RANK : (r + 1) * ROWS_PER_RANK], torch.Generator().manual_seed(0))[0]
                for r in range(world)
            ]).mean(),
        ),
    ):  # fmt: skip
        torch.manual_seed(0)
        ref = build().eval()
        with torch.no_grad():
            want = expected(ref)
        torch.manual_seed(0)
        module = build()
        (result,) = ep_trainer(world, world, max_steps=1).test(module, dataloaders=_local(batch, rank), verbose=False)
        torch.testing.assert_close(torch.tensor(result["test/loss"]), want, atol=1e-5, rtol=1e-5)


# -- capacity counted per sequence drops what one process on the global batch drops ------------------------------


class _GradNorms(pl.Callback):
    """The total gradient norms (2 and inf) through the strategy's ``clip_grad_norm_``, before any clipping."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = list(pl_module.parameters())
        self.norms = {p: float(clip_grad_norm_(params, math.inf, p)) for p in (2.0, math.inf)}


def _sequence_capacity_matches_single_process(rank: int, world: int, out: Path) -> None:
    batch = _global_batch(world, seed=2)
    torch.manual_seed(0)
    ref = Seq2SeqSGDModule(arch="switch-tiny", overrides=SWITCH, load_balance_coef=0.5, z_loss_coef=1e-3)
    ce, stats, _ = ref._loss(batch)
    loss = ce + ref.aux_loss(stats)[0]
    loss.backward()
    assert sum(int(s.num_dropped) for s in stats) > 0  # the capacity drops copies
    grads = [p.grad for p in ref.parameters() if p.grad is not None]
    ref_norms = {p: float(torch.nn.utils.get_total_norm(grads, p)) for p in (2.0, math.inf)}
    with torch.no_grad():
        for p in ref.parameters():
            if p.grad is not None:
                p -= p.grad

    torch.manual_seed(0)
    module = Seq2SeqSGDModule(arch="switch-tiny", overrides=SWITCH, load_balance_coef=0.5, z_loss_coef=1e-3)
    norms = _GradNorms()
    ep_trainer(world, world, max_steps=1, callbacks=[norms]).fit(module, train_dataloaders=_local(batch, rank))
    for p, value in ref_norms.items():
        assert math.isclose(norms.norms[p], value, rel_tol=1e-5), (p, norms.norms[p], value)
    ref_params = dict(ref.model.named_parameters())
    for name, param in module.model.named_parameters():
        torch.testing.assert_close(_full(param), ref_params[name].detach(), atol=1e-5, rtol=1e-5, msg=name)


# -- gradient norms over ranks that hold empty shards ---------------------------------------------------------------


def _norms_with_empty_shards(rank: int, world: int, out: Path) -> None:
    # Qwen's shared-expert gate is (1, D): FSDP2 gives rank 1 an empty (0, D) shard of it.
    overrides = {"vocab_size": VOCAB, "dim": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "num_experts": 4}
    batch = _global_batch(world, seed=4)
    torch.manual_seed(0)
    ref = CausalLMModule(arch="qwen-moe-tiny", overrides=overrides, load_balance_coef=0.5)
    ce, _, stats, _ = ref._loss(batch)
    (ce + ref.aux_loss(stats)[0]).backward()
    grads = [p.grad for p in ref.parameters() if p.grad is not None]
    ref_norms = {p: float(torch.nn.utils.get_total_norm(grads, p)) for p in (2.0, math.inf)}

    torch.manual_seed(0)
    module = CausalLMModule(arch="qwen-moe-tiny", overrides=overrides, load_balance_coef=0.5)
    norms = _GradNorms()
    ep_trainer(world, world, max_steps=1, callbacks=[norms]).fit(module, train_dataloaders=_local(batch, rank))
    gate = module.model.layers[1].ffn.shared_gate.weight  # layer 0 is dense (mlp_only_layers)
    assert isinstance(gate, DTensor) and (gate.to_local().numel() == 0) == (rank == 1)
    for p, value in ref_norms.items():
        assert math.isclose(norms.norms[p], value, rel_tol=1e-5), (p, norms.norms[p], value)


# -- expert-choice routing: every rank's experts pick among that rank's tokens -------------------------------------


def _expert_choice_layer(rank: int, world: int, out: Path) -> None:
    dim, tokens = 16, 12
    torch.manual_seed(0)
    config = MoEConfig(
        dim=dim,
        router=RouterConfig(num_experts=4, top_k=2, kind="expert_choice"),
        experts=ExpertsConfig(hidden_dim=32, init_std=0.2),
        capacity_factor=1.0,
    )
    ref = MoELayer(config)
    layer = MoELayer(config)
    layer.load_state_dict(ref.state_dict())
    apply_expert_parallel(layer, init_device_mesh("cpu", (world,)), expert_grad_scale=1.0)

    generator = torch.Generator().manual_seed(3)
    x_RBSD = torch.randn(world, 2, tokens // 2, dim, generator=generator)
    g_RBSD = torch.randn(x_RBSD.shape, generator=generator)
    mask_RBS = torch.ones(x_RBSD.shape[:-1], dtype=torch.bool)
    mask_RBS[1, 1, 2:] = False  # rank 1 has padding: its experts take fewer live tokens
    # One process, each rank's tokens as their own forward (expert choice counts capacity per forward).
    ref_out = []
    for r in range(world):
        y, _ = ref(x_RBSD[r], mask_RBS[r])
        (y * g_RBSD[r]).sum().backward()
        ref_out.append(y.detach())

    y, _ = layer(x_RBSD[rank], mask_RBS[rank])
    (y * g_RBSD[rank]).sum().backward()
    torch.testing.assert_close(y, ref_out[rank], atol=1e-6, rtol=1e-5)
    # Each expert gets its copies from both ranks: its gradient is the sum; the router's is summed over ranks.
    for name in ("w1", "w3", "w2"):
        torch.testing.assert_close(
            _full(getattr(layer.experts, name).grad), getattr(ref.experts, name).grad, atol=1e-6, rtol=1e-5, msg=name
        )
    router_grad = layer.router.gate.weight.grad.clone()
    dist.all_reduce(router_grad)
    torch.testing.assert_close(router_grad, ref.router.gate.weight.grad, atol=1e-6, rtol=1e-5)


# -- a checkpoint saved at EP=2 reshards to one process and to EP=1 x DP=2, optimizer state included ---------------


def _state(module: pl.LightningModule, trainer: pl.Trainer) -> tuple[dict, dict]:
    weights = {name: _full(value).clone() for name, value in module.state_dict().items()}
    optim = get_optimizer_state_dict(
        trainer.strategy.model, trainer.optimizers[0], options=StateDictOptions(full_state_dict=True)
    )
    return weights, optim


def _deepseek() -> CausalLMModule:
    torch.manual_seed(0)
    return CausalLMModule(arch="deepseek-tiny", overrides=DEEPSEEK, lr=1e-2, warmup_steps=0)


def _checkpoint_reshards(rank: int, world: int, out: Path) -> None:
    batch = _global_batch(world, seed=4)
    ckpt = out / "deepseek.ckpt"
    module = _deepseek()
    trainer = ep_trainer(world, 2, max_steps=1, callbacks=[LoadBalancingBias(gamma=0.01)])
    trainer.fit(module, train_dataloaders=_local(batch, rank))
    trainer.save_checkpoint(ckpt)
    saved_weights, saved_optim = _state(module, trainer)
    biases = [name for name in saved_weights if name.endswith("score_bias")]
    assert biases and all(saved_weights[name].abs().sum() > 0 for name in biases)  # the callback moved them

    resumed = _deepseek()
    trainer = ep_trainer(world, 1, max_steps=1)  # EP=1 x DP=2: already done, restores and takes no step
    trainer.fit(resumed, train_dataloaders=_local(batch, rank), ckpt_path=ckpt)
    w1 = resumed.model.layers[1].ffn.experts.w1
    assert isinstance(w1, DTensor) and w1.to_local().shape[0] == DEEPSEEK["num_experts"] // world  # FSDP's halves
    weights, optim = _state(resumed, trainer)
    assert weights.keys() == saved_weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, saved_weights[name], atol=0, rtol=0, msg=name)
    assert optim["state"].keys() == saved_optim["state"].keys()
    for name, state in optim["state"].items():
        for field, value in state.items():
            torch.testing.assert_close(_full(value), _full(saved_optim["state"][name][field]), atol=0, rtol=0)

    if rank == 0:  # a plain single-process module, no process group involved
        plain = load_distributed_checkpoint(_deepseek(), ckpt)
        for name, value in plain.state_dict().items():
            torch.testing.assert_close(value, saved_weights[name], atol=0, rtol=0, msg=name)


CHECKS: dict[str, Callable[[int, int, Path], None]] = {
    "test_loss": _test_loss_is_global,
    "sequence_capacity": _sequence_capacity_matches_single_process,
    "expert_choice": _expert_choice_layer,
    "norms_empty_shards": _norms_with_empty_shards,
    "checkpoint": _checkpoint_reshards,
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_checks(__name__, 2, tmp_path_factory.mktemp("ep_corners"))


def test_test_loss_under_expert_parallelism_is_the_loss_of_all_ranks_batches(results: Path) -> None:
    # trainer.test logged each rank's own batch loss (rank 0's reached the logger and the returned results).
    assert_check_ok(results, "test_loss")


def test_capacity_per_sequence_under_expert_parallelism_matches_single_process(results: Path) -> None:
    # Loss, 2- and inf-norm of the gradients (over both meshes) and the SGD step, with copies dropped.
    assert_check_ok(results, "sequence_capacity")


def test_gradient_norms_2_and_inf_count_ranks_holding_empty_shards(results: Path) -> None:
    assert_check_ok(results, "norms_empty_shards")


def test_expert_choice_routing_under_expert_parallelism_matches_per_rank_forwards(results: Path) -> None:
    assert_check_ok(results, "expert_choice")


def test_checkpoint_saved_at_ep2_reshards_to_ep1_and_one_process_with_optimizer_state(results: Path) -> None:
    # DeepSeek-V3 style with LoadBalancingBias: the score biases (buffers) travel too.
    assert_check_ok(results, "checkpoint")
