"""One row of ``streamer bench`` (an engine, weight type, look-ahead and batch size timed) and the table of them.

Every engine the benchmark times (ours, NeMo, onnxruntime) reports the same :class:`Row`, so one table and one
JSON schema hold them all.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from streamer.asr.config import ContextSize


@dataclass
class Row:
    """One timed configuration: latency percentiles of a step and the real-time factor of all streams."""

    impl: str  # engine: streamer, nemo, onnxruntime
    scope: str  # encoder or encoder+tdt
    dtype: str
    params_m: float
    att_context_size: str
    chunk_ms: float
    streams: int
    p50_ms: float
    p95_ms: float
    rtfx_total: float  # audio seconds per compute second, all streams together
    threads: int
    max_abs_diff: float | None = None  # onnxruntime rows: largest deviation from our float32 step
    device: str = "cpu"
    first_call_s: float | None = None  # offline rows: the first batch's wall time (compiled: compile + one batch)


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of ``values``."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[k]


def summarize(
    impl: str,
    scope: str,
    dtype: str,
    params: int,
    ctx: ContextSize,
    chunk_s: float,
    streams: int,
    times: Sequence[float],
    threads: int,
    max_abs_diff: float | None = None,
) -> Row:
    """A :class:`Row` from per-step wall times (seconds) of ``streams`` streams, each given ``chunk_s`` of audio."""
    return Row(
        impl=impl, scope=scope, dtype=dtype, params_m=round(params / 1e6, 2),
        att_context_size=f"{ctx[0]},{ctx[1]}", chunk_ms=round(chunk_s * 1000, 1), streams=streams,
        p50_ms=round(statistics.median(times) * 1000, 2), p95_ms=round(percentile(times, 0.95) * 1000, 2),
        rtfx_total=round(streams * chunk_s * len(times) / sum(times), 2), threads=threads,
        max_abs_diff=max_abs_diff,
    )


def row_of(m: dict) -> Row:
    """A :class:`Row` from a measurement of :mod:`streamer.bench_gpu` or :mod:`streamer.bench_offline`."""
    row = summarize(m["impl"], m["scope"], m["dtype"], m["params"], m["ctx"], m["chunk_s"], m["streams"], m["times"],
                    m["threads"])
    row.device = m["device"]
    row.first_call_s = m.get("first_call_s")
    return row


COLUMNS = ("impl", "scope", "dtype", "params_m", "att_context_size", "chunk_ms", "streams", "p50_ms", "p95_ms",
           "rtfx_total", "max_abs_diff")


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value != 0 and abs(value) < 1e-2:
        return f"{value:.1e}"
    return str(value)


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown-style table, one line per row."""
    cols = list(COLUMNS)
    if any(r.device != "cpu" for r in rows):
        cols.insert(1, "device")
    if any(r.first_call_s is not None for r in rows):
        cols.insert(cols.index("rtfx_total") + 1, "first_call_s")
    data = [[_cell(getattr(r, c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(d[i]) for d in data)) for i, c in enumerate(cols)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(v.ljust(w) for v, w in zip(d, widths, strict=True)) for d in data]
    return "\n".join(lines)
