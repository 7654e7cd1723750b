"""Fixtures shared by the test packages."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch._dynamo


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """``torch.compile``'s caches and counters cleared before and after the test (graphs are counted per test)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
