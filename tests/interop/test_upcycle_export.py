"""Upcycled models carry a zoo config and export to Hugging Face; to_hf writes its folder all or nothing."""

import contextlib
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from lightning_moe import zoo
from lightning_moe.interop import UnsupportedConfigError, from_hf, to_hf
from lightning_moe.interop import hf as hf_module
from lightning_moe.nn.moe import MoELayer

# (dense preset, num_experts, top_k, split_hidden): every family whose config can express the upcycled model.
EXPRESSIBLE = {
    "mixtral": ("mixtral-tiny-dense", 4, 2, False),
    "qwen2-split": ("qwen-moe-tiny-dense", 8, 2, True),  # 512 dense units in 8 slices of 64; shared expert gone
    "qwen3-total": ("qwen3-moe-tiny-dense-total", 4, 1, False),
    "deepseek-v3": ("deepseek-tiny-dense", 6, 3, False),  # groups, scaling and shared experts gone
    "glam-total-split": ("glam-tiny-dense-total", 8, 2, True),  # 8 * 256 units in 8 slices: ffn_hidden again
}
# The exportable ones and the Hugging Face model_type of their upcycled export.
EXPORTABLE = {
    "mixtral": "mixtral",
    "qwen2-split": "qwen2_moe",
    "qwen3-total": "qwen3_moe",
    "deepseek-v3": "deepseek_v3",
}


def _upcycled(case: str, noise_std: float = 0.05) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A dense tiny preset and its upcycled model, experts apart by noise so that routing changes the output."""
    preset, num_experts, top_k, split = EXPRESSIBLE[case]
    torch.manual_seed(0)
    dense = zoo.build(preset)
    generator = torch.Generator().manual_seed(1)
    moe = zoo.upcycle(dense, num_experts, top_k, noise_std=noise_std, split_hidden=split, generator=generator)
    return dense, moe


def _ids(model: torch.nn.Module, seed: int = 2) -> torch.Tensor:
    vocab = model.embed.weight.shape[0]
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", sorted(EXPRESSIBLE))
def test_upcycled_zoo_config_rebuilds_the_same_network(case):
    dense, moe = _upcycled(case)
    cfg = moe.zoo_config
    assert type(cfg) is type(dense.zoo_config) and cfg.dense is None
    assert moe.upcycled_from == dense.zoo_config  # kept, and the MoE config is another object
    assert (
        cfg is not moe.upcycled_from and cfg.num_experts == EXPRESSIBLE[case][1] and cfg.top_k == EXPRESSIBLE[case][2]
    )
    rebuilt = zoo.build(cfg)
    ours = moe.state_dict()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in ours.items()}
    assert [m.config for m in rebuilt.modules() if isinstance(m, MoELayer)] == [
        m.config for m in moe.modules() if isinstance(m, MoELayer)
    ]
    rebuilt.load_state_dict(ours)
    ids = _ids(moe)
    with torch.no_grad():
        expected, got = moe.eval()(ids).logits, rebuilt.eval()(ids).logits
    assert torch.equal(got, expected)


def test_the_upcycled_zoo_config_is_the_models_own():
    dense, moe = _upcycled("deepseek-v3")
    moe.zoo_config.rope.theta *= 2
    assert moe.upcycled_from.rope.theta == dense.zoo_config.rope.theta == moe.zoo_config.rope.theta / 2


@pytest.mark.parametrize("case", sorted(EXPORTABLE))
def test_upcycled_model_exports_to_hugging_face_with_the_same_logits(case, tmp_path):
    transformers = pytest.importorskip("transformers")
    from tests.interop.test_hf import assert_causal_matches

    _, moe = _upcycled(case)
    to_hf(moe, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == EXPORTABLE[case]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    assert_causal_matches(theirs, moe, moe.zoo_config.vocab_size)  # logits and each layer's chosen experts


def test_a_module_holding_an_upcycled_model_exports_it(tmp_path):
    from lightning_moe.module import CausalLMModule

    torch.manual_seed(0)
    module = CausalLMModule(arch="qwen3-moe-tiny-dense", upcycle={"num_experts": 4, "top_k": 2, "noise_std": 0.05})
    assert module.config.dense == "active"  # the module's config stays the dense baseline's
    to_hf(module, tmp_path)
    back = from_hf(tmp_path).eval()
    ids = _ids(module.model)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, module.model.eval()(ids).logits, rtol=0, atol=1e-6)


def test_a_model_upcycled_without_a_zoo_config_still_exports(tmp_path):
    _, moe = _upcycled("mixtral")
    expected = moe.zoo_config
    moe.zoo_config = None  # as upcycle left it before it set one (a model saved whole then)
    to_hf(moe, tmp_path)
    back = from_hf(tmp_path)
    assert dataclasses.replace(back.zoo_config, load_balance_coef=expected.load_balance_coef) == expected
    ids = _ids(moe)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids).logits, moe.eval()(ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("preset", "num_experts", "top_k", "split", "why"),
    [
        ("switch-tiny-dense", 4, 1, False, r"SwitchConfig routes top-1 .* renormalises the chosen weights"),
        ("glam-tiny-dense", 8, 2, False, r"GlamConfig has one ffn_hidden \(256\) .* experts are 512 wide"),
        ("glam-tiny-dense", 8, 2, True, r"GlamConfig has one ffn_hidden \(256\) .* experts are 64 wide"),
    ],
)
def test_an_upcycled_model_without_a_preset_form_is_refused_with_the_reason(
    preset, num_experts, top_k, split, why, tmp_path
):
    base, _, _ = preset.rpartition("-dense")
    dense = zoo.build(base, dense="active")
    with (
        pytest.warns(UserWarning) if top_k == 1 else contextlib.nullcontext()
    ):  # top-1 renormalised: RouterConfig warns
        moe = zoo.upcycle(dense, num_experts, top_k, split_hidden=split)
    assert moe.zoo_config is None and moe.upcycled_from == dense.zoo_config
    with pytest.raises(UnsupportedConfigError, match=rf"this upcycled model's structure has no preset form .*{why}"):
        to_hf(moe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_upcycled_glam_with_a_preset_form_gets_the_usual_family_refusal(tmp_path):
    _, moe = _upcycled("glam-total-split")
    with pytest.raises(UnsupportedConfigError, match="config of type GlamConfig has no Hugging Face counterpart"):
        to_hf(moe, tmp_path)


# ------------------------------------------------------------------------------------------------ atomic writes


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (hidden ones and folders included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in folder.rglob("*")}


def _failing_save_file(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"half a checkpoint")  # a partial file, then the error
    raise OSError("No space left on device")


def _two_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    return zoo.build("mixtral-tiny", num_layers=1), zoo.build("mixtral-tiny", num_layers=1)


def test_a_failed_export_leaves_the_previous_export_intact(tmp_path, monkeypatch):
    import safetensors.torch

    old, new = _two_models()
    out = tmp_path / "export"
    to_hf(old, out)
    (out / "notes.txt").write_text("the user's")
    before, siblings = _snapshot(tmp_path), sorted(os.listdir(tmp_path))
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="No space left on device"):
        to_hf(new, out)
    assert _snapshot(tmp_path) == before  # the old files as they were, no temporary file or folder anywhere
    assert sorted(os.listdir(tmp_path)) == siblings
    ids = _ids(old)
    with torch.no_grad():
        torch.testing.assert_close(from_hf(out).eval()(ids).logits, old.eval()(ids).logits, rtol=0, atol=0)

    monkeypatch.undo()
    to_hf(new, out)  # the next export goes through and leaves nothing behind either
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "notes.txt"]
    assert sorted(os.listdir(tmp_path)) == siblings
    with torch.no_grad():
        torch.testing.assert_close(from_hf(out).eval()(ids).logits, new.eval()(ids).logits, rtol=0, atol=0)


def test_a_failed_export_to_a_new_folder_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    model, _ = _two_models()
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="No space left on device"):
        to_hf(model, tmp_path / "a" / "b" / "export")
    assert os.listdir(tmp_path) == []  # not the folder, not its parents, not a temporary sibling


def _tokenizer(word: str) -> str:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    return Tokenizer(WordLevel({word: 0, "<|endoftext|>": 1}, unk_token=word)).to_str()


def test_an_export_failing_while_moving_its_files_in_puts_the_old_ones_back(tmp_path, monkeypatch):
    old, new = _two_models()
    out = tmp_path / "export"
    to_hf(old, out, tokenizer=_tokenizer("a"))
    shards = ["model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for name in shards:  # a sharded checkpoint the export would remove
        (out / name).write_text("an older shard")
    before, siblings = _snapshot(tmp_path), sorted(os.listdir(tmp_path))
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == out / "config.json" and Path(src).parent.name.startswith(".to_hf-"):  # the new one, last
            raise PermissionError("config.json is locked")
        return real_replace(src, dst)

    monkeypatch.setattr(hf_module.os, "replace", replace)
    with pytest.raises(PermissionError, match="config.json is locked"):
        to_hf(new, out, tokenizer=_tokenizer("b"))
    assert _snapshot(tmp_path) == before  # weights, tokenizer and shards: all the old ones again
    assert sorted(os.listdir(tmp_path)) == siblings


def test_an_export_that_cannot_put_an_old_file_back_says_where_it_kept_it(tmp_path, monkeypatch):
    old, new = _two_models()
    out = tmp_path / "export"
    to_hf(old, out)
    before = _snapshot(out)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == out / "config.json":  # neither the new config.json nor the old one can go back in
            raise PermissionError("config.json is locked")
        return real_replace(src, dst)

    monkeypatch.setattr(hf_module.os, "replace", replace)
    with pytest.raises(OSError, match="could not restore .* the previous files it could not put back are in ") as err:
        to_hf(new, out)
    kept = Path(str(err.value).rpartition("could not put back are in ")[2])
    assert kept.parent.parent == out and (kept / "config.json").read_bytes() == before["config.json"]
    assert (out / "model.safetensors").read_bytes() == before["model.safetensors"]
