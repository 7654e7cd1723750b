"""``torch.compile`` of zoo models block by block: the same losses, gradients and training as uncompiled, no
recompilation as the routing changes from step to step, and the module's ``compile`` argument."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch._dynamo
from torch.utils.data import DataLoader

from lightning_moe import zoo
from lightning_moe.module import CausalLMModule, Seq2SeqLMModule
from lightning_moe.nn.compile import blocks, compile_blocks
from tests._helpers import QUIET, batch_loader, compiled_graphs, quiet_trainer
from tests.strategies._distributed import ep_trainer, run_distributed

VOCAB = 64
TINY = {
    "mixtral-tiny": {"vocab_size": VOCAB, "dim": 32, "num_heads": 2, "num_kv_heads": 1, "ffn_hidden": 32},
    "deepseek-tiny": {"vocab_size": VOCAB, "num_layers": 2, "num_experts": 8},
    "qwen-moe-tiny": {"vocab_size": VOCAB, "num_layers": 2},
    "glam-tiny": {"vocab_size": VOCAB, "num_layers": 2, "dim": 32, "ffn_hidden": 64, "num_heads": 2},
    "switch-tiny": {"vocab_size": VOCAB, "num_layers": 2, "dim": 32, "ffn_hidden": 32, "num_heads": 2},
}


pytestmark = [QUIET, pytest.mark.usefixtures("fresh_dynamo")]


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids, ids, targets=ids) if hasattr(model, "encoder") else model(ids, targets=ids)
    aux = sum(loss for stats in out.router_stats for loss in stats.losses.values())
    return out.loss + aux


def _seeded_loss(model: torch.nn.Module, ids: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)  # the same router jitter (Switch) in both models
    return _loss(model, ids)


def _assert_same_step(eager: torch.nn.Module, compiled: torch.nn.Module, step: int, atol: float) -> None:
    """One forward and backward of both models on the step's batch: the same loss and gradients (then cleared)."""
    ids = _batch(step)
    ref, got = _seeded_loss(eager, ids, step), _seeded_loss(compiled, ids, step)
    ref.backward()
    got.backward()
    torch.testing.assert_close(got, ref, atol=atol, rtol=atol)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=atol, rtol=10 * atol, msg=lambda m, n=name: f"{n}: {m}")
        p.grad = q.grad = None


def _batch(step: int, rows: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, 16), generator=torch.Generator().manual_seed(step))


@pytest.mark.parametrize("arch", list(TINY))
def test_compiled_blocks_give_the_same_losses_and_gradients_without_recompiling(arch: str) -> None:
    torch.manual_seed(0)
    eager = zoo.build(arch, **TINY[arch])
    compiled = compile_blocks(copy.deepcopy(eager), backend="aot_eager")
    assert all(module_list[i]._compiled_call_impl is not None for module_list, i in blocks(compiled))

    graphs = [compiled_graphs()]
    for step in range(4):  # each step routes the tokens differently: the expert loads change
        _assert_same_step(eager, compiled, step, atol=1e-6)
        graphs.append(compiled_graphs())
    assert graphs[1] > graphs[0]
    assert graphs[2:] == [graphs[1]] * 3  # the routing changed, nothing recompiled


def test_tracing_the_dispatch_would_recompile_as_the_routing_changes() -> None:
    """What keeping the dispatch out of the graph avoids: traced, it recompiles for new expert loads."""
    from lightning_moe.nn import moe

    torch.manual_seed(0)
    model = compile_blocks(zoo.build("mixtral-tiny", **TINY["mixtral-tiny"]), backend="aot_eager")
    original = moe._dispatch_eagerly
    moe._dispatch_eagerly = moe._dispatch  # the same function, without torch.compiler.disable
    try:
        counts = []
        for step in range(2):
            _loss(model, _batch(step)).backward()
            counts.append(compiled_graphs())
    finally:
        moe._dispatch_eagerly = original
    assert counts[1] > counts[0]


def test_compile_blocks_is_idempotent_and_keeps_the_state_dict() -> None:
    model = zoo.build("mixtral-tiny", **TINY["mixtral-tiny"])
    names = list(model.state_dict())
    compile_blocks(model, backend="aot_eager")
    impls = [module_list[i]._compiled_call_impl for module_list, i in blocks(model)]
    compile_blocks(model, backend="aot_eager")
    assert [module_list[i]._compiled_call_impl for module_list, i in blocks(model)] == impls
    assert list(model.state_dict()) == names


def test_compile_blocks_refuses_unknown_backends_and_models_without_blocks() -> None:
    with pytest.raises(
        ValueError, match=r"backend='nope' is invalid: must be a torch.compile backend, one of .*inductor"
    ):
        compile_blocks(zoo.build("mixtral-tiny", **TINY["mixtral-tiny"]), backend="nope")
    with pytest.raises(ValueError, match=r"model=Linear is invalid: it has no blocks"):
        compile_blocks(torch.nn.Linear(2, 2), backend="aot_eager")


def _fit(module: L.LightningModule, steps: int) -> None:
    trainer = quiet_trainer(max_steps=steps, gradient_clip_val=1.0)
    trainer.fit(module, batch_loader([_batch(step, rows=4) for step in range(steps)]))


@pytest.mark.parametrize(("cls", "arch"), [(CausalLMModule, "deepseek-tiny"), (Seq2SeqLMModule, "switch-tiny")])
def test_module_with_compile_trains_as_without(cls: type, arch: str) -> None:
    weights = []
    for backend in (False, "aot_eager"):
        torch.manual_seed(0)
        module = cls(arch=arch, overrides=TINY[arch], compile=backend)
        start = {name: p.clone() for name, p in module.model.state_dict().items()}
        _fit(module, steps=3)
        compiled = [module_list[i]._compiled_call_impl is not None for module_list, i in blocks(module.model)]
        assert all(compiled) if backend else not any(compiled)
        weights.append(module.model.state_dict())
    assert not torch.equal(weights[1]["lm_head.weight"], start["lm_head.weight"])  # it trained
    for name, ref in weights[0].items():
        torch.testing.assert_close(weights[1][name], ref, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("value", ["nope", 1, None])
def test_module_refuses_a_bad_compile_value_naming_it(value: object) -> None:
    with pytest.raises(ValueError, match=rf"compile={value!r} is invalid: must be"):
        CausalLMModule(arch="mixtral-tiny", overrides=TINY["mixtral-tiny"], compile=value)


def test_inductor_compiled_training_step_matches_eager() -> None:
    """The default backend, generating C++ for the CPU, on Mixtral's blocks: two forwards and backwards."""
    torch.manual_seed(0)
    eager = zoo.build("mixtral-tiny", **TINY["mixtral-tiny"])
    compiled = compile_blocks(copy.deepcopy(eager))
    for step in range(2):
        _assert_same_step(eager, compiled, step, atol=1e-5)


def test_generate_runs_uncompiled_and_matches() -> None:
    torch.manual_seed(0)
    module = CausalLMModule(arch="mixtral-tiny", overrides=TINY["mixtral-tiny"], compile="aot_eager")
    prompt = _batch(0)[:, :5]
    ref = module.generate(prompt, max_new_tokens=6, temperature=0)
    module.configure_model()  # what the Trainer calls: compiles the blocks
    before = compiled_graphs()
    got = module.generate(prompt, max_new_tokens=6, temperature=0)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    assert compiled_graphs() == before  # no position of the generation compiled anything
    _loss(module.model, _batch(1)).backward()
    assert compiled_graphs() > before  # while the forward of training does


class _SGDModule(CausalLMModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)


def _compiled_expert_parallel_step(rank: int, world: int) -> None:
    from torch.distributed.tensor import DTensor

    rows = 2
    batch = torch.randint(0, VOCAB, (world * rows, 17), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    ref = _SGDModule(arch="mixtral-tiny", overrides=TINY["mixtral-tiny"], load_balance_coef=0.5)
    ce, _, stats, _ = ref._loss(batch)
    (ce + ref.aux_loss(stats)[0]).backward()
    expected = {name: (p - p.grad).detach() for name, p in ref.model.named_parameters()}

    torch.manual_seed(0)
    module = _SGDModule(arch="mixtral-tiny", overrides=TINY["mixtral-tiny"], load_balance_coef=0.5, compile="aot_eager")
    trainer = ep_trainer(world, world, max_steps=1, strategy_kwargs={"activation_checkpointing": True})
    trainer.fit(module, train_dataloaders=DataLoader(batch[rank * rows : (rank + 1) * rows], batch_size=rows))
    assert compiled_graphs() > 0
    for name, param in module.model.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        name = name.replace("_checkpoint_wrapped_module.", "")
        torch.testing.assert_close(
            full.detach(), expected[name], atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.multiprocess
def test_compiled_blocks_under_expert_parallelism_and_checkpointing_match_one_process() -> None:
    run_distributed(_compiled_expert_parallel_step, 2)
