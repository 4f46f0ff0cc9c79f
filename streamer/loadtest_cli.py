"""``streamer loadtest``'s command line: its flags, and running the load test or the soak.

Apart from :mod:`streamer.loadtest` so that the soak (:mod:`streamer.loadtest_soak`), which builds on
the load test's parts, and the command that picks one of the two form no import circle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from streamer.errors import ConfigError
from streamer.loadtest import run_load, table


def add_loadtest_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "loadtest",
        help="how many live streams a daemon holds: N real-time clients, lag, drops, CPU, capacity",
        description="Stream different speech at real time from N concurrent live clients over /v1/listen, for "
        "each N in --streams, against --url or a daemon this command starts; report the lag of partials, the "
        "latency of finals beyond the silence rule, audio dropped, server CPU and RSS, and the capacity. "
        "--soak runs one N for long with MQTT, broker restarts and client drops, and exits 1 if anything "
        "was lost or went wrong.",
    )
    add_target_args(p)
    add_load_args(p)
    add_soak_args(p.add_argument_group("soak"))
    p.set_defaults(func=cmd_loadtest)


def add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="a running daemon (ws://HOST:PORT); default: start one with the flags below")
    p.add_argument("--pid", type=int, help="with --url: the daemon's process id, for its CPU and RSS")
    p.add_argument("--token", help="access token, when the daemon has tokens")
    p.add_argument("--model", help="model of the daemon it starts (default: the bundled model)")
    p.add_argument("--att-context-size", metavar="L,R", help="look-ahead of the daemon it starts, e.g. 70,1")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="setting passed to streamer serve")
    p.add_argument("--start-timeout-s", type=float, default=180.0,
                   help="wait this long for the daemon to be ready (default: 180)")


def add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--streams", help="numbers of concurrent streams (default: 1,2,4,8; with --soak: 16)")
    p.add_argument("--duration-s", type=float, help="audio per client per N (default: 60; with --soak: 3600)")
    p.add_argument("--audio", nargs="+", metavar="PATH", help="speech files or folders (default: espeak-ng)")
    p.add_argument("--frame-ms", type=float, default=40.0, help="audio per binary frame a client sends (default: 40)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for the speech order, pauses and start offsets (default: 0)")
    p.add_argument("--max-lag-p95-ms", type=float, default=300.0,
                   help="capacity: partials' p95 lag at most (default: 300)")
    p.add_argument("--max-final-p95-ms", type=float, default=500.0,
                   help="capacity: finals' p95 latency beyond the silence rule at most (default: 500)")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="plot lag percentiles against N (soak: p95 per interval)")
    p.add_argument("--workdir", help="folder for speech, logs and the broker (default: a temporary one)")
    p.add_argument("--name-prefix", default="lt",
                   help="stream names are PREFIX<N>-<i>; give each of several load generators against one daemon "
                        "its own (default: lt)")


def add_soak_args(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--soak", action="store_true", help="one N for long, with MQTT and injected faults")
    p.add_argument("--broker-restart-every-s", type=float, default=300.0,
                   help="restart the broker this often; 0: never (default: 300)")
    p.add_argument("--broker-downtime-s", type=float, default=2.0,
                   help="how long the broker stays down (default: 2)")
    p.add_argument("--client-drop-every-s", type=float, default=120.0,
                   help="cut a random client's TCP connection this often; 0: never (default: 120)")
    p.add_argument("--interval-s", type=float, default=60.0, help="report RSS and lag this often (default: 60)")
    p.add_argument("--no-mqtt", action="store_true", help="soak without MQTT (no broker to start or restart)")


def cmd_loadtest(args: argparse.Namespace) -> int:
    if args.url and (args.model or args.att_context_size or args.set):
        raise ConfigError("--model, --att-context-size and --set configure a daemon this command starts; "
                          "leave them out with --url")
    with tempfile.TemporaryDirectory(prefix="streamer-loadtest-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.soak:
            from streamer.loadtest_soak import print_soak, run_soak

            report = asyncio.run(run_soak(args, workdir))
            print_soak(report)
        else:
            report = asyncio.run(run_load(args, workdir))
            print(table(report["runs"]))
            print(capacity_line(report))
            for line in report["daemon_tracebacks"]:
                print(f"daemon log: traceback: {line}")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        if args.plot:
            from streamer.loadtest_plot import plot_report

            print(plot_report(report, Path(args.plot)), file=sys.stderr)
    if args.soak:
        return 0 if report["ok"] else 1
    return 0


def capacity_line(report: dict[str, Any]) -> str:
    t = report["thresholds"]
    rule = (f"partials' p95 lag <= {t['max_lag_p95_ms']:.0f} ms, finals' p95 extra latency <= "
            f"{t['max_final_p95_ms']:.0f} ms, nothing dropped, no errors")
    if report["capacity"] is None:
        return f"capacity: none of the N tried holds ({rule})"
    return f"capacity: {report['capacity']} streams ({rule})"
