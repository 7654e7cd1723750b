"""A LightningDataModule of packed token blocks, tokenized with a byte-level BPE and cached on disk.

The first run reads the corpus, trains (or loads) the tokenizer, encodes every document with an
end-of-text token after it, and writes the token stream as a flat memory-mapped array under the cache
directory. The file name is a hash of the corpus content and the tokenizer, so a second run with the same
inputs starts at once, and any change to either builds a new cache. Blocks of ``block_size + 1`` tokens are
views into that array (inputs are the first ``block_size`` tokens, targets the last ``block_size``), so
the block size can change without re-encoding. The split into train and validation blocks is a seeded
permutation: the same for every run with the same seed.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_moe.data.corpus import expand_sources, read_documents, stdlib_files
from lightning_moe.data.tokenizer import EOS_TOKEN, load_tokenizer, save_atomic, train_bpe, write_atomic

# The data settings that decide which blocks are for training and which for validation.
SPLIT_FIELDS = ("seed", "val_fraction", "block_size")


def default_cache_dir() -> Path:
    """``$LIGHTNING_MOE_CACHE``, else ``~/.cache/lightning-moe``."""
    return Path(os.environ.get("LIGHTNING_MOE_CACHE", Path.home() / ".cache" / "lightning-moe"))


class PackedBlocks(Dataset):
    """Blocks of ``block_size + 1`` tokens from a flat token file, opened lazily (one memmap per worker).

    Args:
        path: Flat token file.
        dtype: Its numpy dtype.
        block_size: Tokens per input sequence.
        block_ids: Which blocks this dataset serves.
    """

    def __init__(self, path: Path, dtype: str, block_size: int, block_ids: np.ndarray) -> None:
        self.path, self.dtype, self.block_size, self.block_ids = path, dtype, block_size, block_ids
        self._tokens: np.ndarray | None = None

    def tokens(self) -> np.ndarray:
        """The whole token stream (memory-mapped)."""
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._tokens

    def __len__(self) -> int:
        return len(self.block_ids)

    def __getitem__(self, index: int) -> torch.Tensor:
        start = int(self.block_ids[index]) * self.block_size
        block = self.tokens()[start : start + self.block_size + 1]
        return torch.from_numpy(block.astype(np.int64))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_tokens"] = None  # workers re-open the memmap instead of pickling the data
        return state


class ResumableShuffle(DistributedSampler):
    """Seeded per-epoch shuffling that can start part-way into an epoch, on one process or sharded over ranks.

    Each epoch ``e`` visits a permutation drawn from ``seed + e``. With ``num_replicas`` ranks, rank ``r`` takes
    every ``num_replicas``-th index of it from position ``r`` (the tail that cannot give every rank one more is
    dropped), so the ranks' batches of one step are disjoint and together are one global batch. Where an
    iteration starts: with ``position``, at the epoch and the global sample of it that training reached (rank ``r``
    then takes every ``num_replicas``-th index from there, so a resume at another world size continues the same
    global order); else :meth:`skip_to` sets the epoch and the samples of it already consumed on this rank for the
    next iteration, and :meth:`set_epoch`, which Lightning calls at each epoch start, a new epoch from its beginning.
    Being a ``DistributedSampler``, it is not replaced by Lightning's distributed wrapper, whose own reshuffling
    would lose the position.

    Args:
        num_samples: Dataset length.
        seed: Base seed.
        num_replicas: Ranks sharing the data.
        rank: This rank.
        batch_size: Samples per batch (with ``position``: an epoch uses only full global batches).
        position: Returns ``(epoch, samples of it consumed by all ranks)`` (see :func:`advance_position`;
            ``None``: use :meth:`set_epoch` and :meth:`skip_to`).
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        batch_size: int = 1,
        position: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)  # fmt: skip
        self._skip = 0
        self.batch_size = batch_size
        self.position = position

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (ignored with ``position``: it places the data)."""
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = epoch

    def skip_to(self, epoch: int, consumed: int) -> None:
        """Resume at ``epoch`` with ``consumed`` samples of it already seen by this rank."""
        self.epoch, self._skip = epoch, consumed

    def __len__(self) -> int:
        # This rank's full epoch: after a resume Lightning counts the batches it already saw, and the iterator
        # yields only the rest.
        return self.num_samples

    def __iter__(self):
        if self.position is not None:
            # Where the data stream stands, from what training consumed: each new iterator continues it, however
            # the trainer counts its epochs (a run that stopped at max_steps mid-epoch is saved with that epoch
            # counted as finished, and its extension would otherwise start the next permutation).
            self.epoch, start = self.position()
            order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
            rows = epoch_rows(len(self.dataset), start, self.num_replicas, self.batch_size)
            return iter(order.tolist()[start + self.rank : start + rows * self.num_replicas : self.num_replicas])
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        mine = order[self.rank : self.total_size : self.num_replicas]
        skip, self._skip = self._skip, 0
        return iter(mine[skip:])


def epoch_rows(num_samples: int, start: int, world: int, batch_size: int) -> int:
    """Samples each of ``world`` ranks takes from global position ``start`` of an epoch to its end (full batches)."""
    return max(0, num_samples - start) // (world * batch_size) * batch_size


def advance_position(
    position: tuple[int, int], samples: int, num_samples: int, world: int, batch_size: int
) -> tuple[int, int]:
    """The data position ``(epoch, global sample)`` after training consumed ``samples`` more (all ranks together).

    An epoch ends where fewer than one full global batch (``world * batch_size``) is left: the next starts at 0.
    """
    epoch, start = position[0], position[1] + samples
    if epoch_rows(num_samples, start, world, batch_size) == 0:
        return epoch + 1, 0
    return epoch, start


class PaddedPredictSampler(DistributedSampler):
    """The prediction samples in their order, shared out over ranks, padded so that every rank gets as many.

    Rank ``r`` of ``n`` takes the samples at positions ``r, r + n, ...`` of ``0 .. num_samples - 1`` followed by
    the first samples again, up to a multiple of ``n`` (``DistributedSampler`` without shuffling), so every rank
    runs the same number of batches. Lightning's own prediction sampler repeats nothing, and ranks can then run
    different numbers of batches: under expert parallelism every forward is a collective, so one rank would wait
    forever for the others. :meth:`padding` marks the repeated samples, whose predictions are to be dropped.

    Args:
        num_samples: Number of prediction samples.
        num_replicas: Ranks sharing them.
        rank: This rank.
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def padding(self) -> list[bool]:
        """For each of this rank's samples, in order: whether it repeats one that is predicted elsewhere."""
        return [self.rank + i * self.num_replicas >= len(self.dataset) for i in range(self.num_samples)]


class StepResumedLoader(DataLoader):
    """The training loader: resumable, its position restored from the trainer's step count.

    :meth:`TextDataModule.train_dataloader` starts its sampler where the restored step count says, so the
    loader has no state of its own to save. Having ``state_dict``/``load_state_dict`` tells Lightning it
    resumes mid-epoch correctly (Lightning warns of "unreliable results" for loaders without them).
    """

    def state_dict(self) -> dict:
        """Nothing: the position comes from the trainer's restored step count."""
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to restore (see :meth:`state_dict`)."""


class TextDataModule(L.LightningDataModule):
    """Packed-token language-modelling data from the embedded corpus or your own text.

    Args:
        sources: Text files, globs and ``.jsonl`` files; ``None`` uses the embedded corpus (the running
            interpreter's standard library source).
        text_field: Field with the text in ``.jsonl`` records.
        max_bytes: Read at most this many bytes of text (``None``: everything).
        tokenizer_path: An existing ``tokenizer.json``; ``None`` trains a byte-level BPE on the text.
        vocab_size: Vocabulary of the trained tokenizer.
        block_size: Tokens per training sequence.
        batch_size: Sequences per batch.
        val_fraction: Share of the blocks held out for validation.
        num_workers: Dataloader worker processes.
        seed: Seed of the train/validation split and the shuffling.
        cache_dir: Where tokenizers and token files are cached (``None``: :func:`default_cache_dir`).

    Raises:
        ValueError: For invalid arguments (checked here), from :meth:`prepare_data` for a missing or empty
            corpus, a non-text file or a bad tokenizer file, and from :meth:`setup` for a corpus too small for
            ``block_size`` or (when fitting) for one full training batch of ``batch_size``.

    Example::

        data = TextDataModule(vocab_size=1024, block_size=128, max_bytes=2_000_000)
        data.prepare_data()
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))  # (batch_size, block_size + 1) token ids
    """

    def __init__(
        self,
        sources: list[str] | None = None,
        text_field: str = "text",
        max_bytes: int | None = 4_000_000,
        tokenizer_path: str | None = None,
        vocab_size: int = 1024,
        block_size: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        seed: int = 1234,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()

        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        checks = {
            "block_size": (is_int(block_size) and block_size >= 1, "must be an int >= 1"),
            "batch_size": (is_int(batch_size) and batch_size >= 1, "must be an int >= 1"),
            "vocab_size": (is_int(vocab_size) and vocab_size >= 258, "must be an int >= 258 (bytes + special tokens)"),
            "val_fraction": (
                isinstance(val_fraction, (int, float)) and not isinstance(val_fraction, bool) and 0 < val_fraction < 1,
                "must be a number in (0, 1)",
            ),
            "num_workers": (is_int(num_workers) and num_workers >= 0, "must be an int >= 0"),
            "max_bytes": (max_bytes is None or (is_int(max_bytes) and max_bytes >= 1), "must be an int >= 1 or None"),
            "seed": (is_int(seed) and seed >= 0, "must be an int >= 0"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"{name}={locals()[name]!r} is invalid: {allowed}")
        if isinstance(sources, str) or (sources is not None and not all(isinstance(s, str) for s in sources)):
            raise ValueError(f"sources={sources!r} is invalid: must be a list of files and globs (e.g. [{sources!r}])")
        if sources is not None and not sources:
            raise ValueError("sources=[] is invalid: give at least one file or glob, or None for the embedded corpus")
        for name, value in (("tokenizer_path", tokenizer_path), ("cache_dir", cache_dir)):
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"{name}={value!r} is invalid: must be a path (a string) or None")
        if tokenizer_path is not None and not Path(tokenizer_path).is_file():
            raise ValueError(f"tokenizer_path={tokenizer_path!r} is invalid: no such file")
        self.save_hyperparameters()
        self.sources, self.text_field, self.max_bytes = sources, text_field, max_bytes
        self.tokenizer_path, self.vocab_size_arg = tokenizer_path, vocab_size
        self.block_size, self.batch_size, self.val_fraction = block_size, batch_size, val_fraction
        self.num_workers, self.seed = num_workers, seed
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.tokenizer = None
        self.train_set: PackedBlocks | None = None
        self.val_set: PackedBlocks | None = None
        self._saved_split: dict[str, Any] | None = None  # a checkpoint's split to compare with this one at setup

    # -- building the cache ---------------------------------------------------------------------------

    def _files(self) -> list[Path]:
        return stdlib_files() if self.sources is None else expand_sources(self.sources)

    def _documents(self) -> list[str]:
        docs = list(read_documents(self._files(), self.text_field, self.max_bytes))
        if not any(doc.strip() for doc in docs):
            what = "the embedded corpus" if self.sources is None else f"sources={self.sources!r}"
            raise ValueError(f"{what} is invalid: it holds no text")
        return docs

    def _paths(self, docs: list[str]) -> tuple[Path, Path]:
        corpus = hashlib.sha256()
        for doc in docs:
            corpus.update(hashlib.sha256(doc.encode("utf-8")).digest())
        corpus_key = corpus.hexdigest()[:16]
        if self.tokenizer_path is not None:
            tok_key = hashlib.sha256(Path(self.tokenizer_path).read_bytes()).hexdigest()[:16]
            tokenizer_file = Path(self.tokenizer_path)
        else:
            tok_key = f"bpe{self.vocab_size_arg}-{corpus_key}"
            tokenizer_file = self.cache_dir / f"tokenizer-{tok_key}.json"
        # "-text": special tokens' text in documents encodes as text (streams cached before that are not reused)
        return tokenizer_file, self.cache_dir / f"tokens-{corpus_key}-{tok_key}-text.bin"

    def prepare_data(self) -> None:
        """Train or load the tokenizer and encode the corpus into the cache (once; later runs reuse it)."""
        if self.tokenizer_path is not None:  # fail early on a file that is not a tokenizer, or one without EOS
            if load_tokenizer(self.tokenizer_path).token_to_id(EOS_TOKEN) is None:
                raise ValueError(
                    f"tokenizer_path={self.tokenizer_path!r} is invalid: it has no {EOS_TOKEN!r} token, which "
                    "separates the documents in the token stream; add it as a special token"
                )
        docs = self._documents()
        tokenizer_file, tokens_file = self._paths(docs)
        if self.tokenizer_path is None and not tokenizer_file.exists():
            save_atomic(train_bpe(docs, self.vocab_size_arg), tokenizer_file)
        if not tokens_file.exists():
            tokenizer = load_tokenizer(tokenizer_file)
            # A tokenizer.json may carry truncation or padding (many on the Hub do): the stream takes every token of
            # every document and no padding, as Hugging Face's tokenizers do unless a call asks for them.
            tokenizer.no_truncation()
            tokenizer.no_padding()
            # Documents are text: one that mentions "<|endoftext|>" holds those characters, not a document boundary
            # (nor the pad id), as tiktoken-style pipelines refuse or escape such text. Only EOS ids separate them.
            tokenizer.encode_special_tokens = True
            dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32
            eos = tokenizer.token_to_id(EOS_TOKEN)
            ids: list[int] = []
            for start in range(0, len(docs), 256):
                for encoding in tokenizer.encode_batch(docs[start : start + 256]):
                    ids.extend(encoding.ids)
                    ids.append(eos)
            stream = np.asarray(ids, dtype=dtype)
            write_atomic(tokens_file, stream.tofile)

    # -- datasets -------------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Open the cached tokens and split the blocks into train and validation sets.

        Raises:
            ValueError: If the corpus makes fewer than 2 blocks, or, for ``stage`` ``"fit"`` (or ``None``), if the
                training blocks fill no full batch (the training loader drops the last partial batch, so training
                would run no step at all).
        """
        if self.train_set is None:
            self._split()
        if self._saved_split is not None:  # a checkpoint's split, restored before this setup
            self._check_split(self._saved_split)
            self._saved_split = None
        if stage in (None, "fit"):
            self._check_train_batches()

    def _split(self) -> None:
        docs = self._documents()
        tokenizer_file, tokens_file = self._paths(docs)
        if not (tokens_file.exists() and tokenizer_file.exists()):  # a cache missing either file builds it again
            self.prepare_data()
        self.tokenizer = load_tokenizer(tokenizer_file)
        dtype = "uint16" if self.tokenizer.get_vocab_size() <= 2**16 else "uint32"
        num_tokens = tokens_file.stat().st_size // np.dtype(dtype).itemsize
        num_blocks = (num_tokens - 1) // self.block_size
        if num_blocks < 2:
            raise ValueError(
                f"block_size={self.block_size} is invalid for this corpus: its {num_tokens} tokens make fewer than "
                "2 blocks (one to train, one to validate); use more text or a smaller block_size"
            )
        order = np.random.default_rng(self.seed).permutation(num_blocks)
        num_val = max(1, math.ceil(self.val_fraction * num_blocks))
        self.val_set = PackedBlocks(tokens_file, dtype, self.block_size, np.sort(order[:num_val]))
        self.train_set = PackedBlocks(tokens_file, dtype, self.block_size, order[num_val:])

    def _split_digest(self) -> str:
        """A hash of the blocks each split holds, in order (the corpus, tokenizer, block size, seed and fraction)."""
        digest = hashlib.sha256(f"{self.train_set.path.name}:{self.block_size}".encode())
        for ids in (self.val_set.block_ids, self.train_set.block_ids):
            digest.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|")
        return digest.hexdigest()

    def state_dict(self) -> dict[str, Any]:
        """The settings and a hash of the train/validation split, saved in checkpoints (empty before the split).

        On resume, :meth:`load_state_dict` warns when this run's split differs.
        """
        if self.train_set is None:
            return {}
        return {"split": {**{name: getattr(self, name) for name in SPLIT_FIELDS}, "digest": self._split_digest()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn if a checkpoint's run split its blocks otherwise (checked at :meth:`setup` if it has not run yet)."""
        saved = state_dict.get("split")
        if saved is None:
            return
        if self.train_set is None:
            self._saved_split = saved
        else:
            self._check_split(saved)

    def _check_split(self, saved: dict[str, Any]) -> None:
        """Warn, naming the changed settings, if ``saved`` (a checkpoint's ``state_dict()["split"]``) differs."""
        if saved.get("digest") == self._split_digest():
            return
        changed = {
            name: (saved[name], getattr(self, name))
            for name in SPLIT_FIELDS
            if saved.get(name, getattr(self, name)) != getattr(self, name)
        }
        cause = (
            f"changed data settings (checkpoint, now): {changed}"
            if changed
            else "the corpus gives other blocks (changed data.sources or max_bytes with the same tokenizer)"
        )
        rank_zero_warn(
            f"the train/validation split differs from the checkpoint's run: {cause}. Blocks the checkpoint's model "
            "trained on can now be validation blocks (its validation loss then reads too low), and training does "
            "not continue the checkpoint's data order; use the checkpoint's data.seed, data.val_fraction, "
            "data.block_size and corpus to keep its split"
        )

    def _check_train_batches(self) -> None:
        num_train, num_val = len(self.train_set), len(self.val_set)
        if num_train >= self.batch_size:
            return
        smaller_batch = f"batch_size <= {num_train}, " if num_train else ""
        raise ValueError(
            f"batch_size={self.batch_size} is invalid for this corpus: it makes only {num_train} training blocks of "
            f"block_size={self.block_size} tokens (besides {num_val} validation blocks), fewer than one full "
            "batch, and the training loader drops partial batches, so there would be no training batches; use "
            f"{smaller_batch}a smaller block_size or val_fraction, or more text"
        )

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer (after :meth:`setup`)."""
        if self.tokenizer is None:
            raise RuntimeError("call setup() before reading vocab_size")
        return self.tokenizer.get_vocab_size()

    def train_dataloader(self) -> DataLoader:
        """Shuffled training blocks (seeded per epoch), full batches only, resuming mid-epoch exactly.

        Each epoch's iterator starts where the training samples consumed so far put it (the module's
        ``train_samples_seen`` over all ranks, restored from its checkpoint, else the training batches the trainer
        ran), so every step after a resume sees the batch the uninterrupted run saw, also when a finished run is
        extended with a larger ``max_steps``; a resume at another world size continues at the same sample of the
        epoch.
        """
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

        def position() -> tuple[int, int]:
            # The module's (epoch, global sample), kept by advance_position and saved in its checkpoints. Files
            # without it: its sample count, else (any other LightningModule) the training batches the trainer ran,
            # read as if every batch ran at this world size. Not the step count: Lightning steps at each epoch's end
            # also after fewer than accumulate_grad_batches batches, and manual optimization steps at will.
            module = trainer.lightning_module
            kept = getattr(module, "train_data_position", None)
            if kept is not None:
                return int(kept[0]), int(kept[1])
            seen = getattr(module, "train_samples_seen", None)
            if seen is None:
                seen = trainer.fit_loop.epoch_loop.batch_progress.total.processed * self.batch_size * world
            per_epoch = max(1, epoch_rows(len(self.train_set), 0, world, self.batch_size) * world)
            epoch, start = divmod(seen, per_epoch)
            return epoch, start

        sampler = ResumableShuffle(
            len(self.train_set), self.seed, world, rank, self.batch_size, position if trainer is not None else None
        )
        batches_per_epoch = len(sampler) // self.batch_size
        if batches_per_epoch == 0:
            raise ValueError(
                f"batch_size={self.batch_size} is invalid for {world} ranks: the corpus's {len(self.train_set)} "
                f"training blocks give each rank {len(sampler)}, fewer than one full batch; use batch_size <= "
                f"{len(sampler)}, fewer ranks or more text"
            )
        return StepResumedLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def advance_position(self, position: tuple[int, int], samples: int, world: int) -> tuple[int, int]:
        """The training data position after ``samples`` more (see :func:`advance_position`); the module calls it."""
        return advance_position(position, samples, len(self.train_set), world, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        """Validation blocks in a fixed order."""
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        """The validation blocks (the corpus has no separate test split)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Prompts for ``predict``: the first half of each validation block, in order.

        With several processes, a :class:`PaddedPredictSampler` gives every rank as many prompts (so as many
        batches, which expert parallelism needs), some of the last ones repeated; it marks those.
        """
        half = max(1, self.block_size // 2)
        prompts = [self.val_set[i][:half] for i in range(len(self.val_set))]
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        sampler = None
        if kwargs and kwargs.get("num_replicas", 1) > 1:
            sampler = PaddedPredictSampler(len(prompts), kwargs["num_replicas"], kwargs.get("rank", 0))
        return DataLoader(prompts, batch_size=self.batch_size, sampler=sampler)

    def val_tokens(self) -> np.ndarray:
        """All validation target tokens, for reference statistics such as the unigram entropy."""
        assert self.val_set is not None
        return np.concatenate([self.val_set[i][1:].numpy() for i in range(len(self.val_set))])


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats) of the empirical unigram distribution: the loss of a model that ignores context."""
    counts = np.bincount(tokens.astype(np.int64))
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log(probs)).sum())
