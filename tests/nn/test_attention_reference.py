"""Attention, caching and generation against independent re-implementations written here."""

import dataclasses
import math

import pytest
import torch

from lightning_moe import zoo
from lightning_moe.module import CausalLMModule, Seq2SeqLMModule, sample_next
from lightning_moe.nn.attention import Attention, AttentionConfig, KVCache, attention_bias


def _reference_attention(attn, x_BTD, keep_BS, window, theta=10000.0):
    """Loop-per-query attention with RoPE as complex rotations of (i, i + Dh/2) pairs; padding keys hidden."""
    cfg, dh = attn.config, attn.head_dim
    batch, seq, _ = x_BTD.shape
    q = attn.q_proj(x_BTD).view(batch, seq, cfg.num_heads, dh)
    k = attn.k_proj(x_BTD).view(batch, seq, cfg.num_kv_heads, dh)
    v = attn.v_proj(x_BTD).view(batch, seq, cfg.num_kv_heads, dh)
    freqs = theta ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)

    def rotate(t):
        angle = torch.arange(seq, dtype=torch.float64).view(1, seq, 1, 1) * freqs
        z = torch.complex(t[..., : dh // 2], t[..., dh // 2 :]) * torch.polar(torch.ones_like(angle), angle)
        return torch.cat([z.real, z.imag], dim=-1)

    q, k = rotate(q), rotate(k)
    out = torch.zeros(batch, seq, cfg.num_heads, dh, dtype=x_BTD.dtype)
    group = cfg.num_heads // cfg.num_kv_heads
    for b in range(batch):
        for i in range(seq):
            keys = [j for j in range(i + 1) if keep_BS[b, j] and (window is None or i - j < window)] or [i]
            for h in range(cfg.num_heads):
                scores = torch.stack([q[b, i, h] @ k[b, j, h // group] for j in keys]) / math.sqrt(dh)
                weights = torch.softmax(scores, dim=0)
                out[b, i, h] = sum(w * v[b, j, h // group] for w, j in zip(weights, keys, strict=True))
    return attn.o_proj(out.reshape(batch, seq, -1))


def _rope_tables(positions, dh, theta=10000.0):
    inv = theta ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    angle = positions.double().view(-1, 1) * inv
    emb = torch.cat([angle, angle], dim=-1)
    return emb.cos().unsqueeze(0), emb.sin().unsqueeze(0)


@pytest.mark.parametrize("window", [None, 3])
def test_chunked_cache_with_left_padding_and_a_window_matches_a_loop_reference(window):
    torch.manual_seed(0)
    attn = Attention(16, AttentionConfig(num_heads=4, num_kv_heads=2)).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, :3] = False  # row 0: left padding
    with torch.no_grad():
        expected = _reference_attention(attn, x, keep, window)
        cache, outs = KVCache(1), []
        for start, end in [(0, 4), (4, 7), (7, 9)]:  # chunks of several tokens crossing the window boundary
            mask = attention_bias(
                2, end - start, past=start, sliding_window=window, padding_mask_BS=keep[:, :end], dtype=x.dtype
            )
            rope = _rope_tables(torch.arange(start, end), attn.head_dim)
            outs.append(attn(x[:, start:end], rope, mask, cache.layer(0)))
    torch.testing.assert_close(torch.cat(outs, dim=1), expected, rtol=1e-10, atol=1e-10)


def test_a_row_of_padding_only_gives_finite_outputs_and_gradients():
    torch.manual_seed(0)
    attn = Attention(16, AttentionConfig(num_heads=4, num_kv_heads=4))
    x = torch.randn(2, 6, 16, requires_grad=True)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1] = False
    cos, sin = _rope_tables(torch.arange(6), 4)
    out = attn(x, (cos.float(), sin.float()), attention_bias(2, 6, padding_mask_BS=keep))
    out.float().square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())


@pytest.mark.parametrize(
    ("arch", "changes"),
    [("glam-tiny", {}), ("deepseek-tiny", {"q_lora_rank": None}), ("deepseek-tiny", {"q_lora_rank": 16})],
)
def test_chunked_prefill_through_the_cache_equals_the_full_forward_and_each_row_alone(arch, changes):
    torch.manual_seed(0)
    cfg = dataclasses.replace(zoo.config(arch), num_layers=2, **changes)
    model = zoo.build(cfg).double().eval()
    ids = torch.randint(3, cfg.vocab_size, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        full = model(ids, mask).logits
        cache = model.new_cache()
        chunks = [model(ids[:, s:e], mask[:, :e], cache=cache).logits for s, e in [(0, 5), (5, 6), (6, 10)]]
        alone = model(ids[:1, 4:]).logits
    real = mask.bool()
    torch.testing.assert_close(torch.cat(chunks, dim=1)[real], full[real], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(full[0, 4:], alone[0], rtol=1e-7, atol=1e-7)  # RoPE tables are float32


def _top_k_probs(logits, temperature, top_k):
    """softmax(logits / T) over every token whose logit is at least the k-th largest (ties at the k-th kept)."""
    values = sorted(logits.tolist(), reverse=True)
    kth = values[min(top_k, len(values)) - 1] if top_k is not None else -math.inf
    weights = [math.exp((v - values[0]) / temperature) if v >= kth else 0.0 for v in logits.tolist()]
    return torch.tensor(weights, dtype=torch.float64) / sum(weights)


@pytest.mark.parametrize(
    ("temperature", "top_k"),
    [(0.7, 3), (1.0, 2), (2.5, None), (1.3, 50), (1e4, 4)],  # 2: a tie at the k-th logit; 50: more than the vocab
)
def test_sampled_frequencies_match_the_top_k_softmax(temperature, top_k):
    logits = torch.tensor([1.0, 3.0, 2.0, 2.0, -0.5, 0.2])
    probs = _top_k_probs(logits, temperature, top_k)
    draws = 40000
    torch.manual_seed(0)
    counts = torch.bincount(sample_next(logits.expand(draws, -1), temperature, top_k).flatten(), minlength=6)
    assert (counts[probs == 0] == 0).all()
    support = probs > 0
    expected = probs[support] * draws
    chi2 = ((counts[support].double() - expected) ** 2 / expected).sum()
    assert chi2 < 30.0  # far above the 99.99th percentile of chi-square with at most 5 degrees of freedom (25.7)


def test_a_tiny_temperature_is_greedy_and_splits_only_ties_at_the_top():
    logits = torch.tensor([[2.0, 5.0, 5.0, 4.999]]).expand(2000, -1)
    torch.manual_seed(0)
    counts = torch.bincount(sample_next(logits, 1e-30, 1).flatten(), minlength=4)
    assert counts[0] == counts[3] == 0 and counts[1] > 800 and counts[2] > 800


def test_stop_id_outside_the_vocabulary_is_refused_before_any_work():
    torch.manual_seed(0)
    module = CausalLMModule(arch="mixtral-tiny", overrides={"num_layers": 1})
    prompt = torch.zeros(1, 3, dtype=torch.long)
    for bad in (1024, -1, 2.0):
        with pytest.raises(ValueError, match=rf"stop_id={bad!r} is invalid: must be a token id in \[0, 1024\)"):
            module.generate(prompt, 3, stop_id=bad)
    assert module.generate(prompt, 3, stop_id=1023).shape[0] == 1


def test_generate_keeps_train_mode_when_the_model_refuses_the_input():
    torch.manual_seed(0)
    causal = CausalLMModule(arch="mixtral-tiny", overrides={"num_layers": 1}).train()
    with pytest.raises(ValueError, match=r"input_ids holds 5000, which is invalid"):
        causal.generate(torch.full((1, 3), 5000), 2)
    assert causal.training
    seq2seq = Seq2SeqLMModule(arch="switch-tiny", overrides={"num_layers": 2}).train()
    vocab = seq2seq.config.vocab_size
    with pytest.raises(ValueError, match=rf"input_ids holds {vocab}, which is invalid"):
        seq2seq.generate(torch.full((1, 3), vocab), 2)
    assert seq2seq.training


def test_seq2seq_generate_names_an_encoder_input_longer_than_max_seq_len():
    torch.manual_seed(0)
    module = Seq2SeqLMModule(arch="switch-tiny", overrides={"num_layers": 2, "max_seq_len": 8}).train()
    with pytest.raises(ValueError, match=r"input_ids of 9 tokens is invalid: the encoder takes at most the model's "):
        module.generate(torch.zeros(1, 9, dtype=torch.long), 2)
    assert module.training
    assert module.generate(torch.zeros(1, 8, dtype=torch.long), 2).shape == (1, 3)
