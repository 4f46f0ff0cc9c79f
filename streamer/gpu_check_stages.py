"""The five stages of :mod:`streamer.gpu_check`, each run as ``python -m streamer ...`` commands under a time box.

A stage adds its rows to the report and its raw results to ``report.data[stage]``. A command killed at the
stage's budget counts as ``partial``: the rows it printed before (``--format json`` prints each as it is
measured) are still reported.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from streamer.gpu_check_plan import Plan, Report

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "nemo"


def run_stage(stage: str, plan: Plan, workdir: Path, report: Report) -> None:
    """Run one stage; an unexpected error becomes a FAIL row, never a traceback that loses the table."""
    deadline = time.monotonic() + plan.budgets_s[stage]
    try:
        {"parity": parity, "bench": bench, "loadtest": loadtest, "offline": offline, "compile": compiled}[stage](
            plan, workdir, report, deadline)
    except Exception as exc:  # noqa: BLE001 - the table must still be printed
        report.add(stage, "stage failed", f"{type(exc).__name__}: {exc}".splitlines()[0][:200], "FAIL")


def streamer_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "streamer", *args]


def run(command: list[str], deadline: float, log: Path) -> tuple[int | None, str]:
    """Run ``command`` until it ends or ``deadline`` (monotonic); stderr goes to ``log``. Returns (exit status,
    None if killed at the deadline; its stdout so far)."""
    timeout = max(1.0, deadline - time.monotonic())
    with open(log, "ab") as err:
        try:
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                  timeout=timeout, check=False)
            return done.returncode, done.stdout.decode(errors="replace")
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout or b""
            return None, out.decode(errors="replace") if isinstance(out, bytes) else out


def json_lines(text: str) -> list[dict[str, Any]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut off at the time box
    return rows


def tail(log: Path, lines: int = 3) -> str:
    text = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return " / ".join(text[-lines:])[:300] or "no output"


# ---------------------------------------------------------------- (a) parity


def parity(plan: Plan, workdir: Path, report: Report, deadline: float) -> None:
    out, log = workdir / "parity.json", workdir / "parity.log"
    command = [sys.executable, "-m", "streamer.gpu_check_parity", "--device", plan.device, "--json", str(out)]
    if plan.quick:
        command.append("--quick")
    if plan.threads:
        command += ["--threads", str(plan.threads)]
    code, _ = run(command, deadline, log)
    if code != 0 or not out.exists():
        report.add("parity", "goldens and speech", "timed out" if code is None else f"exit {code}: {tail(log)}",
                   "FAIL")
        return
    data = json.loads(out.read_text())
    report.data["parity"] = data
    g, s = data["goldens"], data["speech"]
    exact = g["device_equals_cpu"] == g["cases"] and g["device_equals_nemo"] == g["cases"]
    report.add("parity", f"goldens float32 {plan.device} = cpu = NeMo (tokens, frames)",
               f"{g['device_equals_cpu']}/{g['cases']} = cpu, {g['device_equals_nemo']}/{g['cases']} = NeMo"
               + (f"; differ: {', '.join(g['mismatches'][:3])}" if g["mismatches"] else ""),
               "ok" if exact and g["cases"] else "FAIL")
    report.add("parity", f"speech float32, {s['streams']} streams batched ({s['source']})",
               f"{s['device_equals_cpu']}/{s['streams']} streams = cpu, CUDA graphs "
               f"{'on' if s['cuda_graphs'] else 'off'}",
               "ok" if s["device_equals_cpu"] == s["streams"] else "FAIL")
    for dtype in g["half"]:
        gh, sh = g["half"][dtype], s["half"][dtype]
        report.add("parity", f"{dtype} token agreement with float32",
                   f"goldens {pct(gh['agreement'])} ({gh['exact']}/{gh['utterances']} exact), speech "
                   f"{pct(sh['agreement'])} ({sh['exact']}/{sh['utterances']} exact)")


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


# ---------------------------------------------------------------- (b) bench


def bench(plan: Plan, workdir: Path, report: Report, deadline: float) -> None:
    log = workdir / "bench.log"
    command = streamer_command("bench", "--device", plan.device, "--att-context-sizes", "70,1", "--streams",
                               ",".join(map(str, plan.bench_streams)), "--dtypes", ",".join(plan.bench_dtypes),
                               "--steps", str(plan.bench_steps), "--warmup", str(plan.bench_warmup), "--no-decoder",
                               "--nemo", "off", "--format", "json")
    if plan.threads:
        command += ["--threads", str(plan.threads)]
    code, out = run(command, deadline, log)
    rows = json_lines(out)
    report.data["bench"] = rows
    status = "ok" if code == 0 else "partial" if code is None else "FAIL"
    if not rows:
        report.add("bench", "[70,1] 114M encoder step", f"no rows: {tail(log)}", "FAIL" if code != 0 else "ok")
        return
    for n in plan.bench_streams:
        mine = [r for r in rows if r["streams"] == n]
        if not mine:
            report.add("bench", f"[70,1] x{n}", "not reached within the time box", status)
            continue
        p50 = "/".join(f"{r['p50_ms']:g}" for r in mine)
        rtfx = "/".join(f"{r['rtfx_total']:g}" for r in mine)
        report.add("bench", f"[70,1] x{n} ({'/'.join(r['dtype'] for r in mine)})",
                   f"p50 {p50} ms, RTFx {rtfx} ({mine[0]['impl']})", "ok" if len(mine) == len(plan.bench_dtypes)
                   else status)


# ---------------------------------------------------------------- (c) loadtest


def speech_args() -> list[str]:
    """``--audio`` files for a machine without espeak-ng (the goldens' audio); nothing when espeak-ng is there."""
    if shutil.which("espeak-ng"):
        return []
    return ["--audio", *map(str, sorted(FIXTURES.glob("*/audio_*.wav")))]


def large_model(workdir: Path, deadline: float, report: Report) -> str | None:
    path, log = workdir / "large-114m.nemo", workdir / "save-model.log"
    probe = sorted(FIXTURES.glob("tdt_streaming/audio_*.wav"))
    command = streamer_command("bench", "--save-model", str(path), *(["--probe-wav", str(probe[0])] if probe else []))
    code, _ = run(command, deadline, log)
    if code != 0 or not path.exists():
        report.add("loadtest", "114M model (streamer bench --save-model)",
                   "timed out" if code is None else f"exit {code}: {tail(log)}", "FAIL")
        return None
    return str(path)


def daemon_args(plan: Plan, spec: str) -> list[str]:
    most = max(plan.load_ladder)
    sets = {"model.device": plan.device, "model.dtype": plan.load_dtype, "engine.max_batch": most,
            "server.max_sessions": most + 4, "server.max_pending_connections": most + 64,
            "server.max_handshakes": most + 64}
    if plan.threads:
        sets["model.threads"] = plan.threads
    args = ["--model", spec, "--att-context-size", "70,1"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args


def loadtest(plan: Plan, workdir: Path, report: Report, deadline: float) -> None:
    from streamer.loadtest_peers import DaemonProcess

    results: dict[str, Any] = {}
    report.data["loadtest"] = results
    for name in plan.load_models:
        spec = "streamer-tdt-small" if name == "bundled" else large_model(workdir, deadline, report)
        if spec is None:
            continue
        folder = workdir / f"load-{name}"
        folder.mkdir(exist_ok=True)
        daemon = DaemonProcess(folder, daemon_args(plan, spec))
        try:
            daemon.start(max(10.0, min(120.0, deadline - time.monotonic() - plan.load_duration_s)))
            results[name] = ladder(plan, name, daemon, folder, report, deadline)
        finally:
            daemon.stop()


def ladder(plan: Plan, name: str, daemon: Any, folder: Path, report: Report, deadline: float) -> list[dict]:
    """Loadtests at growing N against ``daemon`` until one fails or the next would not fit the time box."""
    runs: list[dict] = []
    label = f"{name} [70,1] {plan.load_dtype}"
    for n in plan.load_ladder:
        needed = plan.load_duration_s + 15
        if time.monotonic() + needed > deadline:
            report.add("loadtest", f"{label} x{n}", "not run: the time box is spent", "partial")
            break
        row, problem = load_at(plan, n, daemon, folder, time.monotonic() + needed + 30)
        if row is None:
            report.add("loadtest", f"{label} x{n}", problem, "FAIL")
            break
        runs.append(row)
        lag, extra = row["lag_ms"], row["final_extra_ms"]
        report.add("loadtest", f"{label} x{n}",
                   f"lag p50/p95 {ms(lag['p50'])}/{ms(lag['p95'])} ms, final+ p95 {ms(extra['p95'])} ms, dropped "
                   f"{row['dropped_s']} s, errors {len(row['errors'])}, daemon cpu {row['cpu_percent']}%"
                   + (f" ({row['generators']} load generators)" if row["generators"] > 1 else ""),
                   "ok" if row["passed"] else "over")
        if not row["passed"]:
            break
    held = max((r["streams"] for r in runs if r["passed"]), default=None)
    verdict = "none of the N tried" if held is None else f"{held} streams" + (
        " (the largest tried)" if held == max(plan.load_ladder) else "")
    report.add("loadtest", f"{label} capacity", f"{verdict} (p95 lag <= 300 ms, final+ p95 <= 500 ms, no drops)")
    return runs


def load_at(plan: Plan, n: int, daemon: Any, folder: Path, deadline: float) -> tuple[dict | None, str]:
    """``streamer loadtest --url`` with N clients, split over up to ``plan.load_generators`` processes of at least
    ``plan.load_min_share`` clients each (own stream names and seeds); their rows merged by :func:`merge_rows`."""
    k = max(1, min(plan.load_generators, n // plan.load_min_share))
    shares = [n // k + (i < n % k) for i in range(k)]
    procs = []
    for i, share in enumerate(shares):
        out, log = folder / f"load-{n}-{i}.json", folder / f"load-{n}-{i}.log"
        out.unlink(missing_ok=True)
        command = streamer_command("loadtest", "--url", f"ws://127.0.0.1:{daemon.port}", "--pid",
                                   str(daemon.proc.pid), "--streams", str(share), "--duration-s",
                                   f"{plan.load_duration_s:g}", "--frame-ms", f"{plan.load_frame_ms:g}", "--seed",
                                   str(i), "--name-prefix", f"g{i}n", "--json", str(out), *speech_args())
        with open(log, "ab") as err:
            procs.append((subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err,
                                           stdin=subprocess.DEVNULL), out, log))
    rows = []
    for proc, out, log in procs:
        try:
            code = proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        if code != 0 or not out.exists():
            for other, _, _ in procs:
                if other.poll() is None:
                    other.kill()
                    other.wait()
            return None, "timed out" if code is None else f"exit {code}: {tail(log)}"
        rows.append(json.loads(out.read_text())["runs"][0])
    return merge_rows(n, rows), ""


def merge_rows(n: int, rows: list[dict]) -> dict:
    """One row from the rows of several load generators: sums of counts, the worst p95 and max, the median p50
    (the p50 of the whole is not recoverable from parts; the worst p95 overstates the whole's, never understates)."""
    if len(rows) == 1:
        return {**rows[0], "generators": 1}

    def worst(key: str, stat: str) -> float | None:
        values = [r[key][stat] for r in rows if r[key][stat] is not None]
        return max(values) if values else None

    def middle(key: str) -> float | None:
        values = sorted(r[key]["p50"] for r in rows if r[key]["p50"] is not None)
        return values[len(values) // 2] if values else None

    cpus = [r["cpu_percent"] for r in rows if r["cpu_percent"] is not None]
    return {
        "streams": n, "generators": len(rows), "partials": sum(r["partials"] for r in rows),
        "lag_ms": {"p50": middle("lag_ms"), "p95": worst("lag_ms", "p95"), "max": worst("lag_ms", "max")},
        "final_extra_ms": {"p50": middle("final_extra_ms"), "p95": worst("final_extra_ms", "p95"),
                           "max": worst("final_extra_ms", "max")},
        "finals": sum(r["finals"] for r in rows), "dropped_s": round(sum(r["dropped_s"] for r in rows), 3),
        "errors": [e for r in rows for e in r["errors"]], "cpu_percent": max(cpus) if cpus else None,
        "rss_mb": max((r["rss_mb"] for r in rows if r["rss_mb"] is not None), default=None),
        "passed": all(r["passed"] for r in rows), "parts": rows,
    }


# ---------------------------------------------------------------- (d) offline


def offline(plan: Plan, workdir: Path, report: Report, deadline: float) -> None:
    log = workdir / "offline.log"
    code, out = run(offline_command(plan, plan.offline_dtypes), deadline, log)
    rows = json_lines(out)
    report.data["offline"] = rows
    if not rows:
        report.add("offline", "parakeet-tdt-0.6b shape", "timed out" if code is None else f"exit {code}: {tail(log)}",
                   "FAIL")
        return
    for r in rows:
        report.add("offline", f"{r['scope']} {r['dtype']} {r['streams']} x {r['chunk_ms'] / 1000:g} s "
                              f"({r['params_m']:g}M)", f"RTFx {r['rtfx_total']:g} (batch p50 {r['p50_ms']:g} ms)",
                   "ok" if code == 0 else "partial")


def offline_command(plan: Plan, dtypes: list[str], *extra: str) -> list[str]:
    command = streamer_command("bench", "--offline", "--device", plan.device, "--dtypes", ",".join(dtypes),
                               "--offline-batch", str(plan.offline_batch), "--utterance-s", f"{plan.utterance_s:g}",
                               "--steps", str(plan.steps_offline), "--warmup", "1" if not plan.quick else "0",
                               "--nemo", "off", "--format", "json", *extra)
    if plan.offline_layers:
        command += ["--offline-layers", str(plan.offline_layers)]
    if plan.threads:
        command += ["--threads", str(plan.threads)]
    return command


# ---------------------------------------------------------------- (e) compile


def compiled(plan: Plan, workdir: Path, report: Report, deadline: float) -> None:
    """The offline encoder eager, then torch.compile'd per ``plan.compile_modes`` (on CUDA also with CUDA graphs),
    same model and inputs, encoder only: steady RTFx and the first call (the compile) of each."""
    log = workdir / "compile.log"
    command = offline_command(plan, [plan.compile_dtype], "--no-decoder", "--offline-compile",
                              ",".join(plan.compile_modes))
    code, out = run(command, deadline, log)
    rows = json_lines(out)
    report.data["compile"] = rows
    status = "ok" if code == 0 else "partial" if code is None else "FAIL"
    if not rows:
        report.add("compile", "parakeet-tdt-0.6b shape", "timed out" if code is None else f"exit {code}: {tail(log)}",
                   "FAIL")
        return
    eager = rows[0]["rtfx_total"]
    for r in rows:
        gain = "" if r is rows[0] else f", {r['rtfx_total'] / eager:.2f}x eager"
        report.add("compile", f"{r['impl']} {r['dtype']} {r['streams']} x {r['chunk_ms'] / 1000:g} s",
                   f"RTFx {r['rtfx_total']:g}{gain}, first call {r['first_call_s']:g} s", status)
    for mode in plan.compile_modes[len(rows) - 1:]:
        report.add("compile", f"{mode} {plan.compile_dtype}", "not reached within the time box", status)
