"""``streamer loadtest``: how many live streams a daemon holds, measured as an operator would measure it.

N concurrent real-time clients (``"live": true``) stream different speech to ``/v1/listen`` at real time,
for a list of N. Per N: the lag of partials behind the audio (wall time a partial arrived minus wall
time the audio at its ``end`` was captured and sent), the latency of finals beyond the trailing-silence
rule (arrival minus capture of the audio at the final's ``end``, minus the rule), audio dropped, server
CPU and RSS; then the **capacity**, the largest N within the thresholds. ``--soak`` (see
``streamer.loadtest_soak``) runs one N for long with MQTT, broker restarts and client drops.

The daemon is the one at ``--url`` or one this command starts (``streamer serve`` as a subprocess).
Traffic goes to 127.0.0.1 only when it starts the daemon; every wait has a deadline. The parts:
``loadtest_client`` (one live client), ``loadtest_speech`` (the audio), ``loadtest_peers`` (daemon,
broker, relay, MQTT subscriber, /proc probes), ``loadtest_soak``, ``loadtest_plot`` and
``loadtest_cli`` (the command line, which runs this module or the soak).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamer.errors import ConfigError
from streamer.loadtest_client import LoadClient, check_finals
from streamer.loadtest_speech import load_tracks

# ---------------------------------------------------------------- a run of N clients


def percentile(values: Any, q: float) -> float | None:
    if not len(values):
        return None
    ordered = sorted(values)
    return float(ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))])


def spread(values: Any) -> dict[str, float | None]:
    """p50, p95 and max, rounded to whole ms."""
    out = {"p50": percentile(values, 0.5), "p95": percentile(values, 0.95), "max": max(values) if len(values) else None}
    return {k: None if v is None else round(v) for k, v in out.items()}


def make_clients(url: str, n: int, tracks: list[bytes], duration_s: float, block_s: float, rng: random.Random,
                 connect_kwargs: dict[str, Any], prefix: str) -> list[LoadClient]:
    return [LoadClient(f"{prefix}-{i}", tracks[i % len(tracks)], url, duration_s, rng.uniform(0.0, 1.0), block_s,
                       connect_kwargs) for i in range(n)]


async def run_clients(clients: list[LoadClient], probe: Any, progress: str) -> dict[str, Any]:
    """Run the clients to their end; print a progress line each second; return the server's CPU (% of one core
    while the audio streamed) and peak RSS (MiB), None where ``probe`` (if any) cannot tell."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    cpu0, _ = await asyncio.to_thread(probe.sample) if probe else (None, None)
    rss_peak: float | None = None
    tasks = [asyncio.create_task(c.run()) for c in clients]
    streaming_s = max(c.start_delay_s for c in clients) + clients[0].duration_s
    cpu_percent = None
    pending = set(tasks)
    while pending:  # ends when every client has (each has its own deadline)
        _, pending = await asyncio.wait(pending, timeout=1.0)
        elapsed = loop.time() - began
        cpu, rss = await asyncio.to_thread(probe.sample) if probe else (None, None)
        rss_peak = rss if rss_peak is None or (rss is not None and rss > rss_peak) else rss_peak
        if cpu0 is not None and cpu is not None and cpu_percent is None and (elapsed >= streaming_s or not pending):
            cpu_percent = round(100 * (cpu - cpu0) / elapsed)
        p95 = percentile([x for c in clients for x in c.stats.partial_lag_ms[-50:]], 0.95)
        print(f"\r{progress} {min(elapsed, streaming_s):5.0f}/{streaming_s:.0f} s, {len(pending)} clients running, "
              f"recent lag p95 {'-' if p95 is None else f'{p95:.0f}'} ms, "
              f"rss {'n/a' if rss is None else f'{rss:.0f}'} MB   ", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr, flush=True)
    return {"cpu_percent": cpu_percent, "rss_mb": None if rss_peak is None else round(rss_peak)}


def summarize(n: int, clients: list[LoadClient], server: dict[str, Any],
              thresholds: dict[str, float]) -> dict[str, Any]:
    """One row of the report: the figures for N clients and whether they are within the thresholds."""
    stats = [c.stats for c in clients]
    lags = [x for s in stats for x in s.partial_lag_ms]
    extra = [x for s in stats for x in s.final_extra_ms]
    checks = [check_finals(s) for s in stats]
    warnings: Counter[str] = Counter()
    for s in stats:
        warnings.update(s.warnings)
    row = {
        "streams": n, "duration_s": clients[0].duration_s, "partials": len(lags), "lag_ms": spread(lags),
        "finals": sum(c[0] for c in checks), "final_extra_ms": spread(extra),
        "finals_duplicated": sum(c[1] for c in checks), "finals_missing": sum(c[2] for c in checks),
        "dropped_s": round(sum(s.dropped_s for s in stats), 3),
        "warned_dropped_s": round(sum(s.warned_dropped_s for s in stats), 3),
        "warnings": dict(warnings), "errors": [e for s in stats for e in s.errors],
        "resumes": sum(s.resumes for s in stats), **server,
    }
    row["passed"] = bool(
        row["lag_ms"]["p95"] is not None and row["lag_ms"]["p95"] <= thresholds["max_lag_p95_ms"]
        and (row["final_extra_ms"]["p95"] is None or row["final_extra_ms"]["p95"] <= thresholds["max_final_p95_ms"])
        and row["dropped_s"] == 0 and not warnings["audio_dropped"] and not row["errors"]
        and not row["finals_missing"] and not row["finals_duplicated"]
    )
    return row


def capacity(rows: list[dict[str, Any]]) -> int | None:
    """The largest N that passed (None when none did)."""
    return max((r["streams"] for r in rows if r["passed"]), default=None)


def table(rows: list[dict[str, Any]]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    head = (f"{'streams':>7} {'partials':>8} {'lag p50':>8} {'lag p95':>8} {'lag max':>8} {'final+ p50':>10} "
            f"{'final+ p95':>10} {'finals':>6} {'dropped s':>9} {'cpu %':>6} {'rss MB':>7} {'errors':>6}  ok")
    lines = [head]
    for r in rows:
        lag, extra = r["lag_ms"], r["final_extra_ms"]
        lines.append(
            f"{r['streams']:>7} {r['partials']:>8} {ms(lag['p50']):>8} {ms(lag['p95']):>8} {ms(lag['max']):>8} "
            f"{ms(extra['p50']):>10} {ms(extra['p95']):>10} {r['finals']:>6} {r['dropped_s']:>9.2f} "
            f"{'n/a' if r['cpu_percent'] is None else r['cpu_percent']:>6} "
            f"{'n/a' if r['rss_mb'] is None else r['rss_mb']:>7} {len(r['errors']):>6}  "
            f"{'yes' if r['passed'] else 'no'}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- the command


@dataclass
class Target:
    """The daemon under test: its ``/v1/listen`` URL, HTTP base, a CPU and RSS probe if any, the process if ours."""

    listen_url: str
    http_base: str
    probe: Any = None
    process: Any = None


async def open_target(args: argparse.Namespace, workdir: Path, extra_sets: list[str], max_streams: int) -> Target:
    from streamer.client import listen_url
    from streamer.loadtest_peers import DaemonProcess, MetricsProbe, ProcessProbe, read_metrics

    if args.url:
        url = listen_url(args.url)
        http_base = "http" + url[2:].removesuffix("/v1/listen")
        if args.pid:
            return Target(url, http_base, ProcessProbe(args.pid))
        metrics = await asyncio.to_thread(read_metrics, http_base, args.token)
        return Target(url, http_base, MetricsProbe(http_base, args.token) if "process_cpu_seconds_total" in metrics
                      else None)
    serve_args = ["--set", f"server.max_sessions={max_streams + 4}", *extra_sets]
    if args.model:
        serve_args += ["--model", args.model]
    if args.att_context_size:
        serve_args += ["--att-context-size", args.att_context_size]
    for item in args.set or []:
        serve_args += ["--set", item]
    daemon = DaemonProcess(workdir, serve_args)
    print(f"loadtest: starting streamer serve {' '.join(serve_args)} (log: {daemon.log})", file=sys.stderr, flush=True)
    await asyncio.to_thread(daemon.start, args.start_timeout_s)
    url = f"ws://127.0.0.1:{daemon.port}/v1/listen"
    return Target(url, daemon.http_base, ProcessProbe(daemon.proc.pid), daemon)


async def run_load(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    streams = parse_streams(args.streams or "1,2,4,8")
    duration_s = args.duration_s or 60.0
    rng = random.Random(args.seed)
    tracks = await load_tracks(args, workdir, max(streams), rng)
    target = await open_target(args, workdir, [], max(streams))
    thresholds = {"max_lag_p95_ms": args.max_lag_p95_ms, "max_final_p95_ms": args.max_final_p95_ms}
    rows = []
    try:
        for n in streams:
            clients = make_clients(target.listen_url, n, tracks, duration_s, args.frame_ms / 1000, rng,
                                   connect_options(args), f"{getattr(args, 'name_prefix', None) or 'lt'}{n}")
            server = await run_clients(clients, target.probe, f"loadtest: {n} streams")
            rows.append(summarize(n, clients, server, thresholds))
            await asyncio.sleep(1.0)  # let the daemon settle between runs
    finally:
        code = await asyncio.to_thread(target.process.stop) if target.process else None
    tracebacks = target.process.log_lines(is_traceback=True) if target.process else []
    return {"mode": "load", "url": target.listen_url if args.url else None, "model": args.model,
            "att_context_size": args.att_context_size, "frame_ms": args.frame_ms, "thresholds": thresholds,
            "runs": rows, "capacity": capacity(rows), "daemon_exit_status": code,
            "daemon_tracebacks": tracebacks}


def connect_options(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else None
    return {"open_timeout": 10, "close_timeout": 5, "compression": None, "max_size": 2**22,
            "additional_headers": headers}


def parse_streams(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ConfigError(f"--streams {text!r}: expected numbers such as 1,2,4,8") from None
    if not values or values[0] < 1:
        raise ConfigError(f"--streams {text!r}: expected positive numbers such as 1,2,4,8")
    return values
