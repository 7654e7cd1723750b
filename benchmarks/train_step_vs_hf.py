"""Training-step throughput and peak memory: our zoo models against Hugging Face's, same weights, same batch.

For each family a ~50M-parameter config is built as a random ``transformers`` model (eager experts, its
fastest CPU path; SDPA attention), converted with :func:`lightning_moe.interop.from_hf`, and both run the
same training step on the same batch, interleaved, float32: forward and cross-entropy, ``zero_grad``,
backward, fused AdamW step, in the order Lightning's automatic optimization runs them (so the previous
step's gradients are alive during the forward, for both models). Our model keeps its expert
weight-gradient memory between steps, as ``CausalLMModule`` does by default
(:func:`~lightning_moe.nn.reuse_expert_grad_memory`; ``--no-reuse`` turns it off). The median step time of
several repeats gives tokens/s; peak memory is measured in a fresh subprocess per model (the growth of
anonymous memory over a few steps). Run::

    python benchmarks/train_step_vs_hf.py              # all shapes
    python benchmarks/train_step_vs_hf.py --shapes mixtral --repeats 3
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

VOCAB, DIM, LAYERS, HEADS, KV_HEADS = 8192, 512, 4, 8, 4

SHAPES = {
    "mixtral": (
        "MixtralConfig",
        dict(intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2, num_key_value_heads=KV_HEADS),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            intermediate_size=1408,
            moe_intermediate_size=176,
            shared_expert_intermediate_size=704,
            num_experts=60,
            num_experts_per_tok=4,
            num_key_value_heads=KV_HEADS,
        ),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(
            intermediate_size=1408,
            moe_intermediate_size=128,
            n_routed_experts=64,
            num_experts_per_tok=6,
            n_shared_experts=2,
            n_group=8,
            topk_group=4,
            topk_method="group_limited_greedy",
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=64,
            qk_nope_head_dim=32,
            qk_rope_head_dim=32,
            v_head_dim=64,
            num_key_value_heads=HEADS,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            intermediate_size=1408,
            moe_intermediate_size=128,
            n_routed_experts=64,
            num_experts_per_tok=6,
            n_shared_experts=2,
            n_group=8,
            topk_group=4,
            first_k_dense_replace=1,
            q_lora_rank=128,
            kv_lora_rank=64,
            qk_nope_head_dim=32,
            qk_rope_head_dim=32,
            v_head_dim=64,
            num_key_value_heads=HEADS,
        ),
    ),
    # Encoder-decoder: 4 + 4 layers, every other one sparse; the batch's first half of each row is the encoder
    # input, the second the decoder's. A capacity no expert reaches, so both sides keep every token.
    # transformers has no SDPA path for Switch: its side runs eager attention.
    "switch": (
        "SwitchTransformersConfig",
        dict(
            d_model=DIM,
            d_kv=DIM // HEADS,
            d_ff=1024,
            num_heads=HEADS,
            num_layers=LAYERS,
            num_decoder_layers=LAYERS,
            num_sparse_encoder_layers=LAYERS // 2,
            num_sparse_decoder_layers=LAYERS // 2,
            num_experts=8,
            expert_capacity=100_000,
            dropout_rate=0.0,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3_moe_256e": (
        "Qwen3MoeConfig",
        dict(
            intermediate_size=1024,
            moe_intermediate_size=64,
            num_experts=256,
            num_experts_per_tok=8,
            head_dim=64,
            num_key_value_heads=KV_HEADS,
        ),
    ),
}


def hf_model(shape: str) -> torch.nn.Module:
    import transformers

    config_name, kwargs = SHAPES[shape]
    if config_name == "SwitchTransformersConfig":
        config = transformers.SwitchTransformersConfig(vocab_size=VOCAB, attn_implementation="eager", **kwargs)
        torch.manual_seed(0)
        model = transformers.SwitchTransformersForConditionalGeneration(config)
        with torch.no_grad():  # transformers 5 initialises the stacks' embeddings apart from `shared`
            model.encoder.embed_tokens.weight.copy_(model.shared.weight)
            model.decoder.embed_tokens.weight.copy_(model.shared.weight)
        return model.float().train()
    config = getattr(transformers, config_name)(
        vocab_size=VOCAB,
        hidden_size=DIM,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        experts_implementation="eager",
        attn_implementation="sdpa",
        **kwargs,
    )
    torch.manual_seed(0)
    model = getattr(transformers, config_name.replace("Config", "ForCausalLM"))(config)
    return model.float().train()


def models(shape: str, reuse: bool = True) -> dict[str, torch.nn.Module]:
    from lightning_moe.interop import from_hf
    from lightning_moe.nn import reuse_expert_grad_memory

    hf = hf_model(shape)
    ours = from_hf(hf).train()
    reuse_expert_grad_memory(ours, enabled=reuse)
    return {"hf": hf, "ours": ours}


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    if "decoder_input_ids" in inspect.signature(model.forward).parameters:  # encoder-decoder
        half = batch.shape[1] // 2
        encoder_ids, decoder_ids = batch[:, :half], batch[:, half:]
        logits = model(input_ids=encoder_ids, decoder_input_ids=decoder_ids[:, :-1]).logits
        targets = decoder_ids[:, 1:]
    else:
        logits = model(batch[:, :-1]).logits
        targets = batch[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    optimizer.zero_grad(set_to_none=True)  # Lightning: training_step, zero_grad, backward, optimizer step
    loss.backward()
    optimizer.step()
    return loss.item()


def rss_anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory(shape: str, which: str, batch_size: int, seq: int, reuse: bool, steps: int = 3) -> float:
    """Peak growth of anonymous memory (MiB) over a few training steps, after the model is built."""
    model = models(shape, reuse)[which]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = torch.randint(0, VOCAB, (batch_size, seq + 1), generator=torch.Generator().manual_seed(0))
    base, peak, done = rss_anon_mib(), [0.0], [False]

    def poll() -> None:
        while not done[0]:
            peak[0] = max(peak[0], rss_anon_mib())
            time.sleep(0.002)

    thread = threading.Thread(target=poll)
    thread.start()
    for _ in range(steps):
        train_step(model, optimizer, batch)
    done[0] = True
    thread.join()
    return peak[0] - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-reuse", action="store_true", help="our model allocates fresh expert gradients")
    parser.add_argument("--memory-child", nargs=2, metavar=("SHAPE", "WHICH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(peak_memory(*args.memory_child, args.batch, args.seq, not args.no_reuse)))
        return
    tokens = args.batch * args.seq
    reuse = "fresh expert gradients" if args.no_reuse else "expert gradient memory kept"
    print(
        f"torch {torch.__version__}, {args.threads} threads, float32, {tokens} tokens/step, "
        f"median of {args.repeats}; {reuse}"
    )
    columns = ["shape", "params", "HF step (s)", "ours step (s)", "speed-up", "HF tok/s", "ours tok/s"]
    columns += ["HF peak MiB", "ours peak MiB"]
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        pair = models(shape, not args.no_reuse)
        params = sum(p.numel() for p in pair["ours"].parameters())
        opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for k, m in pair.items()}
        batch = torch.randint(0, VOCAB, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {"hf": [], "ours": []}
        for _ in range(2):
            for k in pair:
                train_step(pair[k], opts[k], batch)
        for _ in range(args.repeats):
            for k in pair:
                start = time.perf_counter()
                train_step(pair[k], opts[k], batch)
                times[k].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        mem = {}
        for k in pair:
            cmd = [sys.executable, __file__, "--memory-child", shape, k, "--batch", str(args.batch), "--seq",
                   str(args.seq), "--threads", str(args.threads)] + ["--no-reuse"] * args.no_reuse  # fmt: skip
            mem[k] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip())
        print(
            f"| {shape} | {params / 1e6:.0f}M | {med['hf']:.3f} | {med['ours']:.3f} | {med['hf'] / med['ours']:.2f}x | "
            f"{tokens / med['hf']:.0f} | {tokens / med['ours']:.0f} | {mem['hf']:.0f} | {mem['ours']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
