"""What :mod:`streamer.gpu_check` runs (the :class:`Plan` per device and size) and what it reports (rows of
one table), apart from the stages that fill it (:mod:`streamer.gpu_check_stages`) and the command line.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

STAGES = ("parity", "bench", "loadtest", "offline", "compile")


@dataclass
class Plan:
    """What each stage runs and how long it may take (seconds)."""

    device: str
    quick: bool
    budgets_s: dict[str, float]
    bench_streams: list[int]
    bench_dtypes: list[str]
    bench_steps: int
    bench_warmup: int
    load_models: list[str]  # "bundled", "114M"
    load_ladder: list[int]
    load_duration_s: float
    load_dtype: str
    offline_dtypes: list[str]
    offline_batch: int
    utterance_s: float
    offline_layers: int | None
    steps_offline: int
    compile_modes: list[str] = field(default_factory=lambda: ["offline"])  # besides eager, same model and inputs
    compile_dtype: str = "float32"
    threads: int | None = None  # torch threads of every command (None: torch's default)
    load_generators: int = 1  # loadtest processes sharing one N (one Python process cannot feed 2000 clients)
    load_min_share: int = 32  # clients per generator at least
    load_frame_ms: float = 40.0
    stages: list[str] = field(default_factory=lambda: list(STAGES))


def make_plan(device: str, quick: bool, stages: list[str]) -> Plan:
    """Sizes for a GPU box (about 8 minutes in all) or, with ``quick``, tiny ones for the CPU (about two minutes,
    most of it compiling)."""
    if quick:
        return Plan(device, True, {"parity": 60, "bench": 60, "loadtest": 90, "offline": 60, "compile": 120}, [1, 2],
                    ["float32"], 2, 1, ["bundled"], [1, 2], 3.0, "float32", ["float32"], 1, 2.0, 1, 1, threads=1,
                    stages=stages)
    cuda = device.startswith("cuda")
    halves = ["float32", "float16", "bfloat16"] if cuda else ["float32"]
    return Plan(device, False, {"parity": 75, "bench": 100, "loadtest": 170, "offline": 60, "compile": 90},
                [2**k for k in range(11)], halves, 10, 3, ["114M", "bundled"], [32, 256, 1024, 2048], 10.0,
                "float16" if cuda else "float32", halves, 128 if cuda else 4, 20.0, None, 3, stages=stages,
                load_generators=4 if cuda else 1, load_frame_ms=80.0 if cuda else 40.0,
                compile_modes=["offline", "offline-graphs"] if cuda else ["offline"],
                compile_dtype="bfloat16" if cuda else "float32")


@dataclass
class Row:
    """One line of the final table."""

    stage: str
    case: str
    result: str
    status: str  # ok, FAIL, over (a loadtest N past the thresholds), partial (hit the time box), skipped, planned


@dataclass
class Report:
    """The table's rows, in order, and every stage's raw results (the JSON)."""

    rows: list[Row] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, stage: str, case: str, result: str, status: str = "ok") -> None:
        self.rows.append(Row(stage, case, result, status))
        print(f"gpu_check: {stage}: {case}: {result} [{status}]", file=sys.stderr, flush=True)

    @property
    def failed(self) -> bool:
        return any(r.status == "FAIL" for r in self.rows)


def format_table(rows: list[Row]) -> str:
    """The rows as one aligned text table (the result column last, so long results only widen the line)."""
    head = ("stage", "case", "status", "result")
    data = [(r.stage, r.case, r.status, r.result) for r in rows]
    widths = [max(len(h), *(len(d[i]) for d in data)) if data else len(h) for i, h in enumerate(head)]
    line = " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
    out = [line.rstrip(), "-|-".join("-" * w for w in widths)]
    out += [" | ".join(v.ljust(w) for v, w in zip(d, widths, strict=True)).rstrip() for d in data]
    return "\n".join(out)
