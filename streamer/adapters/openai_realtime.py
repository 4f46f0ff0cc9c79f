"""OpenAI's realtime transcription API, ``WS /v1/realtime?intent=transcription``: an adapter on the session core.

Wire to core: the connection is a link (``core.connect(protocol="openai_realtime")``); ``session.update`` (GA)
and ``transcription_session.update`` (beta, ``OpenAI-Beta: realtime=v1``) set the session's format and turn
detection (:mod:`streamer.adapters.openai_session`); the first ``input_audio_buffer.append`` starts the core's
session with them (so audio sent before any update runs on the defaults ``session.created`` showed, as at
OpenAI), and each append's base64 PCM goes to ``push_audio``; ``input_audio_buffer.commit`` and ``.clear`` are
``finalize`` (a clear's text is then not sent). Core to wire: partials and finals become items
(:mod:`streamer.adapters.openai_turns`): ``input_audio_buffer.speech_started``/``speech_stopped``/
``committed``, ``conversation.item.input_audio_transcription.delta``/``.completed``; a ``Problem`` becomes an
``error`` event in OpenAI's shape, and bad input is refused the same way while the session goes on.

The session can wait (``live: false``): a client sending faster than the server recognizes is slowed down by
the socket, never thinned. The core's start deadline does not apply (a client may connect well before it talks);
the idle rule does: nothing received for ``server.idle_timeout_s`` ends the connection. The query parameter
``stream=NAME`` names the stream for captions and MQTT (else ``openai-<session id>``).
"""

from __future__ import annotations

import asyncio
import binascii
import json
import logging
from base64 import b64decode
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection

from streamer.adapters.openai_session import (
    ConfigProblem,
    RealtimeConfig,
    apply_update,
    beta_session,
    default_config,
    endpointing,
    ga_session,
    prompt_hotwords,
)
from streamer.adapters.openai_turns import Turns, new_id
from streamer.protocol import Final, Partial
from streamer.server.fanout import Outbox
from streamer.server.listen import CLOSE_CODES, next_message
from streamer.session import Ended, Event, Problem, Session, SessionCore, StartOptions
from streamer.settings import ServerSettings

logger = logging.getLogger(__name__)

AUDIO_EVENTS = ("input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear")
CLIENT_EVENTS = ("session.update", "transcription_session.update", *AUDIO_EVENTS)
SERVER_ERRORS = frozenset({"server_busy", "not_ready", "internal_error", "idle_timeout"})
MIN_COMMIT_S = 0.1  # OpenAI refuses to commit less audio than this


class WireEvent:
    """A server event for the connection's :class:`~streamer.server.fanout.Outbox` (which sends ``to_json()``)."""

    __slots__ = ("event",)

    def __init__(self, event: dict[str, Any]) -> None:
        self.event = {"type": event["type"], "event_id": new_id("event"), **event}

    def to_json(self) -> str:
        return json.dumps(self.event, ensure_ascii=False)


async def serve_realtime(core: SessionCore, settings: ServerSettings, ws: ServerConnection) -> None:
    """Handle one ``/v1/realtime`` connection until it ends."""
    connection = RealtimeConnection(core, settings, ws)
    session = core.connect(connection, protocol="openai_realtime", name_prefix="openai")
    if isinstance(session, Problem):
        await ws.send(WireEvent(_error(session.code, session.message)).to_json())
        await ws.close(1013, "not ready" if session.code == "not_ready" else "server busy")
        return
    try:
        await connection.run(session)
    finally:
        core.release(session)


def _error(code: str, message: str, param: str | None = None, event_id: str | None = None) -> dict[str, Any]:
    kind = "server_error" if code in SERVER_ERRORS else "invalid_request_error"
    return {"type": "error", "error": {"type": kind, "code": code, "message": message, "param": param,
                                       "event_id": event_id}}


class RealtimeConnection:
    """One realtime connection: client events to core calls, core events to server events (the session's sink).

    Args:
        core: the session core.
        settings: the ``[server]`` settings (send queue bound, timeouts).
        ws: the connection.
    """

    def __init__(self, core: SessionCore, settings: ServerSettings, ws: ServerConnection) -> None:
        self.core, self.settings, self.ws = core, settings, ws
        assert ws.request is not None
        self.beta = any("realtime=v1" in v for v in ws.request.headers.get_all("OpenAI-Beta"))
        self.stream = parse_qs(urlsplit(ws.request.path).query).get("stream", [None])[-1]  # None: openai-<id>
        self.outbox = Outbox(ws, settings.max_pending_messages, settings.close_timeout_s,
                             on_slow=core.metrics.slow_consumers_total.inc)
        self.config: RealtimeConfig = default_config(core.endpoint.trailing_silence_after_speech_s)
        self.session_id = new_id("sess")
        self.turns = Turns(vad=True)
        self._session: Session | None = None
        self._waits: set[asyncio.Task[None]] = set()
        self._commits = 0  # commits so far: each one's number pairs its answer with it
        self._context: tuple[str | None, str | None] = (None, None)  # param and client event id of an error

    # ------------------------------------------------------------------ core events -> server events

    def offer(self, event: Event, replay: bool = False) -> None:
        """The core's events as server events, queued in order (loop thread; never awaits)."""
        if isinstance(event, Partial):
            self._send(*self.turns.partial(event))
        elif isinstance(event, Final):
            self._send(*self.turns.final(event))
        elif isinstance(event, Problem):
            self._send(_error(event.code, event.message, *self._context))
        elif isinstance(event, Ended):
            self.outbox.close_after_queue(*CLOSE_CODES.get(event.reason, (1000, event.reason)))

    def _send(self, *events: dict[str, Any]) -> None:
        for event in events:
            self.outbox.offer(WireEvent(event))  # type: ignore[arg-type]  # the outbox only calls to_json()

    def _refuse(self, session: Session, code: str, message: str, param: str | None, event_id: str | None) -> None:
        """Refuse a client event: logged and counted by the core, sent back as an ``error`` event."""
        self._context = (param, event_id)
        try:
            session.error(code, message)
        finally:
            self._context = (None, None)

    # ------------------------------------------------------------------ the connection

    async def run(self, session: Session) -> None:
        """Say ``session.created``, then receive until the connection or the session ends."""
        self._session = session
        sender = asyncio.create_task(self.outbox.run(), name=f"openai-send-{session.id}")
        if self.beta:
            self._send({"type": "transcription_session.created", "session": beta_session(self.config,
                                                                                          self.session_id)})
        else:
            self._send({"type": "session.created", "session": ga_session(self.config, self.session_id)})
        try:
            await self._receive(session)
        finally:
            for task in self._waits:
                task.cancel()
            if session.is_open:  # the client closed or vanished: the open turn goes to the other sinks
                self.outbox.stop()
                await session.lost(resumable=False)
            if not sender.done():
                try:
                    async with asyncio.timeout(self.settings.close_timeout_s * 2):
                        await asyncio.shield(sender)
                except TimeoutError:
                    sender.cancel()

    async def _receive(self, session: Session) -> None:
        while session.is_open:
            message = await next_message(self.ws, session, self.settings.idle_timeout_s)
            if message is None:
                return
            try:
                await self._on_message(session, message)
            except Exception:
                logger.exception("session %s: handling a realtime event failed", session.id)
                self._refuse(session, "internal_error", f"the server failed to handle this event (a bug, logged "
                             f"as session {session.id}); it was discarded and the session goes on", None, None)

    async def _on_message(self, session: Session, message: str | bytes) -> None:
        if isinstance(message, bytes):
            self._refuse(session, "invalid_value", "binary frames are not part of the realtime API: send audio as "
                         "input_audio_buffer.append events with base64 PCM", None, None)
            return
        try:
            event = json.loads(message)
        except ValueError as exc:
            self._refuse(session, "invalid_json", f"the event is not valid JSON: {exc}", None, None)
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            self._refuse(session, "missing_required_parameter", "an event must be a JSON object with a 'type'",
                         "type", None)
            return
        kind, event_id = event["type"], event.get("event_id") if isinstance(event.get("event_id"), str) else None
        if kind in ("session.update", "transcription_session.update"):
            self._update(session, event, kind == "transcription_session.update", event_id)
        elif kind == "input_audio_buffer.append":
            await self._append(session, event.get("audio"), event_id)
        elif kind in ("input_audio_buffer.commit", "input_audio_buffer.clear"):
            self._commit(session, kind == "input_audio_buffer.clear", event_id)
        else:
            what = "is not available in a transcription session" if kind.split(".")[0] in (
                "response", "conversation", "output_audio_buffer") else "is not a client event"
            self._refuse(session, "invalid_value", f"{kind[:64]!r} {what}; supported: {', '.join(CLIENT_EVENTS)}",
                         "type", event_id)

    def _update(self, session: Session, event: dict[str, Any], beta: bool, event_id: str | None) -> None:
        try:
            config = apply_update(self.config, event.get("session"), beta)
        except ConfigProblem as exc:
            self._refuse(session, "invalid_value", str(exc), exc.param, event_id)
            return
        if session.is_started and (config.rate_hz != self.config.rate_hz or
                                   endpointing(config) != endpointing(self.config)):
            self._refuse(session, "session_in_progress", "the audio format and turn detection cannot change once "
                         "audio was appended; open a new connection for other settings", "session", event_id)
            return
        self.config = config
        self.turns.vad = config.turn_detection is not None
        if beta:
            self._send({"type": "transcription_session.updated", "session": beta_session(config, self.session_id)})
        else:
            self._send({"type": "session.updated", "session": ga_session(config, self.session_id)})

    async def _append(self, session: Session, audio: Any, event_id: str | None) -> None:
        if not isinstance(audio, str):
            self._refuse(session, "missing_required_parameter", "input_audio_buffer.append needs 'audio': base64 of "
                         "16-bit little-endian PCM", "audio", event_id)
            return
        try:
            data = b64decode(audio, validate=True)
        except (binascii.Error, ValueError) as exc:
            self._refuse(session, "invalid_value", f"'audio' is not valid base64 ({exc}); send base64 of 16-bit "
                         "little-endian PCM", "audio", event_id)
            return
        if not session.is_started:
            hotwords = prompt_hotwords(self.config.transcription.get("prompt"), self.core.limits.max_hotwords)
            await session.begin(StartOptions(self.config.rate_hz, "pcm_s16le", 1, self.stream, live=False,
                                             endpointing=endpointing(self.config), hotwords=hotwords))
            if not session.is_started:
                return  # the core said why (an error event); the audio is not taken
        if session.is_open and data:
            await session.push_audio(data)

    def _commit(self, session: Session, cleared: bool, event_id: str | None) -> None:
        at_s = session.received_s
        if not cleared and at_s - self.turns.boundary_s < MIN_COMMIT_S:
            self._refuse(session, "input_audio_buffer_commit_empty", f"the buffer holds "
                         f"{max(0.0, at_s - self.turns.boundary_s) * 1000:.0f} ms of audio not yet committed; a "
                         f"commit needs at least {MIN_COMMIT_S * 1000:.0f} ms", None, event_id)
            return
        if not session.is_started:  # a clear before any audio: nothing to drop
            self._send({"type": "input_audio_buffer.cleared"})
            return
        done = session.finalize()
        self._commits += 1
        request = self._commits
        self._send(*self.turns.commit(at_s, request, cleared))
        task = asyncio.create_task(self._answer_commit(done, request), name=f"openai-commit-{session.id}")
        self._waits.add(task)
        task.add_done_callback(self._waits.discard)

    async def _answer_commit(self, done: asyncio.Event, request: int) -> None:
        await done.wait()  # the cut is made: its final, if the turn had speech, was offered first
        self._send(*self.turns.carried_out(request))
