"""Learning curves of training runs, drawn as one SVG: the training loss and each validation metric by step.

What is read from a run directory (``streamer train`` and ``streamer pretrain`` write both):

* ``train.log``: one line per ``train.log_every_steps`` steps, ``... step N epoch E loss X ...``: the
  training loss, averaged over those steps. A resumed run logs again the steps after its last checkpoint;
  the later line of a step wins, since that is the run the checkpoints continue.
* ``results.csv``: one row per validation. Every ``wer*`` column (``wer_70_13``: dev WER at that look-ahead,
  ``wer``: a Paraformer's full-context WER) goes to the WER panel; ``dev_accuracy`` (Best-RQ's masked-code
  accuracy on held-out clips) to its own panel, in percent.

The SVG has a panel per quantity side by side, one colour per run and one dash pattern per look-ahead, the
validation points marked (hover one for its value), and a legend below. ``streamer curves`` draws any runs
together; the trainers redraw ``curves.svg`` in their run directory after every validation.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

LOG_LINE = re.compile(r"\bstep (\d+) epoch \d+ loss ([-+0-9.eEnainf]+)")
CURVES_FILE = "curves.svg"
LOSS_PANEL = "training loss"
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
DASHES = ("", "7 4", "2 3", "9 3 2 3")
PANEL_W, PANEL_H, PAD_L, PAD_R, PAD_T, PAD_B = 440, 300, 58, 16, 30, 42

Points = list[tuple[int, float]]


@dataclass
class RunCurves:
    """One run's curves: ``panels`` maps a panel's title to its series (a look-ahead's name -> points)."""

    name: str
    panels: dict[str, dict[str, Points]] = field(default_factory=dict)


def read_run(run_dir: Path, name: str | None = None) -> RunCurves:
    """The curves of one run directory (a file that is missing gives no curve, not an error)."""
    run = RunCurves(name or run_dir.name)
    log = run_dir / "train.log"
    if log.is_file():
        losses: dict[int, float] = {}
        for line in log.read_text(errors="replace").splitlines():
            match = LOG_LINE.search(line)
            if match:
                losses[int(match[1])] = float(match[2])
        if losses:
            run.panels[LOSS_PANEL] = {"": sorted(losses.items())}
    results = run_dir / "results.csv"
    if results.is_file():
        with results.open(newline="") as f:
            rows = list(csv.DictReader(f))
        for column in rows[0].keys() if rows else ():
            if column.startswith("wer"):
                panel, scale = "dev WER, %", 1.0
            elif column == "dev_accuracy":
                panel, scale = "masked-code accuracy on dev, %", 100.0
            else:
                continue
            points = {int(r["step"]): float(r[column]) * scale for r in rows if r.get(column) not in (None, "")}
            run.panels.setdefault(panel, {})[series_name(column)] = sorted(points.items())
    return run


def series_name(column: str) -> str:
    """``wer_70_13`` -> ``[70,13]``; a column without a look-ahead -> ``""`` (the run's only series)."""
    parts = column.split("_")[1:]
    if len(parts) == 2 and all(p.lstrip("-").isdigit() for p in parts):
        return f"[{parts[0]},{parts[1]}]"
    return ""


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round values (1, 2 or 5 times a power of ten apart) that span ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        lo, hi = lo - (abs(lo) or 1) * 0.5, hi + (abs(hi) or 1) * 0.5
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * 0.999)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    return [k * step for k in range(first, last + 1)]


def label(value: float) -> str:
    """A tick label: no trailing zeros, thousands as ``k``."""
    if abs(value) >= 10000 and value % 1000 == 0:
        return f"{value / 1000:g}k"
    return f"{value:.6g}"


def render(runs: list[RunCurves], title: str = "") -> str:
    """The SVG text of ``runs`` (panels in the order first seen: loss, WER, accuracy)."""
    titles: list[str] = []
    for run in runs:
        titles += [t for t in run.panels if t not in titles]
    series: list[str] = []
    for run in runs:
        for panel in run.panels.values():
            series += [s for s in panel if s and s not in series]
    legend_rows = len(runs) + (1 if series else 0)
    top = 28 if title else 0
    width = max(1, len(titles)) * PANEL_W
    height = top + PANEL_H + 12 + 18 * legend_rows + 8
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}"'
        ' font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    if title:
        out.append(f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">{escape(title)}</text>')
    if not titles:
        out.append(f'<text x="20" y="{top + 40}">no steps logged and no validation yet</text>')
    for i, panel in enumerate(titles):
        out += _panel(i * PANEL_W, top, panel, [(k, run.panels.get(panel, {})) for k, run in enumerate(runs)],
                      series)
    y = top + PANEL_H + 16
    for k, run in enumerate(runs):
        color = COLORS[k % len(COLORS)]
        out.append(f'<line x1="20" y1="{y}" x2="44" y2="{y}" stroke="{color}" stroke-width="2.5"/>')
        out.append(f'<text x="50" y="{y + 4}">{escape(run.name)}</text>')
        y += 18
    if series:
        x = 20
        for s in series:
            dash = DASHES[series.index(s) % len(DASHES)]
            out.append(f'<line x1="{x}" y1="{y}" x2="{x + 30}" y2="{y}" stroke="#444" stroke-width="1.8"'
                       f'{_dash(dash)}/>')
            out.append(f'<text x="{x + 36}" y="{y + 4}">look-ahead {escape(s)}</text>')
            x += 150
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _dash(pattern: str) -> str:
    return f' stroke-dasharray="{pattern}"' if pattern else ""


def _panel(x0: int, y0: int, title: str, runs: list[tuple[int, dict[str, Points]]], series: list[str]) -> list[str]:
    """One panel's axes, grid, ticks and lines; ``runs`` pairs each run's colour index with its series."""
    points = [p for _, panel in runs for pts in panel.values() for p in pts if math.isfinite(p[1])]
    xs, ys = [p[0] for p in points] or [0], [p[1] for p in points] or [0.0]
    xticks, yticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    left, right = x0 + PAD_L, x0 + PANEL_W - PAD_R
    high, low = y0 + PAD_T, y0 + PANEL_H - PAD_B

    def sx(v: float) -> float:
        return left + (v - xticks[0]) / (xticks[-1] - xticks[0]) * (right - left)

    def sy(v: float) -> float:
        return low - (v - yticks[0]) / (yticks[-1] - yticks[0]) * (low - high)

    out = [f'<g class="panel" data-title="{escape(title)}">',
           f'<text x="{(left + right) / 2}" y="{y0 + 18}" text-anchor="middle" font-size="13">{escape(title)}</text>']
    for v in yticks:  # grid lines and tick marks carry their value (data-value), for tools and tests
        out.append(f'<line class="ytick" data-value="{v:.6g}" x1="{left}" y1="{sy(v):.1f}" x2="{right}" '
                   f'y2="{sy(v):.1f}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{left - 5}" y="{sy(v) + 4:.1f}" text-anchor="end">{label(v)}</text>')
    for v in xticks:
        out.append(f'<line class="xtick" data-value="{v:.6g}" x1="{sx(v):.1f}" y1="{low}" x2="{sx(v):.1f}" '
                   f'y2="{low + 4}" stroke="#444"/>')
        out.append(f'<text x="{sx(v):.1f}" y="{low + 16}" text-anchor="middle">{label(v)}</text>')
    out.append(f'<text x="{(left + right) / 2}" y="{low + 32}" text-anchor="middle">step</text>')
    out.append(f'<polyline points="{left},{high} {left},{low} {right},{low}" fill="none" stroke="#444"/>')
    for k, panel in runs:
        color = COLORS[k % len(COLORS)]
        for name, pts in panel.items():
            dash = DASHES[series.index(name) % len(DASHES)] if name else ""
            finite = [(s, v) for s, v in pts if math.isfinite(v)]
            coords = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in finite)
            out.append(f'<polyline class="curve" points="{coords}" fill="none" stroke="{color}" stroke-width="1.8"'
                       f'{_dash(dash)}/>')
            if title != LOSS_PANEL:  # validations: mark each one, with its value on hover
                for s, v in finite:
                    out.append(f'<circle cx="{sx(s):.1f}" cy="{sy(v):.1f}" r="2.6" fill="{color}">'
                               f"<title>step {s}: {v:.4g}{(' ' + escape(name)) if name else ''}</title></circle>")
    out.append("</g>")
    return out


def write_curves(run_dirs: Iterable[tuple[str | None, Path]], out: Path, title: str = "") -> Path:
    """Draw the runs (``(label or None, run directory)`` pairs) into ``out``; returns ``out``."""
    runs = [read_run(path, name) for name, path in run_dirs]
    out.write_text(render(runs, title))
    return out
