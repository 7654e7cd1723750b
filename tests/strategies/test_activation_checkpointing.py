"""Activation checkpointing of decoder blocks: same loss, gradients and expert counts; blocks really recompute."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.utils.checkpoint import set_checkpoint_early_stop

from lightning_moe.module import CausalLMModule
from lightning_moe.strategies import apply_activation_checkpointing, moe_layers

OVERRIDES = {
    "mixtral-tiny": {"vocab_size": 64, "dim": 32, "num_heads": 2, "num_kv_heads": 1, "ffn_hidden": 32},
    "deepseek-tiny": {"vocab_size": 64, "num_layers": 2, "num_experts": 8},
}


def _step(arch: str, checkpointed: bool, early_stop: bool = True) -> tuple[CausalLMModule, torch.Tensor, int]:
    """One forward and backward of the loss; returns the module, the loss and the number of MoE forwards."""
    torch.manual_seed(0)
    module = CausalLMModule(arch=arch, overrides=OVERRIDES[arch], load_balance_coef=0.5, z_loss_coef=1e-3)
    if checkpointed:
        apply_activation_checkpointing(module.model)
    calls = []
    for layer in moe_layers(module.model):
        layer.register_forward_pre_hook(lambda *_: calls.append(1))
    batch = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(1))
    # Early stop ends a recompute once it has rebuilt what backward needs, which may be before the layer adds
    # to its counters; without it the whole forward, counter update included, runs again.
    with set_checkpoint_early_stop(early_stop):
        ce, _, stats, _ = module._loss(batch)
        loss = ce + module.aux_loss(stats)[0]
    loss.backward()
    return module, loss.detach(), len(calls)


@pytest.mark.parametrize("early_stop", [True, False])
@pytest.mark.parametrize("arch", ["mixtral-tiny", "deepseek-tiny"])
def test_checkpointed_step_matches_plain_step(arch: str, early_stop: bool) -> None:
    plain, plain_loss, plain_calls = _step(arch, checkpointed=False)
    ckpt, ckpt_loss, ckpt_calls = _step(arch, checkpointed=True, early_stop=early_stop)

    assert all(isinstance(block, CheckpointWrapper) for block in ckpt.model.layers)
    assert ckpt_calls == 2 * plain_calls > 0  # every MoE layer ran again in backward
    torch.testing.assert_close(ckpt_loss, plain_loss, atol=0, rtol=0)
    plain_params = dict(plain.model.named_parameters())
    for name, param in ckpt.model.named_parameters():
        ref = plain_params[name.replace("_checkpoint_wrapped_module.", "")]
        torch.testing.assert_close(param.grad, ref.grad, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # The recomputed forward must not count the tokens a second time.
    for plain_layer, ckpt_layer in zip(moe_layers(plain.model), moe_layers(ckpt.model), strict=True):
        assert plain_layer.tokens_per_expert.sum() > 0
        torch.testing.assert_close(ckpt_layer.tokens_per_expert, plain_layer.tokens_per_expert, atol=0, rtol=0)


def test_checkpointing_keeps_state_dict_names_and_is_idempotent() -> None:
    module = CausalLMModule(arch="mixtral-tiny", overrides=OVERRIDES["mixtral-tiny"])
    names = set(module.state_dict())
    apply_activation_checkpointing(module.model)
    apply_activation_checkpointing(module.model)
    assert set(module.state_dict()) == names
    assert not any(isinstance(m, CheckpointWrapper) for block in module.model.layers for m in block.children())
