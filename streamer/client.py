"""A ``/v1/listen`` client's bookkeeping (protocol: "Resuming a session" in :mod:`streamer.protocol`): the daemon's
address, the recent audio kept to re-send after a dropped connection, and the session to resume.

Standard library only (like :mod:`streamer.protocol`), so a client that copies ``streamer.protocol`` and this
module imports no torch.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from streamer.protocol import Final, Ready, Resume, Start, Stop

RESUME_BUFFER_S = 30.0  # audio a live client keeps to re-send after a reconnect (the server says where it got to)


def listen_url(url: str) -> str:
    """The ``/v1/listen`` address of a daemon given as ``ws://host:port``, ``http://host:port/`` (what the
    daemon prints) or the full ``ws://host:port/v1/listen``; ``https://`` becomes ``wss://``.

    Raises:
        ValueError: not a ws, wss, http or https address.
    """
    if url.startswith(("http://", "https://")):
        url = "ws" + url[4:]
    if not url.startswith(("ws://", "wss://")):
        raise ValueError(f"{url!r}: expected ws://HOST:PORT (or wss://)")
    base = url.rstrip("/")
    return base if base.endswith("/v1/listen") else base + "/v1/listen"


class SentAudio:
    """A live client's most recent audio, kept to re-send what a dropped connection lost.

    Positions count sample frames (one sample per channel) since the client began, across sessions.
    Bounded: a block goes once ``max_frames`` newer frames are kept, so at least the last ``max_frames``
    are always there.

    Args:
        frame_bytes: bytes of one sample frame (:attr:`Start.frame_bytes`).
        max_frames: how many of the newest frames to keep, > 0.
    """

    def __init__(self, frame_bytes: int, max_frames: int) -> None:
        if frame_bytes <= 0 or max_frames <= 0:
            raise ValueError(f"frame_bytes and max_frames must be positive, got {frame_bytes} and {max_frames}")
        self.frame_bytes, self.max_frames = frame_bytes, max_frames
        self._blocks: deque[tuple[int, bytes]] = deque()  # (position of its first frame, payload)
        self.start = 0  # position of the oldest frame kept
        self.end = 0  # position after the newest frame

    def add(self, payload: bytes) -> None:
        """Append ``payload`` (whole frames, as sent on the wire); the oldest blocks go beyond the bound."""
        if len(payload) % self.frame_bytes:
            raise ValueError(f"{len(payload)} bytes are not whole frames of {self.frame_bytes} bytes")
        if not payload:
            return
        self._blocks.append((self.end, payload))
        self.end += len(payload) // self.frame_bytes
        while self.end - self._blocks[0][0] - len(self._blocks[0][1]) // self.frame_bytes >= self.max_frames:
            self._blocks.popleft()  # never the newest: the frames after it number 0 < max_frames
        self.start = self._blocks[0][0]

    def since(self, position: int) -> list[bytes]:
        """The audio from ``position`` on (from :attr:`start`, if that is later), as payloads to send."""
        out = []
        for first, payload in self._blocks:
            skip = max(0, position - first) * self.frame_bytes
            if skip < len(payload):
                out.append(payload[skip:])
        return out


class ClientSession:
    """What a live ``/v1/listen`` client keeps to resume its session after a dropped connection; no I/O.

    The client adds its audio to :attr:`audio` as it is captured, connected or not. On each connection it
    sends :meth:`start_message`, hands the ``ready`` to :meth:`on_ready` (after a ``resume_failed`` error
    the server starts a new session, whose ``ready`` follows), sends :meth:`unsent` audio calling
    :meth:`mark_sent` after each payload, and hands every ``final`` to :meth:`on_final` and ``end`` to
    :meth:`on_end`.

    Args:
        start: the ``start`` message (its ``resume`` is ignored).
        buffer_s: seconds of the newest audio kept to re-send.
    """

    def __init__(self, start: Start, buffer_s: float = RESUME_BUFFER_S) -> None:
        self.start = replace(start, resume=None)
        self.audio = SentAudio(start.frame_bytes, max(1, round(buffer_s * start.sample_rate)))
        self.ready: Ready | None = None  # the session's latest ready (session id, resume token); None: none to resume
        self.next_segment = 0  # finals received in this session: the first segment whose final is missing
        self.session_began = 0  # position of the session's first frame, plus any frames it never got
        self.sent = 0  # position up to which audio went to the current connection

    def start_message(self) -> Start:
        """The ``start`` for a new connection: it resumes the session when there is one with a token."""
        if self.ready is None or not self.ready.resume_token:
            return self.start
        return replace(self.start, resume=Resume(self.ready.session, self.ready.resume_token, self.next_segment))

    def on_ready(self, ready: Ready) -> int:
        """Take a ``ready`` and move :attr:`sent` back to where the server's session needs audio from.

        Returns:
            Sample frames the server needs that are no longer kept (0 unless the client was away longer than
            the buffer): they are skipped, so the session's audio has a gap there.
        """
        if ready.resumed:
            needed = self.session_began + round((ready.audio_s or 0.0) * self.start.sample_rate)
        else:  # a new session gets what the last one did not
            needed = self.session_began = self.sent
            self.next_segment = 0
        lost = max(0, self.audio.start - needed)
        self.session_began += lost  # the server never counts those frames: keep audio_s and positions in step
        self.ready, self.sent = ready, needed + lost
        return lost

    def on_final(self, final: Final) -> None:
        """Count a received final (a replayed one included)."""
        self.next_segment = max(self.next_segment, final.segment + 1)

    def on_end(self) -> None:
        """The session is over: the next connection starts a new one."""
        self.ready = None

    def unsent(self) -> list[bytes]:
        """The kept audio the current connection has not had yet, as payloads to send in order."""
        return self.audio.since(self.sent)

    def mark_sent(self, payload: bytes) -> None:
        """Count ``payload`` (one of :meth:`unsent`) as sent on the current connection."""
        self.sent += len(payload) // self.audio.frame_bytes

    @property
    def is_caught_up(self) -> bool:
        """Everything captured so far went to the current connection."""
        return self.sent >= self.audio.end

    async def send_audio(self, ws: Any, captured: asyncio.Event, is_source_done: Callable[[], bool]) -> None:
        """Send ``ws`` the kept audio it lacks, then live audio as ``captured`` signals it, and ``stop`` once
        ``is_source_done()`` and everything is sent. Cancelling loses nothing: unsent audio stays kept."""
        while True:
            captured.clear()
            for payload in self.unsent():
                await ws.send(payload)
                self.mark_sent(payload)
            if self.is_caught_up:
                if is_source_done():
                    await ws.send(Stop().to_json())
                    return
                await captured.wait()

    @property
    def session_audio_s(self) -> float:
        """Seconds of audio the session gets once everything captured is sent (compare with ``end.audio_s``)."""
        return (self.audio.end - self.session_began) / self.start.sample_rate
