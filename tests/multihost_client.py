"""A live ``/v1/listen`` client for the multi-host test, with a record of what it saw on each connection.

It captures its speech at real time (``live``), streams it through HAProxy from the client host, and after a
dropped connection reconnects through HAProxy and resumes its session the way streamer's own clients do
(:class:`streamer.client.ClientSession`: the last 30 s of audio kept, ``start`` with ``resume``; when the server
cannot resume, a new session gets the audio not sent yet). Each connection's :class:`Seen` holds what arrived:
errors, ``ready``, partials, finals, ``end`` and the close code.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamer.client import ClientSession
from streamer.protocol import End, Error, Final, Partial, Ready, ServerMessage, Start, Warning, parse_server_message
from tests.multihost_cluster import WAIT_S, Cluster

BLOCK_S = 0.1  # audio per frame, captured and sent at real time
RECONNECT_DELAY_S = 0.2


@dataclass
class Seen:
    """What the client saw on one connection (``replica``: which one served it, filled in by the test)."""

    replica: str = "?"
    errors: list[str] = field(default_factory=list)
    ready: Ready | None = None
    partials: list[Partial] = field(default_factory=list)
    finals: list[Final] = field(default_factory=list)
    end: End | None = None
    close_code: int | None = None
    audio_from_s: float = 0.0  # the client's audio position this connection began sending at
    audio_to_s: float = 0.0  # and where it ended
    opened_at_s: float = 0.0  # loop time of the connection attempt, and of its ready
    ready_at_s: float | None = None

    def summary(self) -> str:
        ready = "no ready" if self.ready is None else \
            f"ready session={self.ready.session} resumed={self.ready.resumed} audio_s={self.ready.audio_s}"
        errors = "; ".join(f"{text} (x{count})" if count > 1 else text for text, count in _runs(self.errors))
        finals = "; ".join(f"#{f.segment} {f.text!r} ({f.reason})" for f in self.finals) or "none"
        end = "no end" if self.end is None else f"end segments={self.end.segments} audio_s={self.end.audio_s}"
        return (f"via {self.replica}: errors: {errors or 'none'}; {ready}; audio sent "
                f"{self.audio_from_s:.2f}-{self.audio_to_s:.2f} s; {len(self.partials)} partials; finals: "
                f"{finals}; {end}; close code {self.close_code}")


def _runs(items: list[str]) -> list[tuple[str, int]]:
    """Consecutive repeats collapsed: ``[(item, count), ...]``."""
    out: list[tuple[str, int]] = []
    for item in items:
        if out and out[-1][0] == item:
            out[-1] = (item, out[-1][1] + 1)
        else:
            out.append((item, 1))
    return out


class LiveClient:
    """Streams ``pcm`` (s16le mono) at real time to ``/v1/listen`` through the cluster's HAProxy.

    Args:
        cluster: where to connect (from its client host).
        pcm: the speech.
        rate: its sample rate.
        stream: the stream name.
        is_stop_held: when true, ``stop`` waits for :meth:`release` (so a test decides when the session may end).
    """

    def __init__(self, cluster: Cluster, pcm: bytes, rate: int, stream: str, is_stop_held: bool = False) -> None:
        self.cluster, self.pcm, self.rate = cluster, pcm, rate
        self.session = ClientSession(Start(rate, "pcm_s16le", 1, stream, live=True))
        self.seen: list[Seen] = []
        self._captured = asyncio.Event()
        self._is_captured_all = False
        self._may_stop = asyncio.Event()
        if not is_stop_held:
            self._may_stop.set()

    def release(self) -> None:
        """Let the client send ``stop`` once its audio is sent."""
        self._may_stop.set()
        self._captured.set()

    @property
    def finals(self) -> list[Final]:
        return [final for seen in self.seen for final in seen.finals]

    async def wait_until(self, predicate: Callable[[LiveClient], bool]) -> None:
        async with asyncio.timeout(WAIT_S):
            while not predicate(self):
                await asyncio.sleep(0.02)

    async def run(self) -> None:
        """Capture and stream until an ``end`` arrives; reconnect after every dropped connection."""
        capture = asyncio.create_task(self._capture())
        try:
            async with asyncio.timeout(len(self.pcm) / 2 / self.rate + 2 * WAIT_S):
                while not await self._connection():
                    await asyncio.sleep(RECONNECT_DELAY_S)
        finally:
            capture.cancel()
            await asyncio.gather(capture, return_exceptions=True)

    async def _capture(self) -> None:
        loop = asyncio.get_running_loop()
        block_bytes = 2 * round(BLOCK_S * self.rate)
        began = loop.time()
        for k, i in enumerate(range(0, len(self.pcm), block_bytes)):
            await asyncio.sleep(max(0.0, began + (k + 1) * BLOCK_S - loop.time()))
            self.session.audio.add(self.pcm[i : i + block_bytes])
            self._captured.set()
        self._is_captured_all = True
        self._captured.set()

    async def _connection(self) -> bool:
        """One connection, recorded in a new :class:`Seen`; True once the session's ``end`` arrived."""
        seen = Seen(opened_at_s=asyncio.get_running_loop().time())
        self.seen.append(seen)
        try:
            ws = await self.cluster.ws(f"{self.cluster.lb_url}/v1/listen")
        except (OSError, InvalidStatus, TimeoutError) as exc:
            seen.errors.append(f"connecting: {exc or type(exc).__name__}")
            return False
        try:
            async with ws:
                return await self._converse(ws, seen)
        except ConnectionClosed as exc:
            seen.close_code = exc.rcvd.code if exc.rcvd is not None else 1006
            return False
        finally:
            seen.audio_to_s = self.session.sent / self.rate
            if seen.close_code is None:
                seen.close_code = ws.close_code

    async def _converse(self, ws: ClientConnection, seen: Seen) -> bool:
        await ws.send(self.session.start_message().to_json())
        while not isinstance(msg := await self._receive(ws), Ready):
            if not isinstance(msg, Error) or msg.code not in ("resume_failed", "stream_in_use"):
                raise AssertionError(f"unexpected answer to start: {msg}")
            seen.errors.append(f"{msg.code}: {msg.message}")
            if msg.code == "stream_in_use":  # the dead replica's lease lives on until its ttl: ask again
                await asyncio.sleep(RECONNECT_DELAY_S)
                await ws.send(self.session.start_message().to_json())
        seen.ready, seen.ready_at_s = msg, asyncio.get_running_loop().time()
        lost_frames = self.session.on_ready(msg)
        assert lost_frames == 0, f"{lost_frames} frames the server needed were no longer kept"
        seen.audio_from_s = self.session.sent / self.rate
        sender = asyncio.create_task(self.session.send_audio(ws, self._captured, self._is_done))
        try:
            while True:
                msg = await self._receive(ws)
                if isinstance(msg, Final):
                    self.session.on_final(msg)
                    seen.finals.append(msg)
                elif isinstance(msg, Partial):
                    seen.partials.append(msg)
                elif isinstance(msg, Error | Warning):
                    seen.errors.append(f"{msg.code}: {msg.message}")
                elif isinstance(msg, End):
                    self.session.on_end()
                    seen.end = msg
                    with contextlib.suppress(TimeoutError):  # the server closes after 'end'
                        async with asyncio.timeout(WAIT_S):
                            await ws.wait_closed()
                    return True
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)

    def _is_done(self) -> bool:
        return self._is_captured_all and self._may_stop.is_set()

    async def _receive(self, ws: ClientConnection) -> ServerMessage:
        async with asyncio.timeout(WAIT_S):
            return parse_server_message(await ws.recv())
