"""``streamer loadtest --soak``: N live streams for a long time with MQTT on and faults injected.

Each client reaches the daemon through its own loopback :class:`~streamer.loadtest_peers.Relay`; every
``--client-drop-every-s`` a random connected client's TCP connection is cut without a close frame, so the
daemon holds the session and the client resumes it (``ClientSession``), re-sending audio from
``ready.audio_s``. Every ``--broker-restart-every-s`` the mosquitto broker this command started is
restarted. Reports per interval the daemon's RSS and the partials' p95 lag; at the end RSS growth after
warm-up, lag drift, and finals produced (``streamer_finals_total``) against finals delivered to the
clients (each segment exactly once per session, across resumes) and to MQTT (each final at least once;
QoS 1 duplicates are counted apart), and every error seen. ``ok`` only when nothing was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from streamer.errors import ConfigError
from streamer.loadtest import connect_options, open_target, parse_streams, percentile, run_clients
from streamer.loadtest_client import LoadClient, check_finals
from streamer.loadtest_speech import load_tracks

MQTT_PREFIX, MQTT_DEVICE = "streamer", "loadtest"
MQTT_SETTLE_S = 30.0  # after the clients end, how long to wait for the outbox to reach the subscriber


async def every(period_s: float, until: float, action: Callable[[], Awaitable[None]]) -> None:
    """Run ``action`` every ``period_s`` (first after one period) while before loop time ``until``."""
    loop = asyncio.get_running_loop()
    due = loop.time() + period_s
    while period_s > 0 and due < until:
        await asyncio.sleep(due - loop.time())
        await action()
        due += period_s


class Intervals:
    """Per-interval figures: the daemon's RSS and the p95 lag of the partials that arrived in the interval."""

    def __init__(self, clients: list[LoadClient], probe: Any) -> None:
        self.clients, self.probe = clients, probe
        self.rows: list[dict[str, Any]] = []
        self._seen = [0] * len(clients)  # partials of each client already counted
        self._began = asyncio.get_running_loop().time()

    async def sample(self) -> None:
        lags: list[float] = []
        for i, client in enumerate(self.clients):
            lags += client.stats.partial_lag_ms[self._seen[i]:]
            self._seen[i] = len(client.stats.partial_lag_ms)
        p95 = percentile(lags, 0.95)
        _, rss = await asyncio.to_thread(self.probe.sample) if self.probe else (None, None)
        row = {"t_s": round(asyncio.get_running_loop().time() - self._began), "rss_mb": None if rss is None else
               round(rss, 1), "lag_p95_ms": None if p95 is None else round(p95), "partials": len(lags),
               "resumes": sum(c.stats.resumes for c in self.clients)}
        self.rows.append(row)
        print(f"\nsoak: {row['t_s']} s: rss {row['rss_mb']} MB, lag p95 {row['lag_p95_ms']} ms, "
              f"{row['partials']} partials, {row['resumes']} resumes so far", file=sys.stderr, flush=True)


async def run_soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from streamer.loadtest_peers import Broker, MqttTally, Relay, read_metrics

    streams = parse_streams(args.streams or "16")
    if len(streams) != 1:
        raise ConfigError(f"--soak runs one number of streams; got --streams {args.streams}")
    n, duration_s = streams[0], args.duration_s or 3600.0
    use_mqtt = not args.no_mqtt and not args.url
    if args.url and not args.no_mqtt:
        print("loadtest: with --url the soak cannot start or restart a broker: MQTT is not checked",
              file=sys.stderr, flush=True)
    rng = random.Random(args.seed)
    tracks = await load_tracks(args, workdir, n, rng)
    broker = tally = target = None
    relays: list[Relay] = []
    stop_tally = asyncio.Event()
    try:
        sets: list[str] = []
        if use_mqtt:
            (workdir / "broker").mkdir(exist_ok=True)
            broker = Broker(workdir / "broker")
            await asyncio.to_thread(broker.start)
            sets = ["mqtt.enabled=true", "mqtt.host=127.0.0.1", f"mqtt.port={broker.port}",
                    f"mqtt.prefix={MQTT_PREFIX}", f"mqtt.device_id={MQTT_DEVICE}"]
            tally = MqttTally(broker.port, f"{MQTT_PREFIX}/{MQTT_DEVICE}/+/final")
            tally_task = asyncio.create_task(tally.run(stop_tally))
            async with asyncio.timeout(10):
                await tally.subscribed.wait()
        target = await open_target(args, workdir, [x for s in sets for x in ("--set", s)], n)
        address = urlsplit(target.listen_url)
        if address.scheme != "ws" or address.hostname is None or address.port is None:
            raise ConfigError(f"--soak relays plain ws://HOST:PORT connections; got {target.listen_url}")
        before = await asyncio.to_thread(read_metrics, target.http_base, args.token)
        clients = []
        for i in range(n):
            relay = Relay(address.hostname, address.port)
            await relay.start()
            relays.append(relay)
            url = f"ws://127.0.0.1:{relay.port}{address.path}"
            clients.append(LoadClient(f"soak-{i}", tracks[i % len(tracks)], url, duration_s, rng.uniform(0, 1),
                                      args.frame_ms / 1000, connect_options(args)))
        report = await _soak(args, clients, relays, broker, target, duration_s, rng)
        if tally is not None:
            await _settle(tally, clients)
        after = await asyncio.to_thread(read_metrics, target.http_base, args.token)
    finally:
        stop_tally.set()
        for relay in relays:
            await relay.close()
        code = await asyncio.to_thread(target.process.stop) if target is not None and target.process else None
        if broker is not None:
            await asyncio.to_thread(broker.stop)
    if tally is not None:
        try:
            async with asyncio.timeout(15):  # it notices ``stop`` within a reconnect attempt
                await tally_task
        except TimeoutError:
            tally.errors.append("MQTT: the subscriber did not stop within 15 s")
    produced = None
    if "streamer_finals_total" in after:
        produced = round(after["streamer_finals_total"] - before.get("streamer_finals_total", 0.0))
    return _report(args, n, duration_s, report, clients, tally, produced, target, code, broker)


async def _soak(args: argparse.Namespace, clients: list[LoadClient], relays: list[Any], broker: Any, target: Any,
                duration_s: float, rng: random.Random) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    until = loop.time() + duration_s
    intervals = Intervals(clients, target.probe)
    drops = 0

    async def drop() -> None:  # mid-segment where possible: the hardest case for a resume
        nonlocal drops
        connected = [i for i, c in enumerate(clients) if c.is_connected]
        connected = [i for i in connected if clients[i].has_open_segment] or connected
        if connected:
            i = rng.choice(connected)
            clients[i].expect_cut = True
            relays[i].cut()
            drops += 1

    async def restart() -> None:
        await asyncio.to_thread(broker.restart, args.broker_downtime_s)

    faults = [asyncio.create_task(every(args.interval_s, until + 0.5, intervals.sample)),
              asyncio.create_task(every(args.client_drop_every_s, until - 2.0, drop))]
    if broker is not None:
        faults.append(asyncio.create_task(every(args.broker_restart_every_s, until - 2.0, restart)))
    try:
        await run_clients(clients, target.probe, f"soak: {len(clients)} streams")
    finally:
        for task in faults:
            task.cancel()
        await asyncio.gather(*faults, return_exceptions=True)
    if not intervals.rows or intervals.rows[-1]["t_s"] < duration_s - args.interval_s / 2:
        await intervals.sample()
    return {"intervals": intervals.rows, "client_drops": drops}


async def _settle(tally: Any, clients: list[LoadClient]) -> None:
    """Wait (bounded) until the subscriber has every final the clients got: the outbox may still be draining."""
    wanted = {k for c in clients for k in c.stats.final_keys}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + MQTT_SETTLE_S
    while loop.time() < deadline and not wanted <= set(tally.seen):
        await asyncio.sleep(0.2)  # the tally has no event per message; a short bounded poll is enough here


def _report(args: argparse.Namespace, n: int, duration_s: float, soak: dict[str, Any], clients: list[LoadClient],
            tally: Any, produced: int | None, target: Any, code: int | None, broker: Any) -> dict[str, Any]:
    rows = soak["intervals"]
    checks = [check_finals(c.stats) for c in clients]
    delivered = sum(c[0] for c in checks)
    errors = [e for c in clients for e in c.stats.errors]
    if target.process is not None:
        errors += [f"daemon log: traceback: {line}" for line in target.process.log_lines(is_traceback=True)]
        if code != 0:
            errors.append(f"daemon exited with {code} on SIGTERM")
    finals: dict[str, Any] = {
        "produced": produced, "clients": delivered, "clients_duplicated": sum(c[1] for c in checks),
        "clients_missing": sum(c[2] for c in checks) + max(0, (produced or 0) - delivered),
    }
    if tally is not None:
        keys = {k for c in clients for k in c.stats.final_keys}
        finals["mqtt"] = len(tally.seen)
        finals["mqtt_duplicates"] = sum(v - 1 for v in tally.seen.values())
        finals["mqtt_missing"] = len(keys - set(tally.seen)) + max(0, (produced or 0) - len(tally.seen))
        errors += tally.errors
    rss_start = next((r["rss_mb"] for r in rows if r["rss_mb"] is not None), None)
    rss_end = rows[-1]["rss_mb"] if rows else None
    lags = [r["lag_p95_ms"] for r in rows if r["lag_p95_ms"] is not None]
    dropped_s = round(sum(c.stats.dropped_s for c in clients), 3)
    unbuffered_s = round(sum(c.stats.unbuffered_s for c in clients), 3)
    lost = finals["clients_missing"] + finals.get("mqtt_missing", 0)
    return {
        "mode": "soak", "streams": n, "duration_s": duration_s, "intervals": rows,
        "rss_mb": {"start": rss_start, "end": rss_end, "growth_percent": None if not (rss_start and rss_end)
                   else round(100 * (rss_end - rss_start) / rss_start, 1)},
        "lag_p95_ms": {"first": lags[0] if lags else None, "last": lags[-1] if lags else None},
        "finals": finals, "dropped_s": dropped_s, "unbuffered_s": unbuffered_s,
        "warnings": dict(sum((c.stats.warnings for c in clients), Counter())),
        "faults": {"client_drops": soak["client_drops"], "resumes": sum(c.stats.resumes for c in clients),
                   "broker_restarts": broker.restarts if broker is not None else 0},
        "errors": errors, "lost": lost,
        "daemon_log_errors": target.process.log_lines(is_traceback=False) if target.process else [],
        "ok": lost == 0 and not errors and dropped_s == 0 and unbuffered_s == 0 and produced is not None,
    }


def print_soak(report: dict[str, Any]) -> None:
    """The per-interval table and the summary, on stdout."""
    print(f"{'t s':>6} {'rss MB':>8} {'lag p95 ms':>10} {'partials':>8} {'resumes':>7}")
    for r in report["intervals"]:
        print(f"{r['t_s']:>6} {r['rss_mb'] if r['rss_mb'] is not None else 'n/a':>8} "
              f"{r['lag_p95_ms'] if r['lag_p95_ms'] is not None else '-':>10} {r['partials']:>8} {r['resumes']:>7}")
    rss, lag, f, faults = report["rss_mb"], report["lag_p95_ms"], report["finals"], report["faults"]
    print(f"rss: {rss['start']} MB after warm-up, {rss['end']} MB at the end ({rss['growth_percent']} %)")
    print(f"partials' lag p95: {lag['first']} ms in the first interval, {lag['last']} ms in the last")
    mqtt = (f"; MQTT {f['mqtt']} ({f['mqtt_duplicates']} duplicates, {f['mqtt_missing']} missing)"
            if "mqtt" in f else "; MQTT not checked")
    print(f"finals: produced {f['produced']}, delivered to clients {f['clients']} ({f['clients_duplicated']} "
          f"duplicated, {f['clients_missing']} missing){mqtt}")
    print(f"faults: {faults['client_drops']} client drops, {faults['resumes']} resumes, "
          f"{faults['broker_restarts']} broker restarts; audio dropped {report['dropped_s']} s")
    for line in report["daemon_log_errors"]:
        print(f"daemon log (not counted as an error): {line}")
    for error in report["errors"]:
        print(f"error: {error}")
    print("soak: ok, nothing lost" if report["ok"] else f"soak: FAILED ({report['lost']} finals lost, "
          f"{len(report['errors'])} errors)")
