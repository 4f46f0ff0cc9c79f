"""The one-command GPU check (``scripts/gpu_check.sh`` runs ``python -m streamer.gpu_check``): does the GPU path
give the CPU's tokens, how fast is it, how many live streams does the box hold. Prints one table at the end
and writes everything as JSON (``--out``, default ``$OUT``).

Stages, each time-boxed (its command is killed at its budget; what it measured until then is kept):

* ``parity``: CUDA float32 against the CPU and NeMo's goldens, streaming and offline, tokens and frames
  exact; float16/bfloat16 token agreement on the goldens and on speech (:mod:`streamer.gpu_check_parity`).
* ``bench``: ``streamer bench --device cuda`` at 1 to 1024 streams ([70,1], the 114M configuration) per
  precision, CUDA graphs on.
* ``loadtest``: ``streamer serve`` on the GPU with the bundled model and the 114M one, ``streamer
  loadtest`` at growing N until a run fails its thresholds or the budget runs out: the capacity.
* ``offline``: RTFx of a parakeet-tdt-0.6b-shaped model on a batch of long utterances.

``--device cpu --quick`` runs every stage on the CPU with tiny sizes (the CI test of this script);
``--dry-run`` prints the plan and the table's frame without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("parity", "bench", "loadtest", "offline")


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
    threads: int | None = None  # torch threads of every command (None: torch's default)
    load_generators: int = 1  # loadtest processes sharing one N (one Python process cannot feed 2000 clients)
    load_min_share: int = 32  # clients per generator at least
    load_frame_ms: float = 40.0
    stages: list[str] = field(default_factory=lambda: list(STAGES))


def make_plan(device: str, quick: bool, stages: list[str]) -> Plan:
    """Sizes for a GPU box (about 7 minutes in all) or, with ``quick``, tiny ones for the CPU (under a minute)."""
    if quick:
        return Plan(device, True, {"parity": 60, "bench": 60, "loadtest": 90, "offline": 60}, [1, 2], ["float32"],
                    2, 1, ["bundled"], [1, 2], 3.0, "float32", ["float32"], 1, 2.0, 1, 1, threads=1, stages=stages)
    cuda = device.startswith("cuda")
    halves = ["float32", "float16", "bfloat16"] if cuda else ["float32"]
    return Plan(device, False, {"parity": 75, "bench": 100, "loadtest": 170, "offline": 60},
                [2**k for k in range(11)], halves, 10, 3, ["114M", "bundled"], [32, 256, 1024, 2048], 10.0,
                "float16" if cuda else "float32", halves, 128 if cuda else 4, 20.0, None, 3, stages=stages,
                load_generators=4 if cuda else 1, load_frame_ms=80.0 if cuda else 40.0)


@dataclass
class Row:
    """One line of the final table."""

    stage: str
    case: str
    result: str
    status: str  # ok, FAIL, over (a loadtest N past the thresholds), partial (hit the time box), skipped, planned


@dataclass
class Report:
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


def environment(device: str) -> tuple[dict[str, Any], str | None]:
    """torch, CUDA and the GPU as this Python sees them, and what is wrong for ``device`` (None: nothing)."""
    import platform

    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                           "cpu_cores": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "gpu_count": torch.cuda.device_count(), "bf16": torch.cuda.is_bf16_supported()}
    problem = None
    if device.startswith("cuda") and not torch.cuda.is_available():
        problem = (f"this Python's torch ({torch.__version__}) has no CUDA"
                   + ("" if torch.version.cuda is None else f" device (built for CUDA {torch.version.cuda})")
                   + ": install a CUDA build of torch (README, section GPU), or point STREAMER_PYTHON at a Python "
                     "that has one")
    return env, problem


def describe_plan(plan: Plan) -> list[Row]:
    """The table's frame for ``--dry-run``: one row per stage saying what it would run."""
    text = {
        "parity": f"goldens + {'3' if plan.quick else '12'} speech streams on {plan.device} vs cpu"
                  + ("" if not plan.device.startswith("cuda") else "; float16/bfloat16 agreement"),
        "bench": f"streams {','.join(map(str, plan.bench_streams))} x {','.join(plan.bench_dtypes)}, [70,1]",
        "loadtest": f"{', '.join(plan.load_models)} model(s), N {','.join(map(str, plan.load_ladder))} for "
                    f"{plan.load_duration_s:g} s each until one fails, {plan.load_dtype}",
        "offline": f"parakeet-tdt-0.6b shape, {plan.offline_batch} x {plan.utterance_s:g} s, "
                   f"{','.join(plan.offline_dtypes)}" + (f", {plan.offline_layers} layer(s)" if plan.offline_layers
                                                         else ""),
    }
    return [Row(s, text[s], f"time box {plan.budgets_s[s]:.0f} s", "planned") for s in plan.stages]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m streamer.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (default: cuda)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: every stage in about a minute on the CPU")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the table's frame; run nothing")
    p.add_argument("--stages", default=",".join(STAGES), help=f"which stages, in order (default: {','.join(STAGES)})")
    p.add_argument("--out", default=os.environ.get("OUT") or None,
                   help="folder for gpu_check.json and gpu_check.txt (default: $OUT; unset: no files)")
    p.add_argument("--workdir", default=None, help="folder for models, speech and logs (default: a temporary one)")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        p.error(f"--stages: {', '.join(unknown) or 'none given'}: choose from {', '.join(STAGES)}")
    args.stage_list = stages
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 when nothing failed, 1 when a check failed, 2 when the device cannot be used."""
    import tempfile

    args = parse_args(argv)
    plan = make_plan(args.device, args.quick, args.stage_list)
    report = Report(data={"plan": asdict(plan), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    if args.dry_run:
        report.rows = describe_plan(plan)
        return finish(report, args.out, 0)
    env, problem = environment(plan.device)
    report.data["environment"] = env
    gpu = f", {env['gpu']} ({env['gpu_memory_gib']} GiB)" if "gpu" in env else ""
    report.add("setup", f"python {env['python']}, torch {env['torch']}{gpu}", problem or f"device {plan.device}",
               "FAIL" if problem else "ok")
    if problem:
        for stage in plan.stages:
            report.add(stage, "not run", "the device is unusable (see setup)", "skipped")
        return finish(report, args.out, 2)
    from streamer.gpu_check_stages import run_stage

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for stage in plan.stages:
            began = time.monotonic()
            run_stage(stage, plan, workdir, report)
            report.data.setdefault("stage_seconds", {})[stage] = round(time.monotonic() - began, 1)
    return finish(report, args.out, 1 if report.failed else 0)


def finish(report: Report, out: str | None, code: int) -> int:
    """Print the table (the last thing printed), write the JSON and the table to ``out``; return ``code``."""
    table = format_table(report.rows)
    report.data["rows"] = [asdict(r) for r in report.rows]
    report.data["exit_status"] = code
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "gpu_check.json").write_text(json.dumps(report.data, indent=2, default=str) + "\n")
        (folder / "gpu_check.txt").write_text(table + "\n")
    print(table, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
