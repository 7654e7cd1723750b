"""``lightning-moe zoo``: the model zoo's presets with their shapes and sizes, counted on the meta device.

Every preset is built under ``torch.device("meta")``, so nothing is allocated and the largest ones list in
well under a second each. Run::

    lightning-moe zoo                      # every preset
    lightning-moe zoo deepseek mixtral-8x7b  # a family's presets, and one preset
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_moe.nn.encoder_decoder import CrossAttentionDecoderLayer
from lightning_moe.nn.moe import MoELayer
from lightning_moe.nn.transformer import DecoderLayer
from lightning_moe.zoo.registry import build, count_parameters, families, family_of, names

COLUMNS = (
    "preset",
    "family",
    "blocks",
    "MoE blocks",
    "dim",
    "experts",
    "top-k",
    "shared",
    "total",
    "active",
    "context",
)


@dataclass(frozen=True)
class PresetSummary:
    """What ``lightning-moe zoo`` prints of a preset.

    Attributes:
        name: Preset name.
        family: Its family.
        blocks: Transformer blocks (encoder and decoder together for Switch).
        moe_blocks: Blocks whose FFN is an MoE layer.
        dim: Model width.
        experts: Routed experts per MoE layer (``None``: no MoE layer, a dense baseline).
        top_k: Experts per token (``None`` without MoE layers, or with expert-choice routing).
        shared_hidden: Hidden width of the shared experts together (0: none).
        total: Parameters, every one once.
        active: Parameters a token uses (see :func:`~lightning_moe.zoo.registry.count_parameters`).
        max_seq_len: The longest sequence the preset takes (``None`` if its config has no such field).
    """

    name: str
    family: str
    blocks: int
    moe_blocks: int
    dim: int
    experts: int | None
    top_k: int | None
    shared_hidden: int
    total: int
    active: int
    max_seq_len: int | None


def summarize(name: str) -> PresetSummary:
    """Build the named preset on the meta device and read its shape and parameter counts.

    Raises:
        ValueError: For an unknown name (listing the closest names).
    """
    with torch.device("meta"):
        model = build(name)
    blocks = [m for m in model.modules() if isinstance(m, (DecoderLayer, CrossAttentionDecoderLayer))]
    moe = [m for m in model.modules() if isinstance(m, MoELayer)]
    first = moe[0].config if moe else None
    counts = count_parameters(model)
    cfg = model.zoo_config
    return PresetSummary(
        name=name,
        family=family_of(name),
        blocks=len(blocks),
        moe_blocks=sum(bool(block.is_moe) for block in blocks),
        dim=cfg.dim,
        experts=first.num_experts if first else None,
        top_k=first.router.top_k if first and first.router.kind == "token_choice" else None,
        shared_hidden=first.shared_hidden_dim if first else 0,
        total=counts.total,
        active=counts.active,
        max_seq_len=getattr(cfg, "max_seq_len", None),
    )


def human(count: int) -> str:
    """A parameter count with a unit: ``46.70B``, ``1.92M``, ``350.0K`` (the larger unit once it rounds to 1000)."""
    if round(count / 1e6, 2) >= 1000:
        return f"{count / 1e9:.2f}B"
    if round(count / 1e3, 1) >= 1000:
        return f"{count / 1e6:.2f}M"
    return f"{count / 1e3:.1f}K"


def table(summaries: Sequence[PresetSummary]) -> str:
    """A markdown table of the summaries, one row each, in :data:`COLUMNS` order."""

    def cell(value: int | None) -> str:
        return "-" if value is None else str(value)

    rows = [COLUMNS, tuple("---" for _ in COLUMNS)]
    for s in summaries:
        rows.append(
            (
                s.name,
                s.family,
                str(s.blocks),
                str(s.moe_blocks),
                str(s.dim),
                cell(s.experts),
                cell(s.top_k),
                str(s.shared_hidden) if s.shared_hidden else "-",
                human(s.total),
                human(s.active),
                cell(s.max_seq_len),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows)


def select(selectors: Sequence[str]) -> list[str]:
    """The preset names that ``selectors`` (preset or family names; none: every preset) pick, in zoo order.

    Raises:
        ValueError: For a selector that is neither a preset nor a family, naming it and what is allowed.
    """
    if not selectors:
        return names()
    picked: set[str] = set()
    for selector in selectors:
        if selector in names():
            picked.add(selector)
        elif selector in families():
            picked.update(name for name in names() if family_of(name) == selector)
        else:
            close = difflib.get_close_matches(selector, names() + families(), n=5, cutoff=0.4)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise ValueError(
                f"name={selector!r} is invalid: not a preset or a family{hint}. Families: {', '.join(families())}; "
                "`lightning-moe zoo` lists every preset"
            )
    return [name for name in names() if name in picked]


def main(argv: Sequence[str] | None = None) -> None:
    """Print the table of the selected presets."""
    parser = argparse.ArgumentParser(
        prog="lightning-moe zoo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="preset or family names (default: every preset)")
    args = parser.parse_args(argv)
    try:
        selected = select(args.names)
    except ValueError as err:
        parser.error(str(err))
    print(table([summarize(name) for name in selected]))
