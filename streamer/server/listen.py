"""One ``/v1/listen`` connection and the session it carries (protocol: :mod:`streamer.protocol`).

A :class:`ListenSession` turns a client's frames into audio for its engine channel (through its
:class:`~streamer.server.listen_audio.SessionAudio`) and results (through the :class:`~streamer.server.hub.Hub`
and the session's :class:`~streamer.server.resume.ResultLog`) back into messages. When the connection breaks
without ``stop``, the session is held for ``server.resume_window_s``; a new connection that resumes it takes
its state over (the rules of holding and of a resume after a restart: :mod:`streamer.server.resume`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import uuid
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from streamer.audio.convert import PcmConverter
from streamer.errors import AudioError, ConfigError
from streamer.protocol import (
    ClientMessage,
    End,
    Error,
    Final,
    Finalize,
    KeepAlive,
    MessageError,
    Ready,
    Resume,
    Start,
    Stop,
    parse_client_message,
)
from streamer.protocol import Warning as WarningMessage
from streamer.server.fanout import Outbox
from streamer.server.listen_audio import SessionAudio
from streamer.server.resume import ResultLog, may_hold, new_token, orphan_replay, start_mismatch
from streamer.server.session_journal import Orphan, SessionStore

if TYPE_CHECKING:
    from collections.abc import Callable

    from streamer.engine.channel import Channel
    from streamer.engine.endpoint import EndpointConfig
    from streamer.engine.scheduler import Scheduler
    from streamer.server.fanout import Hub
    from streamer.server.metrics import Metrics
    from streamer.settings import ServerSettings

logger = logging.getLogger(__name__)


class Phase(enum.Enum):
    AWAITING_START = "awaiting start"
    STREAMING = "streaming"
    HELD = "held"  # the connection broke; the session waits resume_window_s for its client
    MOVED = "moved"  # the session was resumed on another connection; this one only winds down
    ENDING = "ending"


@dataclasses.dataclass(frozen=True, slots=True)
class ListenServices:
    """What a :class:`ListenSession` uses of the server that accepted its connection.

    Attributes:
        settings: the ``[server]`` settings (caps, timeouts, ``resume_window_s``).
        scheduler: opens, feeds and closes engine channels.
        hub: result fan-out; the session registers its :class:`ResultLog` as the stream's source.
        metrics: the metrics registry.
        endpoint: the default endpointing rules (``start`` may override some).
        model_info: ``model``, ``att_context_size``, ``chunk_s`` for ``ready`` messages.
        find_resumable: the session a ``resume`` names and may take over, or None and why not.
        is_full_for_new_session: True when a new session would exceed ``max_sessions``.
        sessions: the journal of what a resume may replay after a restart (and the previous run's orphans).
    """

    settings: ServerSettings
    scheduler: Scheduler
    hub: Hub
    metrics: Metrics
    endpoint: EndpointConfig
    model_info: dict[str, Any]
    find_resumable: Callable[[Resume], tuple[ListenSession | None, str | None]]
    is_full_for_new_session: Callable[[], bool]
    sessions: SessionStore


class ListenSession:
    """One ``/v1/listen`` connection and the session it carries; see :mod:`streamer.protocol`.

    A session outlives a broken connection for ``server.resume_window_s`` (phase ``HELD``); a new
    connection's ``ListenSession`` that resumes it takes its state over (:meth:`_resume`) and this one
    ends (``MOVED``).
    """

    def __init__(self, services: ListenServices, ws: ServerConnection) -> None:
        self.services, self.ws = services, ws
        self.id = uuid.uuid4().hex[:12]
        cfg = services.settings
        self.outbox = Outbox(
            ws, cfg.max_pending_messages, cfg.close_timeout_s, on_slow=services.metrics.slow_consumers_total.inc
        )
        self.phase = Phase.AWAITING_START
        self.channel: Channel | None = None
        self.audio: SessionAudio | None = None
        self.stream = ""
        # the session's state a resume carries over (besides the channel, audio and stream above)
        self.start: Start | None = None
        self.results = ResultLog(cfg.max_pending_messages, on_final=self._journal_final)
        self.resume_token: str | None = None
        self.spent_tokens: set[str] = set()
        self._released = asyncio.Event()  # a held session was resumed or ended

    async def run(self) -> None:
        sender = asyncio.create_task(self.outbox.run(), name=f"ws-send-{self.id}")
        try:
            await self._receive()
        finally:
            if self.phase in (Phase.AWAITING_START, Phase.STREAMING):  # the client vanished, or the connection broke
                self.outbox.stop()
                if self.phase is Phase.STREAMING and may_hold(self.ws, self.services.settings.resume_window_s,
                                                              self.outbox.is_slow):
                    self._hold()
                else:
                    self.phase = Phase.ENDING
                    await self._flush("disconnect", detach_first=True)
            if not sender.done():
                try:
                    async with asyncio.timeout(self.services.settings.close_timeout_s * 2):
                        await asyncio.shield(sender)
                except TimeoutError:
                    sender.cancel()
            if self.phase is Phase.HELD:
                await self._wait_for_resume()

    async def _receive(self) -> None:
        idle_s = self.services.settings.idle_timeout_s
        while self.phase is Phase.AWAITING_START or self.phase is Phase.STREAMING:
            try:
                async with asyncio.timeout(idle_s):
                    message = await self.ws.recv()
            except TimeoutError:
                self._error("idle_timeout", f"nothing received for {idle_s:g} s; the session is closed")
                await self.end("idle", 1008, "idle timeout")
                return
            except ConnectionClosed:
                return
            if isinstance(message, str):
                await self._on_text(message)
            else:
                await self._on_audio(message)

    async def _on_text(self, text: str) -> None:
        """Handle one text message. Whatever fails is answered with an error and the session goes on: a
        refused message with its code, a bug (any other exception) with ``internal_error``, logged with its
        traceback; neither reaches the connection handler (which would close with 1011)."""
        if self.phase is not Phase.AWAITING_START and self.phase is not Phase.STREAMING:
            return
        what = "text message"
        try:
            msg = parse_client_message(text)
            what = f"{msg.type!r} message"
            await self._dispatch(msg)
        except MessageError as exc:
            self._error(exc.code, str(exc))
        except Exception:
            logger.exception("session %s: handling a %s failed", self.id, what)
            self._error("internal_error", f"the server failed to handle this {what} (a bug, logged as session "
                        f"{self.id}); the message was discarded and the session goes on")

    async def _dispatch(self, msg: ClientMessage) -> None:
        if isinstance(msg, Start):
            self._on_start(msg)
        elif isinstance(msg, KeepAlive):
            pass
        elif self.channel is None:
            self._error("no_start", f"{msg.type!r} before 'start'; send a 'start' message first")
        elif isinstance(msg, Finalize):
            self.channel.finalize()
            self.services.scheduler.poke(self.channel)
        elif isinstance(msg, Stop):
            await self.end("stop", 1000, "end of stream")

    def _on_start(self, start: Start) -> None:
        if self.channel is not None:
            self._error("already_started", "this session has started already; open a new connection for a new stream")
            return
        if start.resume is not None:
            if self._resume(start, start.resume):
                return
            start = dataclasses.replace(start, resume=None)  # what failed was said; go on with a new session
        try:
            converter = PcmConverter(start.sample_rate, start.encoding, start.channels)
            endpoint = self.services.endpoint.with_overrides(start.endpointing)
        except AudioError as exc:
            self._error("unsupported_audio", str(exc))
            return
        except ConfigError as exc:
            self._error("bad_message", str(exc))
            return
        name = start.stream or f"ws-{self.id}"
        if name in self.services.scheduler.channels:
            self._error("stream_in_use", f"stream {name!r} is already sent by another source; choose another name")
            return
        if self.services.is_full_for_new_session():
            self._refuse_busy()
            return
        try:
            channel = self.services.scheduler.open(name, endpoint, is_live=start.live)
        except ValueError as exc:  # every channel is taken (sessions + microphone + file)
            self._error("server_busy", f"cannot open stream {name!r}: {exc}; try again later")
            return
        self.channel, self.stream, self.start = channel, name, start
        self.audio = SessionAudio(converter, self.services.scheduler)
        self.phase = Phase.STREAMING
        self.outbox.set_interim_results(start.interim_results)
        self.results.attach(self.outbox, 0)
        self.services.hub.set_source(name, self.results)
        self.services.metrics.sessions_total.inc()
        self.outbox.offer(self._ready(resumed=False))
        logger.info("session %s: stream %s, %d Hz %s x%d", self.id, name, start.sample_rate, start.encoding,
                    start.channels)

    def _ready(self, resumed: bool) -> Ready:
        assert self.channel is not None and self.start is not None
        info, window_s = self.services.model_info, self.services.settings.resume_window_s
        extra: dict[str, Any] = {}
        if window_s > 0:  # a server without resume sends exactly the ready it always did
            if self.resume_token is not None:
                self.spent_tokens.add(self.resume_token)
            self.resume_token = new_token()
            self.services.sessions.token(self.id, self.stream, self.resume_token)
            extra = {"resume_token": self.resume_token, "resume_window_s": window_s, "resumed": resumed,
                     "audio_s": self._received_s()}
        return Ready(self.id, self.stream, info["model"], info["att_context_size"], self.start.sample_rate,
                     info["chunk_s"], self.channel.endpoint.to_dict(), live=self.channel.is_live, **extra)

    def _received_s(self) -> float:
        """Seconds of whole sample frames received in the session, unrounded: times the sample rate it is a
        whole number."""
        return self.audio.received_s if self.audio is not None else 0.0

    # ------------------------------------------------------------------ resume

    def _hold(self) -> None:
        """Keep the session for its client: results wait in the log, the channel stays open."""
        self.phase = Phase.HELD
        self.results.detach()
        logger.info("session %s: connection lost; stream %s is kept %g s for a resume", self.id, self.stream,
                    self.services.settings.resume_window_s)

    async def _wait_for_resume(self) -> None:
        """Wait out the resume window; unless the session was resumed or ended meanwhile, end it as a disconnect.

        Cancelling stops the wait and leaves the session held (the server's shutdown ends it).
        """
        try:
            async with asyncio.timeout(self.services.settings.resume_window_s):
                await self._released.wait()
        except TimeoutError:
            pass
        if self.phase is Phase.HELD:
            logger.info("session %s: not resumed within %g s; ending it", self.id,
                        self.services.settings.resume_window_s)
            self.phase = Phase.ENDING
            await self._flush("disconnect", detach_first=True)

    def _resume(self, start: Start, resume: Resume) -> bool:
        """Take over the session ``resume`` names; False (after error ``resume_failed``) when it cannot be."""
        held, problem = self.services.find_resumable(resume)
        if held is not None and held.start is not None:
            problem = start_mismatch(held.start, held.stream, start)
        if held is None and (orphan := self.services.sessions.take_orphan(resume.session, resume.token)):
            self._replay_orphan(orphan, resume.next_segment)
            return False
        if held is None or problem is not None:
            self._error("resume_failed", f"cannot resume session {resume.session!r}: {problem}; "
                        "starting a new session instead")
            return False
        if held.phase is Phase.STREAMING:  # the client is back before the server saw its old connection die
            logger.info("session %s: resumed while its old connection looked open; dropping that one", held.id)
            held.outbox.stop()
            held._hold()
            held.ws.transport.abort()
        self.id, self.channel, self.audio, self.stream = held.id, held.channel, held.audio, held.stream
        self.start, self.results = held.start, held.results
        if self.audio is not None:  # the client re-sends whole sample frames from audio_s on
            self.audio.resume()
        self.resume_token, self.spent_tokens = held.resume_token, held.spent_tokens
        held.phase, held.channel = Phase.MOVED, None
        held._released.set()
        self.phase = Phase.STREAMING
        self.outbox.set_interim_results(start.interim_results)
        self.services.metrics.sessions_resumed_total.inc()
        self.outbox.offer(self._ready(resumed=True))
        replayed = self.results.attach(self.outbox, resume.next_segment)
        self.services.hub.set_source(self.stream, self.results)
        logger.info("session %s: resumed on a new connection at %.3f s of audio; %d result(s) replayed", self.id,
                    self._received_s(), replayed)
        return True

    def _replay_orphan(self, orphan: Orphan, next_segment: int) -> None:
        """A session of the daemon's previous run (it restarted): say so, then replay the finals it kept."""
        reason, replay = orphan_replay(orphan, next_segment)
        self._error("resume_failed", reason)
        for msg in replay:
            self.outbox.offer(msg, replay=True)
        logger.info("session %s: resumed after a restart of the server: %d final(s) replayed, a new session follows",
                    orphan.session, sum(isinstance(msg, Final) for msg in replay))

    def _journal_final(self, final: Final) -> None:
        self.services.sessions.final(self.id, final)

    # ------------------------------------------------------------------ audio, errors, the end

    async def _on_audio(self, frame: bytes) -> None:
        """Convert a frame and write it to the channel; a session that can wait waits here for room, and while
        it waits nothing more is read from the socket, so TCP slows the client down (back-pressure)."""
        if self.phase is not Phase.STREAMING and self.phase is not Phase.AWAITING_START:
            return
        if self.channel is None or self.audio is None:
            self._error("no_start", "audio before 'start'; send a 'start' message first (the frame was dropped)")
            return
        if not frame:
            self.outbox.offer(WarningMessage("empty_frame", "an empty binary frame carries no audio; it was ignored",
                                      self.stream))
            return
        audio, channel = self.audio, self.channel
        try:
            samples, first_clipping = audio.convert(frame)
        except AudioError as exc:
            self._error("bad_audio", str(exc))
            return
        except Exception:  # a bug: said and logged like one in a text message, never a 1011 for the session
            logger.exception("session %s: converting an audio frame of %d bytes failed", self.id, len(frame))
            self._error("internal_error", f"the server failed to convert this audio frame (a bug, logged as session "
                        f"{self.id}); the frame was discarded and the session goes on")
            return
        if first_clipping:
            self.outbox.offer(WarningMessage(
                "audio_clipped", "pcm_f32le samples must lie in [-1, 1]; louder ones were clipped (said once per "
                "session)", self.stream))
        await audio.write(channel, samples)

    def _error(self, code: str, message: str) -> None:
        logger.info("session %s: %s: %s", self.id, code, message)
        self.services.metrics.protocol_errors_total.inc(label_value=code)
        self.outbox.offer(Error(code, message, self.stream or None))

    def _refuse_busy(self) -> None:
        cap = self.services.settings.max_sessions
        self.services.metrics.sessions_refused_total.inc(label_value="listen")
        self._error("server_busy", f"the server has {cap} sessions open, its maximum, counting sessions kept for "
                    "their clients to reconnect; try again later")
        self.phase = Phase.ENDING
        self.outbox.close_after_queue(1013, "server busy")

    async def end(self, reason: str, code: int, close_reason: str) -> None:
        """Flush the last segment (its final reaches the client first), send ``end``, close with ``code``.

        A held session has no client: its final goes to the other sinks only.
        """
        if self.phase is Phase.ENDING or self.phase is Phase.MOVED:
            return
        was_held = self.phase is Phase.HELD
        self.phase = Phase.ENDING
        self._released.set()
        # A session held for its client when the daemon stops stays in the journal: the client may resume it
        # after the restart and get the finals it missed.
        await self._flush(reason, detach_first=False, forget=not (was_held and reason == "shutdown"))
        if was_held:
            return
        if self.channel is not None and self.audio is not None:
            dropped_s = self.channel.dropped_samples / self.channel.sample_rate_hz
            self.outbox.offer(End(self.stream, self.channel.segmenter.segment, round(self._received_s(), 3),
                                  round(dropped_s, 3), self.audio.incomplete_bytes or None))
        self.outbox.close_after_queue(code, close_reason)

    async def _flush(self, reason: str, detach_first: bool, forget: bool = True) -> None:
        """Close the channel, its last final first; ``forget``: the session is over, its journal entry goes."""
        channel = self.channel
        if channel is None:
            return
        if detach_first:
            self.services.hub.set_source(self.stream, None)  # nobody to send to: finals go to the other sinks
        elif self.audio is not None and not channel.is_closing:
            await self.audio.write_tail(channel, self.id)
        await self.services.scheduler.close(channel, reason)
        self.services.hub.set_source(self.stream, None)
        if forget:
            self.services.sessions.end(self.id)
