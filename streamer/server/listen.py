"""Protocol v1 on ``/v1/listen`` (:mod:`streamer.protocol`): one WebSocket connection, a thin adapter on the
session core (:mod:`streamer.session`).

Frames in, core calls out: a text message is parsed into ``start`` (→ :meth:`Session.start
<streamer.session.machine.Session.start>` with :class:`~streamer.session.events.StartOptions` and a
:class:`~streamer.session.events.ResumeRequest`), ``finalize``, ``stop`` or ``keepalive``; a binary frame is
audio (→ :meth:`Session.push_audio <streamer.session.machine.Session.push_audio>`). Core events in, v1 messages out:
``Opened`` → ``ready``, ``Problem`` → ``error``, ``Ended`` → ``end`` (when a session ran) and the close code
its reason maps to, ``Moved`` → ``moved`` and close 1012, ``Superseded`` → the connection is dropped; partials,
finals and warnings go as they are.

What is v1's own and stays here: the connection's :class:`~streamer.server.fanout.Outbox` (its send queue and
slow-consumer rule), the idle timeout, the wording of ``no_start``, ``internal_error`` for a failure while
handling a message, the close codes, and what a close frame means for a resume (:func:`may_hold`).
Sessions, caps, resume, resampling, endpointing and metrics are the core's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from streamer.protocol import (
    ClientMessage,
    End,
    Error,
    Finalize,
    KeepAlive,
    MessageError,
    Ready,
    Start,
    Stop,
    parse_client_message,
)
from streamer.protocol import Moved as ProtocolMoved
from streamer.server.fanout import Outbox
from streamer.session import (
    Accounting,
    Ended,
    Event,
    Moved,
    Opened,
    Problem,
    ResumeRequest,
    Session,
    SessionCore,
    StartOptions,
    Superseded,
)

if TYPE_CHECKING:
    from streamer.server.metrics import Metrics
    from streamer.settings import ServerSettings

logger = logging.getLogger(__name__)

# How each way a session ends closes the connection (after its last messages).
CLOSE_CODES: dict[str, tuple[int, str]] = {
    "stop": (1000, "end of stream"),
    "shutdown": (1001, "server shutting down"),
    "idle": (1008, "idle timeout"),
    "start_timeout": (1008, "start timeout"),
    "server_busy": (1013, "server busy"),
    "moved": (1012, "moved: resume on another server"),
}


async def serve_listen(core: SessionCore, settings: ServerSettings, metrics: Metrics, ws: ServerConnection) -> None:
    """Handle one ``/v1/listen`` connection until it and its session (held for a resume, too) are done."""
    connection = ListenConnection(settings, metrics, ws)
    session = core.connect(connection, protocol="listen", name_prefix="ws")
    if isinstance(session, Problem):
        await ws.send(Error(session.code, session.message).to_json())
        await ws.close(1013, "not ready" if session.code == "not_ready" else "server busy")
        return
    deadline = asyncio.create_task(session.start_deadline(), name=f"ws-start-deadline-{ws.id}")
    try:
        await connection.run(session)
    finally:
        deadline.cancel()
        core.release(session)


def may_hold(ws: ServerConnection, is_slow: bool) -> bool:
    """True when ``ws`` broke in a way that lets a resume continue its session.

    A close frame from the client means it hung up; a close for a slow consumer (``is_slow``) or a frame too
    large is the server's verdict. Neither is held. A drop without a close frame (or a keepalive timeout) is.
    """
    closing = ws.protocol
    if is_slow or closing.close_rcvd is not None:
        return False
    sent = closing.close_sent
    return sent is None or sent.code not in (CloseCode.POLICY_VIOLATION, CloseCode.MESSAGE_TOO_BIG)


def start_options(start: Start) -> StartOptions:
    """A v1 ``start`` as the core's options."""
    return StartOptions(start.sample_rate, start.encoding, start.channels, start.stream, start.interim_results,
                        start.live, start.endpointing, hotwords=start.hotwords or (),
                        hotword_weight=start.hotword_weight)


def ready_message(opened: Opened) -> Ready:
    """``Opened`` as v1's ``ready``: a server without resume sends exactly the ready it always did."""
    model = opened.model
    if opened.resume_window_s <= 0:
        return Ready(opened.session, opened.stream, model.model, model.att_context_size, opened.sample_rate,
                     model.chunk_s, opened.endpointing, live=opened.live, hotwords=opened.hotwords,
                     hotword_weight=opened.hotword_weight, latency_s=model.latency_s)
    return Ready(opened.session, opened.stream, model.model, model.att_context_size, opened.sample_rate,
                 model.chunk_s, opened.endpointing, resume_token=opened.resume_token,
                 resume_window_s=opened.resume_window_s, resumed=opened.resumed, audio_s=opened.received_s,
                 live=opened.live, hotwords=opened.hotwords, hotword_weight=opened.hotword_weight,
                 latency_s=model.latency_s)


def end_message(accounting: Accounting) -> End:
    """The accounting as v1's ``end`` (milliseconds; ``incomplete_bytes`` only when there are some)."""
    return End(accounting.stream, accounting.segments, round(accounting.received_s, 3),
               round(accounting.dropped_s, 3), accounting.incomplete_bytes or None)


class ListenConnection:
    """One ``/v1/listen`` connection: v1 frames to core calls, core events to v1 messages (the session's sink).

    Args:
        settings: the ``[server]`` settings (send queue bound, timeouts).
        metrics: the metrics registry (slow consumers).
        ws: the connection.
    """

    def __init__(self, settings: ServerSettings, metrics: Metrics, ws: ServerConnection) -> None:
        self.settings, self.ws = settings, ws
        self.outbox = Outbox(ws, settings.max_pending_messages, settings.close_timeout_s,
                             on_slow=metrics.slow_consumers_total.inc)
        self.session: Session | None = None

    def offer(self, event: Event, replay: bool = False) -> None:
        """The core's events as v1 messages, queued in order (loop thread; never awaits)."""
        if isinstance(event, Opened):
            self.outbox.offer(ready_message(event), replay)
        elif isinstance(event, Problem):
            self.outbox.offer(Error(event.code, event.message, event.stream), replay)
        elif isinstance(event, Ended):
            if event.accounting is not None:
                self.outbox.offer(end_message(event.accounting))
            self.outbox.close_after_queue(*CLOSE_CODES.get(event.reason, (1000, event.reason)))
        elif isinstance(event, Moved):  # a drain moved the session: the client resumes on another replica
            self.outbox.offer(ProtocolMoved(event.session, event.stream, event.resume_token,
                                            round(event.audio_s, 6), event.next_segment))
            self.outbox.close_after_queue(*CLOSE_CODES["moved"])
        elif isinstance(event, Superseded):  # resumed on another connection: this one is dropped
            self.outbox.stop()
            self.ws.transport.abort()
        else:
            self.outbox.offer(event, replay)

    async def run(self, session: Session) -> None:
        """Receive until the connection or the session ends; then, if the session is held, wait out its window."""
        self.session = session
        sender = asyncio.create_task(self.outbox.run(), name=f"ws-send-{session.id}")
        try:
            await self._receive(session)
        finally:
            if session.is_open:  # the client vanished, or the connection broke
                self.outbox.stop()
                await session.lost(resumable=may_hold(self.ws, self.outbox.is_slow))
            if not sender.done():
                try:
                    async with asyncio.timeout(self.settings.close_timeout_s * 2):
                        await asyncio.shield(sender)
                except TimeoutError:
                    sender.cancel()
            await session.wait_for_resume()

    async def _receive(self, session: Session) -> None:
        while session.is_open:
            message = await next_message(self.ws, session, self.settings.idle_timeout_s)
            if message is None:
                return
            if isinstance(message, str):
                await self._on_text(session, message)
            else:
                await self._on_audio(session, message)

    async def _on_text(self, session: Session, text: str) -> None:
        """Handle one text message. Whatever fails is answered with an error and the session goes on: a
        refused message with its code, a bug (any other exception) with ``internal_error``, logged with its
        traceback; neither reaches the connection handler (which would close with 1011)."""
        if not session.is_open:
            return
        what = "text message"
        try:
            msg = parse_client_message(text)
            what = f"{msg.type!r} message"
            await self._dispatch(session, msg)
        except MessageError as exc:
            session.error(exc.code, str(exc))
        except Exception:
            logger.exception("session %s: handling a %s failed", session.id, what)
            session.error("internal_error", f"the server failed to handle this {what} (a bug, logged as session "
                          f"{session.id}); the message was discarded and the session goes on")

    async def _dispatch(self, session: Session, msg: ClientMessage) -> None:
        if isinstance(msg, Start):
            resume = msg.resume
            await session.begin(start_options(msg), None if resume is None else
                                ResumeRequest(resume.session, resume.token, resume.next_segment))
        elif isinstance(msg, KeepAlive):
            pass
        elif not session.is_started:
            session.error("no_start", f"{msg.type!r} before 'start'; send a 'start' message first")
        elif isinstance(msg, Finalize):
            session.finalize()
        elif isinstance(msg, Stop):
            await session.stop()

    async def _on_audio(self, session: Session, frame: bytes) -> None:
        """Audio for the session; a session that can wait waits in ``session.push_audio`` for room, and while it waits
        nothing more is read from the socket, so TCP slows the client down (back-pressure)."""
        if not session.is_open:
            return
        if not session.is_started:
            session.error("no_start", "audio before 'start'; send a 'start' message first (the frame was dropped)")
            return
        await session.push_audio(frame)


async def next_message(ws: ServerConnection, session: Session, idle_s: float) -> str | bytes | None:
    """The connection's next message; None when it closed, or when nothing came for ``idle_s`` (the session is then
    told ``idle_timeout`` and ended as idle). Shared by the WebSocket adapters whose sessions time out the same way."""
    try:
        async with asyncio.timeout(idle_s):
            return await ws.recv()
    except TimeoutError:
        session.error("idle_timeout", f"nothing received for {idle_s:g} s; the session is closed")
        await session.end("idle")
        return None
    except ConnectionClosed:
        return None
