"""Train mixtral-tiny for a few hundred steps and save the expert-load heatmap as docs/expert-load-heatmap.png.

    python docs/make_heatmap.py            # about 20 seconds on 2 CPU cores

The model has 4 MoE layers of 8 experts (top-2) and trains without the load-balancing loss, so the picture
shows the uneven loads a router drifts into on its own. The image is the one ``ExpertLoadMonitor`` logs to
TensorBoard as ``moe/load_heatmap`` (rows: layers; columns: experts; blue starving, white balanced, red
overloaded; colour bar 0x to 2x the balanced load), scaled up 2x for the README.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import numpy as np

from lightning_moe.callbacks import ExpertLoadMonitor
from lightning_moe.callbacks.heatmap import load_heatmap, write_png
from lightning_moe.data.datamodule import TextDataModule
from lightning_moe.module import CausalLMModule


def main() -> None:
    """Train, then write the heatmap PNG and print the loads."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "expert-load-heatmap.png"))
    args = parser.parse_args()
    L.seed_everything(0)
    data = TextDataModule(max_bytes=1_000_000, vocab_size=1024, block_size=64, batch_size=16)
    module = CausalLMModule(
        arch="mixtral-tiny", overrides={"num_layers": 4, "dim": 64, "ffn_hidden": 128}, load_balance_coef=0.0
    )
    monitor = ExpertLoadMonitor(logging_interval=args.steps // 3)
    L.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_model_summary=False,
        callbacks=[monitor],
    ).fit(module, data)
    image = load_heatmap(monitor.last_load.numpy(), cell=24)
    write_png(np.kron(image, np.ones((2, 2, 1), dtype=np.uint8)), args.out)
    print(f"wrote {args.out}; loads (rows: layers) relative to balanced:")
    print(np.array2string(monitor.last_load.numpy() * monitor.last_load.shape[1], precision=2))


if __name__ == "__main__":
    main()
