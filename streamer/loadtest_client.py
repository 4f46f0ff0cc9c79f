"""One live load-test client of ``streamer loadtest``: captures speech at real time, streams it to
``/v1/listen`` as a live source, resumes its session after a dropped connection (``ClientSession``), and
records when each result arrived against when the audio it covers was captured.
"""

from __future__ import annotations

import asyncio
import math
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from streamer.asr import clocks
from streamer.client import ClientSession
from streamer.protocol import End, Error, Final, Partial, Ready, Start, Warning, parse_server_message

SAMPLE_RATE_HZ = clocks.SAMPLE_RATE_HZ  # the model's rate: the server has nothing to resample
DRAIN_TIMEOUT_S = 60.0  # after its audio ends, how long a client waits for its last final and ``end``
RECONNECT_DELAY_S = 0.2

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


