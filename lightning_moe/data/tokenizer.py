"""Byte-level BPE tokenizers trained with the ``tokenizers`` library and cached on disk."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer with ``vocab_size`` entries (special tokens included).

    Byte-level means any text encodes without unknown tokens: the 256 byte symbols are always present.

    Raises:
        ValueError: If ``vocab_size`` cannot hold the byte alphabet and the special tokens.
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is invalid: a byte-level BPE needs at least {minimum}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Create ``path`` atomically: ``write`` fills a temporary file next to it, which is then renamed to ``path``.

    The temporary name is unique (process id and a random UUID), also among processes on other machines that share
    the folder and have the same process id, as containers often do. A ``write`` that fails removes its temporary
    file, so nothing half-written is left behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_atomic(tokenizer: Tokenizer, path: Path) -> None:
    """Write ``tokenizer.json`` atomically (see :func:`write_atomic`)."""
    write_atomic(path, lambda tmp: tokenizer.save(str(tmp)))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json``.

    Raises:
        ValueError: If the file does not exist or is not a ``tokenizers`` JSON file.
    """
    if not Path(path).is_file():
        raise ValueError(f"tokenizer_path={str(path)!r} is invalid: no such file")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises a bare Exception ("Model missing", ...)
        raise ValueError(
            f"tokenizer_path={str(path)!r} is invalid: not a tokenizers JSON file such as Tokenizer.save() "
            f"writes ({err})"
        ) from None
