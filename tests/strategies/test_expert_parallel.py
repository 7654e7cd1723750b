"""ExpertParallelStrategy: one training step equals the single-process step on the same global batch."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from lightning_moe.module import CausalLMModule
from lightning_moe.strategies import AllToAllDispatcher, ExpertParallelStrategy
from tests.strategies._distributed import run_distributed

pytestmark = pytest.mark.multiprocess

OVERRIDES = {
    "mixtral-tiny": {
        "vocab_size": 64,
        "dim": 32,
        "num_heads": 2,
        "num_kv_heads": 1,
        "ffn_hidden": 32,
        "num_experts": 4,
    },
    "qwen-moe-tiny": {
        "vocab_size": 64,
        "dim": 32,
        "num_layers": 2,
        "num_heads": 2,
        "num_kv_heads": 1,
        "num_experts": 4,
    },
    "deepseek-tiny": {"vocab_size": 64, "num_layers": 2, "num_experts": 8},
}
VOCAB = 64
ROWS_PER_RANK, SEQ = 2, 17


class _SGDModule(CausalLMModule):
    """SGD with lr 1: the parameter update is the gradient itself, so the test sees any gradient error."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)


class _LossCapture(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.loss = outputs["loss"].detach().clone()


def _module(arch: str) -> _SGDModule:
    # The strategy sums the expert counts over ranks for the load-balancing loss, so the per-rank losses
    # average to the global batch's loss: a large coefficient makes any mismatch visible.
    torch.manual_seed(0)
    return _SGDModule(arch=arch, overrides=OVERRIDES[arch], load_balance_coef=0.5, z_loss_coef=1e-3)


def _reference_step(
    arch: str, batch: torch.Tensor, bf16: bool = False, clip: float | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ref = _module(arch)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        ce, _, stats, _ = ref._loss(batch)
        aux, _ = ref.aux_loss(stats)
    loss = ce + aux
    loss.backward()
    if clip is not None:
        assert torch.nn.utils.clip_grad_norm_(ref.parameters(), clip) > 2 * clip  # the clipping changes the step
    with torch.no_grad():
        for p in ref.parameters():
            if p.grad is not None:
                p -= p.grad
    return loss.detach(), {name: p.detach() for name, p in ref.model.named_parameters()}


def _one_step_matches_single_process(
    rank: int,
    world: int,
    ep: int,
    arch: str,
    activation_checkpointing: bool = False,
    bf16: bool = False,
    clip: float | None = None,
) -> None:
    batch = torch.randint(0, VOCAB, (world * ROWS_PER_RANK, SEQ), generator=torch.Generator().manual_seed(5))
    ref_loss, ref_params = _reference_step(arch, batch, bf16, clip)
    # bf16-mixed: the same autocast math, summed in another order over the ranks (bf16 rounding).
    tol = 2e-3 if bf16 else 1e-5

    module = _module(arch)
    capture = _LossCapture()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=ExpertParallelStrategy(expert_parallel_size=ep, activation_checkpointing=activation_checkpointing),
        precision="bf16-mixed" if bf16 else "32-true",
        gradient_clip_val=clip,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[capture],
    )
    local = batch[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]
    trainer.fit(module, train_dataloaders=DataLoader(local, batch_size=ROWS_PER_RANK))

    layers = [m for m in module.modules() if hasattr(m, "dispatcher")]
    assert layers and all(isinstance(m.dispatcher, AllToAllDispatcher) for m in layers)
    w1 = layers[0].experts.w1
    assert isinstance(w1, DTensor) and w1.to_local().shape[0] == OVERRIDES[arch]["num_experts"] // world

    loss = capture.loss
    dist.all_reduce(loss)
    torch.testing.assert_close(loss / world, ref_loss, atol=tol, rtol=tol)
    for name, param in module.model.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        name = name.replace("_checkpoint_wrapped_module.", "")
        torch.testing.assert_close(
            full.detach(), ref_params[name], atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}"
        )
    # Every layer counted this rank's tokens once, recomputed forwards included.
    top_k = layers[0].config.router.top_k
    for layer in layers:
        assert float(layer.tokens_per_expert.sum()) == ROWS_PER_RANK * (SEQ - 1) * top_k


@pytest.mark.parametrize(
    ("arch", "world", "ep"),
    [("mixtral-tiny", 2, 2), ("mixtral-tiny", 4, 2), ("qwen-moe-tiny", 2, 2), ("deepseek-tiny", 2, 2)],
)
def test_one_training_step_matches_single_process(arch: str, world: int, ep: int) -> None:
    run_distributed(_one_step_matches_single_process, world, ep, arch)


def test_one_training_step_with_activation_checkpointing_matches_single_process() -> None:
    run_distributed(_one_step_matches_single_process, 2, 2, "mixtral-tiny", True)


def test_one_bf16_mixed_training_step_matches_single_process() -> None:
    # The experts' outputs come back in bf16 and the rows travel in bf16 (half the all-to-all bytes).
    run_distributed(_one_step_matches_single_process, 2, 2, "mixtral-tiny", False, True)


@pytest.mark.parametrize(("world", "bf16"), [(2, False), (2, True), (4, False)])
def test_one_training_step_with_gradient_clipping_matches_single_process(world: int, bf16: bool) -> None:
    # The expert weights' gradients live on the (data, expert) mesh, the others on the flat FSDP mesh: the
    # total norm spans both (torch's clip_grad_norm_ cannot stack norms from two meshes).
    run_distributed(_one_step_matches_single_process, world, 2, "mixtral-tiny", False, bf16, 0.05)
