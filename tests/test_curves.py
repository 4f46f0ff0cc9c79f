"""Learning curves (``streamer curves``, ``curves.svg`` in a run directory): what is read from the logs and
where it lands in the SVG.

The SVG is parsed back and its lines mapped to values through the axis ticks it prints, so a curve drawn
from the wrong numbers, on the wrong panel or upside down fails.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from streamer.training.curves import label, nice_ticks, read_run, render

NS = {"s": "http://www.w3.org/2000/svg"}
RECORDS = Path(__file__).resolve().parents[1] / "models" / "training-runs" / "bestrq-paraformer-20261206"

LOG = """\
2026-12-06 20:40:32,258 INFO streamer.training.trainer: step 25 epoch 0 loss 6.5000 (transducer 6.1 ctc 7.2) grad 4.33
2026-12-06 20:41:08,658 INFO streamer.training.trainer: step 50 epoch 0 loss 5.0000 (transducer 4.9 ctc 5.3) grad 1.80
2026-12-06 20:41:09,000 INFO streamer.training.trainer: validation at step 50: wer_70_13 97.00%
2026-12-06 20:41:45,605 INFO streamer.training.trainer: step 75 epoch 0 loss 9.0000 (transducer 8.0 ctc 9.9) grad 1.02
2026-12-06 20:42:00,000 INFO streamer.training.trainer: resumed at step 50
2026-12-06 20:42:30,605 INFO streamer.training.trainer: step 75 epoch 0 loss 4.0000 (transducer 3.5 ctc 5.1) grad 1.02
2026-12-06 20:43:10,000 INFO streamer.training.trainer: step 100 epoch 1 loss 4.5000 (transducer 4.0 ctc 5.6) grad 0.9
"""
RESULTS = """\
step,epoch,audio_hours,train_hours,lr,train_loss,wer_70_13,wer_70_0
50,0,1.5,0.1,0.001,5.0,97.0,99.0
100,1,3.0,0.2,0.0009,4.5,80.0,85.0
"""


def _run(tmp_path: Path, name: str, log: str, results: str) -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "train.log").write_text(log)
    (run / "results.csv").write_text(results)
    return run


def _panels(svg: str) -> dict[str, list[list[tuple[float, float]]]]:
    """Each panel's curves as data points (step, value), recovered through its axis ticks: the drawn position
    of two ticks and the label printed beside them (which must say the tick's value)."""
    root = ET.fromstring(svg)
    out: dict[str, list[list[tuple[float, float]]]] = {}
    for panel in root.findall("s:g[@class='panel']", NS):
        labels = {t.text for t in panel.findall("s:text", NS)}
        ticks = {}
        for axis, coord in (("xtick", "x1"), ("ytick", "y1")):
            lines = panel.findall(f"s:line[@class='{axis}']", NS)
            assert {label(float(t.get("data-value", ""))) for t in lines} <= labels  # each tick is labelled
            first, last = lines[0], lines[-1]
            ticks[axis] = (float(first.get(coord, "")), float(first.get("data-value", "")),
                           float(last.get(coord, "")), float(last.get("data-value", "")))
        curves = []
        for line in panel.findall("s:polyline[@class='curve']", NS):
            points = [tuple(map(float, p.split(","))) for p in (line.get("points") or "").split()]
            curves.append([(_value(ticks["xtick"], px), _value(ticks["ytick"], py)) for px, py in points])
        out[panel.get("data-title", "")] = curves
    return out


def _value(tick: tuple[float, float, float, float], pixel: float) -> float:
    p0, v0, p1, v1 = tick
    return v0 + (pixel - p0) / (p1 - p0) * (v1 - v0)


def test_a_run_s_loss_and_wer_curves_hold_its_logged_numbers(tmp_path: Path) -> None:
    run = read_run(_run(tmp_path, "r1", LOG, RESULTS))
    # the resumed run logged step 75 twice: the later line (the run the checkpoints continue) wins
    assert run.panels["training loss"] == {"": [(25, 6.5), (50, 5.0), (75, 4.0), (100, 4.5)]}
    assert run.panels["dev WER, %"] == {"[70,13]": [(50, 97.0), (100, 80.0)], "[70,0]": [(50, 99.0), (100, 85.0)]}
    panels = _panels(render([run]))
    assert list(panels) == ["training loss", "dev WER, %"]
    [loss] = panels["training loss"]
    for (step, value), (want_step, want) in zip(loss, [(25, 6.5), (50, 5.0), (75, 4.0), (100, 4.5)], strict=True):
        assert step == pytest.approx(want_step, abs=0.5) and value == pytest.approx(want, abs=0.02)
    wer = panels["dev WER, %"]
    assert [[round(v, 1) for _, v in curve] for curve in wer] == [[97.0, 80.0], [99.0, 85.0]]


def test_runs_get_their_own_colours_and_look_aheads_their_own_dashes(tmp_path: Path) -> None:
    a = read_run(_run(tmp_path, "a", LOG, RESULTS), "scratch")
    b = read_run(_run(tmp_path, "b", LOG.replace("loss 4.5000", "loss 3.0000"), RESULTS), "pretrained")
    root = ET.fromstring(render([a, b], "title"))
    curves = root.findall(".//s:polyline[@class='curve']", NS)
    assert len(curves) == 2 * 3  # loss + two look-aheads, per run
    assert len({c.get("stroke") for c in curves}) == 2
    assert len({c.get("stroke-dasharray") for c in curves}) == 2  # [70,13] solid, [70,0] dashed
    legend = [t.text for t in root.findall(".//s:text", NS)]
    assert {"scratch", "pretrained", "look-ahead [70,13]", "look-ahead [70,0]", "title"} <= set(legend)
    hovers = [c.findtext("s:title", namespaces=NS) for c in root.findall(".//s:circle", NS)]
    assert "step 100: 80 [70,13]" in hovers and len(hovers) == 2 * 4  # validations only, not loss points


def test_a_pretraining_run_plots_its_masked_code_accuracy_in_percent(tmp_path: Path) -> None:
    results = (
        "step,epoch,train_loss,dev_loss,dev_accuracy,dev_codes_used\n"
        "500,0,7.8,7.86,0.0269,3282\n1000,1,7.6,7.6,0.0354,3282\n"
    )
    run = read_run(_run(tmp_path, "p", LOG, results))
    [(s0, a0), (s1, a1)] = run.panels["masked-code accuracy on dev, %"][""]
    assert (s0, s1) == (500, 1000) and a0 == pytest.approx(2.69) and a1 == pytest.approx(3.54)
    assert "dev WER, %" not in run.panels


def test_ticks_are_round_and_cover_the_range() -> None:
    for lo, hi in [(0.0, 1.0), (18500, 21500), (2.69, 4.1), (97.0, 97.0), (-3.0, 12.0)]:
        ticks = nice_ticks(lo, hi)
        assert ticks[0] <= lo and ticks[-1] >= hi and 3 <= len(ticks) <= 12
        step = ticks[1] - ticks[0]
        mantissa = step / 10 ** int(f"{step:e}".split("e")[1])
        assert round(mantissa, 6) in (1.0, 2.0, 5.0)


def test_an_empty_run_draws_a_note_instead_of_failing(tmp_path: Path) -> None:
    run = tmp_path / "new"
    run.mkdir()
    svg = render([read_run(run)])
    assert "no steps logged" in svg and ET.fromstring(svg) is not None


def _curves(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamer", "curves", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(not RECORDS.is_dir(), reason="the committed run records are not in this checkout")
def test_cli_draws_the_committed_bestrq_records(tmp_path: Path) -> None:
    out = tmp_path / "bestrq.svg"
    result = _curves(f"scratch={RECORDS / 'bestrq-finetune-scratch'}",
                     f"pretrained={RECORDS / 'bestrq-finetune-pretrained'}",
                     str(RECORDS / "bestrq-pretrain"), "--out", str(out), "--title", "Best-RQ")
    assert result.returncode == 0, result.stderr
    panels = _panels(out.read_text())
    assert list(panels) == ["training loss", "dev WER, %", "masked-code accuracy on dev, %"]
    # the pretrained fine-tune's last dev WER at [70,13] is the card's 83.5%, the scratch run's 91.5%
    finals = sorted(round(curve[-1][1], 1) for curve in panels["dev WER, %"])
    assert 83.5 in finals and 91.5 in finals


def test_cli_refuses_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    result = _curves(str(tmp_path))
    assert result.returncode != 0 and "not a run directory" in result.stderr
