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
* ``compile``: the same model's encoder eager and ``torch.compile``d (length buckets; on CUDA also replayed as
  CUDA graphs) on the same inputs: steady RTFx and compile time (:mod:`streamer.asr.compiled`).

``--device cpu --quick`` runs every stage on the CPU with tiny sizes (the CI test of this script);
``--dry-run`` prints the plan and the table's frame without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from streamer.gpu_check_plan import STAGES, Plan, Report, Row, format_table, make_plan


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
        "compile": f"offline encoder eager vs {','.join(plan.compile_modes)}, {plan.compile_dtype}, "
                   f"{plan.offline_batch} x {plan.utterance_s:g} s",
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
