"""Gaps in the LightningModule: resume checks, the tokenizer on resume, generation arguments, argument checks."""

import dataclasses
import warnings

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from lightning_moe import zoo
from lightning_moe.data import TextDataModule
from lightning_moe.module import CausalLMModule, sample_next

BASE = {"dim": 32, "ffn_hidden": 32, "num_layers": 1}
TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i * i}  # square\n" for i in range(60))


def _trainer(tmp_path, max_steps: int = 1) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                     num_sanity_val_steps=0, default_root_dir=tmp_path)  # fmt: skip


def _tokens() -> DataLoader:
    return DataLoader(torch.randint(0, 64, (8, 9), generator=torch.Generator().manual_seed(0)), batch_size=4)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    """A one-step run of a tiny mixtral on plain token batches (so no tokenizer), saved to a file."""
    tmp_path = tmp_path_factory.mktemp("saved")
    trainer = _trainer(tmp_path)
    trainer.fit(CausalLMModule(arch="mixtral-tiny", overrides={**BASE, "rope_theta": 1e4}, warmup_steps=0), _tokens())
    path = str(tmp_path / "step1.ckpt")
    trainer.save_checkpoint(path)
    return path


def _restore(path: str, **module_args) -> CausalLMModule:
    """A new module given the checkpoint as Lightning gives it on resume: the hook, then the weights."""
    module = CausalLMModule(**module_args)
    checkpoint = torch.load(path, weights_only=False)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    return module


def test_resume_accepts_overrides_that_build_the_checkpoints_network(saved, tmp_path):
    default_experts = zoo.config("mixtral-tiny").num_experts  # the preset's own value: the same network
    module = CausalLMModule(arch="mixtral-tiny", overrides={**BASE, "rope_theta": 1e4, "num_experts": default_experts})
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, _tokens(), ckpt_path=saved)
    assert trainer.global_step == 2
    # Another preset's name with the overrides that make the checkpoint's config is the same network too.
    other, big = zoo.config("mixtral-tiny", **BASE, rope_theta=1e4), zoo.config("mixtral-8x7b")
    fields = [f.name for f in dataclasses.fields(other) if getattr(other, f.name) != getattr(big, f.name)]
    overrides = {name: getattr(other, name) for name in fields}
    assert zoo.config("mixtral-8x7b", **overrides) == other
    _restore(saved, arch="mixtral-8x7b", overrides=overrides)


def test_resume_may_change_training_only_config_fields(saved):
    training = {"load_balance_coef": 0.5, "z_loss_coef": 0.01, "router_jitter": 0.1, "capacity_factor": 2.0}
    module = _restore(saved, arch="mixtral-tiny", overrides={**BASE, "rope_theta": 1e4, **training})
    assert module.coefs["load_balance"] == 0.5  # this run's settings, not the checkpoint's
    assert module.config.capacity_factor == 2.0


@pytest.mark.parametrize(
    ("arch", "overrides", "match"),
    [
        ("mixtral-tiny", {**BASE, "rope_theta": 1e4, "num_experts": 4},
         r"overrides=\{.*'num_experts': 4\} is invalid for this checkpoint.*num_experts: checkpoint 8, now 4"),
        ("mixtral-tiny", {**BASE, "rope_theta": 10.0}, r"rope_theta: checkpoint 10000.0, now 10.0"),
        ("qwen-moe-tiny", {"dim": 32, "num_layers": 1}, r"arch='qwen-moe-tiny' is invalid for this checkpoint, which "
         r"was trained with arch='mixtral-tiny'.*family: checkpoint mixtral, now qwen_moe"),
    ],
)  # fmt: skip
def test_resume_refuses_another_network_naming_the_fields_and_both_values(saved, arch, overrides, match):
    with pytest.raises(ValueError, match=match):
        _restore(saved, arch=arch, overrides=overrides)


def test_a_checkpoint_without_a_tokenizer_keeps_the_datas_on_resume(saved, tmp_path):
    assert "tokenizer_json" not in torch.load(saved, weights_only=False)
    (tmp_path / "corpus.txt").write_text(TEXT)
    data = TextDataModule(sources=[str(tmp_path / "corpus.txt")], vocab_size=300, block_size=8, batch_size=4,
                          val_fraction=0.1, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    module = CausalLMModule(arch="mixtral-tiny", overrides={**BASE, "rope_theta": 1e4}, warmup_steps=0)
    trainer = _trainer(tmp_path, max_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, data, ckpt_path=saved)
    assert module.tokenizer_json == data.tokenizer.to_str()
    trainer.save_checkpoint(tmp_path / "step2.ckpt")
    assert torch.load(tmp_path / "step2.ckpt", weights_only=False)["tokenizer_json"] == data.tokenizer.to_str()
    # The checkpoint cannot tell which tokenizer its weights learnt: a warning says the data's must be that one.
    assert any("holds no tokenizer: the data's tokenizer must be the one" in str(w.message) for w in caught)


def _tiny() -> CausalLMModule:
    return CausalLMModule(arch="mixtral-tiny", overrides=BASE)


def test_generate_refuses_top_k_when_greedy_as_the_cli_does():
    prompt = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"top_k=5 is invalid with temperature=0: greedy decoding takes the top token"):
        _tiny().generate(prompt, 1, temperature=0.0, top_k=5)
    assert _tiny().generate(prompt, 1, temperature=1.0, top_k=5).shape == (1, 3)


def test_generate_takes_numpy_numbers_and_refuses_a_use_cache_that_is_not_a_bool():
    prompt = torch.randint(0, 100, (2, 3), generator=torch.Generator().manual_seed(0))
    module = _tiny()
    torch.manual_seed(5)
    plain = module.generate(prompt, 4, temperature=0.7, top_k=20)
    torch.manual_seed(5)
    numpy_args = module.generate(prompt, 4, temperature=np.float64(0.7), top_k=20)
    torch.manual_seed(5)
    numpy_float32 = module.generate(prompt, 4, temperature=np.float32(0.5), top_k=20)
    torch.manual_seed(5)
    assert torch.equal(numpy_float32, module.generate(prompt, 4, temperature=float(np.float32(0.5)), top_k=20))
    assert torch.equal(plain, numpy_args)
    with pytest.raises(ValueError, match=r"use_cache='no' is invalid: must be True or False"):
        module.generate(prompt, 1, use_cache="no")


@pytest.mark.parametrize("mask", [[[1, 1]], "11", torch.ones(1, 2).tolist()])
def test_decoder_generate_refuses_a_mask_that_is_not_a_tensor(mask):
    with pytest.raises(ValueError, match=r"attention_mask of type list|attention_mask of type str"):
        _tiny().generate(torch.zeros(1, 2, dtype=torch.long), 1, attention_mask=mask)


def test_top_k_keeps_ties_at_the_kth_logit_as_transformers_does():
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])
    kept = TopKLogitsWarper(top_k=2)(None, logits.clone()).isfinite()
    torch.manual_seed(0)
    draws = torch.cat([sample_next(logits, 1.0, 2) for _ in range(400)]).flatten()
    assert set(draws.tolist()) == set(kept[0].nonzero().flatten().tolist())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lr="0.01"), r"lr='0.01' is invalid: must be a finite number > 0"),
        (dict(overrides=[("dim", 32)]), r"overrides=\[\('dim', 32\)\] is invalid: must be a dict"),
        (dict(arch=5), r"arch=5 is invalid: must be a preset name"),
        (dict(arch="mixtral-tiny-dense", upcycle="ab"), r"upcycle='ab' is invalid: must be a dict"),
        (dict(reuse_expert_grad_memory="no"), r"reuse_expert_grad_memory='no' is invalid: must be a bool"),
    ],
)
def test_module_arguments_of_the_wrong_type_get_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CausalLMModule(**kwargs)


def test_resume_without_changes_gives_no_warning_or_error(saved):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*(tokenizer|network).*")
        _restore(saved, arch="mixtral-tiny", overrides={**BASE, "rope_theta": 1e4})


def test_logged_hyperparameters_describe_the_network_the_checkpoints_record(tmp_path):
    # Loggers write hparams_initial (hparams.yaml); an imported model is recorded as preset + overrides, not its path.
    from lightning.pytorch.loggers import CSVLogger

    from lightning_moe.interop import to_hf

    to_hf(CausalLMModule(arch="mixtral-tiny", overrides=BASE), tmp_path / "hf")
    module = CausalLMModule(init_from=str(tmp_path / "hf"), warmup_steps=0)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=CSVLogger(tmp_path, name="run"),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0)  # fmt: skip
    trainer.fit(module, _tokens())
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    recorded = torch.load(tmp_path / "run.ckpt", weights_only=False)["hyper_parameters"]
    assert zoo.config(recorded["arch"], **recorded["overrides"]) == zoo.config("mixtral-tiny", **BASE)
    logged = yaml.safe_load((tmp_path / "run" / "version_0" / "hparams.yaml").read_text())
    assert {k: logged[k] for k in ("arch", "overrides", "init_from")} == {
        k: recorded[k] for k in ("arch", "overrides", "init_from")
    }


def test_a_preset_larger_than_the_memory_available_is_refused_before_allocating(monkeypatch):
    # mixtral-8x7b's float32 weights (46.7B parameters, 174 GiB) would run the machine out of memory.
    import lightning_moe.module as module_lib

    monkeypatch.setattr(module_lib, "available_memory", lambda: 100 * 2**30)
    with pytest.raises(ValueError, match=r"arch='mixtral-8x7b' is invalid on this machine: its 46.7B parameters need "
                                         r"174.0 GiB in torch.float32 and 100.0 GiB"):  # fmt: skip
        CausalLMModule(arch="mixtral-8x7b")
    tiny = zoo.count_parameters("mixtral-tiny").total * 4
    monkeypatch.setattr(module_lib, "available_memory", lambda: tiny - 1)
    with pytest.raises(ValueError, match=r"arch='mixtral-tiny' is invalid on this machine"):
        CausalLMModule(arch="mixtral-tiny")
    monkeypatch.setattr(module_lib, "available_memory", lambda: tiny + 2**20)
    assert CausalLMModule(arch="mixtral-tiny").model is not None
