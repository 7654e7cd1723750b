"""Text sources: the embedded default corpus (this interpreter's standard library) and user files.

The default corpus needs no download: it is the ``.py`` source of the running Python's standard library
(real code and English docstrings; about 12 MB for CPython 3.11 without its test suites), read in sorted
path order so every run sees the same text. Point the data module at your own text with ``sources``:
plain-text files, globs, and JSON-lines files (``.jsonl``) whose records carry a text field.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted, without site-packages and test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        if not _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            files.append(path)
    return files


def expand_sources(sources: list[str]) -> list[Path]:
    """Expand paths and globs into a sorted, de-duplicated list of files.

    A source that names an existing file is that file, even where its name holds glob characters
    (``notes[1].txt``, which as a pattern would match ``notes1.txt``). Paths that name one file (``a.txt`` and
    its absolute path, a symlink to it) count once.

    Raises:
        ValueError: If a source matches no file, or names a folder.
    """
    files: list[Path] = []
    for source in sources:
        pattern = os.path.expanduser(source)
        if os.path.isfile(pattern):
            matches = [pattern]
        else:
            matches = [m for m in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(m)]
        if not matches and os.path.isdir(pattern):
            example = os.path.join(source, "**", "*.txt")
            raise ValueError(
                f"sources entry {source!r} is invalid: it is a folder, and sources are files and globs; give its "
                f"files as a glob such as {example!r}"
            )
        if not matches:
            raise ValueError(f"sources entry {source!r} is invalid: it matches no file")
        files.extend(Path(m) for m in matches)
    unique: dict[str, Path] = {}
    for path in sorted(files):  # one file under two spellings (relative and absolute, a symlink) is read once
        unique.setdefault(os.path.realpath(path), path)
    return sorted(unique.values())


def read_documents(files: list[Path], text_field: str = "text", max_bytes: int | None = None) -> Iterator[str]:
    r"""Yield documents from text files (one document per file) and ``.jsonl`` files (one per record).

    A file's suffix is matched in any case (``.JSONL`` too), and a UTF-8 byte-order mark at its start is dropped.

    Args:
        files: Files to read, in order.
        text_field: Field holding the text in JSON-lines records.
        max_bytes: Stop once this many bytes of text have been yielded (the last document is cut).

    Raises:
        ValueError: For a file that is not UTF-8 text, or a JSON-lines line that is not JSON, not an object
            with a string ``text_field``, or whose text holds a lone surrogate escape such as ``\ud800`` (not
            Unicode text, so not encodable as UTF-8; the file and its 1-based line number are named).
    """
    remaining = max_bytes if max_bytes is not None else float("inf")
    for path in files:
        if remaining <= 0:
            return
        try:
            raw = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors write one) is not text
        except UnicodeDecodeError as err:
            raise ValueError(f"source file {str(path)!r} is invalid: not UTF-8 text ({err.reason})") from None
        if path.suffix.lower() == ".jsonl":
            texts = []
            # "\n" only: JSON strings may hold U+2028, U+2029 and U+0085 unescaped, where splitlines() would cut.
            for line_no, line in enumerate(raw.split("\n"), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{path}:{line_no} is invalid: not JSON ({err.msg} at column {err.colno}); expected one JSON "
                        f"object per line with a string field {text_field!r}"
                    ) from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ValueError(
                        f"{path}:{line_no} is invalid: expected a JSON object with a string field {text_field!r}"
                    )
                try:
                    record[text_field].encode("utf-8")
                except UnicodeEncodeError as err:
                    raise ValueError(
                        f"{path}:{line_no} is invalid: its field {text_field!r} holds the lone surrogate "
                        f"{record[text_field][err.start]!r} at character {err.start}, which is not Unicode text; "
                        "escape a character beyond U+FFFF as a surrogate pair or write it unescaped"
                    ) from None
                texts.append(record[text_field])
        else:
            texts = [raw]
        for text in texts:
            if remaining <= 0:  # the budget is spent: no empty documents for the rest of the file
                return
            if not text:
                continue
            size = len(text.encode("utf-8"))
            if size > remaining:
                text = text.encode("utf-8")[: int(remaining)].decode("utf-8", errors="ignore")
                size = int(remaining)
            remaining -= size
            if text:
                yield text
