"""``streamer loadtest``: how many live streams a daemon holds, measured as an operator would measure it.

N concurrent real-time clients (``"live": true``) stream different speech to ``/v1/listen`` at real time,
for a list of N. Per N: the lag of partials behind the audio (wall time a partial arrived minus wall
time the audio at its ``end`` was captured and sent), the latency of finals beyond the trailing-silence
rule (arrival minus capture of the audio at the final's ``end``, minus the rule), audio dropped, server
CPU and RSS; then the **capacity**, the largest N within the thresholds. ``--soak`` (see
``streamer.loadtest_soak``) runs one N for long with MQTT, broker restarts and client drops.

The daemon is the one at ``--url`` or one this command starts (``streamer serve`` as a subprocess).
Traffic goes to 127.0.0.1 only when it starts the daemon; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import subprocess
import sys
import tempfile
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamer.errors import ConfigError, StreamerError
from streamer.protocol import ClientSession, End, Error, Final, Partial, Ready, Start, Warning, parse_server_message

SAMPLE_RATE_HZ = 16000
DRAIN_TIMEOUT_S = 60.0  # after its audio ends, how long a client waits for its last final and ``end``
RECONNECT_DELAY_S = 0.2
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus")
SENTENCES = (
    "turn on the kitchen lights and set a timer for ten minutes",
    "the quick brown fox jumps over the lazy dog near the river bank",
    "please remind me to call my sister tomorrow morning at nine",
    "what is the weather going to be like this weekend in the mountains",
    "the meeting has been moved to thursday afternoon in room four",
    "open the garage door and switch off the heating downstairs",
    "a cup of coffee with milk and no sugar would be lovely thank you",
    "the train to the city leaves from platform two every twenty minutes",
    "read me the latest news about the football match last night",
    "our new office is on the third floor next to the library",
    "she sold seven hundred apples at the market before noon",
    "add eggs bread butter and fresh tomatoes to the shopping list",
)
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us+f3", "en-gb+m3", "en-us+f2")


# ---------------------------------------------------------------- speech


def espeak_pool(directory: Path, count: int) -> list[Path]:
    """Write ``count`` different utterances (sentence, voice and speed vary) as WAV files with espeak-ng."""
    out = []
    for c in range(count):
        path = directory / f"utterance{c:03d}.wav"
        voice = VOICES[(c // len(SENTENCES) + c) % len(VOICES)]
        speed = str(140 + (c * 7) % 50)  # words per minute
        command = ["espeak-ng", "-w", str(path), "-v", voice, "-s", speed, SENTENCES[c % len(SENTENCES)]]
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=30)
        except FileNotFoundError:
            raise StreamerError("espeak-ng makes the default speech: install it (apt install espeak-ng) or give "
                                "speech files with --audio") from None
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise StreamerError(f"espeak-ng failed ({exc}); give speech files with --audio instead") from exc
        out.append(path)
    return out


def audio_files(specs: list[str]) -> list[Path]:
    """Files named, and the audio files inside folders named, in order."""
    out: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            out += sorted(p for p in path.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
        elif path.is_file():
            out.append(path)
        else:
            raise ConfigError(f"--audio {spec}: no such file or folder")
    if not out:
        raise ConfigError(f"--audio {' '.join(specs)}: no audio files ({', '.join(AUDIO_SUFFIXES)}) there")
    return out


def load_s16(path: Path) -> np.ndarray:
    from streamer.audio.io import load_audio

    samples = load_audio(path, SAMPLE_RATE_HZ)
    return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")


def make_tracks(clips: list[np.ndarray], count: int, rng: random.Random, gap_s: tuple[float, float]) -> list[bytes]:
    """One s16le track per client: four clips in a client-specific order, with pauses of random length between
    them (longer than the trailing-silence rule, so segments end by silence), rotated to a random start."""
    tracks = []
    for i in range(count):
        parts = []
        for j in range(min(4, len(clips))):
            parts.append(clips[(i * 5 + j * 7) % len(clips)])
            parts.append(np.zeros(round(rng.uniform(*gap_s) * SAMPLE_RATE_HZ), dtype="<i2"))
        track = np.concatenate(parts)
        track = np.roll(track, -rng.randrange(len(track)))
        tracks.append(track.tobytes())
    return tracks


# ---------------------------------------------------------------- one client


@dataclass
class ClientStats:
    """What one client saw. Lags in ms; ``*_at`` are loop times of arrival (for per-interval figures)."""

    partial_lag_ms: array[float] = field(default_factory=lambda: array("d"))
    partial_at: array[float] = field(default_factory=lambda: array("d"))
    final_extra_ms: array[float] = field(default_factory=lambda: array("d"))
    finals: dict[str, list[int]] = field(default_factory=dict)  # session id -> segment numbers in arrival order
    final_keys: list[tuple[str, int, float, float]] = field(default_factory=list)  # (stream, segment, start, end)
    ends: list[End] = field(default_factory=list)
    warnings: Counter[str] = field(default_factory=Counter)
    warned_dropped_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    resumes: int = 0
    unbuffered_s: float = 0.0  # audio a resumed session needed that the client no longer kept

    @property
    def dropped_s(self) -> float:
        return sum(e.dropped_s or 0.0 for e in self.ends)


class LoadClient:
    """A real-time source: captures ``track`` in ``block_s`` blocks at real time for ``duration_s`` (looping it)
    and streams it to ``url``, resuming the session with :class:`ClientSession` when the connection drops.

    Args:
        name: the stream name.
        track: s16le mono audio at 16 kHz.
        url: the ``/v1/listen`` address (or a relay's).
        duration_s: seconds of audio to stream.
        start_delay_s: wait this long first, so clients are not phase-aligned.
        block_s: seconds per binary frame.
    """

    def __init__(self, name: str, track: bytes, url: str, duration_s: float, start_delay_s: float,
                 block_s: float, connect_kwargs: dict[str, Any]) -> None:
        self.name, self.track, self.url = name, track, url
        self.duration_s, self.start_delay_s, self.connect_kwargs = duration_s, start_delay_s, connect_kwargs
        self.block_frames = max(1, round(block_s * SAMPLE_RATE_HZ))
        self.session = ClientSession(Start(SAMPLE_RATE_HZ, "pcm_s16le", 1, name, live=True))
        self.captured_at = array("d")  # loop time at which block k was captured
        self.stats = ClientStats()
        self.expect_cut = False  # set by the soak just before it cuts this client's connection
        self.is_connected = False
        self.has_open_segment = False  # the latest result was a partial: a segment with text is open
        self.trailing_silence_s = 0.0
        self._captured = asyncio.Event()
        self._is_source_done = False
        self._excluded_until = 0  # results about audio before this position are replays, not live

    async def run(self) -> None:
        """Capture and stream until ``end`` (or the deadline: duration + delay + drain). Cancelling is safe."""
        capture = asyncio.create_task(self._capture())
        try:
            async with asyncio.timeout(self.start_delay_s + self.duration_s + DRAIN_TIMEOUT_S):
                await self._connections()
        except TimeoutError:
            self.stats.errors.append(f"{self.name}: no 'end' within {DRAIN_TIMEOUT_S:.0f} s after the audio ended")
        finally:
            capture.cancel()

    async def _capture(self) -> None:
        loop = asyncio.get_running_loop()
        block_bytes = 2 * self.block_frames
        blocks = math.ceil(self.duration_s * SAMPLE_RATE_HZ / self.block_frames)
        t0 = loop.time() + self.start_delay_s
        position = 0
        for k in range(blocks):
            await asyncio.sleep(max(0.0, t0 + (k + 1) * self.block_frames / SAMPLE_RATE_HZ - loop.time()))
            chunk = self.track[position:position + block_bytes]
            if len(chunk) < block_bytes:  # wrap around the track
                position = block_bytes - len(chunk)
                chunk += self.track[:position]
            else:
                position += block_bytes
            self.session.audio.add(chunk)
            self.captured_at.append(loop.time())
            self._captured.set()
        self._is_source_done = True
        self._captured.set()

    async def _connections(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        await asyncio.sleep(self.start_delay_s)
        while True:
            try:
                async with connect(self.url, **self.connect_kwargs) as ws:
                    if await self._converse(ws):
                        return
                    self.stats.errors.append(f"{self.name}: closed with {ws.close_code} before 'end'")
            except ConnectionClosed as exc:
                self._closed(exc.rcvd.code if exc.rcvd is not None else 1006)
            except (OSError, TimeoutError) as exc:
                self.stats.errors.append(f"{self.name}: connection failed: {exc or type(exc).__name__}")
            finally:
                self.is_connected = False
            if self.session.ready is None and not self.expect_cut:
                return  # no session to resume: the error says why
            await asyncio.sleep(RECONNECT_DELAY_S)

    def _closed(self, code: int) -> None:
        if self.expect_cut and code == 1006:
            self.expect_cut = False  # the cut we injected
        elif code != 1000:
            self.stats.errors.append(f"{self.name}: connection closed with code {code}")

    async def _converse(self, ws: Any) -> bool:
        """One connection: start (or resume), stream, read results. True once ``end`` arrived."""
        await ws.send(self.session.start_message().to_json())
        while True:
            async with asyncio.timeout(10):
                msg = parse_server_message(await ws.recv())
            if isinstance(msg, Ready):
                break
            if isinstance(msg, Error):
                self.stats.errors.append(f"{self.name}: error {msg.code}: {msg.message}")
                if msg.code != "resume_failed":
                    self.session.on_end()
                    return True
        self.is_connected = True
        lost = self.session.on_ready(msg)
        self.stats.unbuffered_s += lost / SAMPLE_RATE_HZ
        self.stats.resumes += bool(msg.resumed)
        self.trailing_silence_s = msg.endpointing.get("trailing_silence_after_speech_s", 0.0)
        self._excluded_until = self.session.sent if msg.resumed else 0
        self.stats.finals.setdefault(msg.session, [])
        sender = asyncio.create_task(self.session.send_audio(ws, self._captured, lambda: self._is_source_done))
        try:
            async for raw in ws:
                if self._on_message(parse_server_message(raw), msg.session):
                    return True
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)  # a send that failed with the connection
        return False

    def _on_message(self, msg: Any, session: str) -> bool:
        now = asyncio.get_running_loop().time()
        if isinstance(msg, Partial):
            self.has_open_segment = True
            lag = self._lag_s(msg.end, now)
            if lag is not None:
                self.stats.partial_lag_ms.append(lag * 1000)
                self.stats.partial_at.append(now)
        elif isinstance(msg, Final):
            self.has_open_segment = False
            self.session.on_final(msg)
            self.stats.finals[session].append(msg.segment)
            self.stats.final_keys.append((msg.stream, msg.segment, msg.start, msg.end))
            lag = self._lag_s(msg.end, now)
            if lag is not None and msg.reason == "silence":
                self.stats.final_extra_ms.append((lag - self.trailing_silence_s) * 1000)
        elif isinstance(msg, Warning):
            self.stats.warnings[msg.code] += 1
            if msg.code == "audio_dropped":
                self.stats.warned_dropped_s += msg.seconds or 0.0
        elif isinstance(msg, Error):
            self.stats.errors.append(f"{self.name}: error {msg.code}: {msg.message}")
        elif isinstance(msg, End):
            sent_s = self.session.session_audio_s
            if msg.audio_s is not None and abs(msg.audio_s - sent_s) > 0.002:  # 'end' rounds to 1 ms
                self.stats.errors.append(f"{self.name}: the client sent {sent_s:.3f} s of audio in the session, "
                                         f"the server received {msg.audio_s:.3f} s")
            self.session.on_end()
            self.stats.ends.append(msg)
            return True
        return False

    def _lag_s(self, end_s: float, now: float) -> float | None:
        """Now minus when the audio at ``end_s`` (session clock) was captured; None for a replayed result."""
        position = self.session.session_began + round(end_s * SAMPLE_RATE_HZ)
        if position <= self._excluded_until or not self.captured_at:
            return None
        block = min(len(self.captured_at) - 1, max(0, math.ceil(position / self.block_frames) - 1))
        return now - self.captured_at[block]


def check_finals(stats: ClientStats) -> tuple[int, int, int]:
    """Each segment exactly once per session: returns (finals received once, duplicates, missing).

    Missing finals are those ``end.segments`` counts and the client never got; a session without ``end``
    (an error says why) is not counted."""
    once = duplicates = missing = 0
    for segments in stats.finals.values():
        counts = Counter(segments)
        once += len(counts)
        duplicates += sum(n - 1 for n in counts.values())
    expected = sum(e.segments for e in stats.ends)
    if stats.ends and len(stats.finals) == len(stats.ends):
        missing = max(0, expected - once)
    return once, duplicates, missing


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
    from streamer.loadtest_peers import DaemonProcess, MetricsProbe, ProcessProbe, read_metrics
    from streamer.protocol import listen_url

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


async def load_tracks(args: argparse.Namespace, workdir: Path, count: int, rng: random.Random) -> list[bytes]:
    if args.audio:
        paths = audio_files(args.audio)
        clips = [await asyncio.to_thread(load_s16, p) for p in paths]
        return [np.roll(clips[i % len(clips)], -rng.randrange(len(clips[i % len(clips)]))).tobytes()
                for i in range(count)]
    paths = await asyncio.to_thread(espeak_pool, workdir, min(max(4, 2 * count), 48))
    clips = [await asyncio.to_thread(load_s16, p) for p in paths]
    return make_tracks(clips, count, rng, (1.3, 2.5))


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
                                   connect_options(args), f"lt{n}")
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
