"""scripts/gpu_check.sh and its Python side: arguments, the plan, the table, time boxes, and a whole run on the CPU.

The GPU run itself happens only where a GPU is lent; here every stage runs with ``--device cpu --quick`` (tiny
sizes), which exercises the same commands, parsing and table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from streamer.gpu_check import main
from streamer.gpu_check_parity import agreement, edit_distance
from streamer.gpu_check_plan import Report, Row, format_table, make_plan
from streamer.gpu_check_stages import json_lines, run_stage

ROOT = Path(__file__).resolve().parents[1]


def table_lines(text: str) -> list[str]:
    """The table at the end of the output: from its header line to the end."""
    lines = text.rstrip("\n").splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("stage "))
    return lines[start:]


# ---------------------------------------------------------------- arguments, plan, table


def test_unknown_stages_are_refused_by_name(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--dry-run", "--stages", "parity,benchmark"])
    assert info.value.code == 2
    assert "--stages: benchmark: choose from parity, bench, loadtest, offline, compile" in capsys.readouterr().err


def test_dry_run_prints_the_plan_as_the_table_and_writes_the_files(capsys, tmp_path: Path) -> None:
    assert main(["--dry-run", "--stages", "bench,offline", "--out", str(tmp_path)]) == 0
    lines = table_lines(capsys.readouterr().out)
    assert [line.split("|")[0].strip() for line in lines[2:]] == ["bench", "offline"]
    assert "1,2,4,8,16,32,64,128,256,512,1024 x float32,float16,bfloat16" in lines[2]
    assert all("planned" in line for line in lines[2:])
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["plan"]["stages"] == ["bench", "offline"] and data["exit_status"] == 0
    assert (tmp_path / "gpu_check.txt").read_text().splitlines() == lines


def test_quick_plan_is_tiny_and_the_gpu_plan_fits_its_time() -> None:
    quick, full = make_plan("cpu", True, ["parity"]), make_plan("cuda", False, ["parity"])
    assert quick.bench_streams == [1, 2] and quick.load_ladder == [1, 2] and quick.offline_layers == 1
    assert full.bench_streams[-1] == 1024 and full.load_dtype == "float16" and full.offline_layers is None
    assert sum(full.budgets_s.values()) <= 540 - 45  # within the script's 540 s, with room for setup
    assert full.compile_modes == ["offline", "offline-graphs"] and quick.compile_modes == ["offline"]
    assert make_plan("cpu", False, ["compile"]).compile_modes == ["offline"]  # no CUDA graphs on the CPU


def test_dry_run_plans_the_compiled_rows(capsys) -> None:
    assert main(["--dry-run", "--stages", "compile"]) == 0
    (line,) = table_lines(capsys.readouterr().out)[2:]
    assert line.startswith("compile") and "eager vs offline,offline-graphs, bfloat16, 128 x 20 s" in line


def test_the_table_aligns_its_columns_whatever_the_lengths() -> None:
    rows = [Row("setup", "python 3.12, torch 2.11.0+cu130, NVIDIA H100", "device cuda", "ok"),
            Row("bench", "[70,1] x1024", "p50 12.5/8.1 ms", "partial"), Row("x", "", "", "FAIL")]
    lines = format_table(rows).splitlines()
    assert len(lines) == 2 + len(rows) and set(lines[1]) <= {"-", "|"}
    bars = {tuple(i for i, c in enumerate(line) if c == "|") for line in lines}
    assert len(bars) == 1  # every separator at the same column on every line
    assert lines[2].split("|")[2].strip() == "ok" and lines[4].split("|")[2].strip() == "FAIL"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_fails_setup_skips_the_stages_and_still_prints_the_table(capsys) -> None:
    assert main(["--stages", "parity,bench"]) == 2
    lines = table_lines(capsys.readouterr().out)
    setup, *stages = lines[2:]
    assert "FAIL" in setup and "has no CUDA" in setup and "CUDA build of torch" in setup
    assert [s.split("|")[0].strip() for s in stages] == ["parity", "bench"] and all("skipped" in s for s in stages)


# ---------------------------------------------------------------- helpers


def test_edit_distance_and_agreement() -> None:
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([1, 2, 3], [1, 3]) == 1 and edit_distance([], [4, 5]) == 2
    assert edit_distance([1, 2, 3, 4], [2, 1, 3, 5]) == 3
    got = agreement([([1, 2, 3, 4], [1, 2, 3, 4]), ([5, 6, 7, 8], [5, 9, 7])])
    assert got == {"utterances": 2, "exact": 1, "tokens": 8, "edits": 2, "agreement": 0.75}
    assert agreement([([], [])])["agreement"] is None


def test_json_lines_skips_a_line_cut_off_at_the_time_box() -> None:
    text = 'measuring...\n{"streams": 1, "p50_ms": 2.5}\n{"streams": 2, "p50'
    assert json_lines(text) == [{"streams": 1, "p50_ms": 2.5}]


def test_a_stage_killed_at_its_time_box_is_a_row_not_a_traceback(tmp_path: Path) -> None:
    """bench cannot build the 114M model in a second: the command is killed there and the table says so."""
    plan = make_plan("cpu", True, ["bench"])
    plan.budgets_s["bench"] = 1.0
    report = Report()
    began = time.monotonic()
    run_stage("bench", plan, tmp_path, report)
    assert time.monotonic() - began < 30
    (row,) = report.rows
    assert row.stage == "bench" and row.status == "FAIL" and row.result.startswith("no rows")


# ---------------------------------------------------------------- the script, end to end on the CPU


@pytest.mark.slow
def test_the_script_runs_every_stage_on_the_cpu_and_ends_with_the_table(tmp_path: Path) -> None:
    env = {**os.environ, "STREAMER_PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    env.pop("OUT", None)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--quick", "--out",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=480, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = table_lines(done.stdout)
    assert lines == done.stdout.rstrip("\n").splitlines()[-len(lines):]  # nothing printed after the table
    stages = [line.split("|")[0].strip() for line in lines[2:]]
    assert stages[0] == "setup" and {"parity", "bench", "loadtest", "offline", "compile"} <= set(stages)
    statuses = {line.split("|")[2].strip() for line in lines[2:]}
    assert statuses == {"ok"}, "\n".join(lines)
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["parity"]["goldens"]["device_equals_nemo"] == data["parity"]["goldens"]["cases"] > 0
    assert {r["streams"] for r in data["bench"]} == {1, 2} and all(r["p50_ms"] > 0 for r in data["bench"])
    assert [r["streams"] for r in data["loadtest"]["bundled"]] == [1, 2]
    assert {r["scope"] for r in data["offline"]} == {"offline", "offline+tdt"}
    assert [r["impl"] for r in data["compile"]] == ["streamer", "streamer/compiled"]
    assert all(r["first_call_s"] > 0 and r["rtfx_total"] > 0 for r in data["compile"])


def test_merge_rows_sums_counts_and_keeps_the_worst_tail() -> None:
    from streamer.gpu_check_stages import merge_rows

    def row(p50: int, p95: int, passed: bool, errors: list[str]) -> dict:
        return {"streams": 2, "partials": 10, "lag_ms": {"p50": p50, "p95": p95, "max": p95 + 5},
                "final_extra_ms": {"p50": None, "p95": None, "max": None}, "finals": 3, "dropped_s": 0.5,
                "errors": errors, "cpu_percent": 40 + p50, "rss_mb": 300, "passed": passed}

    merged = merge_rows(6, [row(10, 50, True, []), row(30, 400, False, ["x"]), row(20, 90, True, [])])
    assert merged["streams"] == 6 and merged["generators"] == 3 and merged["partials"] == 30
    assert merged["lag_ms"] == {"p50": 20, "p95": 400, "max": 405} and merged["final_extra_ms"]["p95"] is None
    assert merged["dropped_s"] == 1.5 and merged["errors"] == ["x"] and not merged["passed"]
    assert merge_rows(2, [row(10, 50, True, [])])["generators"] == 1


@pytest.mark.slow
def test_several_load_generators_share_one_daemon(tmp_path: Path) -> None:
    """Two loadtest processes of one client each against one daemon: distinct stream names, both rows merged."""
    plan = make_plan("cpu", True, ["loadtest"])
    plan.load_generators, plan.load_min_share, plan.load_ladder = 2, 1, [2]
    report = Report()
    run_stage("loadtest", plan, tmp_path, report)
    (run,) = report.data["loadtest"]["bundled"]
    assert run["generators"] == 2 and run["streams"] == 2 and not run["errors"], report.rows
    assert [p["streams"] for p in run["parts"]] == [1, 1] and run["passed"]
