#!/usr/bin/env python3
"""Stream an audio file or the microphone to a streamer daemon (``/v1/listen``) and print the captions.

    python clients/ws_client.py talk.wav                       # finals, one line per segment
    python clients/ws_client.py talk.flac --realtime           # paced like a live source
    python clients/ws_client.py --mic                          # the default microphone, until Ctrl-C
    python clients/ws_client.py talk.mp3 --json                # every server message, one JSON line each
    python clients/ws_client.py talk.wav --url ws://gpu-box:8765 --stream kitchen
    STREAMER_TOKEN=... python clients/ws_client.py talk.wav --url wss://gpu-box:8765 --cafile cert.pem

Files are decoded with soundfile (WAV, FLAC, MP3, Ogg) and the *samples* are sent, never the file's
bytes (a WAV header sent as audio is a click and garbage text): pcm_f32le (``--s16``: pcm_s16le) at the
file's own rate and channel count, which ``start`` declares; the server resamples and mixes down.
Rates outside 8-48 kHz are resampled here first (soxr). The microphone is read at its native rate
with sounddevice. On a terminal the partial is rewritten in place and finals scroll; otherwise only
finals are printed. Ctrl-C sends ``stop``: the last final arrives before the program exits.

Live sources (``--mic``, ``--realtime``) survive a dropped connection: the client keeps the last
``RESUME_BUFFER_S`` of audio (``streamer.client.ClientSession`` does the bookkeeping), reconnects
with backoff and resumes the session with the token from ``ready`` (protocol: "Resuming a session"
in ``streamer.protocol``), re-sending the audio from where the server's ``audio_s`` says it got
to; the finals it missed arrive then, once each. If the session cannot be resumed (its window
passed), it goes on in a new session. It gives up after ``GIVE_UP_S`` without a connection. Behind the load
balancer of a cluster (README "Scaling out") the same resume continues the session on another replica when its
own died, or said ``moved`` while draining (it closes with 1012 then, and the reconnect resumes elsewhere).

A daemon with ``server.auth_tokens`` needs ``--token`` (or ``STREAMER_TOKEN``), sent as
``Authorization: Bearer``; a refusal (HTTP 401) is one line on stderr and exit status 1. For a
``wss://`` daemon with a self-signed certificate, ``--cafile`` names the certificate to trust.

Needs websockets, numpy, soundfile (files), sounddevice (``--mic``), soxr (unusual rates), and
``streamer.protocol`` and ``streamer.client`` (standard library only, so torch is never imported).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import ssl
import sys
from collections.abc import AsyncGenerator
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from streamer.client import RESUME_BUFFER_S, ClientSession, listen_url
from streamer.protocol import (
    MAX_CHANNELS,
    MAX_SAMPLE_RATE_HZ,
    MIN_SAMPLE_RATE_HZ,
    End,
    Error,
    Final,
    Partial,
    Ready,
    Start,
    Stop,
    Warning,
    parse_server_message,
)

FRAME_S = 0.1  # audio per binary frame
BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # waits before reconnect attempts; the last one repeats
GIVE_UP_S = 60.0  # a live source stops trying after this long without a connection
# A resume on another replica of a cluster may wait for the old one's stream lease to lapse (cluster.lease_ttl_s).
READY_TIMEOUT_S = 30.0
RETRY_CODES = ("not_ready", "server_busy")  # refusals a session being resumed waits out (backoff, then again)
CLEAR_LINE = "\r\x1b[K"


def load_file(path: str) -> tuple[np.ndarray, int]:
    """Decode ``path`` to (frames, channels) float32 at a rate the server takes."""
    import soundfile as sf

    data, rate = sf.read(path, dtype="float32", always_2d=True)
    if data.shape[1] > MAX_CHANNELS:
        data = data.mean(axis=1, keepdims=True)
    if not MIN_SAMPLE_RATE_HZ <= rate <= MAX_SAMPLE_RATE_HZ:
        import soxr

        target = min(max(rate, MIN_SAMPLE_RATE_HZ), MAX_SAMPLE_RATE_HZ)
        data, rate = soxr.resample(data, rate, target).astype(np.float32), target
    return data, int(rate)


def encode(block: np.ndarray, s16: bool) -> bytes:
    """Interleaved little-endian samples."""
    if s16:
        return (np.clip(block, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    return np.ascontiguousarray(block, dtype="<f4").tobytes()


async def file_blocks(data: np.ndarray, rate: int, realtime: bool) -> AsyncGenerator[np.ndarray, None]:
    """``FRAME_S`` blocks of a decoded file; with ``realtime``, no faster than it plays."""
    loop = asyncio.get_running_loop()
    step = max(1, round(rate * FRAME_S))
    started = loop.time()
    for i, first in enumerate(range(0, len(data), step)):
        yield data[first : first + step]
        if realtime:
            await asyncio.sleep(max(0.0, started + (i + 1) * step / rate - loop.time()))


async def mic_blocks(device: str | None) -> tuple[int, AsyncGenerator[np.ndarray, None]]:
    """The microphone's rate and its blocks (float32, mono), read at its native rate."""
    import sounddevice as sd

    try:
        info = sd.query_devices(int(device) if device and device.isdigit() else device, kind="input")
    except (ValueError, sd.PortAudioError) as exc:
        raise OSError(f"no microphone: {exc} (python -m sounddevice lists the devices)") from exc
    rate = min(max(round(info["default_samplerate"]), MIN_SAMPLE_RATE_HZ), MAX_SAMPLE_RATE_HZ)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[np.ndarray] = asyncio.Queue(maxsize=200)

    def put(block: np.ndarray) -> None:
        if queue.full():  # we fell behind: drop the oldest rather than grow
            queue.get_nowait()
        queue.put_nowait(block)

    def callback(indata: np.ndarray, frames: int, time: object, status: object) -> None:
        loop.call_soon_threadsafe(put, indata.copy())  # PortAudio's thread: copy and hand over, nothing else

    async def blocks() -> AsyncGenerator[np.ndarray, None]:
        with sd.InputStream(device=info["index"], samplerate=rate, channels=1, dtype="float32",
                            blocksize=round(rate * FRAME_S / 2), callback=callback):
            while True:
                yield await queue.get()

    return rate, blocks()


class Printer:
    """Partials in place on a terminal, finals as lines, warnings and errors on stderr; or raw JSON."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.inplace = sys.stdout.isatty() and not as_json
        self.partial = False

    def __call__(self, raw: str) -> None:
        if self.as_json:
            print(raw, flush=True)
            return
        msg = parse_server_message(raw)
        if isinstance(msg, Partial) and self.inplace:
            width = shutil.get_terminal_size().columns - 1
            text = msg.text if len(msg.text) <= width else "…" + msg.text[-(width - 1) :]
            print(CLEAR_LINE + text, end="", flush=True)
            self.partial = True
        elif isinstance(msg, Final):
            self._clear()
            if msg.text:
                print(msg.text, flush=True)
        elif isinstance(msg, Warning | Error):
            self._clear()
            print(f"{msg.type}: {msg.code}: {msg.message}", file=sys.stderr, flush=True)

    def _clear(self) -> None:
        if self.partial:
            print(CLEAR_LINE, end="", flush=True)
            self.partial = False


async def send_audio(
    ws: ClientConnection, blocks: AsyncGenerator[np.ndarray, None], s16: bool, stop: asyncio.Event, sent: list[int]
) -> None:
    """Send blocks until they run out or ``stop`` is set, then ``stop``; ``sent[0]`` counts sample frames."""
    try:
        async for block in blocks:
            if stop.is_set():
                break
            await ws.send(encode(block, s16))
            sent[0] += len(block)
    finally:
        await blocks.aclose()  # closes the microphone
    await ws.send(Stop().to_json())


class LiveSession:
    """Streams a live source to ``/v1/listen`` and carries its session across dropped connections.

    Args:
        start: the ``start`` message (without ``resume``).
        blocks: the source's audio.
        s16: send pcm_s16le rather than pcm_f32le.
        stop: set to end the stream (Ctrl-C): what was captured is sent, then ``stop``.
        show: prints each server message.
        connect_kwargs: for ``websockets.connect`` (headers, TLS).
        source: what is streamed, for the first status line.
    """

    def __init__(self, start: Start, blocks: AsyncGenerator[np.ndarray, None], s16: bool, stop: asyncio.Event,
                 show: Printer, connect_kwargs: dict[str, Any], source: str) -> None:
        self.start, self.blocks, self.s16, self.stop, self.show = start, blocks, s16, stop, show
        self.connect_kwargs, self.source = connect_kwargs, source
        self.session = ClientSession(start, RESUME_BUFFER_S)  # the buffered audio, the token, the finals counted
        self.captured = asyncio.Event()  # new audio in the buffer, or the source ended
        self.is_source_done = False
        self._attempt = 0  # reconnect attempts since the last ready
        self._lost_at: float | None = None  # loop time of the first failure since the last ready

    async def run(self, url: str) -> int:
        producer = asyncio.create_task(self._capture())
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    async with connect(url, **self.connect_kwargs) as ws:
                        outcome = await self._converse(url, ws)
                        if outcome is not None:
                            return outcome
                        why = f"closed with {ws.close_code} before 'end'"
                except (ConnectionClosed, OSError, TimeoutError) as exc:
                    if self.session.ready is None:
                        raise  # never had a session: say so rather than retry
                    why = str(exc) or type(exc).__name__
                self._lost_at = self._lost_at or loop.time()
                if loop.time() - self._lost_at > GIVE_UP_S:
                    print(f"ws_client: no session for {GIVE_UP_S:g} s; giving up", file=sys.stderr, flush=True)
                    return 1
                delay = BACKOFF_S[min(self._attempt, len(BACKOFF_S) - 1)]
                self._attempt += 1
                print(f"ws_client: connection lost ({why}); reconnecting in {delay:g} s", file=sys.stderr, flush=True)
                await asyncio.sleep(delay)
        finally:
            producer.cancel()

    async def _capture(self) -> None:
        """Read the source into the buffer, connected or not (a microphone must be drained)."""
        try:
            async for block in self.blocks:
                if self.stop.is_set():
                    break
                self.session.audio.add(encode(block, self.s16))
                self.captured.set()
        finally:
            await self.blocks.aclose()  # closes the microphone
            self.is_source_done = True
            self.captured.set()

    async def _converse(self, url: str, ws: ClientConnection) -> int | None:
        """One connection: ``start`` (resuming the session if there is one), send, print. Returns the exit status
        once the session is over, or None when the connection closed before ``end`` (then reconnect)."""
        previous = self.session.ready
        await ws.send(self.session.start_message().to_json())
        while True:
            async with asyncio.timeout(READY_TIMEOUT_S):
                raw = await ws.recv()
            msg = parse_server_message(raw)
            self.show(raw)
            if isinstance(msg, Ready):
                break
            if isinstance(msg, Error) and msg.code in RETRY_CODES and self.session.ready is not None:
                return None  # a replica that is stopping (or full) while the session moves: try again
            if not isinstance(msg, Error) or msg.code != "resume_failed":
                return 1  # the start was refused (bad format, stream name in use, server busy)
        self._attempt, self._lost_at = 0, None
        lost = self.session.on_ready(msg)
        if msg.resumed:
            print(f"ws_client: resumed session {msg.session} at {msg.audio_s or 0:.3f} s", file=sys.stderr, flush=True)
        elif previous is None:
            print(f"ws_client: streaming {self.source} to {url} as stream {msg.stream}", file=sys.stderr,
                  flush=True)
        if lost:
            print(f"ws_client: {lost / self.start.sample_rate:.2f} s of audio were no longer buffered and are lost",
                  file=sys.stderr, flush=True)
        sender = asyncio.create_task(self._send(ws))
        try:
            async for raw in ws:
                self.show(raw)
                msg = parse_server_message(raw)
                if isinstance(msg, Final):
                    self.session.on_final(msg)
                elif isinstance(msg, End):
                    self.session.on_end()
                    check_accounting(msg, self.session.session_audio_s)
                    return 0
        finally:
            sender.cancel()
        return None  # closed cleanly but without "end" (e.g. as a slow consumer): reconnect

    async def _send(self, ws: ClientConnection) -> None:
        """Send the buffered audio the session lacks, then live audio; ``stop`` once the source has ended."""
        await self.session.send_audio(ws, self.captured, lambda: self.is_source_done)


def check_accounting(end: End, sent_s: float) -> None:
    """Say so on stderr when the server received other audio than was sent, or dropped some."""
    if end.audio_s is not None and abs(end.audio_s - sent_s) > 0.002:
        print(f"ws_client: sent {sent_s:.3f} s of audio but the server received {end.audio_s:.3f} s",
              file=sys.stderr, flush=True)
    if end.dropped_s:
        print(f"ws_client: the server fell behind and dropped {end.dropped_s:.2f} s of the audio",
              file=sys.stderr, flush=True)


async def run(args: argparse.Namespace) -> int:
    if args.mic:
        rate, blocks = await mic_blocks(args.device)
        channels = 1
    else:
        data, rate = load_file(args.file)
        channels, blocks = data.shape[1], file_blocks(data, rate, args.realtime)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    show = Printer(args.json)
    # A microphone or a real-time replay cannot wait: it is live (the server drops its oldest audio if it falls
    # behind). A file sent as fast as possible can: the server slows it down and loses nothing.
    start = Start(rate, "pcm_s16le" if args.s16 else "pcm_f32le", channels, args.stream, live=args.mic or args.realtime)
    url = listen_url(args.url)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else None
    tls = {"ssl": ssl.create_default_context(cafile=args.cafile)} if args.cafile else {}  # else the system CAs
    options = {"open_timeout": 10, "close_timeout": 5, "compression": None, "max_size": 2**22,
               "additional_headers": headers, **tls}
    source = f"the microphone at {rate} Hz" if args.mic else f"{args.file} ({rate} Hz, {channels} channel(s))"
    if args.mic or args.realtime:  # live: a dropped connection is resumed
        return await LiveSession(start, blocks, args.s16, stop, show, options, source).run(url)
    async with connect(url, **options) as ws:
        await ws.send(start.to_json())
        async with asyncio.timeout(10):
            first = await ws.recv()
        show(first)
        ready = parse_server_message(first)
        if not isinstance(ready, Ready):
            return 1  # the start was refused (bad format, stream name in use, server busy)
        print(f"ws_client: streaming {source} to {url} as stream {ready.stream}", file=sys.stderr, flush=True)
        sent = [0]
        sender = asyncio.create_task(send_audio(ws, blocks, args.s16, stop, sent))
        try:
            async for raw in ws:  # until "end" (or the server closes)
                show(raw)
                if isinstance(end := parse_server_message(raw), End):
                    check_accounting(end, sent[0] / rate)
                    break
        finally:
            sender.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None,
                                epilog="see the module docstring for examples")
    p.add_argument("file", nargs="?", help="audio file (WAV, FLAC, MP3, Ogg; any rate and channel count)")
    p.add_argument("--mic", action="store_true", help="stream the microphone instead of a file")
    p.add_argument("--device", help="with --mic: device index or part of its name (default: the system's)")
    p.add_argument("--url", default="ws://127.0.0.1:8765",
                   help="the daemon: ws://HOST:PORT, wss://..., or the full .../v1/listen (default: %(default)s)")
    p.add_argument("--stream", help="stream name, for /v1/captions?stream=NAME and MQTT (default: the server's)")
    p.add_argument("--realtime", action="store_true", help="send a file no faster than it plays")
    p.add_argument("--s16", action="store_true", help="send 16-bit integers (pcm_s16le) instead of float32")
    p.add_argument("--json", action="store_true", help="print every server message as it arrives, one per line")
    p.add_argument("--token", default=os.environ.get("STREAMER_TOKEN"),
                   help="access token for a daemon that needs one (default: $STREAMER_TOKEN, which unlike "
                   "a command-line argument other users cannot see in ps)")
    p.add_argument("--cafile", help="with a wss:// URL: trust this PEM certificate (e.g. the daemon's self-signed one)")
    args = p.parse_args(argv)
    if args.mic == bool(args.file):
        p.error("give an audio file or --mic")
    if args.file and not os.path.isfile(args.file):
        p.error(f"{args.file}: no such file")
    try:
        listen_url(args.url)
    except ValueError as exc:
        p.error(f"--url {exc}")
    if args.cafile and not listen_url(args.url).startswith("wss://"):
        p.error("--cafile needs a wss:// URL")
    if args.cafile and not os.path.isfile(args.cafile):
        p.error(f"--cafile {args.cafile}: no such file")
    try:
        return asyncio.run(run(args))
    except InvalidStatus as exc:  # the server answered the upgrade with an HTTP error
        print(f"ws_client: error: {refused(exc)}", file=sys.stderr)
        return 1
    except ssl.SSLCertVerificationError as exc:
        print(f"ws_client: error: {exc.verify_message or exc}: the server's certificate is not trusted "
              "(--cafile FILE trusts a self-signed one)", file=sys.stderr)
        return 1
    except (OSError, TimeoutError, RuntimeError, WebSocketException) as exc:  # refused, unreadable file, no mic
        print(f"ws_client: error: {exc or type(exc).__name__}", file=sys.stderr)
        return 1


def refused(exc: InvalidStatus) -> str:
    """One line for an HTTP refusal of the upgrade, with the server's reason and, for 401, what to do."""
    status = exc.response.status_code
    body = exc.response.body.decode("utf-8", "replace").strip().splitlines() if exc.response.body else []
    reason = f": {body[0]}" if body else ""
    if status == 401:
        return f"the server refused the connection (HTTP 401{reason}); give its token with --token or STREAMER_TOKEN"
    return f"the server refused the connection (HTTP {status}{reason})"


if __name__ == "__main__":
    sys.exit(main())
