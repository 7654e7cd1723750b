"""Hugging Face interop: every family converts logits-exact, routes alike, round-trips, and fails loudly."""

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_moe.interop import CheckpointMismatchError, UnsupportedConfigError, from_hf, hf_config_to_ours, to_hf
from lightning_moe.interop.hf import _HF_DEFAULTS
from lightning_moe.nn.moe import MoELayer

transformers = pytest.importorskip("transformers")

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.9,
    "mscale_all_dim": 0.7,
}


def _perturb(hf: torch.nn.Module, bias: bool = False) -> torch.nn.Module:
    """Weights off their init scale: sharp routers, non-unit norms, a non-zero V3 correction bias."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("mlp.gate.weight", "router.classifier.weight")):
                p.normal_(std=1.0)
            elif name.endswith(("norm.weight", "layer_norm.weight", "layernorm.weight")):
                p.uniform_(0.5, 1.5)
            elif "relative_attention_bias" in name:
                p.normal_(std=1.0)
            else:
                p.normal_(std=0.1)
        for name, buffer in hf.named_buffers():
            if bias and name.endswith("e_score_correction_bias"):
                buffer.copy_(0.3 * torch.randn_like(buffer))
    return hf.float().eval()


def _routers(hf: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for name, m in hf.named_modules() if name.endswith("mlp.gate") and "Router" in type(m).__name__]


def assert_causal_matches(hf: torch.nn.Module, ours: torch.nn.Module, vocab: int) -> None:
    """Logits within 1e-5 and, in every MoE layer, the same experts per token (HF's router outputs vs our stats)."""
    hf_ids = []
    hooks = [r.register_forward_hook(lambda m, i, out: hf_ids.append(out[2])) for r in _routers(hf)]
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (2, 12))
    try:
        with torch.no_grad():
            theirs = hf(ids).logits
            out = ours.eval()(ids)
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(out.logits, theirs, rtol=1e-5, atol=1e-5)
    assert len(out.router_stats) == len(hf_ids) > 0
    for stats, hf_TK in zip(out.router_stats, hf_ids, strict=True):
        assert torch.equal(stats.expert_ids.sort(dim=-1).values, hf_TK.sort(dim=-1).values)


# ------------------------------------------------------------------------------------------------ families


def mixtral(experts=4, top_k=2, heads=4, kv_heads=2, window=None, tied=False, vocab=97):
    cfg = transformers.MixtralConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        sliding_window=window,
        tie_word_embeddings=tied,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5e5},
        attn_implementation="eager",
    )
    return _perturb(transformers.MixtralForCausalLM(cfg))


def qwen2(step=1, mlp_only=(0,), normalize=False, experts=6, top_k=3, kv_heads=2, head_dim=None, shared=24):
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        **({} if head_dim is None else {"head_dim": head_dim}),
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=12,
        shared_expert_intermediate_size=shared,
        norm_topk_prob=normalize,
        decoder_sparse_step=step,
        mlp_only_layers=list(mlp_only),
        attn_implementation="eager",
    )
    return _perturb(transformers.Qwen2MoeForCausalLM(cfg))


def qwen3(mlp_only=(), kv_heads=2, experts=8, top_k=3):
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=16,
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=12,
        norm_topk_prob=True,
        mlp_only_layers=list(mlp_only),
        attn_implementation="eager",
    )
    return _perturb(transformers.Qwen3MoeForCausalLM(cfg))


def _deepseek_shapes(heads, first_dense, groups, topk_group, q_lora, rope):
    return dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_group=groups,
        topk_group=topk_group,
        first_k_dense_replace=first_dense,
        q_lora_rank=q_lora,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        max_position_embeddings=64,
        rope_parameters=rope,
        attn_implementation="eager",
    )


def deepseek_v2(
    heads=4, first_dense=1, groups=4, topk_group=2, q_lora=None, method="group_limited_greedy", shared=2, eps=1e-6
):
    cfg = transformers.DeepseekV2Config(
        **_deepseek_shapes(heads, first_dense, groups, topk_group, q_lora, YARN),
        rms_norm_eps=eps,
        n_shared_experts=shared,
        topk_method=method,
        routed_scaling_factor=3.0,
    )
    return _perturb(transformers.DeepseekV2ForCausalLM(cfg))


def deepseek_v3(heads=4, first_dense=1, groups=4, topk_group=2, q_lora=24, normalize=True, eps=1e-6, shared=1):
    rope = {"rope_type": "default", "rope_theta": 10000.0} if groups == 2 else YARN
    cfg = transformers.DeepseekV3Config(
        **_deepseek_shapes(heads, first_dense, groups, topk_group, q_lora, rope),
        rms_norm_eps=eps,
        n_shared_experts=shared,
        routed_scaling_factor=2.5,
        norm_topk_prob=normalize,
    )
    return _perturb(transformers.DeepseekV3ForCausalLM(cfg), bias=True)


CAUSAL = {
    "mixtral-e4-k2-h4-kv2": lambda: mixtral(),
    "mixtral-e8-k3-h4-kv1-window5-tied": lambda: mixtral(8, 3, 4, 1, window=5, tied=True),
    "mixtral-e3-k1-h2-kv2": lambda: mixtral(3, 1, 2, 2),
    "qwen2-shared-dense0": lambda: qwen2(),
    "qwen2-step2-normalized-kv1": lambda: qwen2(step=2, mlp_only=(), normalize=True, kv_heads=1),
    "qwen2-e4-k1-dense2": lambda: qwen2(mlp_only=(2,), experts=4, top_k=1, kv_heads=4),
    "qwen2-headdim16": lambda: qwen2(head_dim=16),  # not hidden_size / heads
    "qwen2-noshared": lambda: qwen2(shared=0),  # transformers builds an empty shared expert and its gate
    "deepseek-v3-noshared": lambda: deepseek_v3(shared=0),
    "qwen3-kv2": lambda: qwen3(),
    "qwen3-kv1-dense1-e6-k2": lambda: qwen3(mlp_only=(1,), kv_heads=1, experts=6, top_k=2),
    "deepseek-v2-groups": lambda: deepseek_v2(),
    "deepseek-v2-greedy-qlora-h2-nodense": lambda: deepseek_v2(2, 0, 1, 1, q_lora=24, method="greedy", shared=1),
    "deepseek-v3-g4-tg2": lambda: deepseek_v3(),
    # transformers' latent q/kv norms keep eps 1e-6 whatever rms_norm_eps says.
    "deepseek-v2-qlora-eps1e-2": lambda: deepseek_v2(q_lora=24, eps=1e-2),
    "deepseek-v3-g4-tg2-eps1e-2": lambda: deepseek_v3(eps=1e-2),
    "deepseek-v3-g2-tg1-dense2-noqlora-h2": lambda: deepseek_v3(2, 2, 2, 1, q_lora=None, normalize=False),
}


@pytest.mark.parametrize("case", sorted(CAUSAL))
def test_causal_families_match_hugging_face_logits_and_routing(case):
    hf = CAUSAL[case]()
    assert_causal_matches(hf, from_hf(hf), hf.config.vocab_size)


@pytest.mark.parametrize(
    "case", ["mixtral-e4-k2-h4-kv2", "qwen2-shared-dense0", "qwen3-kv2", "deepseek-v2-groups", "deepseek-v3-g4-tg2"]
)
def test_router_gate_precision_against_hugging_face_under_bf16_autocast(case):
    # Under CPU autocast every family's router computes its logits in bf16, DeepSeek's `.type(torch.float32)`
    # included (autocast casts F.linear's inputs whatever their dtype): gate_precision="compute" gives those
    # logits bit for bit. The float32 default gives the logits Hugging Face computes without autocast.
    hf = CAUSAL[case]()
    ours = from_hf(hf)
    pairs = list(zip(_routers(hf), [m.router for m in ours.modules() if isinstance(m, MoELayer)], strict=True))
    assert pairs
    torch.manual_seed(2)
    x = torch.randn(24, hf.config.hidden_size)
    for theirs, router in pairs:
        with torch.no_grad():
            theirs_fp32 = theirs(x)[0]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                theirs_bf16 = theirs(x)[0]
                default = router.logits(x)
                router.config = dataclasses.replace(router.config, gate_precision="compute")
                compute = router.logits(x)
        assert theirs_bf16.dtype == torch.bfloat16 and default.dtype == compute.dtype == torch.float32
        torch.testing.assert_close(compute, theirs_bf16.float(), rtol=0, atol=0)
        torch.testing.assert_close(default, theirs_fp32, rtol=0, atol=0)
        assert not torch.equal(default, compute)  # bf16 rounding shows: the two precisions differ


def _one_moe_layer(family):
    common = dict(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, router_aux_loss_coef=0.03, attn_implementation="eager")  # fmt: skip
    if family == "mixtral":
        return transformers.MixtralForCausalLM(
            transformers.MixtralConfig(intermediate_size=24, num_local_experts=4, **common)
        )
    cfg = transformers.Qwen3MoeConfig(intermediate_size=40, head_dim=8, num_experts=6, moe_intermediate_size=12,
                                      norm_topk_prob=False, **common)  # fmt: skip
    return transformers.Qwen3MoeForCausalLM(cfg)


@pytest.mark.parametrize("family", ["mixtral", "qwen3"])
def test_one_moe_layer_gets_hugging_faces_load_balancing_loss(family):
    hf = _perturb(_one_moe_layer(family))
    ours = from_hf(hf)
    assert ours.zoo_config.load_balance_coef == pytest.approx(0.03 * 2)
    ids = torch.randint(0, 97, (3, 10))
    with torch.no_grad():
        theirs = hf.config.router_aux_loss_coef * hf(ids, output_router_logits=True).aux_loss
        (stats,) = ours(ids).router_stats
    torch.testing.assert_close(ours.zoo_config.load_balance_coef * stats.losses["load_balance"], theirs)


@pytest.mark.parametrize(
    ("make", "layers"),
    [(lambda: mixtral(), 2), (lambda: qwen2(mlp_only=(0,)), 2), (lambda: qwen2(step=3, mlp_only=()), 1)],
)
def test_the_load_balance_coefficient_weighs_each_layer_as_hugging_faces_pooled_loss(make, layers, tmp_path):
    # transformers pools the statistics of all MoE layers into one loss (top_k when balanced); we add one per layer
    # (1 when balanced): c * top_k / L gives the same total when balanced, and exports back to c.
    hf = make()
    top_k = hf.config.num_experts_per_tok
    ours = from_hf(hf)
    assert sum(isinstance(m, MoELayer) for m in ours.modules()) == layers
    coef = ours.zoo_config.load_balance_coef
    assert coef == pytest.approx(hf.config.router_aux_loss_coef * top_k / layers)
    to_hf(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["router_aux_loss_coef"] == pytest.approx(
        hf.config.router_aux_loss_coef
    )


def switch(capacity=1000, tied=True, sparse=2, experts=4):
    cfg = transformers.SwitchTransformersConfig(
        vocab_size=96,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_heads=4,
        num_layers=4,
        num_decoder_layers=4,
        num_sparse_encoder_layers=sparse,
        num_sparse_decoder_layers=sparse,
        num_experts=experts,
        expert_capacity=capacity,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=12,
        dropout_rate=0.0,
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    hf = _perturb(transformers.SwitchTransformersForConditionalGeneration(cfg))
    with torch.no_grad():  # transformers 5 unties the stacks' embeddings from `shared` with the head
        hf.encoder.embed_tokens.weight.copy_(hf.shared.weight)
        hf.decoder.embed_tokens.weight.copy_(hf.shared.weight)
    return hf


def assert_switch_matches(hf, ours) -> list[int]:
    """Same logits, and per MoE layer the same number of kept tokens per expert as HF's capacity-masked dispatch."""
    kept = []
    hooks = [
        m.register_forward_hook(lambda m, i, out: kept.append(out[0].sum(dim=(0, 1))))
        for name, m in hf.named_modules()
        if name.endswith("mlp.router")
    ]
    torch.manual_seed(1)
    ids, dec = torch.randint(0, 96, (3, 20)), torch.randint(0, 96, (3, 14))
    try:
        with torch.no_grad():
            theirs = hf(input_ids=ids, decoder_input_ids=dec).logits
            out = ours.eval()(ids, dec)
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(out.logits, theirs, rtol=1e-5, atol=1e-5)
    assert len(out.router_stats) == len(kept) > 0
    for stats, hf_kept in zip(out.router_stats, kept, strict=True):
        torch.testing.assert_close(stats.kept_per_expert, hf_kept.float())
    return [int(s.num_dropped) for s in out.router_stats]


@pytest.mark.parametrize(("tied", "sparse"), [(True, 2), (False, 4), (True, 1)])
def test_switch_without_drops_matches_hugging_face(tied, sparse):
    hf = switch(tied=tied, sparse=sparse)
    ours = from_hf(hf)
    expected = [i % (4 // sparse) == 1 or sparse == 4 for i in range(4)]
    assert [layer.is_moe for layer in ours.encoder] == expected
    assert sum(assert_switch_matches(hf, ours)) == 0


def test_switch_z_loss_totals_hugging_faces_and_the_coefficients_round_trip(tmp_path):
    # transformers averages each stack's z-losses over its sparse layers; we add one per layer with c / n.
    hf = switch(sparse=2)
    ours = from_hf(hf)
    assert ours.zoo_config.z_loss_coef == pytest.approx(hf.config.router_z_loss_coef / 2)
    assert ours.zoo_config.load_balance_coef == pytest.approx(hf.config.router_aux_loss_coef / 2)
    torch.manual_seed(1)
    ids, dec = torch.randint(0, 96, (3, 20)), torch.randint(0, 96, (3, 14))
    with torch.no_grad():
        out = hf(input_ids=ids, decoder_input_ids=dec, output_router_logits=True)
        theirs = hf.config.router_z_loss_coef * (out.encoder_z_loss + out.decoder_z_loss)
        stats = ours.eval()(ids, dec).router_stats
    assert len(stats) == 4
    torch.testing.assert_close(ours.zoo_config.z_loss_coef * sum(s.losses["z_loss"] for s in stats), theirs)
    to_hf(ours, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["router_z_loss_coef"] == pytest.approx(hf.config.router_z_loss_coef)
    assert saved["router_aux_loss_coef"] == pytest.approx(hf.config.router_aux_loss_coef)


def test_a_configured_dropout_is_named_in_a_warning():
    with pytest.warns(UserWarning, match=r"sets \{'dropout_rate': 0.1\}: lightning-moe models have no dropout"):
        hf_config_to_ours(switch().config.to_dict() | {"dropout_rate": 0.1})


def test_switch_drops_the_same_tokens_as_hugging_face():
    hf = switch(capacity=3, experts=4)
    ours = from_hf(hf)
    moe = [m for m in ours.modules() if isinstance(m, MoELayer)]
    assert all(m.config.capacity_scope == "sequence" and m.config.expert_capacity == 3 for m in moe)
    dropped = assert_switch_matches(hf, ours)  # a different dropped token would change the logits
    assert all(d > 0 for d in dropped)


# ------------------------------------------------------------------------------------------------ directories


def _assert_same_logits(a, b, vocab=97):
    ids = torch.randint(0, vocab, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(ids).logits, b.eval()(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case",
    [
        "qwen2-shared-dense0",
        "qwen2-headdim16",
        "deepseek-v3-g4-tg2",
        "deepseek-v3-noshared",
        "mixtral-e8-k3-h4-kv1-window5-tied",
    ],
)
def test_round_trip_through_to_hf_and_from_pretrained(case, tmp_path):
    hf = CAUSAL[case]()
    ours = from_hf(hf)
    to_hf(ours, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    if case.startswith("deepseek-v3"):  # a buffer: check it travelled
        bias = [m.e_score_correction_bias for m in _routers(reloaded)]
        assert all(torch.equal(a, b.e_score_correction_bias) for a, b in zip(bias, _routers(hf), strict=True))
    assert_causal_matches(reloaded.float(), ours, hf.config.vocab_size)
    back = from_hf(tmp_path)
    _assert_same_logits(back, ours)
    # The training settings travel too (DeepSeek's aux_loss_alpha was dropped, so a re-import took a default).
    changed = {"seq_balance_coef": 0.0456} if case.startswith("deepseek") else {"load_balance_coef": 0.123}
    tuned = dataclasses.replace(ours.zoo_config, **changed)
    to_hf(ours, tmp_path / "tuned", config=tuned)
    again = hf_config_to_ours(json.loads((tmp_path / "tuned" / "config.json").read_text()))
    assert {k: getattr(again, k) for k in changed} == pytest.approx(changed)
    assert dataclasses.replace(again, **changed) == tuned


def test_switch_round_trip(tmp_path):
    hf = switch(capacity=3, tied=False)
    ours = from_hf(hf)
    to_hf(ours, tmp_path)
    reloaded = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation="eager"
    )
    assert_switch_matches(reloaded.float(), ours)


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_directory_loads_without_transformers(shard, tmp_path):
    hf = deepseek_v3()
    kwargs = {} if shard is None else {"max_shard_size": shard}
    hf.save_pretrained(tmp_path, **kwargs)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard is not None)
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        torch.save(hf(ids).logits, tmp_path / "expected.pt")
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["transformers"] = None  # any import of transformers now fails
        import torch
        from lightning_moe.interop import from_hf
        model = from_hf({str(tmp_path)!r}).eval()
        with torch.no_grad():
            logits = model(torch.load({str(tmp_path / "ids.pt")!r})).logits
        torch.testing.assert_close(logits, torch.load({str(tmp_path / "expected.pt")!r}), rtol=1e-5, atol=1e-5)
        assert not any(name.startswith("transformers") for name in sys.modules if sys.modules[name] is not None)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_export_replaces_a_sharded_checkpoint_in_the_same_directory(tmp_path):
    hf_a = mixtral()
    hf_a.save_pretrained(tmp_path, max_shard_size="20KB")  # model A: index + model-0000k-of-0000n shards
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(shards) > 1
    unrelated = ["tokenizer.json", "model-notes.txt", "adapter.safetensors"]
    for name in unrelated:
        (tmp_path / name).write_text("keep me")
    model_b = from_hf(mixtral())
    with torch.no_grad():
        for param in model_b.parameters():
            param.add_(0.05 * torch.randn_like(param))
    to_hf(model_b, tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert not any(path.exists() for path in shards)
    assert all((tmp_path / name).read_text() == "keep me" for name in unrelated)
    reloaded = from_hf(tmp_path)
    _assert_same_logits(reloaded, model_b)  # B's weights, not the stale shards of A
    with pytest.raises(AssertionError):
        _assert_same_logits(reloaded, from_hf(hf_a))
    _assert_same_logits(from_hf(to_hf(from_hf(hf_a), tmp_path)), from_hf(hf_a))  # a second export replaces B


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("preset", "dense"),
    [("mixtral-tiny-dense", "active"), ("qwen-moe-tiny-dense", "active"), ("deepseek-tiny-dense-total", "total")],
)
def test_dense_baseline_export_is_refused(preset, dense, tmp_path):
    from lightning_moe import zoo

    with pytest.raises(UnsupportedConfigError, match=rf"dense='{dense}' cannot be exported to Hugging Face: a dense"):
        to_hf(zoo.build(preset), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    moe = zoo.build(preset.split("-dense")[0])
    assert (to_hf(moe, tmp_path / "moe") / "model.safetensors").is_file()  # the MoE preset still exports


def _edit_checkpoint(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture
def qwen_dir(tmp_path):
    qwen2().save_pretrained(tmp_path)
    return tmp_path


def test_missing_tensor_is_named(qwen_dir):
    _edit_checkpoint(qwen_dir, lambda t: t.pop("model.layers.1.mlp.experts.2.up_proj.weight"))
    with pytest.raises(
        CheckpointMismatchError, match=r"'model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight' is missing"
    ):
        from_hf(qwen_dir)


def test_extra_tensor_is_named(qwen_dir):
    _edit_checkpoint(qwen_dir, lambda t: t.update({"model.layers.1.mlp.bogus.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointMismatchError, match=r"'model\.layers\.1\.mlp\.bogus\.weight' is unexpected"):
        from_hf(qwen_dir)


def test_mis_shaped_tensor_is_named(qwen_dir):
    def edit(t):
        t["model.layers.2.self_attn.k_proj.bias"] = torch.zeros(7)

    _edit_checkpoint(qwen_dir, edit)
    with pytest.raises(CheckpointMismatchError, match=r"'model\.layers\.2\.self_attn\.k_proj\.bias' has shape \(7,\)"):
        from_hf(qwen_dir)


def test_fused_expert_layout_is_checked_too():
    hf = qwen3()
    state = hf.state_dict()
    state["model.layers.0.mlp.experts.gate_up_proj"] = state["model.layers.0.mlp.experts.gate_up_proj"][:, :-2]
    hf.state_dict = lambda: state
    with pytest.raises(CheckpointMismatchError, match=r"'model\.layers\.0\.mlp\.experts\.gate_up_proj' has shape"):
        from_hf(hf)


def _qwen2_config(**changes):
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ).to_dict()
    return cfg | changes


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"use_sliding_window": True}, "use_sliding_window=True"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_type='linear'"),
        ({"some_new_switch": 3}, "some_new_switch"),
        ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ],
)
def test_unsupported_config_fields_are_named(changes, field):
    with pytest.raises(UnsupportedConfigError, match=field.replace("(", r"\(").replace("[", r"\[")):
        hf_config_to_ours(_qwen2_config(**changes))


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (lambda: transformers.Qwen3MoeConfig(attention_bias=True), "attention_bias=True"),
        (lambda: transformers.DeepseekV3Config(rope_interleave=False), "rope_interleave=False"),
        (lambda: transformers.DeepseekV2Config(topk_method="noaux_tc"), "topk_method='noaux_tc'"),
        (lambda: transformers.DeepseekV2Config(mlp_bias=True), "mlp_bias=True"),
        (lambda: transformers.SwitchTransformersConfig(router_bias=True), "router_bias=True"),
        (lambda: transformers.SwitchTransformersConfig(num_decoder_layers=6), "num_decoder_layers=6"),
        (lambda: transformers.SwitchTransformersConfig(num_sparse_decoder_layers=6), "num_sparse_decoder_layers=6"),
        (lambda: transformers.LlamaConfig(), "model_type='llama'"),
    ],
)
def test_unsupported_family_fields_are_named(config, field):
    with pytest.raises(UnsupportedConfigError, match=field):
        hf_config_to_ours(config().to_dict())


def test_config_mapping_reads_the_architectural_fields():
    cfg = hf_config_to_ours(
        transformers.MixtralConfig(sliding_window=7, rms_norm_eps=1e-6, tie_word_embeddings=True).to_dict()
    )
    assert (cfg.sliding_window, cfg.norm_eps, cfg.tie_embeddings, cfg.rope_theta) == (7, 1e-6, True, 1e6)
    v3 = hf_config_to_ours(json.loads(transformers.DeepseekV3Config(rope_parameters=YARN).to_json_string()))
    assert (v3.score_func, v3.group_score, v3.score_bias, v3.normalize_topk) == ("sigmoid", "top2_sum", True, True)
    assert (v3.n_group, v3.topk_group, v3.first_k_dense, v3.routed_scaling_factor) == (8, 4, 3, 2.5)
    assert (v3.rope.scaling, v3.rope.factor, v3.rope.mscale_all_dim) == ("yarn", 4.0, 0.7)
    # Old-style configs (rope_theta + rope_scaling with "type") read the same.
    old = {k: v for k, v in transformers.DeepseekV3Config().to_dict().items() if k != "rope_parameters"}
    old |= {
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", **{k: v for k, v in YARN.items() if k[:4] != "rope"}},
    }
    assert hf_config_to_ours(old).rope == v3.rope
    sw = hf_config_to_ours(transformers.SwitchTransformersConfig(expert_capacity=5, router_jitter_noise=0.1).to_dict())
    assert (sw.expert_capacity, sw.capacity_scope, sw.router_jitter, sw.sparse_step) == (5, "sequence", 0.1, 4)


@pytest.mark.parametrize(
    ("config_class", "required"),
    [
        (transformers.MixtralConfig, {}),
        (transformers.Qwen2MoeConfig, {}),
        (transformers.Qwen3MoeConfig, {}),
        (transformers.DeepseekV2Config, {"n_routed_experts": 64, "num_experts_per_tok": 6}),  # None by default
        (transformers.DeepseekV3Config, {}),
        (transformers.SwitchTransformersConfig, {}),
    ],
)
def test_absent_fields_read_as_transformers_class_defaults(config_class, required):
    # A config.json without a field means transformers' default for it: every field whose absence our reader
    # would otherwise fill differently is in the table, and the table agrees with the installed transformers.
    defaults = config_class(**required)
    model_type = defaults.model_type
    for name, value in _HF_DEFAULTS[model_type].items():
        assert getattr(defaults, name) == value, (model_type, name)
    full = defaults.to_dict()
    expected = hf_config_to_ours(full)
    for name in _HF_DEFAULTS[model_type]:
        assert hf_config_to_ours({k: v for k, v in full.items() if k != name}) == expected, name


def test_older_switch_hub_fields_read_as_what_transformers_builds_and_other_values_are_refused():
    full = transformers.SwitchTransformersConfig().to_dict()
    older = {**full, "num_selected_experts": 1, "router_type": "tokens_masked"}  # as 4.2x conversions wrote them
    assert hf_config_to_ours(older) == hf_config_to_ours(full)
    for name, value in (("num_selected_experts", 2), ("router_type", "experts_choose")):
        with pytest.raises(UnsupportedConfigError, match=rf"config field {name}={value!r} is unsupported"):
            hf_config_to_ours({**older, name: value})


def test_a_switch_config_without_num_decoder_layers_means_twelve_decoder_blocks_as_in_transformers():
    full = transformers.SwitchTransformersConfig(num_layers=4, num_decoder_layers=4).to_dict()
    del full["num_decoder_layers"]
    assert transformers.SwitchTransformersConfig(**full).num_decoder_layers == 12  # not num_layers
    with pytest.raises(UnsupportedConfigError, match=r"num_decoder_layers=12 is unsupported: encoder and decoder"):
        hf_config_to_ours(full)


def test_a_deepseek_v3_config_without_its_routing_fields_loads_as_transformers_loads_it(tmp_path):
    shapes = _deepseek_shapes(heads=2, first_dense=1, groups=8, topk_group=4, q_lora=None, rope=None)
    shapes |= {"n_routed_experts": 16, "num_experts_per_tok": 4, "rope_parameters": {"rope_type": "default"}}
    cfg = transformers.DeepseekV3Config(**shapes, n_shared_experts=1, routed_scaling_factor=2.5)
    _perturb(transformers.DeepseekV3ForCausalLM(cfg), bias=True).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for name in ("n_group", "topk_group", "routed_scaling_factor"):  # left at the class defaults 8, 4, 2.5
        raw.pop(name)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    ours = from_hf(tmp_path)
    assert (ours.zoo_config.n_group, ours.zoo_config.topk_group, ours.zoo_config.routed_scaling_factor) == (8, 4, 2.5)
    assert_causal_matches(theirs, ours, cfg.vocab_size)


# ------------------------------------------------------------------------------------------------ CLI


def test_module_init_from_builds_the_checkpoint_model_and_rejects_overrides(qwen_dir):
    from lightning_moe.module import CausalLMModule

    module = CausalLMModule(arch="qwen-moe-tiny", init_from=str(qwen_dir))
    assert module.config.dim == 32
    # The hyperparameters describe the imported model without the folder: they rebuild the same config.
    assert module.hparams.init_from is None and module.hparams.arch == "qwen-moe-tiny"
    assert CausalLMModule(arch=module.hparams.arch, overrides=module.hparams.overrides).config == module.config
    _assert_same_logits(module.model, from_hf(qwen_dir))
    with pytest.raises(ValueError, match=r"overrides=\{'num_layers': 4\} is invalid with init_from"):
        CausalLMModule(init_from=str(qwen_dir), overrides={"num_layers": 4})


def test_fine_tuning_from_a_hugging_face_directory_lowers_the_loss(tmp_path, monkeypatch):
    from lightning_moe.cli import run_cli
    from tests.test_cli import LossRecorder  # noqa: F401  (used by class path below)

    hf = mixtral(vocab=1024)
    hf.save_pretrained(tmp_path / "hf")
    monkeypatch.setenv("LIGHTNING_MOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[2] / "configs" / "mixtral-tiny.yaml"
    args = ["fit", "--config", str(config), "--model.init_args.init_from", str(tmp_path / "hf"),
            "--data.max_bytes", "200000", "--data.block_size", "32", "--data.batch_size", "8",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "25",
            "--trainer.val_check_interval", "25", "--trainer.limit_val_batches", "1",
            "--model.init_args.warmup_steps", "3", "--trainer.callbacks+", "tests.test_cli.LossRecorder"]  # fmt: skip
    cli = run_cli(args)
    recorder = next(c for c in cli.trainer.callbacks if type(c).__name__ == "LossRecorder")
    assert cli.model.config.num_experts == 4 and cli.model.config.dim == 32  # the checkpoint's, not the preset's
    first, last = sum(recorder.losses[:5]) / 5, sum(recorder.losses[-5:]) / 5
    assert last < first, recorder.losses
    # The run's checkpoint names the imported model by a preset and overrides, not by the folder: it loads (and
    # `generate`, `validate --ckpt_path` rebuild the module) after the folder is gone.
    import shutil

    from lightning_moe.module import CausalLMModule

    (ckpt,) = tmp_path.glob("lightning_logs/*/checkpoints/last.ckpt")
    shutil.rmtree(tmp_path / "hf")
    loaded = CausalLMModule.load_from_checkpoint(ckpt)
    assert loaded.hparams.init_from is None and loaded.hparams.arch == "mixtral-tiny"
    assert loaded.config == cli.model.config
    ids = torch.randint(0, 1024, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, cli.model.model.eval()(ids).logits)
