"""Dtypes across the zoo: low-precision and float64 weights, CPU autocast, balancing state, token ids, interop."""

import copy
import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_moe import zoo
from lightning_moe.interop import from_hf, to_hf
from lightning_moe.module import CausalLMModule, Seq2SeqLMModule
from lightning_moe.nn import ExpertsConfig, MoEConfig, MoELayer, RouterConfig
from lightning_moe.nn.cross_entropy import linear_cross_entropy
from lightning_moe.nn.norm import RMSNorm
from lightning_moe.nn.router import Router

TINY = ["mixtral-tiny", "qwen-moe-tiny", "qwen3-moe-tiny", "deepseek-tiny", "glam-tiny", "switch-tiny"]


def _seq2seq(name: str) -> bool:
    return zoo.family_of(name) == "switch"


def _logits(model: torch.nn.Module, name: str, ids: torch.Tensor) -> torch.Tensor:
    return model(ids[:, :8], ids[:, 8:]).logits if _seq2seq(name) else model(ids).logits


def _loss(model: torch.nn.Module, name: str, ids: torch.Tensor) -> torch.Tensor:
    if _seq2seq(name):
        out = model(ids[:, :8], ids[:, 8:-1], targets=ids[:, 9:])
    else:
        out = model(ids[:, :-1], targets=ids[:, 1:])
    return out.loss + 0.01 * sum(sum(s.losses.values()) for s in out.router_stats)


def _balancing_buffers(model: torch.nn.Module) -> dict[str, torch.dtype]:
    return {n: b.dtype for n, b in model.named_buffers() if n.endswith(("tokens_per_expert", "score_bias"))}


# ------------------------------------------------------------------------------ pure low-precision weights


@pytest.mark.parametrize("name", TINY)
def test_converted_models_run_in_their_dtype_keep_balancing_state_and_track_float32(name):
    torch.manual_seed(0)
    model = zoo.build(name).eval()
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        ref = _logits(model, name, ids).double()
    scale = ref.abs().max().item()
    # Per-token tolerance: a handful of roundings of relative size 2**-9 (bf16) or 2**-12 (fp16) per layer on
    # activations of order one (observed: at most 0.009 and 0.001 on logits up to 1.2; Switch's logits reach 12.5,
    # hence relative to the scale). A routing decision that flips on a near tie moves one token's logits further,
    # so the bound holds for 90% of the tokens; float64 is the float32 model computed without its roundings.
    for dtype, rel, share in ((torch.bfloat16, 0.03, 0.9), (torch.float16, 4e-3, 0.9), (torch.float64, 1e-5, 1.0)):
        converted = copy.deepcopy(model).to(dtype)
        with torch.no_grad():
            out = _logits(converted, name, ids)
        assert out.dtype == dtype
        assert torch.isfinite(out).all()
        err_per_token = (out.double() - ref).abs().amax(-1)
        assert (err_per_token <= rel * scale).double().mean() >= share, (dtype, err_per_token)
        # Balancing state is never rounded to 16 bits (float64 weights carry float64 state).
        want = torch.float64 if dtype == torch.float64 else torch.float32
        assert set(_balancing_buffers(converted).values()) == {want}


@pytest.mark.parametrize("name", TINY)
def test_generate_works_with_bfloat16_float16_and_float64_weights(name):
    torch.manual_seed(0)
    module = (Seq2SeqLMModule if _seq2seq(name) else CausalLMModule)(arch=name)
    ids = torch.randint(0, 300, (2, 5))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        out = copy.deepcopy(module).to(dtype).generate(ids, 3)
        assert out.dtype == torch.long and out.shape == (2, (1 if _seq2seq(name) else 5) + 3)
        if not _seq2seq(name):
            assert torch.equal(out[:, :5], ids)


# ----------------------------------------------------------------------------------------- CPU autocast


@pytest.mark.parametrize("name", TINY)
def test_bf16_autocast_trains_every_family_close_to_float32_with_float32_routers(name):
    torch.manual_seed(0)
    base = zoo.build(name).train()
    batches = [torch.randint(0, 300, (2, 17)) for _ in range(3)]
    losses, router_dtypes = {}, set()
    for autocast in (False, True):
        model = copy.deepcopy(base)
        for router in (m for m in model.modules() if isinstance(m, Router)):
            router.register_forward_hook(lambda m, args, out, on=autocast: router_dtypes.add((on, out.logits_TE.dtype)))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[autocast] = []
        for ids in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = _loss(model, name, ids)
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert loss.dtype == torch.float32
            losses[autocast].append(loss.item())
        assert all(p.dtype == torch.float32 for p in model.parameters())
    # The router runs in float32 under autocast too (RouterConfig.gate_precision's default).
    assert router_dtypes == {(False, torch.float32), (True, torch.float32)}
    assert all(torch.isfinite(torch.tensor(losses[True])))
    # Observed: at most 6e-3 apart on losses near 7 (Switch: 11). 0.05, under 1% of the loss, as in test_bf16.
    diffs = [abs(a - b) for a, b in zip(losses[False], losses[True], strict=True)]
    assert max(diffs) < 0.05, losses


# --------------------------------------------------------------- balancing state under a 16-bit default dtype


def test_balancing_buffers_are_float32_when_built_under_lightnings_bf16_true_init_module():
    # Lightning's recommended way to build a model directly in bf16-true sets the default dtype to bfloat16 while
    # the model is built; the score-correction bias (steps of gamma = 1e-3) and the load counter must not be
    # rounded to bfloat16, as .to(torch.bfloat16) already keeps them in float32.
    trainer = L.Trainer(accelerator="cpu", precision="bf16-true", logger=False, enable_progress_bar=False)
    with trainer.init_module():
        model = zoo.build("deepseek-tiny")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    buffers = _balancing_buffers(model)
    assert any(n.endswith("score_bias") for n in buffers) and set(buffers.values()) == {torch.float32}

    layer = next(m for m in model.modules() if isinstance(m, MoELayer))
    layer.router.score_bias.fill_(0.6)
    layer.tokens_per_expert.fill_(1.0)
    layer.tokens_per_expert[0] = 0.0  # expert 0 under-loaded: its bias rises by gamma
    layer.update_bias(1e-3)
    assert layer.router.score_bias[0].item() == pytest.approx(0.601, abs=1e-6)  # bfloat16: 0.6 + 1e-3 -> 0.6


def test_load_counter_counts_exactly_past_256_under_a_bfloat16_default_dtype():
    config = MoEConfig(dim=16, router=RouterConfig(num_experts=2, top_k=1), experts=ExpertsConfig(hidden_dim=8))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        layer = MoELayer(config)
    finally:
        torch.set_default_dtype(default)
    layer.train()
    torch.manual_seed(0)
    routed = torch.zeros(2, dtype=torch.float64)
    for _ in range(4):
        _, stats = layer(torch.randn(301, 16, dtype=torch.bfloat16))
        routed += stats.tokens_per_expert.double()
    assert routed.sum() == 4 * 301
    assert torch.equal(layer.tokens_per_expert.double(), routed)  # bfloat16 keeps 8 bits: steps of 4 past 512
    assert layer.tokens_per_expert.dtype == torch.float32


# ------------------------------------------------------------------------------------------- token ids


@pytest.mark.parametrize("name", ["mixtral-tiny", "switch-tiny"])
def test_int32_token_ids_give_the_int64_logits_and_loss(name):
    torch.manual_seed(0)
    model = zoo.build(name).eval()
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.equal(_logits(model, name, ids.int()), _logits(model, name, ids))
        assert torch.equal(_loss(model, name, ids.int()), _loss(model, name, ids))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int8])
@pytest.mark.parametrize("name", ["mixtral-tiny", "switch-tiny"])
def test_token_ids_of_other_integer_dtypes_are_refused_by_name(name, dtype):
    # nn.Embedding takes int64 and int32 indices only: anything else must be a clear error, not its RuntimeError.
    model = zoo.build(name)
    ids = torch.randint(0, 100, (2, 12)).to(dtype)
    with pytest.raises(ValueError, match=rf"input_ids.dtype={dtype} is invalid: expected integer token ids, int64"):
        _logits(model, name, ids)
    if _seq2seq(name):
        with pytest.raises(ValueError, match=rf"decoder_input_ids.dtype={dtype} is invalid"):
            model(ids.long(), ids)


@pytest.mark.parametrize(("dtype", "vocab"), [(torch.uint8, 1024), (torch.int8, 300), (torch.int16, 40000)])
def test_linear_cross_entropy_takes_small_integer_targets_against_a_larger_vocabulary(dtype, vocab):
    # The range check compared in the targets' dtype, where the vocabulary size wraps (1024 -> 0 in uint8).
    torch.manual_seed(0)
    x, weight = torch.randn(6, 8), torch.randn(vocab, 8)
    targets = torch.tensor([0, 5, 100, 120, 7, 127], dtype=dtype)
    expected = F.cross_entropy(x @ weight.T, targets.long())
    torch.testing.assert_close(linear_cross_entropy(x, weight, targets), expected)
    with pytest.raises(ValueError, match=r"targets_N holds 5, which is invalid: expected token ids in \[0, 5\)"):
        linear_cross_entropy(x, weight[:5], targets)


def test_attention_masks_bool_and_integer_agree_and_a_float_mask_is_refused():
    torch.manual_seed(0)
    model = zoo.build("mixtral-tiny").eval()
    ids = torch.randint(0, 300, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    with torch.no_grad():
        ref = model(ids, mask).logits
        for dtype in (torch.int64, torch.int32, torch.uint8):
            assert torch.equal(model(ids, mask.to(dtype)).logits, ref)
    with pytest.raises(ValueError, match=r"attention_mask.dtype=torch.float32 is invalid: expected a bool or integer"):
        model(ids, mask.float())


# --------------------------------------------------------------------------------------------- float64


def test_rmsnorm_computes_float64_in_float64():
    # The router and the loss keep float64; the norm rounded it through float32 (gradcheck failed by 1e-4).
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    expected = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), expected, rtol=1e-13, atol=1e-13)
    assert torch.autograd.gradcheck(norm, (x,))
    y = RMSNorm(8)(torch.randn(3, 8, dtype=torch.bfloat16).float())  # float32 stays float32
    assert y.dtype == torch.float32


# ------------------------------------------------------------------------------------ Hugging Face interop


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_to_hf_names_the_weights_dtype_and_transformers_loads_it(tmp_path, dtype):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = zoo.build("mixtral-tiny").to(dtype).eval()
    to_hf(ours, tmp_path, config=zoo.config("mixtral-tiny"))
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")
    hf = transformers.MixtralForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    assert hf.dtype == dtype  # was float32: a bfloat16 export loaded at twice its size, a float64 one rounded
    embed = hf.get_input_embeddings().weight
    assert embed.dtype == dtype and torch.equal(embed, ours.embed.weight)
    if dtype == torch.float64:
        ids = torch.randint(0, 300, (2, 10))
        with torch.no_grad():
            # transformers' norms and rotary tables round through float32, so float32's 1e-5 rather than float64's.
            torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
    assert {p.dtype for p in from_hf(tmp_path).parameters()} == {torch.float32}  # from_hf: float32, as documented


def test_from_hf_of_a_bfloat16_checkpoint_is_float32_with_the_logits_of_transformers_in_float32(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=97, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, attn_implementation="eager")  # fmt: skip
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    ours = from_hf(tmp_path).eval()
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    hf = transformers.MixtralForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
