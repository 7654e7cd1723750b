"""``lightning-moe compare``: a tiny budget writes the table, the plots, the curves and the TensorBoard runs."""

import json
from pathlib import Path

import pytest

from lightning_moe.cli import main
from lightning_moe.compare import CompareConfig, load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs/compare/mixtral-tiny.yaml"


@pytest.fixture(autouse=True)
def shared_cache(tmp_path_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_MOE_CACHE", str(tmp_path_factory.getbasetemp() / "lightning-moe-cache"))
    monkeypatch.chdir(tmp_path)


def test_compare_writes_table_plot_and_tensorboard_runs(tmp_path, capsys):
    out = tmp_path / "cmp"
    main([
        "compare", "--config", str(CONFIG), "--out_dir", str(out), "--seeds", "[0]", "--max_steps", "5",
        "--val_every", "2", "--val_batches", "1", "--block_size", "32", "--batch_size", "4",
        "--max_bytes", "200000", "--warmup_steps", "1", "--upcycle_steps", "2",
    ])  # fmt: skip
    table = (out / "results.md").read_text()
    for label in ("moe", "dense-equal-active", "dense-equal-total"):
        assert f"| {label} |" in table
    assert "final val loss" in table and "tokens/s" in table and "peak memory" in table
    record = json.loads((out / "results.json").read_text())
    # Validation every 2 steps, and at the last one, which val_every does not divide: the final loss is step 5's.
    assert [[point[0] for point in r["curve"]] for r in record["runs"]] == [[2 * 128, 4 * 128, 5 * 128]] * 3
    assert all(r["final_val_loss"] == r["curve"][-1][2] for r in record["runs"])
    moe, active, total = record["runs"]
    assert active["total_params"] < moe["total_params"] and total["total_params"] < moe["total_params"]
    assert (out / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = {p.parent.relative_to(out / "tb").as_posix() for p in (out / "tb").rglob("events.out.tfevents.*")}
    assert runs == {f"{label}/seed0" for label in ("moe", "dense-equal-active", "dense-equal-total",
                                                   "dense-continued", "upcycled-moe")}  # fmt: skip
    assert "| upcycled-moe |" in (out / "upcycle.md").read_text()
    assert (out / "upcycle.png").is_file()
    assert "results.md" in capsys.readouterr().out


def test_compare_config_errors(tmp_path):
    with pytest.raises(ValueError, match="dense=\\['half'\\] is invalid"):
        CompareConfig(dense=["half"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("arch: mixtral-tiny\nsteps: 3\n")
    with pytest.raises(ValueError, match="unknown keys \\['steps'\\]"):
        load_config(["--config", str(bad)])


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--seeds", "[0.5]"], r"seeds=\[0.5\] is invalid: expected a list of ints"),
        (["--seeds", "[-1]"], r"seeds=\[-1\] is invalid: each seed must be in \[0, 2\*\*32 - 1\]"),
        (["--max_steps", "abc"], r"max_steps='abc' is invalid: must be an int"),
        (["--upcycle_steps", "-5"], r"upcycle_steps=-5 is invalid: must be >= 0"),
        (["--lr", "0"], r"lr=0 is invalid: must be > 0"),
        (["--lr", "fast"], r"lr='fast' is invalid: must be a finite number"),
        (["--arch", "mixtral-tiny-dense"], r"arch='mixtral-tiny-dense' is invalid: give the MoE preset"),
        (["--arch", "switch-tiny"], r"arch='switch-tiny' is invalid: compare trains decoder-only presets"),
    ],
)
def test_compare_options_are_checked_before_any_run(tmp_path, argv, match):
    with pytest.raises(ValueError, match=match):
        load_config(["--out_dir", str(tmp_path / "out"), *argv])
    assert not (tmp_path / "out").exists()  # nothing was written


def test_compare_reads_numbers_and_single_seeds_as_meant():
    cfg = load_config(["--lr", "3e-3", "--seeds", "3", "--dense", "active"])  # YAML 1.1: 3e-3 is a string
    assert cfg.lr == 3e-3 and cfg.seeds == [3] and cfg.dense == ["active"]
    assert load_config(["--out_dir", "2024"]).out_dir == "2024"  # a string field keeps its text


def test_the_upcycling_continuation_trains_on_the_batches_after_the_dense_run(tmp_path, monkeypatch):
    from lightning_moe.module import CausalLMModule

    batches: dict[int, list] = {}
    original = CausalLMModule.training_step

    def recording(self, batch, batch_idx):
        batches.setdefault(id(self), []).append(batch.clone())
        return original(self, batch, batch_idx)

    monkeypatch.setattr(CausalLMModule, "training_step", recording)
    main([
        "compare", "--config", str(CONFIG), "--out_dir", str(tmp_path / "cmp"), "--seeds", "[0]", "--max_steps", "3",
        "--val_every", "3", "--val_batches", "1", "--block_size", "32", "--batch_size", "4", "--dense", "[active]",
        "--max_bytes", "200000", "--warmup_steps", "1", "--upcycle_steps", "2",
    ])  # fmt: skip
    moe, dense, continued, upcycled = batches.values()
    assert all(a.equal(b) for a, b in zip(moe, dense, strict=True))  # same data order for every model
    assert all(a.equal(b) for a, b in zip(continued, upcycled, strict=True))
    assert not any(c.equal(d) for c in continued for d in dense)  # not the dense run's batches again
