"""Argument types shared by the benchmark scripts, so argparse refuses a bad value before any work starts.

Each raises :class:`argparse.ArgumentTypeError`, which argparse reports as
``error: argument --flag: 'value' is invalid: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse

import torch


def _int(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be an integer >= {minimum}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _int(text, 0)


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of integers >= 1 (at least one)."""
    values = []
    for item in text.split(","):
        try:
            values.append(_int(item.strip(), 1))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is invalid: {item.strip()!r} is not an integer >= 1 (expected e.g. '512,2048')"
            ) from None
    return values


def device(text: str) -> str:
    """A CPU or CUDA device string (``cpu``, ``cuda``, ``cuda:N``)."""
    try:
        kind = torch.device(text).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: use cpu, cuda or cuda:N")
    return text
