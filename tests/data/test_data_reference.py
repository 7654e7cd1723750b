"""The data pipeline against independent references: T5's span-corruption logic, the packed stream, the sources."""

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import lightning_moe.data.tokenizer as tokenizer_module
from lightning_moe.data import EOS_TOKEN, PAD_TOKEN, TextDataModule, expand_sources, read_documents, train_bpe
from lightning_moe.data.datamodule import ResumableShuffle, advance_position
from lightning_moe.data.span_corruption import check_span_settings, span_corruption

TEXT = "def add(a, b):\n    return a + b\n\n# héllo wörld ☃ 😀\nclass Point:\n    x: int\n" * 30


# -- T5 span corruption -------------------------------------------------------------------------------------------


def t5_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """``random_spans_noise_mask``'s counts (t5/data/preprocessors.py), written from the T5 codebase.

    T5 rounds half to even (``tf.round``, as ``np.round``). Where it asks for more spans than there are non-noise
    tokens its segmentation fails; the library then uses one span per non-noise token, so the reference does too.
    """
    length = max(length, 2)
    num_noise = int(np.round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(int(np.round(num_noise / mean_span_length)), 1)
    return num_noise, min(num_spans, length - num_noise)


def t5_sentinel_transform(tokens: list[int], noise_mask: list[bool], vocab_size: int) -> list[int]:
    """T5's ``noise_span_to_unique_sentinel``: each noise span becomes one sentinel, counting down from the top."""
    out, sentinel = [], vocab_size
    for i, (token, noise) in enumerate(zip(tokens, noise_mask, strict=True)):
        if not noise:
            out.append(token)
        elif i == 0 or not noise_mask[i - 1]:
            sentinel -= 1
            out.append(sentinel)
    return out


def noise_mask_of(row: list[int], targets: list[int], first_sentinel: int) -> list[bool]:
    """Which tokens of ``row`` (distinct ids below the sentinels) the targets hold: the noise mask drawn."""
    masked = {t for t in targets if t < first_sentinel - len(row)}
    return [t in masked for t in row]


LENGTHS = [2, 3, 4, 5, 6, 7, 9, 10, 16, 33, 70, 129]
DENSITIES = [0.01, 0.15, 0.5, 0.85, 0.99]
MEANS = [1.0, 3.0, 7.5]


@pytest.mark.parametrize("mean_span_length", MEANS)
def test_span_corruption_is_t5s_transform_of_a_t5_noise_mask(mean_span_length):
    vocab = 10_000
    generator = torch.Generator().manual_seed(0)
    for length in LENGTHS:
        for density in DENSITIES:
            tokens = torch.arange(3 * length).view(3, length) + 100
            inputs, targets = span_corruption(tokens, vocab - 1, density, mean_span_length, generator)
            num_noise, num_spans = t5_counts(length, density, mean_span_length)
            assert inputs.shape == (3, length - num_noise + num_spans), (length, density)
            assert targets.shape == (3, num_noise + num_spans), (length, density)
            for row, inp, tgt in zip(tokens.tolist(), inputs.tolist(), targets.tolist(), strict=True):
                mask = noise_mask_of(row, tgt, vocab - 1)
                # T5's mask: num_noise noise tokens in num_spans runs; a non-noise run first, a noise run last.
                assert sum(mask) == num_noise and not mask[0] and mask[-1]
                assert sum(1 for i in range(length) if mask[i] and not mask[i - 1]) == num_spans
                assert inp == t5_sentinel_transform(row, mask, vocab)
                assert tgt == t5_sentinel_transform(row, [not m for m in mask], vocab)
                sentinels = [t for t in inp if t >= vocab - num_spans]
                assert sentinels == list(range(vocab - 1, vocab - 1 - num_spans, -1))  # descending, no real token


def test_span_lengths_are_uniform_over_the_segmentations_as_t5_draws_them():
    # T5 shuffles (segments - 1) cut marks among (items - 1) places: every composition is equally likely.
    length, rows = 12, 3000  # 6 noise tokens in 3 spans, 6 kept in 3 runs: C(5, 2) = 10 compositions each
    tokens = torch.arange(length).repeat(rows, 1) + 10
    _, targets = span_corruption(tokens, 999, 0.5, 2.0, torch.Generator().manual_seed(1))
    noise_runs, keep_runs = Counter(), Counter()
    for tgt in targets.tolist():
        mask = noise_mask_of(list(range(10, 10 + length)), tgt, 999)
        runs, run = [], 1
        for i in range(1, length):
            if mask[i] == mask[i - 1]:
                run += 1
            else:
                runs.append(run)
                run = 1
        runs.append(run)
        keep_runs[tuple(runs[0::2])] += 1
        noise_runs[tuple(runs[1::2])] += 1
    for counts in (noise_runs, keep_runs):
        assert len(counts) == math.comb(5, 2)
        expected, sd = rows / 10, math.sqrt(rows * 0.1 * 0.9)
        assert all(abs(c - expected) < 5 * sd for c in counts.values()), counts


def test_span_corruption_of_too_short_a_sequence_and_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"sequence length 1 is invalid for span corruption: need at least 2"):
        span_corruption(torch.zeros(2, 1, dtype=torch.long), 99)
    for density in (0.0, 1.0, float("nan"), True, "0.15"):
        with pytest.raises(ValueError, match=r"noise_density=.* is invalid: must be in \(0, 1\)"):
            check_span_settings(density, 3.0)
    for mean in (0.5, float("inf"), float("nan"), True, "3"):
        with pytest.raises(ValueError, match=r"mean_span_length=.* is invalid: must be a finite number >= 1"):
            check_span_settings(0.15, mean)


# -- tokenizer -----------------------------------------------------------------------------------------------------

_TRAIN_IN_A_FRESH_PROCESS = """
import hashlib, importlib.util, sys
spec = importlib.util.spec_from_file_location("tok", sys.argv[1])
tok = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tok)
corpus = open(sys.argv[2], encoding="utf-8").read()
docs = [corpus[i : i + 700] for i in range(0, len(corpus), 700)]
print(hashlib.sha256(tok.train_bpe(docs, 400).to_str().encode()).hexdigest())
"""


def test_bpe_training_is_deterministic_across_processes_and_keeps_its_size_and_special_tokens():
    corpus = Path(textwrap.__file__).read_text(encoding="utf-8")  # varied enough text for 400 entries
    docs = [corpus[i : i + 700] for i in range(0, len(corpus), 700)]
    tokenizer = train_bpe(docs, 400)
    assert tokenizer.get_vocab_size() == 400
    assert tokenizer.token_to_id(EOS_TOKEN) == 0 and tokenizer.token_to_id(PAD_TOKEN) == 1
    hashes = set()
    for hash_seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", _TRAIN_IN_A_FRESH_PROCESS, tokenizer_module.__file__, textwrap.__file__],
            env={**os.environ, "PYTHONHASHSEED": hash_seed, "RAYON_NUM_THREADS": hash_seed},
            capture_output=True,
            text=True,
            check=True,
        )
        hashes.add(out.stdout.strip())
    assert hashes == {hashlib.sha256(tokenizer.to_str().encode()).hexdigest()}
    for text in ("", "\n\n\n", "x" * 50_000, "é☃😀\u2028\x00\ttab", "  leading and trailing  \n"):
        assert tokenizer.decode(tokenizer.encode(text).ids) == text  # byte-level: no unknown tokens, exact


# -- sources -------------------------------------------------------------------------------------------------------


def test_a_file_named_with_glob_characters_is_that_file(tmp_path):
    (tmp_path / "notes[1].txt").write_text("the file asked for")
    (tmp_path / "notes1.txt").write_text("another file the pattern would match")
    assert expand_sources([str(tmp_path / "notes[1].txt")]) == [tmp_path / "notes[1].txt"]
    # Patterns still expand, and a file listed twice (by name and by a glob) is read once.
    both = expand_sources([str(tmp_path / "*.txt"), str(tmp_path / "notes[1].txt")])
    assert both == sorted([tmp_path / "notes1.txt", tmp_path / "notes[1].txt"])


def test_a_jsonl_record_with_a_lone_surrogate_is_refused_by_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine \\ud83d\\ude00"}\n\n{"text": "bad \\ud800 here"}\n', encoding="utf-8")
    with pytest.raises(
        ValueError,
        match=r"docs\.jsonl:3 is invalid: its field 'text' holds the lone surrogate '\\ud800' at character 4, which "
        r"is not Unicode text",
    ):
        list(read_documents([path]))
    path.write_text('{"text": "fine \\ud83d\\ude00"}\n', encoding="utf-8")
    assert list(read_documents([path])) == ["fine 😀"]  # an escaped surrogate pair is one character


# -- the packed token stream ---------------------------------------------------------------------------------------


def _module(tmp_path: Path, **kwargs) -> TextDataModule:
    settings = {"vocab_size": 300, "block_size": 16, "batch_size": 2, "cache_dir": str(tmp_path / "cache"), **kwargs}
    return TextDataModule(**settings)


def test_blocks_pack_every_document_of_every_source_in_order_with_end_of_text_after_each(tmp_path):
    (tmp_path / "b.txt").write_text(TEXT.upper())
    (tmp_path / "a.txt").write_text(TEXT)
    records = [TEXT[:300], "", TEXT[300:900]]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": r}) + "\n" for r in records))
    max_bytes = len(TEXT.encode()) + len(TEXT.upper().encode()) + 500
    data = _module(tmp_path, sources=[str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl")], text_field="body",
                   max_bytes=max_bytes, val_fraction=0.2)  # fmt: skip
    data.setup("fit")
    # Sorted files, empty records skipped, the last document cut at max_bytes: a, b and 500 bytes of c's text.
    first = len(TEXT[:300].encode())
    docs = [TEXT, TEXT.upper(), TEXT[:300], TEXT[300:900].encode()[: 500 - first].decode(errors="ignore")]
    tok, eos = data.tokenizer, data.tokenizer.token_to_id(EOS_TOKEN)
    stream = [i for doc in docs for i in [*tok.encode(doc).ids, eos]]
    num_blocks = (len(stream) - 1) // 16
    train, val = data.train_set.block_ids.tolist(), data.val_set.block_ids.tolist()
    assert len(val) == max(1, math.ceil(0.2 * num_blocks)) and not set(train) & set(val)
    assert sorted(train + val) == list(range(num_blocks))
    covered = []
    for dataset in (data.train_set, data.val_set):
        for index, block in enumerate(dataset.block_ids.tolist()):
            assert dataset[index].tolist() == stream[block * 16 : block * 16 + 17]
            covered += range(block * 16, block * 16 + 17)
    assert sorted(set(covered)) == list(range(num_blocks * 16 + 1))  # no token of the packed span lost
    batch = next(iter(data.train_dataloader()))
    assert batch.shape == (2, 17) and batch.dtype == torch.int64


def test_a_given_tokenizer_with_truncation_or_padding_still_packs_whole_documents(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.txt").write_text(TEXT.upper())
    tokenizer = train_bpe([TEXT, TEXT.upper()], 300)
    reference = [i for doc in (TEXT, TEXT.upper()) for i in [*tokenizer.encode(doc).ids, 0]]
    # Saved as many tokenizer.json files on the Hub are: with truncation and padding settings.
    tokenizer.enable_truncation(max_length=16)
    tokenizer.enable_padding(length=24, pad_id=1, pad_token=PAD_TOKEN)
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    data = _module(tmp_path, sources=[str(tmp_path / "*.txt")], tokenizer_path=str(path))
    data.setup("fit")
    stream = np.memmap(data.train_set.path, dtype=data.train_set.dtype, mode="r").tolist()
    assert stream == reference


def test_a_changed_setting_builds_a_new_cache_and_the_same_settings_reuse_it(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": TEXT, "other": TEXT.upper()}) + "\n")
    base = {"sources": [str(tmp_path / "a.jsonl")]}

    def stream(**kwargs) -> tuple[Path, list[int], list[int]]:
        data = _module(tmp_path, **{**base, **kwargs})
        data.setup("fit")
        tok = data.tokenizer
        field, max_bytes = kwargs.get("text_field", "text"), kwargs.get("max_bytes", 4_000_000)
        text = (TEXT if field == "text" else TEXT.upper()).encode()[:max_bytes].decode(errors="ignore")
        expected = [*tok.encode(text).ids, tok.token_to_id(EOS_TOKEN)]
        return data.train_set.path, np.fromfile(data.train_set.path, dtype=data.train_set.dtype).tolist(), expected

    first_path, first, expected = stream()
    assert first == expected
    mtime = first_path.stat().st_mtime_ns
    for same in ({}, {"block_size": 8, "seed": 3, "batch_size": 1}, {"max_bytes": None}):  # the same text
        assert stream(**same)[0] == first_path
    assert first_path.stat().st_mtime_ns == mtime  # reused, not rewritten
    paths = {first_path}
    for changed in ({"text_field": "other"}, {"max_bytes": 200}, {"vocab_size": 280}):
        path, tokens, expected = stream(**changed)
        assert path not in paths and tokens == expected
        paths.add(path)
    # A given tokenizer whose file changes (same name) encodes a new cache, with the new tokenizer.
    tok_path = tmp_path / "tok.json"
    train_bpe([TEXT], 300).save(str(tok_path))
    path, tokens, expected = stream(tokenizer_path=str(tok_path))
    assert tokens == expected
    train_bpe([TEXT.upper()], 290).save(str(tok_path))
    new_path, new_tokens, new_expected = stream(tokenizer_path=str(tok_path))
    assert new_path != path and new_tokens == new_expected


def test_resuming_with_another_batch_and_world_size_continues_at_the_next_global_sample():
    # Independent reference: the epoch's permutation, consumed in global batches of world * batch samples.
    num_samples, seed = 50, 11
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed)).tolist()
    position = (0, 0)
    for _ in range(3):  # 3 steps at 2 ranks x 3 samples
        position = advance_position(position, 6, num_samples, 2, 3)
    assert position == (0, 18)
    samplers = [iter(ResumableShuffle(num_samples, seed, 3, r, 4, lambda: position)) for r in range(3)]
    steps = (num_samples - 18) // 12  # full global batches of 3 ranks x 4 left in the epoch
    for step in range(steps):
        global_batch = [next(samplers[r]) for r in range(3) for _ in range(4)]
        expected = order[18 + 12 * step : 18 + 12 * (step + 1)]
        assert sorted(global_batch) == sorted(expected)
        position = advance_position(position, 12, num_samples, 3, 4)
    assert all(next(s, None) is None for s in samplers)  # the tail short of a global batch is left out
    assert position == (1, 0)
