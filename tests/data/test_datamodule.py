import json
import pickle

import numpy as np
import pytest
import torch

from lightning_moe.data import TextDataModule, load_tokenizer, read_documents, stdlib_files, unigram_entropy
from lightning_moe.data.datamodule import ResumableShuffle, advance_position

TEXT = "def add(a, b):\n    return a + b\n\n# numbers: 1 2 3 4 5 6 7 8 9 10\nclass Point:\n    x: int\n" * 40


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.txt").write_text(TEXT.upper())
    return tmp_path


def _data(corpus, tmp_path, **kwargs):
    kwargs = {
        "sources": [str(corpus / "*.txt")],
        "vocab_size": 300,
        "block_size": 16,
        "batch_size": 4,
        "cache_dir": str(tmp_path / "cache"),
        **kwargs,
    }
    return TextDataModule(**kwargs)


def test_blocks_hold_the_encoded_corpus_with_end_of_text_between_documents(corpus, tmp_path):
    data = _data(corpus, tmp_path)
    data.prepare_data()
    data.setup("fit")
    tokens = np.fromfile(next((tmp_path / "cache").glob("tokens-*.bin")), dtype=np.uint16)
    tok = data.tokenizer
    eos = tok.token_to_id("<|endoftext|>")
    expected = tok.encode(TEXT).ids + [eos] + tok.encode(TEXT.upper()).ids + [eos]
    assert tokens.tolist() == expected
    block = data.train_set[0]
    start = int(data.train_set.block_ids[0]) * 16
    assert block.tolist() == expected[start : start + 17]
    assert tok.decode(tok.encode(TEXT).ids) == TEXT  # byte-level BPE round-trips


def test_special_tokens_written_in_a_document_are_text_not_boundaries(tmp_path):
    text = "a model ends a document with <|endoftext|> and pads with <|pad|>.\n" * 30
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt").write_text(TEXT)
    data = _data(tmp_path, tmp_path, sources=[str(tmp_path / "*.txt")])
    data.prepare_data()
    data.setup("fit")
    tokens = np.fromfile(next((tmp_path / "cache").glob("tokens-*.bin")), dtype=np.uint16).tolist()
    tok = data.tokenizer
    eos, pad = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>")
    assert tokens.count(eos) == 2 and tokens.count(pad) == 0  # one boundary after each document
    first = tokens[: tokens.index(eos)]
    assert tok.decode(first, skip_special_tokens=False) == text  # the characters, kept


def test_split_is_deterministic_disjoint_and_covers_every_block(corpus, tmp_path):
    a, b = _data(corpus, tmp_path), _data(corpus, tmp_path)
    a.setup("fit")
    b.setup("fit")
    assert np.array_equal(a.val_set.block_ids, b.val_set.block_ids)
    ids = np.concatenate([a.train_set.block_ids, a.val_set.block_ids])
    assert sorted(ids.tolist()) == list(range(len(ids)))
    other_seed = _data(corpus, tmp_path, seed=7)
    other_seed.setup("fit")
    assert not np.array_equal(other_seed.val_set.block_ids, a.val_set.block_ids)


def test_second_run_reuses_the_cache(corpus, tmp_path):
    first = _data(corpus, tmp_path)
    first.prepare_data()
    files = sorted((tmp_path / "cache").iterdir())
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = _data(corpus, tmp_path)
    second.prepare_data()
    assert sorted((tmp_path / "cache").iterdir()) == files
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    # Changing the text makes a new cache entry.
    (corpus / "a.txt").write_text(TEXT + "extra\n")
    _data(corpus, tmp_path).prepare_data()
    assert len(list((tmp_path / "cache").glob("tokens-*.bin"))) == 2


def test_jsonl_records_with_a_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": TEXT, "id": i}) for i in range(3)) + "\n")
    docs = list(read_documents([path], text_field="body"))
    assert docs == [TEXT] * 3
    with pytest.raises(ValueError, match=r"docs.jsonl:1 is invalid: expected a JSON object with a string field 'text'"):
        list(read_documents([path]))


def test_malformed_jsonl_line_names_the_file_and_its_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": TEXT}), "", json.dumps({"text": "ok"}), '{"text": "abc" "more"}']
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        ValueError,
        match=r"docs\.jsonl:4 is invalid: not JSON \(Expecting ',' delimiter at column 16\); expected one JSON "
        r"object per line with a string field 'text'",
    ):
        list(read_documents([path]))
    path.write_text("\n".join(lines[:3]) + "\n")
    assert list(read_documents([path])) == [TEXT, "ok"]


def test_too_few_training_blocks_for_one_batch_fail_at_setup(corpus, tmp_path):
    probe = _data(corpus, tmp_path, batch_size=1)
    probe.setup("fit")
    num_train = len(probe.train_set)
    with pytest.raises(
        ValueError,
        match=rf"batch_size={num_train + 1} is invalid for this corpus: it makes only {num_train} training blocks of "
        r"block_size=16 tokens \(besides \d+ validation blocks\), fewer than one full batch, .* use "
        rf"batch_size <= {num_train}, a smaller block_size or val_fraction, or more text",
    ):
        _data(corpus, tmp_path, batch_size=num_train + 1).setup("fit")
    # Validation alone needs no full training batch.
    _data(corpus, tmp_path, batch_size=num_train + 1).setup("validate")
    # Exactly one full batch still trains.
    data = _data(corpus, tmp_path, batch_size=num_train)
    data.setup("fit")
    assert len(list(data.train_dataloader())) == 1
    # A validation share that leaves no training block at all.
    with pytest.raises(ValueError, match=r"only 0 training blocks .* use a smaller block_size or val_fraction"):
        _data(corpus, tmp_path, val_fraction=0.999).setup()


def test_max_bytes_caps_the_text(corpus):
    docs = list(read_documents([corpus / "a.txt", corpus / "b.txt"], max_bytes=100))
    assert sum(len(d.encode()) for d in docs) == 100


def test_given_tokenizer_is_used(corpus, tmp_path):
    trained = _data(corpus, tmp_path)
    trained.setup("fit")
    path = tmp_path / "tok.json"
    trained.tokenizer.save(str(path))
    data = _data(corpus, tmp_path, tokenizer_path=str(path), vocab_size=999)
    data.setup("fit")
    assert data.vocab_size == load_tokenizer(path).get_vocab_size()


def test_errors_before_any_work(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"sources entry '.*nothing-\*.txt' is invalid: it matches no file"):
        _data(corpus, tmp_path, sources=[str(tmp_path / "nothing-*.txt")]).prepare_data()
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"sources=\['.*empty.txt'\] is invalid: it holds no text"):
        _data(corpus, tmp_path, sources=[str(tmp_path / "empty.txt")]).prepare_data()
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"source file '.*blob.bin' is invalid: not UTF-8 text"):
        _data(corpus, tmp_path, sources=[str(tmp_path / "blob.bin")]).prepare_data()
    with pytest.raises(ValueError, match=r"tokenizer_path='.*missing.json' is invalid: no such file"):
        _data(corpus, tmp_path, tokenizer_path=str(tmp_path / "missing.json")).prepare_data()
    (tmp_path / "not-a-tokenizer.json").write_text("{}")
    bad_tokenizer = r"tokenizer_path='.*not-a-tokenizer\.json' is invalid: not a tokenizers JSON file .*Model missing"
    with pytest.raises(ValueError, match=bad_tokenizer):
        _data(corpus, tmp_path, tokenizer_path=str(tmp_path / "not-a-tokenizer.json")).prepare_data()
    with pytest.raises(ValueError, match=r"block_size=0 is invalid: must be an int >= 1"):
        _data(corpus, tmp_path, block_size=0)
    with pytest.raises(ValueError, match=r"sources=\[\] is invalid"):
        _data(corpus, tmp_path, sources=[])
    for field in ("tokenizer_path", "cache_dir"):
        with pytest.raises(ValueError, match=rf"{field}=123 is invalid: must be a path \(a string\) or None"):
            _data(corpus, tmp_path, **{field: 123})
    with pytest.raises(ValueError, match=r"seed=-1 is invalid: must be an int >= 0"):
        _data(corpus, tmp_path, seed=-1)
    for field, value in (("block_size", 16.5), ("block_size", True), ("vocab_size", 300.5), ("batch_size", 2.5)):
        with pytest.raises(ValueError, match=rf"{field}={value!r} is invalid: must be an int"):
            _data(corpus, tmp_path, **{field: value})
    with pytest.raises(ValueError, match=r"val_fraction='0.1' is invalid: must be a number in \(0, 1\)"):
        _data(corpus, tmp_path, val_fraction="0.1")
    with pytest.raises(ValueError, match=r"sources='a.txt' is invalid: must be a list of files and globs"):
        _data(corpus, tmp_path, sources="a.txt")
    missing = str(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"tokenizer_path='.*missing.json' is invalid: no such file"):
        _data(corpus, tmp_path, tokenizer_path=missing).setup("fit")  # setup alone, before prepare_data
    with pytest.raises(ValueError, match=r"block_size=100000 is invalid for this corpus"):
        _data(corpus, tmp_path, block_size=100_000).setup("fit")


def test_dataset_pickles_without_its_data(corpus, tmp_path):
    data = _data(corpus, tmp_path)
    data.setup("fit")
    data.train_set[0]  # opens the memmap
    clone = pickle.loads(pickle.dumps(data.train_set))
    assert clone._tokens is None
    assert torch.equal(clone[3], data.train_set[3])


def test_worker_processes_give_the_same_batches(corpus, tmp_path):
    single = _data(corpus, tmp_path)
    single.setup("fit")
    workers = _data(corpus, tmp_path, num_workers=2)
    workers.setup("fit")
    assert all(torch.equal(a, b) for a, b in zip(single.val_dataloader(), workers.val_dataloader(), strict=True))


def test_embedded_corpus_is_the_standard_library():
    files = stdlib_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert files == sorted(files)


def test_unigram_entropy_by_hand():
    tokens = np.array([0, 0, 1, 2])
    expected = -(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25))
    assert abs(unigram_entropy(tokens) - expected) < 1e-12


def test_resumable_shuffle_shards_one_permutation_over_ranks_and_resumes_per_rank():
    num_samples, seed, world = 23, 5, 3
    for epoch in (0, 1):
        permutation = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        single = ResumableShuffle(num_samples, seed)
        single.set_epoch(epoch)
        assert list(single) == permutation  # one process: the whole permutation, as before sharding existed
        shards = []
        for rank in range(world):
            sampler = ResumableShuffle(num_samples, seed, world, rank)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
            assert len(sampler) == num_samples // world == len(shards[-1])
        # Round-robin over the permutation, the last 23 % 3 = 2 indices dropped: disjoint, and one global order.
        assert [shards[i % world][i // world] for i in range(world * (num_samples // world))] == permutation[:21]
    resumed = ResumableShuffle(num_samples, seed, world, 1)
    resumed.skip_to(1, 4)  # 4 samples of epoch 1 already consumed on this rank
    resumed.set_epoch(1)  # Lightning's call at the epoch start keeps the position
    assert list(resumed) == shards[1][4:]
    resumed.set_epoch(2)
    assert len(list(resumed)) == num_samples // world  # the next epoch starts from its beginning


def test_resumable_shuffle_places_each_iteration_at_the_position_training_reached():
    num_samples, seed, batch = 23, 5, 4  # 5 full batches (20 samples) per epoch; the last 3 are never used
    position = [(0, 0)]
    sampler = ResumableShuffle(num_samples, seed, batch_size=batch, position=lambda: position[0])
    epochs = [torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + e)).tolist() for e in (0, 1)]
    assert list(sampler) == epochs[0][:20]
    position[0] = (1, 8)  # epoch 1, 8 samples in: whatever epoch number the trainer passes, the data continues there
    sampler.set_epoch(5)
    assert list(sampler) == epochs[1][8:20]


def test_resuming_at_another_world_size_continues_at_the_same_global_sample():
    num_samples, seed, batch = 64, 3, 2
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed)).tolist()
    # Two ranks consumed 3 batches each: the permutation's first 12 samples. Four ranks resume there.
    position = advance_position((0, 0), 2 * 3 * batch, num_samples, 2, batch)
    shares = [list(ResumableShuffle(num_samples, seed, 4, rank, batch, lambda: position)) for rank in range(4)]
    assert [shares[i % 4][i // 4] for i in range(4 * len(shares[0]))] == order[12:60]


@pytest.mark.parametrize(
    ("num_samples", "batch", "before", "after", "steps"), [(20, 4, 2, 1, 5), (24, 3, 2, 4, 1), (31, 2, 3, 2, 7)]
)
def test_each_epoch_sample_is_trained_once_across_a_world_size_change(num_samples, batch, before, after, steps):
    # A run at `before` ranks stops after `steps` steps (crossing epochs of its own length), then resumes at `after`
    # ranks: the samples of the interrupted epoch are never repeated, and the epoch's global order goes on.
    def run(world, position, num_steps):
        trained = []
        for _ in range(num_steps):
            epoch, start = position
            shares = [
                iter(ResumableShuffle(num_samples, 7, world, r, batch, lambda p=position: p)) for r in range(world)
            ]
            step = [[next(shares[r]) for _ in range(batch)] for r in range(world)]
            trained.append((epoch, [i for r in range(world) for i in step[r]]))
            position = advance_position(position, world * batch, num_samples, world, batch)
        return trained, position

    first, position = run(before, (0, 0), steps)
    second, _ = run(after, position, 2)
    epoch = second[0][0]
    seen = [i for e, step in first + second if e == epoch for i in step]
    assert len(seen) == len(set(seen))
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
    assert sorted(seen) == sorted(order[: len(seen)])  # the epoch's first samples, whatever the world sizes


def test_jsonl_reading_keeps_unicode_line_separators_and_stops_at_max_bytes(tmp_path):
    path = tmp_path / "docs.jsonl"
    texts = ["line one\u2028line two\u0085three", "second record " * 5, "third record " * 5]
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    assert list(read_documents([path])) == texts  # JSON allows U+2028/U+0085 unescaped: one record each
    cut = list(read_documents([path], max_bytes=10))
    assert cut == [texts[0].encode()[:10].decode("utf-8", errors="ignore")]  # no empty documents after the budget


def test_a_given_tokenizer_without_end_of_text_is_refused(corpus, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator(
        ["alpha beta gamma"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"])
    )
    path = tmp_path / "no-eos.json"
    tokenizer.save(str(path))
    with pytest.raises(ValueError, match=r"tokenizer_path='.*no-eos.json' is invalid: it has no '<\|endoftext\|>'"):
        _data(corpus, tmp_path, tokenizer_path=str(path)).prepare_data()
