"""Training-step throughput and peak memory: our zoo models against Hugging Face's, same weights, same batch.

For each family a ~50M-parameter config is built as a random ``transformers`` model (SDPA attention; experts
``--hf-experts eager`` by default, the per-expert loop the issue names its fastest CPU path, or ``grouped_mm``,
transformers' default, which a later check with transformers 5.23 and torch 2.13 found faster on this CPU),
converted with :func:`lightning_moe.interop.from_hf`, and both run the
same training step on the same batch, interleaved (the order alternating between repeats): forward and
cross-entropy, ``zero_grad``, backward, fused AdamW step, in the order Lightning's automatic optimization
runs them (so the previous step's gradients are alive during the forward, for both models). In float32, or
with ``--bf16`` as ``bf16-mixed``: the forward under CPU autocast to bfloat16, float32 weights, optimizer and
loss. Our model trains as ``CausalLMModule`` does by default: it computes its loss chunk by chunk, never the
whole logits (:func:`~lightning_moe.nn.cross_entropy.linear_cross_entropy`; ``--full-logits``: from the whole
logits, as Hugging Face), and keeps the weight-gradient memory of experts of 32 MiB and more between steps
(:func:`~lightning_moe.nn.reuse_expert_grad_memory`; ``--no-reuse`` turns it off). The median step
time of several repeats gives tokens/s. Peak memory is measured in fresh subprocesses per model, the
median of three: the growth of resident memory over two steps (the kernel's high-water mark), and the peak
of live tensor bytes over a step (see :func:`peak_memory`). The first step's losses of both models are
printed too: the same weights on the same batch must give the same loss (to float32 rounding; to about 1%
in bf16; Switch's router multiplies its input by random jitter in training).

``--dense-limit`` also times the physical limit of any MoE implementation: our model with every MoE layer
replaced by the dense SwiGLU FFN of equal active FLOPs (:func:`~lightning_moe.zoo.registry.densify`,
hidden ``top_k * F + shared``, no router), interleaved with the other two. ``HF/dense`` is then the largest
speed-up over Hugging Face's model that any MoE layer could give, and ``ours/dense`` how far ours is from
it. Run::

    python benchmarks/train_step_vs_hf.py              # all shapes
    python benchmarks/train_step_vs_hf.py --bf16       # bf16-mixed
    python benchmarks/train_step_vs_hf.py --shapes mixtral --repeats 3
    python benchmarks/train_step_vs_hf.py --hf-experts grouped_mm --dense-limit --memory-runs 1
    python benchmarks/train_step_vs_hf.py --tiny --shapes mixtral --batch 2 --seq 16 --repeats 1 --memory-runs 1
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from _args import positive_int  # a sibling module in benchmarks/
from moe_layer import peak_memory_bytes  # a sibling script in benchmarks/

VOCAB, DIM, LAYERS, HEADS, KV_HEADS = 8192, 512, 4, 8, 4
# --tiny: a smoke-test scale (vocabulary, width, layers); expert counts, expert sizes and routing stay.
TINY_VOCAB, TINY_DIM, TINY_LAYERS = 512, 64, 2

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


def vocab_size(tiny: bool = False) -> int:
    """The models' vocabulary size (smaller with ``--tiny``)."""
    return TINY_VOCAB if tiny else VOCAB


def hf_model(shape: str, experts: str = "eager", tiny: bool = False) -> torch.nn.Module:
    import transformers

    config_name, kwargs = SHAPES[shape]
    dim, layers = (TINY_DIM, TINY_LAYERS) if tiny else (DIM, LAYERS)
    if config_name == "SwitchTransformersConfig":
        if tiny:
            kwargs = dict(kwargs, d_model=dim, d_kv=dim // HEADS, num_layers=layers, num_decoder_layers=layers)
            kwargs.update(num_sparse_encoder_layers=layers // 2, num_sparse_decoder_layers=layers // 2)
        config = transformers.SwitchTransformersConfig(
            vocab_size=vocab_size(tiny), attn_implementation="eager", **kwargs
        )
        torch.manual_seed(0)
        model = transformers.SwitchTransformersForConditionalGeneration(config)
        with torch.no_grad():  # transformers 5 initialises the stacks' embeddings apart from `shared`
            model.encoder.embed_tokens.weight.copy_(model.shared.weight)
            model.decoder.embed_tokens.weight.copy_(model.shared.weight)
        return model.float().train()
    config = getattr(transformers, config_name)(
        vocab_size=vocab_size(tiny),
        hidden_size=dim,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        experts_implementation=experts,
        attn_implementation="sdpa",
        **kwargs,
    )
    torch.manual_seed(0)
    model = getattr(transformers, config_name.replace("Config", "ForCausalLM"))(config)
    return model.float().train()


def models(
    shape: str, reuse: bool = True, experts: str = "eager", tiny: bool = False, dense: bool = False
) -> dict[str, torch.nn.Module]:
    """Hugging Face's model and ours with the same weights; with ``dense``, ours densified too (the limit)."""
    from lightning_moe.interop import from_hf
    from lightning_moe.nn import reuse_expert_grad_memory
    from lightning_moe.nn.experts import FRESH_PAGES_MIN_BYTES
    from lightning_moe.zoo.registry import densify

    hf = hf_model(shape, experts, tiny)
    ours = from_hf(hf).train()
    pair = {"hf": hf, "ours": ours}
    if dense:
        torch.manual_seed(0)
        pair["dense"] = densify(copy.deepcopy(ours), "active", init_std=0.02).train()
    reuse_expert_grad_memory(ours, enabled=reuse, min_bytes=FRESH_PAGES_MIN_BYTES)  # as CausalLMModule does
    return pair


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    bf16: bool = False,
    full_logits: bool = False,
) -> float:
    """One training step; ``full_logits=False`` lets our model compute its loss chunk by chunk, as it trains."""
    parameters = inspect.signature(model.forward).parameters
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if "decoder_input_ids" in parameters:  # encoder-decoder
            half = batch.shape[1] // 2
            encoder_ids, decoder_ids = batch[:, :half], batch[:, half:]
            args = dict(input_ids=encoder_ids, decoder_input_ids=decoder_ids[:, :-1])
            targets = decoder_ids[:, 1:]
        else:
            args = dict(input_ids=batch[:, :-1])
            targets = batch[:, 1:]
        if "targets" in parameters and not full_logits:  # ours, as CausalLMModule trains it
            loss = model(**args, targets=targets).loss
        else:  # Hugging Face's models compute their loss from the whole (B, T, V) logits
            logits = model(**args).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    optimizer.zero_grad(set_to_none=True)  # Lightning: training_step, zero_grad, backward, optimizer step
    loss.backward()
    optimizer.step()
    return loss.item()


def status_mib(field: str) -> float:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def kept_bytes(model: torch.nn.Module) -> int:
    """Bytes of the memory our experts keep between steps (:class:`~lightning_moe.nn.experts.GradBuffers`)."""
    return sum(module.grad_buffers.nbytes for module in model.modules() if getattr(module, "grad_buffers", None))


def peak_memory(
    shape: str,
    which: str,
    batch_size: int,
    seq: int,
    reuse: bool,
    bf16: bool = False,
    full_logits: bool = False,
    experts: str = "eager",
    tiny: bool = False,
) -> dict:
    """Peak memory of training steps in MiB, after the model is built: resident and live tensors.

    ``rss``: the growth of resident memory over two steps (the second is the first with the optimizer state
    and the previous gradients alive). The kernel tracks the peak (``VmHWM``); writing ``5`` to
    ``/proc/self/clear_refs`` resets it to the current resident size once the model is built, so the peak is
    exact, not sampled. It includes what the C allocator holds on to, which varies by a few percent between
    runs of the same step.
    ``live``: the peak growth of live tensor bytes over a third step (:func:`moe_layer.peak_memory_bytes`,
    exact and repeatable), started with the gradients freed so that both models allocate them in the step,
    plus the memory our experts keep between steps, which exists before the step and would otherwise be left
    out (our expert gradients live there). The parameters and the optimizer state are left out of both.
    """
    model = models(shape, reuse, experts, tiny)[which]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = torch.randint(0, vocab_size(tiny), (batch_size, seq + 1), generator=torch.Generator().manual_seed(0))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_mib("VmRSS")
    for _ in range(2):
        train_step(model, optimizer, batch, bf16, full_logits)
    rss = status_mib("VmHWM") - base
    optimizer.zero_grad(set_to_none=True)
    live = peak_memory_bytes(lambda: train_step(model, optimizer, batch, bf16, full_logits)) + kept_bytes(model)
    return {"rss": rss, "live": live / 2**20}


def run_json(cmd: list[str]) -> dict:
    """Run ``cmd`` and parse its standard output as JSON."""
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--hf-experts", default="eager", choices=["eager", "grouped_mm"],
                        help="transformers' experts_implementation for its model")  # fmt: skip
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--seq", type=positive_int, default=256)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--no-reuse", action="store_true", help="our model allocates fresh expert gradients")
    parser.add_argument("--bf16", action="store_true", help="forward under CPU autocast to bfloat16 (bf16-mixed)")
    parser.add_argument("--full-logits", action="store_true", help="our loss from the whole logits, as Hugging Face")
    parser.add_argument(
        "--dense-limit",
        action="store_true",
        help="also time our model with dense FFNs of equal active FLOPs in place of its MoE layers",
    )
    parser.add_argument("--memory-runs", type=positive_int, default=3, help="fresh processes per peak (median)")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help=f"smoke-test scale: width {TINY_DIM}, {TINY_LAYERS} layers, vocabulary {TINY_VOCAB} (experts unchanged)",
    )
    parser.add_argument("--memory-child", nargs=2, metavar=("SHAPE", "WHICH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    unknown = [shape for shape in shapes if shape not in SHAPES]
    if unknown:
        parser.error(f"argument --shapes: {', '.join(map(repr, unknown))} is invalid: choose from {', '.join(SHAPES)}")
    if "switch" in shapes and args.seq < 2:
        parser.error(
            f"argument --seq: {args.seq} is invalid: switch splits each row into encoder and decoder, use >= 2"
        )
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory = peak_memory(
            *args.memory_child,
            args.batch,
            args.seq,
            not args.no_reuse,
            args.bf16,
            args.full_logits,
            args.hf_experts,
            args.tiny,
        )
        print(json.dumps(memory))
        return
    tokens = args.batch * args.seq
    reuse = "fresh expert gradients" if args.no_reuse else "expert gradient memory kept"
    reuse += "; our loss from the whole logits" if args.full_logits else "; our loss chunked (no whole logits)"
    reuse += f"; --tiny: width {TINY_DIM}, {TINY_LAYERS} layers, vocabulary {TINY_VOCAB}" if args.tiny else ""
    print(
        f"torch {torch.__version__}, {args.threads} threads, {'bf16-mixed' if args.bf16 else 'float32'}, "
        f"{tokens} tokens/step, "
        f"median of {args.repeats}; {reuse}; Hugging Face experts: {args.hf_experts}"
    )
    columns = ["shape", "params", "HF step (s)", "ours step (s)", "speed-up", "HF tok/s", "ours tok/s"]
    columns += ["HF peak RSS MiB", "ours peak RSS MiB", "HF peak live MiB", "ours peak live MiB"]
    columns += ["first loss HF", "first loss ours"]
    if args.dense_limit:
        columns += ["dense step (s)", "HF/dense", "ours/dense"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for shape in shapes:
        pair = models(shape, not args.no_reuse, args.hf_experts, args.tiny, args.dense_limit)
        params = sum(p.numel() for p in pair["ours"].parameters())
        opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for k, m in pair.items()}
        batch = torch.randint(
            0, vocab_size(args.tiny), (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0)
        )
        times: dict[str, list[float]] = {k: [] for k in pair}
        first_loss = {k: train_step(pair[k], opts[k], batch, args.bf16, args.full_logits) for k in pair}
        for k in pair:
            train_step(pair[k], opts[k], batch, args.bf16, args.full_logits)
        for repeat in range(args.repeats):
            for k in list(pair)[:: -1 if repeat % 2 else 1]:
                start = time.perf_counter()
                train_step(pair[k], opts[k], batch, args.bf16, args.full_logits)
                times[k].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        rss, live = {}, {}
        for k in ("hf", "ours"):
            cmd = [sys.executable, __file__, "--memory-child", shape, k, "--batch", str(args.batch), "--seq",
                   str(args.seq), "--threads", str(args.threads)] + ["--no-reuse"] * args.no_reuse  # fmt: skip
            cmd += ["--bf16"] * args.bf16 + ["--full-logits"] * args.full_logits + ["--hf-experts", args.hf_experts]
            cmd += ["--tiny"] * args.tiny
            runs = [run_json(cmd) for _ in range(args.memory_runs)]
            rss[k] = statistics.median(run["rss"] for run in runs)
            live[k] = statistics.median(run["live"] for run in runs)
        limit = ""
        if args.dense_limit:
            limit = f" {med['dense']:.3f} | {med['hf'] / med['dense']:.2f}x | {med['ours'] / med['dense']:.2f}x |"
        print(
            f"| {shape} | {params / 1e6:.0f}M | {med['hf']:.3f} | {med['ours']:.3f} | {med['hf'] / med['ours']:.2f}x | "
            f"{tokens / med['hf']:.0f} | {tokens / med['ours']:.0f} | {rss['hf']:.0f} | {rss['ours']:.0f} | "
            f"{live['hf']:.0f} | {live['ours']:.0f} | "
            f"{first_loss['hf']:.4f} | {first_loss['ours']:.4f} |" + limit,
            flush=True,
        )


if __name__ == "__main__":
    main()
