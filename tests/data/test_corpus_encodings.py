"""Source files as editors write them: a UTF-8 byte-order mark, an upper-case ``.JSONL`` suffix."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_moe.data.corpus import read_documents

BOM = "\ufeff".encode()


def test_a_byte_order_mark_is_not_part_of_a_text_document(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(BOM + b"def f():\n    return 1\n")
    assert list(read_documents([path])) == ["def f():\n    return 1\n"]


def test_json_lines_with_a_byte_order_mark_read_every_record(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    records = [{"text": "first"}, {"text": "second"}]
    path.write_bytes(BOM + "\n".join(json.dumps(r) for r in records).encode())
    assert list(read_documents([path])) == ["first", "second"]


def test_an_upper_case_jsonl_suffix_is_read_as_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "CORPUS.JSONL"
    path.write_text('{"text": "one"}\n{"text": "two", "id": 3}\n', encoding="utf-8")
    assert list(read_documents([path])) == ["one", "two"]


def test_a_byte_order_mark_inside_a_text_is_kept(tmp_path: Path) -> None:
    """Only the mark at the start of a file is dropped: U+FEFF elsewhere is a character of the text."""
    path = tmp_path / "notes.txt"
    path.write_text("a\ufeffb", encoding="utf-8")
    assert list(read_documents([path])) == ["a\ufeffb"]
