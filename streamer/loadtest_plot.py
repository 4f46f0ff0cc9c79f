"""``streamer loadtest --plot``: lag percentiles against N (or, for a soak, p95 lag per interval) as a PNG.

With matplotlib installed it draws the plot; without it a small built-in rasterizer writes a plain PNG
(lines, points, the threshold, numbered axes) with zlib, so the plot needs no extra dependency.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

COLORS = {"p50": (31, 119, 180), "p95": (214, 39, 40), "max": (120, 120, 120)}
# 3x5 glyphs, one string of 15 pixels per character, row by row.
GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", "p": "000111101111100", "m": "000111111101101",
    "a": "000011101101011", "x": "000101010101101", "s": "000011010001110", "N": "101111111111101",
    "t": "010111010010011", " ": "000000000000000", "=": "000111000111000", "-": "000000111000000",
}


def series(report: dict[str, Any]) -> tuple[list[float], dict[str, list[float | None]], str]:
    """x values, y series by name (ms) and the x axis name, from a load or soak report."""
    if report["mode"] == "soak":
        rows = report["intervals"]
        return [r["t_s"] for r in rows], {"p95": [r["lag_p95_ms"] for r in rows]}, "t s"
    rows = report["runs"]
    return ([r["streams"] for r in rows], {k: [r["lag_ms"][k] for r in rows] for k in ("p50", "p95", "max")},
            "N")


def plot_report(report: dict[str, Any], path: Path) -> str:
    """Write the plot; returns a line saying where and how."""
    xs, ys, xname = series(report)
    threshold = report.get("thresholds", {}).get("max_lag_p95_ms")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        write_png(path, *raster(xs, ys, threshold))
        return f"loadtest: plot written to {path} (simple renderer; install matplotlib for a labelled one)"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in ys.items():
        points = [(x, y) for x, y in zip(xs, values, strict=True) if y is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"lag {name}",
                color=[c / 255 for c in COLORS[name]])
    if threshold is not None:
        ax.axhline(threshold, linestyle="--", color="black", linewidth=0.8, label=f"{threshold:.0f} ms")
    if xname == "N":
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("concurrent real-time streams" if xname == "N" else "seconds into the soak")
    ax.set_ylabel("partials' lag behind the audio, ms")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"loadtest: plot written to {path}"


# ---------------------------------------------------------------- the fallback renderer

WIDTH, HEIGHT, MARGIN_X, MARGIN_Y, SCALE = 640, 400, 70, 40, 2


def raster(xs: list[float], ys: dict[str, list[float | None]], threshold: float | None) -> tuple[int, int, bytearray]:
    """An RGB image of the series: x evenly spaced by index, y linear from 0; legend in the corner."""
    pixels = bytearray(b"\xff" * WIDTH * HEIGHT * 3)
    top = max([v for vals in ys.values() for v in vals if v is not None] + [threshold or 0, 1.0]) * 1.1
    plot_w, plot_h = WIDTH - 2 * MARGIN_X, HEIGHT - 2 * MARGIN_Y

    def at(i: int, y: float) -> tuple[int, int]:
        x = MARGIN_X + (plot_w * i // max(1, len(xs) - 1) if len(xs) > 1 else plot_w // 2)
        return x, HEIGHT - MARGIN_Y - round(plot_h * y / top)

    def put(x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < WIDTH and 0 <= y < HEIGHT:
            pixels[3 * (y * WIDTH + x):3 * (y * WIDTH + x) + 3] = bytes(color)

    def line(a: tuple[int, int], b: tuple[int, int], color: tuple[int, int, int], dash: int = 0) -> None:
        steps = max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)
        for s in range(steps + 1):
            if not dash or (s // dash) % 2 == 0:
                put(round(a[0] + (b[0] - a[0]) * s / steps), round(a[1] + (b[1] - a[1]) * s / steps), color)

    def text(x: int, y: int, label: str, color: tuple[int, int, int] = (0, 0, 0)) -> None:
        for k, ch in enumerate(label):
            glyph = GLYPHS.get(ch, GLYPHS[" "])
            for p, bit in enumerate(glyph):
                if bit == "1":
                    for dx in range(SCALE):
                        for dy in range(SCALE):
                            put(x + k * 4 * SCALE + (p % 3) * SCALE + dx, y + (p // 3) * SCALE + dy, color)

    black = (0, 0, 0)
    line((MARGIN_X, MARGIN_Y), (MARGIN_X, HEIGHT - MARGIN_Y), black)
    line((MARGIN_X, HEIGHT - MARGIN_Y), (WIDTH - MARGIN_X, HEIGHT - MARGIN_Y), black)
    for k in range(5):  # y ticks in ms
        value = top * k / 4
        _, y = at(0, value)
        line((MARGIN_X - 5, y), (MARGIN_X, y), black)
        text(4, y - 5, f"{value:.0f}")
    text(4, MARGIN_Y - 24, "ms")
    for i, x in enumerate(xs):
        px, _ = at(i, 0)
        line((px, HEIGHT - MARGIN_Y), (px, HEIGHT - MARGIN_Y + 5), black)
        text(px - 4, HEIGHT - MARGIN_Y + 10, f"{x:g}")
    if threshold is not None:
        ty = at(0, threshold)[1]
        line((MARGIN_X, ty), (WIDTH - MARGIN_X, ty), black, dash=4)
    for n, (name, values) in enumerate(ys.items()):
        color = COLORS[name]
        points = [at(i, v) for i, v in enumerate(values) if v is not None]
        for a, b in zip(points, points[1:], strict=False):
            line(a, b, color)
        for px, py in points:
            for dx in range(-2, 3):
                for dy in range(-2, 3):
                    put(px + dx, py + dy, color)
        key_x = MARGIN_X + 60 + 70 * n  # the legend: one row above the plot
        line((key_x, 15), (key_x + 15, 15), color)
        text(key_x + 20, 10, name, color)
    return WIDTH, HEIGHT, pixels


def write_png(path: Path, width: int, height: int, rgb: bytearray) -> None:
    """An 8-bit RGB PNG, unfiltered rows, zlib-compressed (the PNG specification's minimal form)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + bytes(rgb[3 * width * y:3 * width * (y + 1)]) for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 6))
                     + chunk(b"IEND", b""))
