"""``lightning-moe zoo``: the presets' table, checked against published configs and sizes."""

from __future__ import annotations

import pytest

from lightning_moe import zoo
from lightning_moe.cli import main
from lightning_moe.zoo import listing


def _rows(out: str) -> dict[str, dict[str, str]]:
    lines = [line for line in out.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == list(listing.COLUMNS)
    assert set(lines[1].replace("|", "").split()) == {"---"}
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)) for line in lines[2:]]
    return {row["preset"]: row for row in rows}


def _billions(cell: str) -> float:
    assert cell.endswith("B"), cell
    return float(cell[:-1])


def test_published_presets_show_their_configs_and_sizes(capsys):
    main(["zoo", "mixtral-8x7b", "deepseek-v3", "switch-base-8"])
    rows = _rows(capsys.readouterr().out)
    assert list(rows) == ["deepseek-v3", "mixtral-8x7b", "switch-base-8"]  # zoo order, whatever the order asked
    mixtral = rows["mixtral-8x7b"]  # mistralai/Mixtral-8x7B-v0.1 config.json; 46.7B / 12.9B in the Mixtral paper
    assert (mixtral["family"], mixtral["blocks"], mixtral["MoE blocks"], mixtral["dim"]) == (
        "mixtral",
        "32",
        "32",
        "4096",
    )
    assert (mixtral["experts"], mixtral["top-k"], mixtral["shared"], mixtral["context"]) == ("8", "2", "-", "32768")
    assert abs(_billions(mixtral["total"]) - 46.7) < 0.05 and abs(_billions(mixtral["active"]) - 12.9) < 0.05
    v3 = rows["deepseek-v3"]  # deepseek-ai/DeepSeek-V3: 61 layers, the first 3 dense, 256 routed + 1 shared of 2048
    assert (v3["blocks"], v3["MoE blocks"], v3["dim"], v3["experts"], v3["top-k"]) == ("61", "58", "7168", "256", "8")
    assert (v3["shared"], v3["context"]) == ("2048", "163840")
    assert round(_billions(v3["total"])) == 671 and round(_billions(v3["active"])) in (37, 38)
    switch = rows["switch-base-8"]  # 12 encoder + 12 decoder blocks, every other one sparse, top-1
    assert (switch["blocks"], switch["MoE blocks"], switch["experts"], switch["top-k"]) == ("24", "12", "8", "1")
    assert switch["total"].endswith("M") and abs(float(switch["total"][:-1]) - 619) < 1


def test_a_family_lists_its_presets_and_dense_baselines_have_no_experts(capsys):
    main(["zoo", "glam", "mixtral-tiny"])
    rows = _rows(capsys.readouterr().out)
    glam = [name for name in zoo.names() if name.startswith("glam")]
    assert sorted(rows) == sorted([*glam, "mixtral-tiny"])
    dense = rows["glam-tiny-dense"]
    assert (dense["experts"], dense["top-k"], dense["shared"], dense["MoE blocks"]) == ("-", "-", "-", "0")
    assert dense["total"] == dense["active"]
    assert rows["glam-tiny"]["MoE blocks"] == "1" and rows["glam-tiny"]["blocks"] == "2"  # every other layer


def test_an_unknown_name_is_refused_before_anything_is_built(capsys, monkeypatch):
    def forbid(name):
        raise AssertionError(f"built {name} before checking the names")

    monkeypatch.setattr(listing, "summarize", forbid)
    with pytest.raises(SystemExit) as exc:
        main(["zoo", "mixtral-8x7b", "mixtrl"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "name='mixtrl' is invalid" in err and "closest: mixtral" in err
    assert "Families: deepseek, glam, mixtral, qwen_moe, switch" in err


@pytest.mark.parametrize(
    "count, text",
    [
        (46_702_792_704, "46.70B"),
        (1_940_000, "1.94M"),
        (756_400, "756.4K"),
        (999_999_999, "1.00B"),
        (999_960, "1.00M"),
        (999_940, "999.9K"),
    ],
)
def test_human_counts(count, text):
    assert listing.human(count) == text
