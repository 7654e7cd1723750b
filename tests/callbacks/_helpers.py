"""Tiny models, data and trainers for the callback tests, and a reader for what TensorBoard got."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from lightning_moe.module import CausalLMModule

VOCAB = 64
SEQ = 16
# top-2 of 8: a router whose rows all point one way picks the two largest coefficients (x.v > 0) or the two
# smallest (x.v < 0); the four middle experts (2..5) never get a token.
SKEW = (4.0, 3.0, 0.1, 0.2, 0.3, 0.4, -3.0, -4.0)


def tiny_mixtral(lr: float = 1e-3, **overrides: Any) -> CausalLMModule:
    """A 2-layer, 8-expert, top-2 Mixtral of ~60k parameters with no auxiliary loss."""
    base = dict(vocab_size=VOCAB, dim=32, num_layers=2, num_heads=2, num_kv_heads=1, ffn_hidden=32, max_seq_len=64)
    return CausalLMModule(
        arch="mixtral-tiny",
        overrides={**base, **overrides},
        lr=lr,
        warmup_steps=0,
        load_balance_coef=0.0,
        z_loss_coef=0.0,
    )


def tiny_deepseek(lr: float = 1e-3, **overrides: Any) -> CausalLMModule:
    """A DeepSeek-V3-style model (sigmoid scores, selection bias) with one dense and one MoE layer, no aux loss."""
    base = dict(
        vocab_size=VOCAB, dim=32, num_layers=2, num_heads=2, attention="mha", first_k_dense=1, dense_hidden=32,
        moe_hidden=16, n_shared_experts=1, num_experts=8, top_k=2, n_group=1, topk_group=1, max_seq_len=64,
    )  # fmt: skip
    return CausalLMModule(
        arch="deepseek-tiny",
        overrides={**base, **overrides},
        lr=lr,
        warmup_steps=0,
        load_balance_coef=0.0,
        z_loss_coef=0.0,
        seq_balance_coef=0.0,
    )


@torch.no_grad()
def skew_routers(module: CausalLMModule, coefs: tuple[float, ...] = SKEW, seed: int = 0) -> None:
    """Point every router row along one random direction with the given coefficients (a collapsed router)."""
    generator = torch.Generator().manual_seed(seed)
    for _, layer in module.moe_layers:
        weight = layer.router.gate.weight
        direction = torch.randn(weight.shape[1], generator=generator)
        weight.copy_(torch.tensor(coefs)[:, None] * direction[None, :] / math.sqrt(weight.shape[1]))


def loader(num_batches: int = 8, batch_size: int = 4, seed: int = 0) -> DataLoader:
    """Random ``(B, SEQ + 1)`` token blocks."""
    blocks = torch.randint(0, VOCAB, (num_batches * batch_size, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return DataLoader(blocks, batch_size=batch_size, shuffle=False)


def trainer(tmp_path: Path, callbacks: list[Callback], max_steps: int, **kwargs: Any) -> L.Trainer:
    """A CPU trainer that logs every step to TensorBoard under ``tmp_path``, with no validation."""
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=TensorBoardLogger(tmp_path, name="tb", version=0),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=1,
    )
    options.update(kwargs)
    return L.Trainer(**options)


class StatsRecorder(Callback):
    """Keeps, per training batch, each layer's chosen experts and drop counts as the layers returned them."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = outputs["router_stats"]
        self.batches.append(
            {
                "step": trainer.global_step,
                "expert_ids": [s.expert_ids.clone() for s in stats],
                "dropped": [int(s.num_dropped) for s in stats],
                "tokens": [int(s.num_tokens) for s in stats],
                "entropy": [float(s.router_entropy) for s in stats],
            }
        )

    def routed(self, layer: int, num_experts: int, steps: range | None = None) -> torch.Tensor:
        """``(E,)`` copies routed to each expert, counted from the chosen expert ids."""
        counts = torch.zeros(num_experts, dtype=torch.float64)
        for record in self.batches:
            if steps is None or record["step"] in steps:
                ids = record["expert_ids"][layer]
                counts += torch.bincount(ids[ids >= 0], minlength=num_experts).double()
        return counts


def read_events(tmp_path: Path) -> EventAccumulator:
    """Everything the TensorBoard logger wrote, read back with TensorBoard's own event reader."""
    accumulator = EventAccumulator(
        str(tmp_path / "tb" / "version_0"), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}
    )
    accumulator.Reload()
    return accumulator


def scalars(events: EventAccumulator, tag: str) -> dict[int, float]:
    """A scalar tag's values by step."""
    return {event.step: event.value for event in events.Scalars(tag)}
