"""``streamer loadtest``: a short real run and a short soak, each against a ``streamer serve`` it starts.

The bundled default model at [70,1] (real words, so segments end by silence) in a subprocess, real websockets
clients paced at real time, espeak-ng speech, a real mosquitto restarted mid-run and a client connection cut
mid-run. The figures are checked for structure and plausibility only, never for speed (the machine is shared).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from streamer.cli import main
from streamer.loadtest import capacity, spread
from streamer.loadtest_client import ClientStats, check_finals
from streamer.protocol import End

pytestmark = pytest.mark.slow

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
needs_mosquitto = pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto is not installed")


def run(tmp_path: Path, *flags: str) -> tuple[int, dict[str, Any]]:
    report = tmp_path / "report.json"
    code = main(["loadtest", "--att-context-size", "70,1", "--json", str(report), "--workdir", str(tmp_path / "w"),
                 *flags])
    return code, json.loads(report.read_text())


@needs_espeak
def test_loadtest_reports_lag_latency_drops_cpu_rss_and_capacity_per_n(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Two Ns for a few seconds: one row each with the figures, a table and a capacity line on stdout, a PNG."""
    plot = tmp_path / "lag.png"
    code, report = run(tmp_path, "--streams", "1,2", "--duration-s", "6", "--plot", str(plot))
    out = capsys.readouterr().out
    assert code == 0 and report["mode"] == "load" and report["daemon_exit_status"] == 0
    assert report["daemon_tracebacks"] == []
    assert [r["streams"] for r in report["runs"]] == [1, 2]
    for row in report["runs"]:
        lag = row["lag_ms"]
        assert row["partials"] > 0 and 0 <= lag["p50"] <= lag["p95"] <= lag["max"] < 6000 + 60000
        assert row["finals"] >= row["streams"]  # every client spoke: a final by silence or at stop
        assert row["finals_missing"] == row["finals_duplicated"] == 0 and row["errors"] == []
        extra = row["final_extra_ms"]
        assert extra["p50"] is None or extra["p50"] > -1000  # arrived after the speech it ends
        assert row["dropped_s"] >= 0 and row["cpu_percent"] > 0 and row["rss_mb"] > 50
    passed = [r["streams"] for r in report["runs"] if r["passed"]]
    assert report["capacity"] == (max(passed) if passed else None)
    assert "lag p95" in out and "capacity:" in out and out.count("\n") >= 4
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", plot.read_bytes()[16:24])
    assert width > 100 and height > 100


@needs_espeak
@needs_mosquitto
def test_a_short_soak_with_a_broker_restart_and_a_client_drop_loses_nothing(tmp_path: Path) -> None:
    """Three live streams, one broker restart, one cut connection (resumed): every final the daemon produced
    reached its client exactly once and MQTT at least once; no error; RSS and lag reported per interval."""
    code, report = run(tmp_path, "--soak", "--streams", "3", "--duration-s", "24", "--interval-s", "6",
                       "--broker-restart-every-s", "11", "--client-drop-every-s", "14")
    assert report["errors"] == [] and report["lost"] == 0, report
    assert code == 0 and report["ok"] is True
    faults, finals = report["faults"], report["finals"]
    assert faults["broker_restarts"] >= 1 and faults["client_drops"] == 1 and faults["resumes"] == 1
    assert finals["produced"] > 0 and finals["produced"] == finals["clients"] == finals["mqtt"]
    assert finals["clients_duplicated"] == finals["clients_missing"] == finals["mqtt_missing"] == 0
    assert len(report["intervals"]) >= 3 and all(r["rss_mb"] > 50 for r in report["intervals"])
    assert report["rss_mb"]["start"] > 50 and report["rss_mb"]["growth_percent"] is not None
    assert report["lag_p95_ms"]["first"] is not None and report["dropped_s"] == 0


def test_finals_are_counted_once_per_session_and_gaps_are_missing() -> None:
    """The accounting the soak's verdict rests on: a repeated segment is a duplicate, one never received missing."""
    stats = ClientStats()
    stats.finals = {"a": [0, 1, 1, 3], "b": [0]}
    stats.ends = [End("s", segments=5), End("s", segments=1)]
    assert check_finals(stats) == (4, 1, 2)  # 0, 1, 3 and b's 0 once; 1 twice; 2 and 4 never
    assert spread([5.0, 1.0, 3.0]) == {"p50": 3, "p95": 5, "max": 5} and spread([])["p95"] is None
    rows = [{"streams": 1, "passed": True}, {"streams": 2, "passed": False}, {"streams": 4, "passed": True}]
    assert capacity(rows) == 4 and capacity(rows[1:2]) is None


@needs_espeak
def test_the_soak_fails_when_a_dropped_session_cannot_be_resumed(tmp_path: Path) -> None:
    """With resume off (server.resume_window_s=0) a cut mid-segment loses that segment's final for the client
    (the daemon flushes it as 'disconnect' to the other sinks): the soak says so and exits 1."""
    code, report = run(tmp_path, "--soak", "--no-mqtt", "--streams", "2", "--duration-s", "12", "--interval-s", "6",
                       "--client-drop-every-s", "3", "--set", "server.resume_window_s=0")
    assert report["faults"]["client_drops"] >= 1 and report["faults"]["resumes"] == 0
    assert report["finals"]["produced"] > report["finals"]["clients"]
    assert report["lost"] >= 1 and report["ok"] is False and code == 1
    assert "mqtt" not in report["finals"]
