"""Switch Transformers: published sizes, sparse layers, routing settings and logits against Hugging Face."""

import pytest
import torch

from lightning_moe import zoo
from lightning_moe.interop import from_hf
from lightning_moe.nn.moe import MoELayer
from lightning_moe.zoo.switch import SwitchConfig

# Published totals: Fedus et al. 2021, Table 9.
PUBLISHED_TOTAL = {"switch-xxl-128": 395e9, "switch-c-2048": 1571e9}


@pytest.mark.parametrize(("name", "published"), PUBLISHED_TOTAL.items())
def test_published_sizes_within_one_percent(name, published):
    total = zoo.count_parameters(name).total
    assert abs(total - published) / published < 0.01, total


def test_switch_large_is_the_published_26b_to_its_two_digits():
    # 26.31B: 1.2% above "26B", a figure given to two significant digits (see lightning_moe/zoo/switch.py).
    total = zoo.count_parameters("switch-large-128").total
    assert 25.5e9 <= total < 26.5e9, total


def test_count_by_hand_for_switch_base_8():
    cfg = zoo.config("switch-base-8")
    d, f, e, v, layers = cfg.dim, cfg.ffn_hidden, cfg.num_experts, cfg.vocab_size, cfg.num_layers
    attention = 4 * d * cfg.num_heads * cfg.head_dim
    ffn = 2 * d * f
    moe = e * ffn + d * e
    per_stack_ffn = layers // 2 * (ffn + moe)
    encoder = layers * (attention + 2 * d) + per_stack_ffn + d
    decoder = layers * (2 * attention + 3 * d) + per_stack_ffn + d
    bias = 2 * cfg.num_buckets * cfg.num_heads
    total = encoder + decoder + bias + v * d  # tied head
    count = zoo.count_parameters("switch-base-8")
    assert count.total == total
    assert count.active == total - layers * (e - 1) * ffn


@pytest.mark.parametrize(
    ("step", "expected"), [(2, [False, True, False, True, False, True]), (1, [True] * 6), (3, [0, 1, 0, 0, 1, 0])]
)
def test_sparse_layers_follow_hugging_face_rule(step, expected):
    model = zoo.build("switch-tiny", num_layers=6, sparse_step=step)
    assert [layer.is_moe for layer in model.encoder] == [bool(x) for x in expected]
    assert [layer.is_moe for layer in model.decoder] == [bool(x) for x in expected]


def test_moe_layers_are_top1_with_capacity_jitter_and_position_priority():
    model = zoo.build("switch-tiny")
    moe = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert len(moe) == 2
    cfg = moe[0].config
    assert (cfg.router.top_k, cfg.router.jitter_eps, cfg.router.normalize_topk) == (1, 0.01, False)
    assert (cfg.capacity_factor, cfg.eval_capacity_factor, cfg.drop_priority) == (1.25, 2.0, "position")
    assert (cfg.experts.activation, cfg.experts.gated) == ("relu", False)
    xxl = zoo.config("switch-xxl-128")
    assert (xxl.activation, xxl.gated) == ("gelu_tanh", True)
    assert (SwitchConfig.load_balance_coef, SwitchConfig.z_loss_coef) == (0.01, 0.001)


def test_capacity_drops_tokens_in_training_and_stats_list_encoder_then_decoder():
    torch.manual_seed(0)
    model = zoo.build("switch-tiny", expert_capacity=2)
    ids = torch.randint(0, 1024, (2, 16))
    out = model(ids, ids[:, :8])
    kept = [int(s.kept_per_expert.sum()) for s in out.router_stats]
    tokens = [int(s.num_tokens) for s in out.router_stats]
    assert tokens == [32, 16]  # encoder layer first, then decoder layer
    assert all(k <= 2 * model.encoder[1].ffn.config.num_experts for k in kept)
    assert all(int(s.num_dropped) > 0 for s in out.router_stats)


def test_tied_head_scales_decoder_output():
    torch.manual_seed(0)
    model = zoo.build("switch-tiny").eval()
    ids = torch.randint(0, 1024, (2, 8))
    out = model(ids, ids)
    assert model.lm_head.weight is model.embed.weight
    torch.testing.assert_close(out.logits, (out.hidden_states * 128**-0.5) @ model.embed.weight.t())
    untied = zoo.build("switch-tiny", tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed.weight and untied.output_scale == 1.0


def test_encoder_padding_changes_no_real_logit():
    torch.manual_seed(0)
    model = zoo.build("switch-tiny").eval()
    ids, dec = torch.randint(0, 1024, (2, 12)), torch.randint(0, 1024, (2, 6))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 8:] = False
    changed = ids.clone()
    changed[~mask] = (ids[~mask] + 5) % 1024
    with torch.no_grad():
        a, b = model(ids, dec, mask).logits, model(changed, dec, mask).logits
    torch.testing.assert_close(a, b)


def test_decoder_is_causal_without_drops():
    torch.manual_seed(0)
    model = zoo.build("switch-tiny", capacity_factor=None, eval_capacity_factor=None).eval()
    ids, dec = torch.randint(0, 1024, (2, 10)), torch.randint(0, 1024, (2, 10))
    changed = dec.clone()
    changed[:, 5] = (dec[:, 5] + 1) % 1024
    with torch.no_grad():
        a, b = model(ids, dec).logits, model(ids, changed).logits
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


# ---------------------------------------------------------------------------------------------------------
# Against Hugging Face SwitchTransformersForConditionalGeneration.

transformers = pytest.importorskip("transformers")


def _hf_model(tied: bool):
    config = transformers.SwitchTransformersConfig(
        vocab_size=96,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_heads=4,
        num_layers=4,
        num_decoder_layers=4,
        num_sparse_encoder_layers=2,
        num_sparse_decoder_layers=2,
        num_experts=4,
        expert_capacity=1000,  # per sequence: nothing drops
        relative_attention_num_buckets=8,
        relative_attention_max_distance=12,
        dropout_rate=0.0,
        router_jitter_noise=0.0,
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.SwitchTransformersForConditionalGeneration(config).float().eval()
    with torch.no_grad():  # norm weights start at one on both sides; randomise them so a mix-up shows
        for name, module in model.named_modules():
            if name.endswith("layer_norm"):
                module.weight.uniform_(0.5, 1.5)
        # transformers 5 unties the encoder and decoder token embeddings from `shared` along with the head when
        # tie_word_embeddings=False; T5 and Switch share one input embedding, so make them equal again.
        model.encoder.embed_tokens.weight.copy_(model.shared.weight)
        model.decoder.embed_tokens.weight.copy_(model.shared.weight)
    return model, config


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_logits_match_hugging_face(tied, padded):
    hf, config = _hf_model(tied)
    ours = from_hf(hf).eval()
    assert [layer.is_moe for layer in ours.encoder] == [False, True, False, True]
    torch.manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (3, 20))  # 20 > max_distance: log-spaced buckets are used
    dec = torch.randint(0, config.vocab_size, (3, 14))
    mask = torch.ones(3, 20, dtype=torch.long)
    if padded:
        mask[0, 15:] = 0
        mask[2, 7:] = 0
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        actual = ours(ids, dec, mask.bool() if padded else None).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
