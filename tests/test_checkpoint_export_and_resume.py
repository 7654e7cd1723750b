"""Checkpoints of trained runs exported to Hugging Face: the exported model generates as ours does.

``transformers``' ``generate`` reads its end, padding and decoder-start ids from ``config.json``; where the export
leaves them out it takes the config class's defaults, which name other tokens than our tokenizer's.
"""

import json

import lightning as L
import pytest
import torch
import torch.distributed.checkpoint as dcp
import transformers
from tokenizers import Tokenizer

from lightning_moe.data import EOS_TOKEN, PAD_TOKEN, TextDataModule
from lightning_moe.interop import from_hf, to_hf
from lightning_moe.module import CausalLMModule, Seq2SeqLMModule
from lightning_moe.strategies import full_checkpoint

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i * i}  # square\n" for i in range(40))
VOCAB = 300

CAUSAL = {
    "mixtral": ("mixtral-tiny", {"dim": 32, "ffn_hidden": 32, "num_experts": 4}),
    "qwen2_moe": ("qwen-moe-tiny", {"dim": 32, "expert_hidden": 16, "shared_expert_hidden": 0, "dense_hidden": 32}),
    "qwen3_moe": ("qwen3-moe-tiny", {"dim": 32, "head_dim": 8, "expert_hidden": 16, "dense_hidden": 32}),
    "deepseek_v2": (
        "deepseek-tiny",
        {"dim": 32, "dense_hidden": 32, "moe_hidden": 16, "num_experts": 8, "n_group": 1, "topk_group": 1}
        | {"score_func": "softmax", "score_bias": False, "normalize_topk": False, "bias_update_speed": 0.0},
    ),
    "deepseek_v3": ("deepseek-tiny", {"dim": 32, "dense_hidden": 32, "moe_hidden": 16, "q_lora_rank": None}),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("data")
    (root / "corpus.txt").write_text(TEXT)
    return root


def _data(root) -> TextDataModule:
    return TextDataModule(
        sources=[str(root / "corpus.txt")],
        vocab_size=VOCAB,
        block_size=16,
        batch_size=4,
        val_fraction=0.1,
        cache_dir=str(root / "cache"),
    )


def _fit_and_reload(module_class, arch, overrides, root, tmp_path):
    """One training step of a real run, its checkpoint saved and loaded back (tokenizer included)."""
    torch.manual_seed(0)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        num_sanity_val_steps=0, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module_class(arch=arch, overrides=overrides, warmup_steps=0), _data(root))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    module = module_class.load_from_checkpoint(tmp_path / "run.ckpt").eval()
    assert module.tokenizer_json is not None
    return module


@pytest.mark.parametrize("family", sorted(CAUSAL))
def test_an_exported_run_stops_generating_at_the_tokenizers_end_token_in_transformers(family, data_dir, tmp_path):
    arch, overrides = CAUSAL[family]
    module = _fit_and_reload(CausalLMModule, arch, overrides, data_dir, tmp_path)
    ours_tokenizer = Tokenizer.from_str(module.tokenizer_json)
    eos, pad = ours_tokenizer.token_to_id(EOS_TOKEN), ours_tokenizer.token_to_id(PAD_TOKEN)
    with torch.no_grad():  # every logit 0: greedy decoding picks id 0, the tokenizer's <|endoftext|>
        module.model.norm.weight.zero_()
    assert eos == 0
    out = to_hf(module, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family
    assert (config["eos_token_id"], config["pad_token_id"]) == (eos, pad)

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    prompt = torch.tensor([ours_tokenizer.encode("def f3(x):").ids])
    ours = module.generate(prompt, max_new_tokens=5, stop_id=eos)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
    assert ours.tolist() == theirs.tolist() == [prompt[0].tolist() + [eos]]

    # The tokenizer loads with its end and padding tokens named, so it pads a batch.
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tokenizer.eos_token, hf_tokenizer.pad_token) == (EOS_TOKEN, PAD_TOKEN)
    long, short = ours_tokenizer.encode("def f3(x):").ids, ours_tokenizer.encode("x").ids
    batch = hf_tokenizer(["def f3(x):", "x"], padding=True)["input_ids"]
    assert batch == [long, short + [pad] * (len(long) - len(short))]


def test_an_exported_switch_run_decodes_in_transformers_from_the_start_id_it_was_trained_with(data_dir, tmp_path):
    overrides = {"vocab_size": 320, "dim": 32, "ffn_hidden": 32, "num_heads": 2, "head_dim": 16, "num_experts": 4}
    overrides |= {"expert_capacity": 64, "capacity_scope": "sequence", "capacity_factor": None, "router_jitter": 0.0}
    overrides |= {"eval_capacity_factor": None}
    module = _fit_and_reload(Seq2SeqLMModule, "switch-tiny", overrides, data_dir, tmp_path)
    vocab = Tokenizer.from_str(module.tokenizer_json)
    eos, pad = vocab.token_to_id(EOS_TOKEN), vocab.token_to_id(PAD_TOKEN)
    assert module.decoder_start_id == pad != 0  # Seq2SeqLMModule trains with the padding id as the start
    out = to_hf(module, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert (config["decoder_start_token_id"], config["pad_token_id"], config["eos_token_id"]) == (pad, pad, eos)

    hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(out, attn_implementation="eager")
    hf.eval()
    inputs = torch.tensor([vocab.encode("def f7(x):\n    return").ids])
    ours = module.generate(inputs, max_new_tokens=6, stop_id=eos)
    theirs = hf.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=6, do_sample=False)
    assert ours.tolist() == theirs.tolist()
    with torch.no_grad():
        torch.testing.assert_close(
            hf(input_ids=inputs, decoder_input_ids=ours).logits, module(inputs, ours).logits, rtol=1e-5, atol=1e-5
        )


def test_special_token_ids_of_an_imported_checkpoint_survive_the_export(tmp_path):
    config = transformers.Qwen2MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, bos_token_id=7, eos_token_id=9, pad_token_id=3,
    )  # fmt: skip
    torch.manual_seed(0)
    ours = from_hf(transformers.Qwen2MoeForCausalLM(config).eval())
    to_hf(ours, tmp_path)
    exported = json.loads((tmp_path / "config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"], exported["pad_token_id"]) == (7, 9, 3)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (reloaded.generation_config.eos_token_id, reloaded.generation_config.pad_token_id) == (9, 3)
    assert not (tmp_path / "tokenizer_config.json").exists()  # no tokenizer given: none written


def test_full_checkpoint_refuses_a_folder_without_meta_pt_before_reading_the_tensors(tmp_path, monkeypatch):
    dcp.save({"state_dict": {"w": torch.ones(3)}}, checkpoint_id=tmp_path, no_dist=True)
    reads = []
    monkeypatch.setattr(dcp, "load", lambda *args, **kwargs: reads.append(args))
    with pytest.raises(FileNotFoundError, match=r"no meta\.pt \(not written by a Lightning Trainer\)"):
        full_checkpoint(tmp_path)
    assert reads == []  # refused before any shard was read


def test_two_steps_and_a_resumed_third_equal_three_steps_bit_for_bit(data_dir, tmp_path):
    """Weights, the router's correction bias (a buffer) and the AdamW moments, all exactly."""
    overrides = {"vocab_size": VOCAB, "dim": 32, "dense_hidden": 32, "moe_hidden": 16, "num_experts": 8}
    overrides |= {"n_group": 2, "topk_group": 1, "bias_update_speed": 0.01}

    def fit(steps: int, ckpt_path: str | None = None):
        torch.manual_seed(0)
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                            limit_val_batches=0, num_sanity_val_steps=0)  # fmt: skip
        module = CausalLMModule(arch="deepseek-tiny", overrides=overrides, warmup_steps=1, lr=1e-2)
        trainer.fit(module, _data(data_dir), ckpt_path=ckpt_path)
        return trainer, module

    whole, whole_module = fit(3)
    first, _ = fit(2)
    first.save_checkpoint(tmp_path / "step2.ckpt")
    resumed, resumed_module = fit(3, str(tmp_path / "step2.ckpt"))
    expected, got = whole_module.state_dict(), resumed_module.state_dict()
    assert any(name.endswith("score_bias") for name in expected)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    expected, got = whole.optimizers[0].state_dict()["state"], resumed.optimizers[0].state_dict()["state"]
    assert expected.keys() == got.keys() and len(expected) > 0
    for index, state in expected.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(got[index][key])), (index, key)
