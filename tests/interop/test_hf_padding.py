"""Hugging Face parity with padding: logits, load-balancing losses and greedy generation of padded batches.

Every reference is a tiny random ``transformers`` 5 model given the same attention mask (and, for left padding,
the ``position_ids`` its ``generate`` would use), with our model loaded from it by ``from_hf``.
"""

import copy
import functools
import warnings

import pytest
import torch
from torch import Tensor, nn

from lightning_moe.interop import from_hf
from lightning_moe.module import CausalLMModule, Seq2SeqLMModule

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

VOCAB = 89
YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 8}


def _perturb(hf: nn.Module) -> nn.Module:
    """Weights off their init scale (sharp routers, non-unit norms, a non-zero V3 correction bias), eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("mlp.gate.weight", "router.classifier.weight")):
                p.normal_(std=1.0)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "relative_attention_bias" in name:
                p.normal_(std=1.0)
            else:
                p.normal_(std=0.1)
        for name, buffer in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.3 * torch.randn_like(buffer))
    hf.generation_config.eos_token_id = None  # greedy generation runs its full length, as ours does
    return hf.float().eval()


_DECODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_DEEPSEEK = dict(
    _DECODER,
    num_key_value_heads=4,
    intermediate_size=48,
    moe_intermediate_size=16,
    n_routed_experts=8,
    num_experts_per_tok=3,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    max_position_embeddings=64,
    rope_parameters=YARN,
)

CONFIGS = {
    # a window shorter than the padded prompts and what generation adds to them
    "mixtral": lambda: transformers.MixtralConfig(
        **_DECODER, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, sliding_window=5
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **_DECODER | {"num_hidden_layers": 3},
        intermediate_size=40,
        num_experts=6,
        num_experts_per_tok=3,
        moe_intermediate_size=12,
        shared_expert_intermediate_size=24,
        mlp_only_layers=[1],
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **_DECODER,
        intermediate_size=40,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=12,
        norm_topk_prob=True,
    ),
    "deepseek_v2": lambda: transformers.DeepseekV2Config(
        **_DEEPSEEK, q_lora_rank=None, n_shared_experts=2, topk_method="group_limited_greedy", routed_scaling_factor=2.0
    ),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **_DEEPSEEK, q_lora_rank=24, n_shared_experts=1, routed_scaling_factor=2.5
    ),
}
CLASSES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
BALANCED = ["mixtral", "qwen2_moe", "qwen3_moe"]  # the families whose transformers model has a load-balancing loss


@functools.cache
def _pair(family: str) -> tuple[nn.Module, nn.Module]:
    """The ``transformers`` model (float32, eager attention) and ours converted from it (eval mode)."""
    cfg = CONFIGS[family]()
    cfg._attn_implementation = "eager"
    hf = _perturb(getattr(transformers, CLASSES[family])(cfg))
    return hf, from_hf(hf).eval()


@functools.cache
def _float64_pair(family: str) -> tuple[nn.Module, nn.Module]:
    """The pair in float64. transformers' eager attention softmaxes in float32, where float64's most negative mask
    value is -inf: a fully masked padding row becomes NaN and reaches the real tokens through 0 * NaN. Its SDPA path
    (with the experts' eager loop: the grouped-mm one takes no float64) keeps the padding rows finite."""
    hf, ours = _pair(family)
    hf64 = getattr(transformers, CLASSES[family])(copy.deepcopy(hf.config))  # its own attention settings
    hf64.load_state_dict(hf.state_dict())
    hf64 = hf64.double().eval()
    hf64.set_attn_implementation("sdpa")
    hf64.set_experts_implementation("eager")
    ours64 = from_hf(hf).double().eval()
    return hf64, ours64


def _padded(lengths: list[int], side: str, seed: int = 5) -> tuple[Tensor, Tensor]:
    """``(B, T)`` ids of random sequences of the given lengths padded with 0 on ``side``, and the 0/1 mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        real = slice(width - length, width) if side == "left" else slice(0, length)
        ids[row, real] = torch.randint(1, VOCAB, (length,), generator=generator)
        mask[row, real] = 1
    return ids, mask


# ------------------------------------------------------------------------------------------------ logits


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_padded_logits_match_hugging_face_on_the_real_positions_in_float64(family, side):
    hf, ours = _float64_pair(family)
    ids, mask = _padded([8, 5, 2], side)
    real = mask.bool()
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # what transformers' generate passes with left padding
    with torch.no_grad():
        mine = ours(ids, mask).logits
        theirs = hf(ids, attention_mask=mask).logits
        theirs_positions = hf(ids, attention_mask=mask, position_ids=position_ids).logits
        alone = [ours(ids[row : row + 1, real[row]]).logits[0] for row in range(3)]
    # transformers' rotary tables are float32 whatever the model's dtype, as ours are: 1e-5, not float64's 1e-12.
    torch.testing.assert_close(mine[real], theirs[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine[real], theirs_positions[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine[real], torch.cat(alone), rtol=1e-5, atol=1e-5)  # each row as it is alone
    assert torch.isfinite(mine).all()  # the padding positions too


# ------------------------------------------------------------------------------------------------ auxiliary losses


def _num_experts(hf: nn.Module) -> int:
    return getattr(hf.config, "num_local_experts", None) or hf.config.num_experts


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", BALANCED)
def test_each_layers_load_balancing_loss_with_padding_is_hugging_faces_for_that_layer(family, side):
    # transformers' load_balancing_loss_func leaves padding out through the attention mask, and for one layer's
    # router logits is top_k times our loss (README: one MoE layer gives equal losses). Its pooled loss over the L
    # layers is top_k * E * sum_e mean_l(f_le) * mean_l(P_le), f the fraction of the routed copies of real tokens.
    hf, ours = _pair(family)
    ids, mask = _padded([8, 6, 3], side)
    with torch.no_grad():
        out = hf(ids, attention_mask=mask, labels=ids, output_router_logits=True)
        stats = ours(ids, mask).router_stats
    top_k, experts = hf.config.num_experts_per_tok, _num_experts(hf)
    assert len(stats) == len(out.router_logits) > 1
    real = mask.reshape(-1).bool()
    f_LE, p_LE = [], []
    for layer_stats, logits_TE in zip(stats, out.router_logits, strict=True):
        theirs = load_balancing_loss_func((logits_TE,), experts, top_k, mask)
        torch.testing.assert_close(top_k * layer_stats.losses["load_balance"], theirs, rtol=1e-5, atol=1e-6)
        # Our counts are the real tokens' routed copies: transformers' top-k of the same router, padding left out.
        chosen = logits_TE.softmax(-1).topk(top_k, dim=-1).indices[real]
        torch.testing.assert_close(
            layer_stats.tokens_per_expert, torch.bincount(chosen.flatten(), None, experts).float()
        )
        assert int(layer_stats.num_tokens) == int(mask.sum())
        f_LE.append(layer_stats.tokens_per_expert / (top_k * layer_stats.num_tokens))
        p_LE.append(logits_TE.softmax(-1)[real].mean(0))
    pooled = top_k * experts * (torch.stack(f_LE).mean(0) * torch.stack(p_LE).mean(0)).sum()
    torch.testing.assert_close(pooled, out.aux_loss, rtol=1e-5, atol=1e-6)


def _one_moe_layer(family: str) -> nn.Module:
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, router_aux_loss_coef=0.03, attn_implementation="eager")  # fmt: skip
    if family == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=24, num_local_experts=4, **common)
        return _perturb(transformers.MixtralForCausalLM(cfg))
    cfg = transformers.Qwen3MoeConfig(
        intermediate_size=40, head_dim=8, num_experts=6, moe_intermediate_size=12, norm_topk_prob=False, **common
    )
    return _perturb(transformers.Qwen3MoeForCausalLM(cfg))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["mixtral", "qwen3"])
def test_a_padded_batchs_training_loss_equals_hugging_faces_with_one_moe_layer(family, side, tmp_path):
    # CausalLMModule on a padded dict batch: the cross-entropy of the labels plus the load-balancing loss with the
    # coefficient from_hf read, against transformers' loss (labels, attention mask, router logits). A left-padded
    # row's first real token has no label: transformers would predict it from the padding, we do not.
    hf = _one_moe_layer(family)
    hf.save_pretrained(tmp_path)
    module = CausalLMModule(arch="mixtral-tiny", init_from=str(tmp_path))
    ids, mask = _padded([8, 5, 3], side, seed=2)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100  # no row trains its first position (row 0 is unpadded; the others' first real tokens below)
    first_real = mask.argmax(dim=1)
    labels[torch.arange(3), first_real] = -100
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, labels=labels, output_router_logits=True).loss
        ce, _, stats, (trained, *_) = module._loss({"input_ids": ids, "attention_mask": mask, "labels": labels})
        aux, _ = module.aux_loss(stats)
    assert trained == int((labels[:, 1:] != -100).sum()) > 0
    assert module.coefs["load_balance"] == pytest.approx(hf.config.router_aux_loss_coef * 2)
    torch.testing.assert_close(ce + aux, theirs, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ generation


def _module(family: str) -> CausalLMModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = CausalLMModule(arch="mixtral-tiny", overrides={"num_layers": 1})
    module.model = copy.deepcopy(_pair(family)[1])  # generate() leaves it in the module's train mode
    module.config = module.model.zoo_config
    return module


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_greedy_generation_of_left_padded_prompts_of_different_lengths_matches_hugging_face(family):
    hf, _ = _pair(family)
    module = _module(family)
    ids, mask = _padded([8, 4, 1], "left", seed=3)
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = module.generate(ids, 6, attention_mask=mask)
    assert torch.equal(cached, theirs)
    assert torch.equal(module.generate(ids, 6, attention_mask=mask, use_cache=False), theirs)
    assert torch.equal(cached[2:, 7:], module.generate(ids[2:, 7:], 6))  # the one-token prompt continues as alone


@pytest.mark.parametrize("side", ["left", "right"])
def test_switch_greedy_generation_of_padded_inputs_of_different_lengths_matches_hugging_face(side):
    hf = _switch(capacity=1000)
    module = Seq2SeqLMModule(arch="switch-tiny", overrides={"num_layers": 1})
    module.model = from_hf(hf)
    module.config = module.model.zoo_config
    ids, mask = _padded([9, 5, 1], side, seed=4)
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(module.generate(ids, 6, attention_mask=mask), theirs)
    assert torch.equal(module.generate(ids, 6, attention_mask=mask, use_cache=False), theirs)


# ------------------------------------------------------------------------------------------------ Switch


def _switch(capacity: int) -> nn.Module:
    cfg = transformers.SwitchTransformersConfig(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2, num_decoder_layers=2,
        num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=4, expert_capacity=capacity,
        relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0,
        tie_word_embeddings=False, attn_implementation="eager", decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    hf = _perturb(transformers.SwitchTransformersForConditionalGeneration(cfg))
    with torch.no_grad():  # transformers 5 unties the stacks' embeddings from `shared`
        hf.encoder.embed_tokens.weight.copy_(hf.shared.weight)
        hf.decoder.embed_tokens.weight.copy_(hf.shared.weight)
    return hf


def test_switch_with_capacity_drops_and_right_padding_matches_hugging_face():
    # Capacity is counted per sequence in token order: padding after the real tokens takes no slot a real token
    # would have had, in transformers too, so the same tokens are dropped.
    hf = _switch(capacity=3)
    ours = from_hf(hf).eval()
    ids, mask = _padded([12, 9, 4], "right", seed=6)
    dec, dec_mask = _padded([7, 5, 3], "right", seed=7)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
        out = ours(ids, dec, mask, dec_mask)
    assert all(int(s.num_dropped) > 0 for s in out.router_stats)
    torch.testing.assert_close(out.logits[dec_mask.bool()], theirs[dec_mask.bool()], rtol=1e-5, atol=1e-5)


def test_switch_left_padding_takes_no_capacity_so_each_row_decodes_as_alone():
    # README: transformers lets padding ahead of the real tokens fill expert slots, so its left-padded row differs
    # from the row alone; ours gives each row what it gives alone.
    hf = _switch(capacity=3)
    ours = from_hf(hf).eval()
    ids, mask = _padded([12, 6], "left", seed=6)
    dec, _ = _padded([5, 5], "right", seed=7)
    with torch.no_grad():
        padded = ours(ids, dec, mask).logits[1]
        alone = ours(ids[1:, 6:], dec[1:]).logits[0]
        theirs_padded = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits[1]
        theirs_alone = hf(input_ids=ids[1:, 6:], decoder_input_ids=dec[1:]).logits[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, theirs_alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(theirs_padded, theirs_alone, atol=1e-3)  # the padding took real tokens' slots
