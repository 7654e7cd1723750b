"""ExpertParallelStrategy: one training step equals the single-process step on the same global batch."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from lightning_moe.callbacks import LoadBalancingBias
from lightning_moe.nn.losses import bias_update
from lightning_moe.nn.moe import MoELayer
from lightning_moe.strategies import AllToAllDispatcher, ExpertParallelStrategy
from tests.strategies._distributed import Seq2SeqSGDModule, SGDModule, ep_trainer, run_distributed

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
    # V3's multi-token prediction: its module's norm runs where FSDP has the module's weights.
    "deepseek-tiny+mtp": {"vocab_size": 64, "num_layers": 2, "num_experts": 8, "mtp_depth": 1},
    # Random routing draws its second expert per rank, so it cannot match one process draw for draw.
    "glam-tiny": {"vocab_size": 64, "dim": 32, "num_heads": 2, "ffn_hidden": 32, "num_experts": 4,
                  "random_routing": False},
    # Capacity counted on each rank's tokens drops other copies than one process would: dropless. Router
    # jitter draws per rank too.
    "switch-tiny": {"vocab_size": 64, "dim": 32, "num_heads": 2, "head_dim": 16, "ffn_hidden": 32,
                    "num_experts": 4, "capacity_factor": None, "router_jitter": 0.0},
}  # fmt: skip
VOCAB = 64
ROWS_PER_RANK, SEQ = 2, 17


class _LossCapture(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.loss = outputs["loss"].detach().clone()


def _module(arch: str) -> SGDModule | Seq2SeqSGDModule:
    # The strategy sums the expert counts over ranks for the load-balancing loss, so the per-rank losses
    # average to the global batch's loss: a large coefficient makes any mismatch visible.
    torch.manual_seed(0)
    cls = Seq2SeqSGDModule if arch.startswith("switch") else SGDModule
    return cls(arch=arch.split("+")[0], overrides=OVERRIDES[arch], load_balance_coef=0.5, z_loss_coef=1e-3)


def _reference_step(
    arch: str, batch: torch.Tensor, bf16: bool = False, clip: float | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[float]]:
    ref = _module(arch)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = ref._loss(batch)
        ce, stats = out[0], out[-2]
        aux, _ = ref.aux_loss(stats)
    loss = ce + aux
    if len(out) == 4 and out[1]:  # CausalLMModule's multi-token-prediction loss, the mean over depths
        loss = loss + ref.mtp_loss_coef * torch.stack(out[1]).mean()
    loss.backward()
    if clip is not None:
        assert torch.nn.utils.clip_grad_norm_(ref.parameters(), clip) > 2 * clip  # the clipping changes the step
    with torch.no_grad():
        for p in ref.parameters():
            if p.grad is not None:
                p -= p.grad
    counts = [float(layer.tokens_per_expert.sum()) for layer in ref.modules() if isinstance(layer, MoELayer)]
    return loss.detach(), {name: p.detach() for name, p in ref.model.named_parameters()}, counts


def _one_step_matches_single_process(
    rank: int,
    world: int,
    ep: int,
    arch: str,
    activation_checkpointing: bool = False,
    bf16: bool = False,
    clip: float | None = None,
    param_dtype: str | None = None,
) -> None:
    batch = torch.randint(0, VOCAB, (world * ROWS_PER_RANK, SEQ), generator=torch.Generator().manual_seed(5))
    ref_loss, ref_params, ref_counts = _reference_step(arch, batch, bf16, clip)
    # bf16-mixed: the same autocast math, summed in another order over the ranks (bf16 rounding). FSDP2's
    # param_dtype: bf16 weights, activations and gradients against the float32 reference.
    tol = 2e-2 if param_dtype else 2e-3 if bf16 else 1e-5

    module = _module(arch)
    capture = _LossCapture()
    trainer = ep_trainer(
        world,
        ep,
        max_steps=1,
        callbacks=[capture],
        strategy_kwargs={"activation_checkpointing": activation_checkpointing, "param_dtype": param_dtype},
        precision="bf16-mixed" if bf16 else "32-true",
        gradient_clip_val=clip,
    )
    local = batch[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]
    trainer.fit(module, train_dataloaders=DataLoader(local, batch_size=ROWS_PER_RANK))

    layers = [m for m in module.modules() if isinstance(m, MoELayer)]
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
    # Every layer counted this rank's tokens once (its share of the global batch's), recomputed forwards included.
    assert len(layers) == len(ref_counts)
    for layer, count in zip(layers, ref_counts, strict=True):
        assert float(layer.tokens_per_expert.sum()) == count / world


@pytest.mark.parametrize(
    ("arch", "world", "ep"),
    [
        ("mixtral-tiny", 2, 2),
        ("mixtral-tiny", 4, 2),
        ("qwen-moe-tiny", 2, 2),
        ("deepseek-tiny", 2, 2),
        ("deepseek-tiny+mtp", 2, 2),
        ("glam-tiny", 2, 2),
        ("switch-tiny", 2, 2),
    ],
)
def test_one_training_step_matches_single_process(arch: str, world: int, ep: int) -> None:
    run_distributed(_one_step_matches_single_process, world, ep, arch)


def test_one_training_step_with_activation_checkpointing_matches_single_process() -> None:
    run_distributed(_one_step_matches_single_process, 2, 2, "mixtral-tiny", True)


def test_one_bf16_mixed_training_step_matches_single_process() -> None:
    # The experts' outputs come back in bf16 and the rows travel in bf16 (half the all-to-all bytes).
    run_distributed(_one_step_matches_single_process, 2, 2, "mixtral-tiny", False, True)


def test_one_training_step_with_bf16_fsdp_parameters_matches_single_process() -> None:
    # FSDP2 mixed precision without autocast: the blocks run in bf16 (it failed the MoE layer's dtype check).
    run_distributed(_one_step_matches_single_process, 2, 2, "mixtral-tiny", False, False, None, "bfloat16")


@pytest.mark.parametrize(("world", "bf16"), [(2, False), (2, True), (4, False)])
def test_one_training_step_with_gradient_clipping_matches_single_process(world: int, bf16: bool) -> None:
    # The expert weights' gradients live on the (data, expert) mesh, the others on the flat FSDP mesh: the
    # total norm spans both (torch's clip_grad_norm_ cannot stack norms from two meshes).
    run_distributed(_one_step_matches_single_process, world, 2, "mixtral-tiny", False, bf16, 0.05)


class _LoadRecorder(pl.Callback):
    """Keeps each bias layer's rank-local load as the step saw it, before LoadBalancingBias sums it over ranks."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.local_loads = [layer.tokens_per_expert.clone() for layer in _bias_layers(pl_module)]


def _bias_layers(module: torch.nn.Module) -> list[MoELayer]:
    return [m for m in module.modules() if isinstance(m, MoELayer) and m.router.score_bias is not None]


def _bias_steps_match_single_process(rank: int, world: int, gamma: float) -> None:
    steps = 2
    batches = torch.randint(0, VOCAB, (steps, world * ROWS_PER_RANK, SEQ), generator=torch.Generator().manual_seed(7))
    # One process: step on the global batch, update the biases from its loads, apply SGD; twice.
    ref = _module("deepseek-tiny")
    ref_biases = []
    for batch in batches:
        ce, _, stats, _ = ref._loss(batch)
        (ce + ref.aux_loss(stats)[0]).backward()
        for layer in _bias_layers(ref):
            layer.update_bias(gamma)
        ref_biases.append([layer.router.score_bias.clone() for layer in _bias_layers(ref)])
        with torch.no_grad():
            for p in ref.parameters():
                if p.grad is not None:
                    p -= p.grad
                    p.grad = None

    module = _module("deepseek-tiny")
    recorder = _LoadRecorder()
    trainer = ep_trainer(world, world, max_steps=steps, callbacks=[recorder, LoadBalancingBias(gamma=gamma)])
    local = batches[:, rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK].reshape(-1, SEQ)
    trainer.fit(module, train_dataloaders=DataLoader(local, batch_size=ROWS_PER_RANK))

    layers = _bias_layers(module)
    assert layers
    for layer, expected in zip(layers, ref_biases[-1], strict=True):
        torch.testing.assert_close(layer.router.score_bias, expected, atol=1e-6, rtol=0)
    # The second step routed with the updated biases, so its parameters only match if the biases did.
    for name, param in module.model.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        torch.testing.assert_close(
            full.detach(), dict(ref.model.named_parameters())[name].detach(), atol=1e-5, rtol=1e-5,
            msg=lambda m, n=name: f"{n}: {m}",
        )  # fmt: skip
    # The test has teeth: an update from this rank's own load alone would give other biases.
    local_only = [
        bias_update(before, load, gamma) for before, load in zip(ref_biases[0], recorder.local_loads, strict=True)
    ]
    differs = torch.tensor(float(any(not torch.equal(a, b) for a, b in zip(local_only, ref_biases[-1], strict=True))))
    dist.all_reduce(differs)
    assert differs > 0


def test_load_balancing_bias_under_expert_parallelism_matches_single_process() -> None:
    # LoadBalancingBias sums the loads over the ranks before updating, so every rank applies the bias one
    # process would from the global batch; the second step routes with it.
    run_distributed(_bias_steps_match_single_process, 2, 0.01)


def _indivisible_expert_count_is_refused(rank: int, world: int) -> None:
    module = SGDModule(arch="mixtral-tiny", overrides={**OVERRIDES["mixtral-tiny"], "num_experts": 3})
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=ExpertParallelStrategy(), max_steps=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"num_experts=3 is invalid for expert_parallel_size=2.*'auto' is the world"):
        trainer.fit(module, train_dataloaders=DataLoader(torch.zeros(2, SEQ, dtype=torch.long), batch_size=2))


def test_an_expert_count_the_mesh_does_not_divide_is_refused_naming_the_setting() -> None:
    run_distributed(_indivisible_expert_count_is_refused, 2)


def _skip_policy_is_refused(rank: int, world: int) -> None:
    module = SGDModule(arch="mixtral-tiny", overrides=OVERRIDES["mixtral-tiny"], nan_policy="skip")
    trainer = ep_trainer(world, world, max_steps=1)
    batch = torch.randint(0, VOCAB, (ROWS_PER_RANK, SEQ))
    with pytest.raises(ValueError, match=rf"nan_policy='skip' is invalid with {world} processes"):
        trainer.fit(module, train_dataloaders=DataLoader(batch, batch_size=ROWS_PER_RANK))


def test_skipping_non_finite_batches_is_refused_before_training_with_several_processes() -> None:
    run_distributed(_skip_policy_is_refused, 2)


def _to_hf_of_a_sharded_module(rank: int, world: int, out: str) -> None:
    from lightning_moe.interop import to_hf

    module = _module("mixtral-tiny")
    trainer = ep_trainer(world, world, max_steps=1)
    batch = torch.randint(0, VOCAB, (ROWS_PER_RANK, SEQ))
    trainer.fit(module, train_dataloaders=DataLoader(batch, batch_size=ROWS_PER_RANK))
    with pytest.raises(ValueError, match=r"model is invalid for to_hf: its parameters are sharded over processes"):
        to_hf(module, out)


def test_to_hf_of_a_sharded_module_says_how_to_export(tmp_path) -> None:
    run_distributed(_to_hf_of_a_sharded_module, 2, str(tmp_path / "hf"))
