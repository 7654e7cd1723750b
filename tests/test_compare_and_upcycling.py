"""``compare``, dense baselines and upcycling: behaviour checked against independent computations."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from lightning_moe import compare, zoo
from lightning_moe.cli import main

TINY = [
    "--seeds", "[0]", "--val_batches", "2", "--block_size", "32", "--batch_size", "4", "--max_bytes", "200000",
    "--warmup_steps", "1", "--dense", "[active]",
]  # fmt: skip


@pytest.fixture(scope="module")
def deepseek_compare(tmp_path_factory):
    """A tiny ``compare`` of deepseek-tiny with upcycling: every run's result (weights included) and the warnings."""
    results = []
    original = compare._train

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        results.append(dict(result))
        return result

    out = tmp_path_factory.mktemp("deepseek-compare")
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mp.setenv("LIGHTNING_MOE_CACHE", str(tmp_path_factory.getbasetemp() / "lightning-moe-cache"))
        mp.setattr(compare, "_train", recording)
        main(["compare", "--arch", "deepseek-tiny", "--out_dir", str(out), *TINY, "--max_steps", "3",
              "--val_every", "3", "--upcycle_steps", "2"])  # fmt: skip
    return {r["label"]: r for r in results}, [str(w.message) for w in caught]


def test_compare_balances_deepseek_routers_with_their_score_bias(deepseek_compare):
    # deepseek-tiny has no load-balancing loss: its preset balances with the score bias (bias_update_speed 0.001),
    # which only the LoadBalancingBias callback moves, as configs/deepseek-tiny.yaml trains it.
    results, _ = deepseek_compare
    assert set(results) == {"moe", "dense-equal-active", "dense-continued", "upcycled-moe"}
    for label in ("moe", "upcycled-moe"):  # the upcycled model keeps DeepSeek's score-bias routers
        biases = {k: v for k, v in results[label]["state"].items() if k.endswith("router.score_bias")}
        assert len(biases) == 2
        for bias in biases.values():
            # sign updates of gamma = 0.001 per step: after 3 (2) steps each entry is a multiple of 0.001, not all 0
            assert bias.abs().max() > 0
            assert bias.abs().max() <= 0.001 * 3 + 1e-6
    assert not any(k.endswith("score_bias") for k in results["dense-equal-active"]["state"])


def test_compare_upcycling_passes_the_tokenizer_on(deepseek_compare):
    # The continuation's dense checkpoint is written by compare itself: the upcycled run must not warn that it holds
    # no tokenizer (the warning names a hidden temporary file the user never made).
    results, messages = deepseek_compare
    assert not [m for m in messages if "holds no tokenizer" in m]
    assert results["upcycled-moe"]["tokenizer_json"] == results["dense-equal-active"]["tokenizer_json"] is not None


def test_compare_final_val_loss_equals_a_hand_computed_validation_loss(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_MOE_CACHE", str(tmp_path.parent / "lightning-moe-cache"))
    cfg = compare.load_config(["--out_dir", str(tmp_path / "out"), *TINY, "--max_steps", "3", "--val_every", "2"])
    result = compare._train(cfg, "moe", 0, 3, {"arch": cfg.arch, "overrides": {}})
    model = zoo.build(cfg.arch)
    model.load_state_dict(result["state"])
    model.eval()
    data = compare._data(cfg)
    data.prepare_data()
    data.setup("fit")
    total, count = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(data.val_dataloader()):
            if i == cfg.val_batches:
                break
            logits = model(batch[:, :-1]).logits
            total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
            count += batch[:, 1:].numel()
    # Validations at 2 steps and at the last (3), which val_every does not divide; tokens are 4 * 32 per step.
    assert [point[0] for point in result["curve"]] == [2 * 128, 3 * 128]
    assert result["final_val_loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["tokens_per_sec"] == pytest.approx(3 * 128 / result["curve"][-1][1], rel=1e-6)
    counts = zoo.count_parameters("mixtral-tiny")
    assert (result["active_params"], result["total_params"]) == (counts.active, counts.total)


@pytest.mark.parametrize("name", ["mixtral-tiny", "qwen-moe-tiny", "qwen3-moe-tiny", "deepseek-tiny"])
def test_upcycled_output_equals_dense_in_training_mode_where_nothing_is_random(name):
    # No jitter and no random routing in these families: the training forward is the dense one too, so the first
    # training step starts from the dense model's loss.
    torch.manual_seed(0)
    dense = zoo.build(f"{name}-dense")
    cfg = zoo.config(name)
    moe = zoo.upcycle(dense, cfg.num_experts, cfg.top_k)
    assert moe.training
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_upcycled_model_keeps_the_dense_dtype_and_function(dtype):
    torch.manual_seed(0)
    dense = zoo.build("deepseek-tiny-dense").to(dtype).eval()
    moe = zoo.upcycle(dense, 8, 2)
    layer = moe.layers[1].ffn
    assert layer.experts.w1.dtype == layer.router.gate.weight.dtype == dtype
    assert layer.router.score_bias.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ids = torch.randint(0, 1024, (2, 16))
    with torch.no_grad():
        reference = dense(ids).logits
        tol = 1e-10 if dtype == torch.float64 else 2e-2
        torch.testing.assert_close(moe(ids).logits, reference, atol=tol, rtol=0)


def test_switch_upcycle_drops_tokens_in_eval_unless_eval_capacity_factor_is_null_too():
    # Switch's presets have capacity_factor 1.25 and eval_capacity_factor 2.0: in eval mode the second applies, so
    # capacity_factor: null alone leaves the upcycled model dropping tokens; both null make it equal the dense one.
    torch.manual_seed(0)
    ids = torch.randint(0, 1024, (2, 64))
    gaps = []
    for overrides in ({"capacity_factor": None}, {"capacity_factor": None, "eval_capacity_factor": None}):
        dense = zoo.build("switch-tiny", dense="active", **overrides).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # top_k=1 renormalised
            moe = zoo.upcycle(dense, 8, 1, zero_router=True)  # all tokens tie onto expert 0: over capacity
        with torch.no_grad():
            gaps.append((moe(ids, decoder_input_ids=ids).logits - dense(ids, decoder_input_ids=ids).logits).abs().max())
    assert gaps[0] > 1e-2 and gaps[1] < 1e-5
