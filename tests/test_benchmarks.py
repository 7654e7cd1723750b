"""Smoke tests of the scripts in benchmarks/: each runs end to end on its smallest settings, and the tables it
prints are checked against their own arithmetic (ratios recomputed from the printed times, token counts,
medians from the recorded steps); bad flag values are refused before any work; the README's Performance
commands use flags the scripts have.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPTS = [
    "moe_layer",
    "expert_scaling",
    "expert_batching",
    "train_step_vs_hf",
    "bf16_mixed",
    "expert_parallel",
    "compile_blocks",
]


class Forbidden(Exception):
    pass


def _forbid(*args, **kwargs):
    raise Forbidden("the script went past its argument checks")


@pytest.fixture
def bench(monkeypatch):
    """Import a benchmark script as a module; the torch thread count and logger levels are restored after."""
    monkeypatch.syspath_prepend(str(BENCH))
    threads = torch.get_num_threads()
    loggers = {name: logging.getLogger(name).level for name in ("lightning.pytorch", "lightning.fabric")}
    yield importlib.import_module
    torch.set_num_threads(threads)
    for name, level in loggers.items():
        logging.getLogger(name).setLevel(level)


def run_main(module, argv, monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    module.main()
    return capsys.readouterr().out


def refused(module, argv, monkeypatch, capsys) -> str:
    """Run ``main`` expecting a refusal; returns the message (stderr, or the SystemExit text)."""
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    with pytest.raises(SystemExit) as exc:
        module.main()
    assert exc.value.code not in (0, None)
    captured = capsys.readouterr()
    return captured.err + (exc.value.code if isinstance(exc.value.code, str) else "")


def tables(out: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table in ``out``: header cells and rows of cells (each row as long as the header)."""
    lines = out.splitlines()
    found = []
    i = 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and re.fullmatch(r"\|([-:]+\|)+", lines[i + 1].strip()):
            header = [c.strip() for c in lines[i].strip().strip("|").split("|")]
            rule = lines[i + 1].strip().strip("|").split("|")
            assert len(rule) == len(header), f"rule and header differ in columns: {lines[i]!r} / {lines[i + 1]!r}"
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                assert len(cells) == len(header), f"row {lines[i]!r} does not fit header {header}"
                rows.append(cells)
                i += 1
            found.append((header, rows))
        else:
            i += 1
    return found


def num(cell: str) -> float:
    value = float(cell.rstrip("x%M"))
    assert math.isfinite(value) and value > 0, cell
    return value


def assert_ratio(ratio_cell: str, num_cell: str, den_cell: str) -> None:
    """``ratio_cell`` is ``num_cell / den_cell`` up to the rounding of the three printed numbers."""
    r, a, b = num(ratio_cell), num(num_cell), num(den_cell)

    def half_ulp(cell: str) -> float:
        digits = cell.rstrip("x%M").partition(".")[2]
        return 0.5 * 10 ** -len(digits)

    da, db, dr = half_ulp(num_cell), half_ulp(den_cell), half_ulp(ratio_cell)
    low, high = (a - da) / (b + db), (a + da) / max(b - db, 1e-12)
    assert low - dr - 1e-9 <= r <= high + dr + 1e-9, f"{ratio_cell} is not {num_cell} / {den_cell}"


# -- moe_layer.py ----------------------------------------------------------------------------------------------


def test_moe_layer_smoke_table_and_ratios(bench, monkeypatch, capsys):
    moe_layer = bench("moe_layer")
    argv = ["--shapes", "mixtral", "--tokens", "512", "--repeats", "1", "--warmup", "0", "--threads", "1"]
    out = run_main(moe_layer, argv, monkeypatch, capsys)
    progress, markdown = tables(out)
    names = [name for name, _, _ in moe_layer.COLUMNS]
    assert markdown[0] == ["shape", "tokens", *names]
    assert progress[0] == ["shape", "tokens", *names]
    (row,) = markdown[1]
    cell = dict(zip(markdown[0], row, strict=True))
    assert cell["shape"].startswith("Mixtral-like") and cell["tokens"] == "512"
    for name in names:
        num(cell[name])
    assert_ratio(cell["grouped/dense"], cell["grouped (s)"], cell["dense (s)"])
    assert_ratio(cell["loop/dense"], cell["loop (s)"], cell["dense (s)"])
    # The progress row holds the same numbers as the markdown row.
    assert progress[1][0][2:] == row[2:]
    assert "targets at" not in out  # no 8192-token row


def test_moe_layer_bf16_kept_memory_without_loop(bench, monkeypatch, capsys):
    moe_layer = bench("moe_layer")
    argv = ["--shapes", "0", "--tokens", "512", "--repeats", "1", "--warmup", "0", "--threads", "1"]
    out = run_main(moe_layer, [*argv, "--bf16", "--reuse-grad-memory", "--skip-loop"], monkeypatch, capsys)
    header, (row,) = tables(out)[1]
    cell = dict(zip(header, row, strict=True))
    assert "bf16-mixed" in out.splitlines()[0]
    assert [cell[c] for c in ("loop (s)", "loop/dense", "grouped/loop", "loop MiB")] == ["-"] * 4
    assert_ratio(cell["grouped/dense"], cell["grouped (s)"], cell["dense (s)"])


def test_moe_layer_target_lines_compare_grouped_over_dense_at_8192_tokens(bench):
    moe_layer = bench("moe_layer")
    mixtral = moe_layer.SHAPES[0]
    assert mixtral.target is not None

    def result(tokens, grouped):
        return moe_layer.Result(mixtral, tokens, {"dense": 1.0, "grouped": grouped}, math.nan, {})

    below, above = mixtral.target * 0.99, mixtral.target * 1.01
    lines = moe_layer.target_report([result(4096, above), result(8192, below)])
    assert lines == [f"mixtral: grouped/dense {below:.2f} (target <= {mixtral.target:.2f}) met"]
    assert moe_layer.target_report([result(8192, above)])[0].endswith("MISSED")


def test_moe_layer_measure_interleaves_in_alternating_order_and_takes_medians(bench, monkeypatch):
    moe_layer = bench("moe_layer")
    calls, clock = [], iter(range(1000))
    monkeypatch.setattr(moe_layer, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    durations = {"a": iter([5, 1, 3]), "b": iter([2, 9, 4])}

    def step(name):
        def run():
            calls.append(name)
            for _ in range(next(durations[name]) - 1):  # each perf_counter call advances the clock by 1
                next(clock)

        return run

    medians = moe_layer.measure({"a": step("a"), "b": step("b")}, repeats=3, warmup=0)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert medians == {"a": statistics.median([5, 1, 3]), "b": statistics.median([2, 9, 4])}


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--repeats", "0"),
        ("--warmup", "-1"),
        ("--threads", "0"),
        ("--tokens", "0"),
        ("--tokens", "512,-3"),
        ("--tokens", "abc"),
        ("--device", "cdua"),
        ("--shapes", "9"),
    ],
)
def test_moe_layer_refuses_bad_values_before_work(bench, monkeypatch, capsys, flag, value):
    moe_layer = bench("moe_layer")
    monkeypatch.setattr(moe_layer, "_check_memory_method", _forbid)
    monkeypatch.setattr(moe_layer, "run_shape", _forbid)
    message = refused(moe_layer, ["--shapes", "mixtral", "--tokens", "512", flag, value], monkeypatch, capsys)
    assert flag in message and value in message


# -- expert_scaling.py -----------------------------------------------------------------------------------------


def test_expert_scaling_smoke_ratios_to_the_first_count(bench, monkeypatch, capsys):
    scaling = bench("expert_scaling")
    argv = ["--experts", "4,8", "--tokens", "512", "--repeats", "1", "--threads", "1"]
    header, rows = tables(run_main(scaling, argv, monkeypatch, capsys))[0]
    assert header == [
        "experts",
        "grouped (s)",
        "grouped, reused grad memory (s)",
        "loop (s)",
        "grouped vs 4 experts",
        "reused vs 4 experts",
        "loop vs 4 experts",
    ]
    assert [r[0] for r in rows] == ["4", "8"]
    for r in rows:
        for time_col, ratio_col in ((1, 4), (2, 5), (3, 6)):
            assert_ratio(r[ratio_col], r[time_col], rows[0][time_col])
    assert rows[0][4:] == ["1.00x"] * 3


def test_expert_scaling_fine_mode_smoke(bench, monkeypatch, capsys):
    scaling = bench("expert_scaling")
    argv = ["--mode", "fine", "--experts", "16,32", "--tokens", "256", "--repeats", "1", "--threads", "1"]
    out = run_main(scaling, argv, monkeypatch, capsys)
    header, rows = tables(out)[0]
    assert "top E/4, expert hidden 4096/E" in out and [r[0] for r in rows] == ["16", "32"]
    assert header[4] == "grouped vs 16 experts"
    assert_ratio(rows[1][4], rows[1][1], rows[0][1])
    assert scaling.layer_config(32, "fine").router.top_k * scaling.layer_config(32, "fine").experts.hidden_dim == 1024


@pytest.mark.parametrize("counts", ["4,8", "4"])
def test_expert_scaling_interleaved_rounds(bench, monkeypatch, capsys, counts):
    scaling = bench("expert_scaling")
    argv = ["--experts", counts, "--interleaved", "2", "--tokens", "256", "--repeats", "1", "--threads", "1"]
    header, rows = tables(run_main(scaling, argv, monkeypatch, capsys))[0]
    experts = counts.split(",")
    assert header == ["round", *(f"{e} experts (s)" for e in experts), *(f"{e} vs {experts[0]}" for e in experts[1:])]
    assert [r[0] for r in rows] == ["1", "2"]
    for r in rows:
        for j in range(1, len(experts)):
            assert_ratio(r[1 + len(experts) + j - 1], r[1 + j], r[1])


@pytest.mark.parametrize(
    "argv, flag, value",
    [
        (["--repeats", "0"], "--repeats", "0"),
        (["--tokens", "0"], "--tokens", "0"),
        (["--threads", "0"], "--threads", "0"),
        (["--interleaved", "-1"], "--interleaved", "-1"),
        (["--experts", "8,x"], "--experts", "x"),
        (["--experts", "8,1"], "--experts", "1"),
        (["--mode", "fine", "--experts", "8,12"], "--experts", "12"),
        (["--mode", "fine", "--experts", "2"], "--experts", "2"),
        (["--device", "cdua"], "--device", "cdua"),
    ],
)
def test_expert_scaling_refuses_bad_values_before_work(bench, monkeypatch, capsys, argv, flag, value):
    scaling = bench("expert_scaling")
    monkeypatch.setattr(scaling, "MoELayer", _forbid)
    message = refused(scaling, ["--tokens", "256", *argv], monkeypatch, capsys)
    assert flag in message and value in message


# -- expert_batching.py ----------------------------------------------------------------------------------------


def test_expert_batching_smoke_speed_up_is_single_over_batched(bench, monkeypatch, capsys):
    batching = bench("expert_batching")
    labels = [label for label, _ in batching.cases()]
    argv = ["--cases", "0,5", "--tokens", "512", "--repeats", "1", "--threads", "1"]
    header, rows = tables(run_main(batching, argv, monkeypatch, capsys))[0]
    assert header == ["layer", "batched (s)", "one expert at a time (s)", "speed-up"]
    assert [r[0] for r in rows] == [labels[0], labels[5]]
    for r in rows:
        assert_ratio(r[3], r[2], r[1])


@pytest.mark.parametrize("flag, value", [("--tokens", "0"), ("--repeats", "0"), ("--threads", "0"), ("--cases", "8")])
def test_expert_batching_refuses_bad_values_before_work(bench, monkeypatch, capsys, flag, value):
    batching = bench("expert_batching")
    monkeypatch.setattr(batching, "MoELayer", _forbid)
    message = refused(batching, [flag, value], monkeypatch, capsys)
    assert flag in message and value in message


# -- compile_blocks.py ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_blocks_smoke_ratio_is_compiled_over_eager(bench, monkeypatch, capsys):
    script = bench("compile_blocks")
    argv = ["--presets", "mixtral-tiny", "--batch", "2", "--seq", "8", "--steps", "2", "--threads", "1"]
    out = run_main(script, [*argv, "--backend", "aot_eager"], monkeypatch, capsys)
    header, (row,) = tables(out)[0]
    cell = dict(zip(header, row, strict=True))
    assert cell["preset"] == "mixtral-tiny"
    assert_ratio(cell["compiled / eager"], cell["compiled step (s)"], cell["eager step (s)"])
    assert float(cell["loss diff"]) < 1e-4  # the same weights and batches give the same losses


@pytest.mark.parametrize(
    "argv",
    [
        ["--presets", "mixtral-tiny-dense"],
        ["--backend", "nope"],
        ["--steps", "0"],
        ["--batch", "0"],
        ["--scaled", "--presets", "qwen3-moe-tiny"],  # no ~50M shape for it
    ],
)
def test_compile_blocks_refuses_bad_values_before_work(bench, monkeypatch, capsys, argv):
    script = bench("compile_blocks")
    monkeypatch.setattr(script, "compile_blocks", _forbid)
    message = refused(script, argv, monkeypatch, capsys)
    assert all(arg in message for arg in argv)


# -- train_step_vs_hf.py ---------------------------------------------------------------------------------------


TINY_VS_HF = ["--tiny", "--shapes", "mixtral", "--batch", "2", "--seq", "16", "--repeats", "1", "--threads", "1"]


def check_vs_hf_table(out: str, rss_positive: bool = True, dense_limit: bool = False) -> None:
    assert "32 tokens/step" in out.splitlines()[0]
    header, (row,) = tables(out)[0]
    cell = dict(zip(header, row, strict=True))
    assert ("dense step (s)" in cell) == dense_limit
    if dense_limit:
        assert_ratio(cell["HF/dense"], cell["HF step (s)"], cell["dense step (s)"])
        assert_ratio(cell["ours/dense"], cell["ours step (s)"], cell["dense step (s)"])
    assert cell["shape"] == "mixtral"
    for column in header[1:]:
        if rss_positive or "RSS" not in column:
            num(cell[column])
        else:
            assert float(cell[column]) >= 0
    assert_ratio(cell["speed-up"], cell["HF step (s)"], cell["ours step (s)"])
    for who in ("HF", "ours"):
        assert_ratio(cell[f"{who} tok/s"], "32", cell[f"{who} step (s)"])
    # Same weights, same batch: the same first loss (float32).
    assert abs(num(cell["first loss HF"]) - num(cell["first loss ours"])) <= 2e-4


def test_train_step_vs_hf_tiny_smoke_in_process(bench, monkeypatch, capsys):
    # The memory children run in this process: their command line goes through the script's own parser.
    vs_hf = bench("train_step_vs_hf")
    children = []

    def child(cmd):
        assert cmd[:2] == [sys.executable, vs_hf.__file__]
        children.append(cmd)
        buffer = io.StringIO()
        with monkeypatch.context() as m, contextlib.redirect_stdout(buffer):
            m.setattr(sys, "argv", cmd[1:])
            vs_hf.main()
        return json.loads(buffer.getvalue())

    monkeypatch.setattr(vs_hf, "run_json", child)
    out = run_main(vs_hf, [*TINY_VS_HF, "--memory-runs", "1", "--dense-limit"], monkeypatch, capsys)
    check_vs_hf_table(out, rss_positive=False, dense_limit=True)
    assert [cmd[2:5] for cmd in children] == [  # the dense limit is timed only
        ["--memory-child", "mixtral", "hf"],
        ["--memory-child", "mixtral", "ours"],
    ]
    assert all("--tiny" in cmd for cmd in children)


def test_train_step_vs_hf_dense_limit_is_our_model_with_dense_ffns_of_equal_active_flops(bench):
    from lightning_moe.nn import FeedForward, MoELayer

    pair = bench("train_step_vs_hf").models("qwen2_moe", tiny=True, dense=True)
    ours, dense = pair["ours"], pair["dense"]
    moe = {name: m for name, m in ours.named_modules() if isinstance(m, MoELayer)}
    assert moe and not any(isinstance(m, MoELayer) for m in dense.modules())
    for name, layer in moe.items():
        ffn = dense.get_submodule(name)
        assert isinstance(ffn, FeedForward)
        # Qwen2-MoE: top-4 of 60 experts of width 176 plus a shared expert of 704.
        assert (layer.config.router.top_k, layer.config.experts.hidden_dim, layer.config.shared_hidden_dim) == (
            4,
            176,
            704,
        )
        assert sum(p.numel() for p in ffn.parameters()) == 3 * layer.config.dim * (4 * 176 + 704)
    # Everything else is our model's, weights included.
    rest = {n: p for n, p in ours.named_parameters() if not any(n.startswith(name + ".") for name in moe)}
    dense_params = dict(dense.named_parameters())
    for n, p in rest.items():
        assert torch.equal(dense_params[n], p), n


@pytest.mark.slow
def test_train_step_vs_hf_tiny_smoke_subprocess():
    # End to end with the peaks measured in fresh processes, as the script runs (~20 s: three interpreters).
    result = subprocess.run(
        [sys.executable, str(BENCH / "train_step_vs_hf.py"), *TINY_VS_HF, "--memory-runs", "1"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    check_vs_hf_table(result.stdout)


@pytest.mark.parametrize(
    "argv, flag, value",
    [
        (["--shapes", "mixtral,mixtrla"], "--shapes", "mixtrla"),
        (["--repeats", "0"], "--repeats", "0"),
        (["--memory-runs", "0"], "--memory-runs", "0"),
        (["--batch", "0"], "--batch", "0"),
        (["--seq", "0"], "--seq", "0"),
        (["--shapes", "switch", "--seq", "1"], "--seq", "1"),
        (["--threads", "0"], "--threads", "0"),
    ],
)
def test_train_step_vs_hf_refuses_bad_values_before_work(bench, monkeypatch, capsys, argv, flag, value):
    vs_hf = bench("train_step_vs_hf")
    monkeypatch.setattr(vs_hf, "models", _forbid)
    monkeypatch.setattr(vs_hf, "peak_memory", _forbid)
    message = refused(vs_hf, argv, monkeypatch, capsys)
    assert flag in message and value in message


# -- bf16_mixed.py ---------------------------------------------------------------------------------------------


def test_bf16_mixed_smoke_table_matches_the_recorded_steps(bench, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("LIGHTNING_MOE_CACHE", str(tmp_path / "cache"))
    bf16_mixed = bench("bf16_mixed")
    record = tmp_path / "runs.json"
    argv = ["--quick", "--families", "glam", "--steps", "3", "--skip", "1", "--batch-size", "2", "--seq-len", "16"]
    argv += ["--data-bytes", "100000", "--threads", "1", "--json", str(record)]
    out = run_main(bf16_mixed, argv, monkeypatch, capsys)
    assert "32 tokens/step (2 x 16), 3 steps" in out.splitlines()[0]
    header, (row,) = tables(out)[0]
    cell = dict(zip(header, row, strict=True))
    runs = json.loads(record.read_text())["families"]["glam-tiny"]["runs"]
    fp32, bf16 = runs["32-true"], runs["bf16-mixed"]
    assert len(fp32["losses"]) == len(bf16["losses"]) == 3
    # Medians after the warm-up step, throughput, and loss agreement, recomputed from the recorded steps.
    t32, t16 = statistics.median(fp32["times"][1:]), statistics.median(bf16["times"][1:])
    assert cell["fp32 step (s)"] == f"{t32:.3f}" and cell["bf16 step (s)"] == f"{t16:.3f}"
    assert cell["speed-up"] == f"{t32 / t16:.2f}x"
    assert cell["fp32 tok/s"] == f"{32 / t32:.0f}" and cell["bf16 tok/s"] == f"{32 / t16:.0f}"
    assert cell["fp32 loss@3"] == f"{fp32['losses'][-1]:.4f}" and cell["bf16 loss@3"] == f"{bf16['losses'][-1]:.4f}"
    diffs = [abs(a - b) for a, b in zip(fp32["losses"], bf16["losses"], strict=True)]
    assert cell["max abs Δloss"] == f"{max(diffs):.4f}"
    rel = statistics.fmean(d / abs(a) for d, a in zip(diffs, fp32["losses"], strict=True))
    assert cell["mean rel Δloss"] == f"{100 * rel:.2f}%"
    assert 0 < num(cell["bf16 matmul FLOPs"]) <= 100
    # params: the model's parameters, each counted once (GLaM ties its LM head to the embedding).
    from lightning_moe.module import CausalLMModule

    model = CausalLMModule(arch="glam-tiny").model
    assert cell["params"] == f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--steps", "0"),
        ("--batch-size", "0"),
        ("--seq-len", "0"),
        ("--skip", "0"),
        ("--threads", "0"),
        ("--data-bytes", "0"),
        ("--families", "mixtrla"),
    ],
)
def test_bf16_mixed_refuses_bad_values_before_work(bench, monkeypatch, capsys, flag, value):
    bf16_mixed = bench("bf16_mixed")
    monkeypatch.setattr(bf16_mixed, "TextDataModule", _forbid)
    monkeypatch.setattr(bf16_mixed, "train", _forbid)
    message = refused(bf16_mixed, ["--quick", flag, value], monkeypatch, capsys)
    assert flag in message and value in message


# -- expert_parallel.py ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.multiprocess
def test_expert_parallel_smoke():
    # ~6-10 s on 2 slow cores: an interpreter plus two forked gloo processes.
    argv = ["--tokens", "128", "--steps", "1", "--warmup", "0"]
    result = subprocess.run(
        [sys.executable, str(BENCH / "expert_parallel.py"), *argv],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=120,
    )
    header, rows = tables(result.stdout)[0]
    assert header[:3] == ["rank", "step ms", "a2a MiB sent (fwd)"] and len(header) == 8
    assert [r[0] for r in rows] == ["0", "1"]
    for r in rows:
        assert all(math.isfinite(float(c)) and float(c) >= 0 for c in r[1:])
        assert float(r[1]) > 0 and float(r[2]) > 0  # 128 tokens of top-2 over 8 experts: some leave each rank


def test_expert_parallel_volume_counts_the_combine_rows_this_rank_received(bench):
    ep = bench("expert_parallel")
    # Two ranks, four experts (rank 0 owns experts 0-1, rank 1 owns 2-3). Rank 0 sends 1 + 4 = 5 copies to rank
    # 1's experts and gets 2 + 0 back from rank 1 to return; rank 1 sends 2 to rank 0 and returns rank 0's 5.
    counts_RE = torch.tensor([[3.0, 0.0, 1.0, 4.0], [2.0, 0.0, 6.0, 1.0]])
    assert ep.sent_rows(counts_RE, 0) == 5 + 2
    assert ep.sent_rows(counts_RE, 1) == 2 + 5
    # Three ranks, one expert each: rank r sends row r of the off-diagonal, and returns column r's.
    counts_RE = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    for rank in range(3):
        off = [(s, d) for s in range(3) for d in range(3) if s != d]
        dispatch = sum(int(counts_RE[s, d]) for s, d in off if s == rank)
        combine = sum(int(counts_RE[s, d]) for s, d in off if d == rank)
        assert ep.sent_rows(counts_RE, rank) == dispatch + combine


@pytest.mark.parametrize(
    "argv, flag, value",
    [
        (["--tokens", "100"], "--tokens", "100"),
        (["--tokens", "0"], "--tokens", "0"),
        (["--steps", "0"], "--steps", "0"),
        (["--warmup", "-1"], "--warmup", "-1"),
        (["--world", "0"], "--world", "0"),
        (["--world", "3"], "--world", "3"),
        (["--threads", "0"], "--threads", "0"),
        (["--arch", "mixtrla-tiny"], "--arch", "mixtrla-tiny"),
        (["--arch", "switch-tiny"], "--arch", "switch-tiny"),
        (["--arch", "mixtral-tiny-dense"], "--arch", "mixtral-tiny-dense"),
        (["--dim", "0"], "--dim", "0"),
    ],
)
def test_expert_parallel_refuses_bad_values_before_spawning(bench, monkeypatch, capsys, argv, flag, value):
    ep = bench("expert_parallel")
    monkeypatch.setattr(ep, "mp", SimpleNamespace(start_processes=_forbid))
    message = refused(ep, argv, monkeypatch, capsys)
    assert flag in message and value in message


# -- README ----------------------------------------------------------------------------------------------------


def _readme_commands() -> list[tuple[str, list[str]]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Performance") :]
    section = section[: section.find("\n## ", 1)] if "\n## " in section[1:] else section
    commands = []
    for match in re.finditer(r"python benchmarks/(\w+)\.py([^`#\n]*)", section):
        commands.append((match.group(1), match.group(2).split()))
    return commands


def test_readme_performance_commands_use_flags_the_scripts_have(bench, monkeypatch, capsys):
    commands = _readme_commands()
    assert {script for script, _ in commands} >= {"moe_layer", "expert_scaling", "train_step_vs_hf", "bf16_mixed"}
    helps = {}
    for script in SCRIPTS:
        module = bench(script)
        monkeypatch.setattr(sys, "argv", [module.__file__, "--help"])
        with pytest.raises(SystemExit):
            module.main()
        helps[script] = capsys.readouterr().out
    for script, args in commands:
        for i, arg in enumerate(args):
            if arg.startswith("--"):
                assert re.search(rf"{re.escape(arg)}\b", helps[script]), f"{script}.py has no {arg}"
                nxt = args[i + 1] if i + 1 < len(args) else ""
                choices = re.search(rf"{re.escape(arg)} \{{([^}}]*)\}}", helps[script])
                if choices and nxt and not nxt.startswith("--"):
                    assert nxt in choices.group(1).split(","), f"{script}.py {arg} {nxt}"
