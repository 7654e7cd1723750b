import re

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from torch.utils.data import DataLoader

from lightning_moe.callbacks import ExpertSpecialization
from lightning_moe.callbacks.expert_specialization import TOKEN_CLASSES, token_class
from lightning_moe.module import CausalLMModule
from tests.callbacks._helpers import VOCAB, loader, read_events, tiny_deepseek, tiny_mixtral, trainer

E = 8
WORDS = {
    "digits": ["0", "1", "2", "42", "7", "100"],
    "keyword": ["def", "return", "if", " for", "class", "import", " in", "None"],
    "identifier": ["self", "foo", " bar", "x", "value_1", "print", "np", "data"],
    "punctuation": ["(", ")", ":", ",", ".", "==", "[", "]", "+=", "->"],
    "whitespace": [" ", "\n", "    ", "\t"],
    "mixed": ["(self", ".append", "x[0]"],
}


def tiny_tokenizer() -> tuple[Tokenizer, list[str]]:
    classes = [c for c, words in WORDS.items() for _ in words]
    words = [w for ws in WORDS.values() for w in ws]
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    classes += ["identifier"] * (VOCAB - len(classes))
    return Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0")), classes


class ValRecorder(Callback):
    def __init__(self) -> None:
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.pairs.append((batch[:, :-1].reshape(-1), outputs["router_stats"][-1].expert_ids))


def test_report_counts_tokens_per_expert_and_class_shares(tmp_path):
    torch.manual_seed(0)
    tokenizer, classes = tiny_tokenizer()
    module = tiny_mixtral()
    module.tokenizer_json = tokenizer.to_str()
    spec = ExpertSpecialization(layers=[-1], top_n=3)
    recorder = ValRecorder()
    trainer(tmp_path, [spec, recorder], max_steps=1, limit_val_batches=1.0).validate(module, loader(3))

    counts = torch.zeros(E, VOCAB)  # independent count from the router outputs
    for tokens, ids in recorder.pairs:
        for k in range(ids.shape[1]):
            counts.index_put_((ids[:, k], tokens), torch.ones(len(tokens)), accumulate=True)
    assert list(spec.results) == ["model.layers.1.ffn"]
    report = spec.results["model.layers.1.ffn"]
    assert sum(info["copies"] for info in report.values()) == 3 * 4 * 16 * 2
    for expert, info in report.items():
        assert info["copies"] == int(counts[expert].sum())
        top = [(tokenizer.decode([int(t)]), int(c)) for c, t in zip(*counts[expert].topk(3), strict=True)]
        assert [c for _, c in info["top_tokens"]] == [c for _, c in top]
        for text, count in info["top_tokens"]:
            assert counts[expert, tokenizer.token_to_id(text)] == count
        expected = {c: 0.0 for c in TOKEN_CLASSES}
        for token in range(VOCAB):
            expected[classes[token]] += float(counts[expert, token]) / info["copies"]
        assert info["classes"] == pytest.approx(expected)
    text = read_events(tmp_path).Tags()["tensors"]
    assert "specialization/layer_1/text_summary" in text


class AllStatsRecorder(Callback):
    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, list[torch.Tensor]]] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.batches.append((batch, [s.expert_ids for s in outputs["router_stats"]]))


def test_multi_token_prediction_layers_count_the_tokens_they_embed(tmp_path):
    # DeepSeek with one MTP module: MoE layers model.layers.1.ffn (the model's) and model.mtp.0.layer.ffn
    # (depth 1, which embeds tokens 1.. of the input). The default reports the model's own first and last.
    torch.manual_seed(0)
    module = tiny_deepseek(mtp_depth=1)
    assert [name for name, _ in module.moe_layers] == ["model.layers.1.ffn", "model.mtp.0.layer.ffn"]
    default, mtp = ExpertSpecialization(top_n=3), ExpertSpecialization(layers=[-1], top_n=3)
    recorder = AllStatsRecorder()
    trainer(tmp_path, [default, mtp, recorder], max_steps=1, limit_val_batches=1.0).validate(module, loader(2))
    assert list(default.results) == ["model.layers.1.ffn"]
    assert list(mtp.results) == ["model.mtp.0.layer.ffn"]
    for results, index, shift in ((default.results, 0, 0), (mtp.results, 1, 1)):
        counts = torch.zeros(E, VOCAB)  # independent count: position i of depth k routes token i + k of the input
        for batch, ids in recorder.batches:
            tokens = batch[:, :-1][:, shift:].reshape(-1)
            for k in range(ids[index].shape[1]):
                counts.index_put_((ids[index][:, k], tokens), torch.ones(len(tokens)), accumulate=True)
        report = next(iter(results.values()))
        assert sum(info["copies"] for info in report.values()) == 2 * 4 * (16 - shift) * 2
        for expert, info in report.items():
            assert info["copies"] == int(counts[expert].sum())
            assert [c for _, c in info["top_tokens"]] == counts[expert].topk(3).values.int().tolist()


@pytest.mark.parametrize(("words", "cls"), [(ws, c) for c, ws in WORDS.items()])
def test_token_classes(words, cls):
    assert {token_class(w) for w in words} == {cls}
    assert token_class("<|endoftext|>", special=True) == "special"


def test_sanity_check_is_not_reported_and_bad_layers_fail(tmp_path):
    spec = ExpertSpecialization()
    trainer(tmp_path, [spec], max_steps=1, limit_val_batches=1, num_sanity_val_steps=1).fit(
        tiny_mixtral(), loader(1), loader(1)
    )
    assert list(spec.results) == ["model.layers.0.ffn", "model.layers.1.ffn"]
    assert spec.results["model.layers.0.ffn"][0]["top_tokens"][0][0].startswith("<")  # no tokenizer: raw ids
    with pytest.raises(ValueError, match=r"layers=\[5\] is invalid: index 5 is out of range for the model's 2 MoE"):
        trainer(tmp_path, [ExpertSpecialization(layers=[5])], max_steps=1, limit_val_batches=1.0).validate(
            tiny_mixtral(), loader(1)
        )


class TrainBatchCounter(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches += 1


@pytest.mark.parametrize("layers", [[5], [0, -3]])
def test_bad_layer_index_fails_when_fit_starts_before_any_training_step(tmp_path, layers):
    counter = TrainBatchCounter()
    spec = ExpertSpecialization(layers=layers)
    message = f"layers={layers!r} is invalid: index {layers[-1]} is out of range for the model's 2 MoE layers"
    with pytest.raises(ValueError, match=re.escape(message + " (valid indices: from -2 to 1)")):
        trainer(tmp_path, [spec, counter], max_steps=3, val_check_interval=3, limit_val_batches=1).fit(
            tiny_mixtral(), loader(3), loader(1)
        )
    assert counter.batches == 0
    # Every index in range (negative ones included) trains and reports.
    spec = ExpertSpecialization(layers=[1, -2])
    trainer(tmp_path, [spec], max_steps=1, limit_val_batches=1).fit(tiny_mixtral(), loader(1), loader(1))
    assert list(spec.results) == ["model.layers.0.ffn", "model.layers.1.ffn"]


def test_bad_layer_index_on_a_model_without_moe_layers(tmp_path):
    dense = CausalLMModule(arch="mixtral-tiny-dense", overrides={"vocab_size": VOCAB, "dim": 32, "num_layers": 2})
    with pytest.raises(ValueError, match=r"index 0 is out of range for the model's 0 MoE layers \(valid indices: none"):
        trainer(tmp_path, [ExpertSpecialization(layers=[0])], max_steps=1).fit(dense, loader(1))
    spec = ExpertSpecialization()  # the default (first and last) fits any model: nothing to report
    trainer(tmp_path, [spec], max_steps=1, limit_val_batches=1).fit(dense, loader(1), loader(1))
    assert spec.results == {}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_n": 0}, "top_n=0 is invalid"),
        ({"top_n": 2.5}, "top_n=2.5 is invalid: must be an int >= 1"),
        ({"layers": []}, r"layers=\[\] is invalid"),
        ({"layers": [0.7]}, r"layers=\[0.7\] is invalid: must be a list of MoE layer indices"),
        ({"layers": "01"}, r"layers='01' is invalid"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExpertSpecialization(**kwargs)


class DictLoaderRecorder(Callback):
    def __init__(self) -> None:
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.pairs.append((batch["input_ids"].reshape(-1), outputs["router_stats"][-1].expert_ids))


def test_padded_dict_batches_count_the_real_tokens_only(tmp_path):
    # CausalLMModule takes Hugging Face-style padded dicts; their padding is routed nowhere (expert id -1).
    torch.manual_seed(0)
    tokenizer, _ = tiny_tokenizer()
    module = tiny_mixtral()
    module.tokenizer_json = tokenizer.to_str()
    ids = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[3, 11:] = 0  # right padding
    rows = [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(6)]
    batches = list(DataLoader(rows, batch_size=3))  # dicts of (3, 16) tensors
    spec = ExpertSpecialization(layers=[-1], top_n=3)
    recorder = DictLoaderRecorder()
    run = trainer(tmp_path, [spec, recorder], max_steps=1, limit_val_batches=1.0)
    run.validate(module, DataLoader(rows, batch_size=3))

    counts = torch.zeros(E, VOCAB)  # independent count from the router outputs, padding excluded by its mask
    for (tokens, ids_TK), batch in zip(recorder.pairs, batches, strict=True):
        real = batch["attention_mask"].reshape(-1).bool()
        assert (ids_TK[~real] == -1).all()
        for k in range(ids_TK.shape[1]):
            counts.index_put_((ids_TK[real, k], tokens[real]), torch.ones(int(real.sum())), accumulate=True)
    report = spec.results["model.layers.1.ffn"]
    assert sum(info["copies"] for info in report.values()) == int(mask.sum()) * 2
    for expert, info in report.items():
        assert info["copies"] == int(counts[expert].sum())
