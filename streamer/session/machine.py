"""One client's session, as a phase machine driven by method calls (the design: :mod:`streamer.session.core`).

A :class:`Session` is one client link's view of a recognition session. It starts one (or resumes a held
one), takes the client's audio bytes, finalize and stop, and offers the link's
:class:`~streamer.session.events.ClientSink` everything the client is to hear, in order. When the link
breaks without a stop, the session is held for ``resume_window_s`` (phase ``HELD``); a new link's
:class:`Session` that resumes it takes its state over (:meth:`Session.start` with a
:class:`~streamer.session.events.ResumeRequest`) and the old one is ``MOVED``.

Exactly one final per segment: the stream's engine channel makes a final when a segment ends and at most
one last final when it is closed; the session closes it exactly once (``stop``, ``end``, or the end of a
held window), and while the client is away the finals wait in the :class:`~streamer.session.results.ResultLog`
and reach it once on a resume.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import uuid
from typing import TYPE_CHECKING, Protocol

from streamer.audio.convert import PcmConverter
from streamer.errors import AudioError, ConfigError
from streamer.protocol import STREAM_NAME, Final, MessageError, Partial, check_hotword_weight, check_hotwords
from streamer.protocol import Warning as WarningMessage
from streamer.session.audio import SessionAudio
from streamer.session.claim import start_claimed
from streamer.session.events import (
    Accounting,
    Carried,
    ClientSink,
    Ended,
    Event,
    ModelInfo,
    Opened,
    Problem,
    ResultRouter,
    ResumeRequest,
    StartOptions,
    Superseded,
)
from streamer.session.results import ResultLog, new_token, orphan_replay, start_mismatch

if TYPE_CHECKING:
    from streamer.engine.channel import Channel
    from streamer.engine.endpoint import EndpointConfig
    from streamer.engine.scheduler import Scheduler
    from streamer.server.metrics import Metrics
    from streamer.server.session_journal import Orphan, SessionStore
    from streamer.server.stream_leases import StreamLeases
    from streamer.session.limits import SessionLimits

logger = logging.getLogger("streamer.session")


class Phase(enum.Enum):
    AWAITING_START = "awaiting start"
    STREAMING = "streaming"
    HELD = "held"  # the link broke; the session waits resume_window_s for its client
    MOVED = "moved"  # the session was resumed on another link; this one only winds down
    ENDING = "ending"


class CrossReplica(Protocol):
    """What a session uses of :class:`streamer.session.failover.Failover` (its type here would be an import cycle)."""

    def issue(self, session: Session) -> str: ...

    def on_final(self, session: Session, final: Final) -> None: ...

    def forget(self, session_id: str) -> None: ...


class Registry(Protocol):
    """What a session uses of the :class:`~streamer.session.core.SessionCore` that made it."""

    limits: SessionLimits
    scheduler: Scheduler
    hub: ResultRouter
    metrics: Metrics
    endpoint: EndpointConfig
    model: ModelInfo
    journal: SessionStore
    leases: StreamLeases | None
    failover: CrossReplica | None

    def find_resumable(self, resume: ResumeRequest) -> tuple[Session | None, str | None]: ...

    def is_full_for_new_session(self) -> bool: ...


class Session:
    """One client link and the session it carries; see the module docstring.

    Args:
        core: the registry it belongs to (caps, collaborators).
        sink: where this link's events go.
        protocol: the adapter's name (metrics labels).
        name_prefix: an unnamed stream is called ``<name_prefix>-<session id>``.
    """

    def __init__(self, core: Registry, sink: ClientSink, protocol: str, name_prefix: str) -> None:
        self.core, self._sink, self.protocol, self._name_prefix = core, sink, protocol, name_prefix
        self.id = uuid.uuid4().hex[:12]
        self.phase = Phase.AWAITING_START
        self.channel: Channel | None = None
        self.audio: SessionAudio | None = None
        self.stream = ""
        # the session's state a resume carries over (besides the channel, audio and stream above)
        self.options: StartOptions | None = None
        self.results = ResultLog(core.limits.max_kept_results, on_final=self._journal_final)
        self.resume_token: str | None = None
        self.spent_tokens: set[str] = set()
        self._interim_results = True
        self._released = asyncio.Event()  # a held session was resumed or ended
        self.is_taking_over = False  # its start resumes another replica's session (and may wait for its lease)

    @property
    def is_open(self) -> bool:
        """True while the client may still send (awaiting start, or streaming)."""
        return self.phase is Phase.AWAITING_START or self.phase is Phase.STREAMING

    @property
    def is_started(self) -> bool:
        """True once this link carries a session (started or resumed) that has not moved on."""
        return self.channel is not None

    def offer(self, event: Event, replay: bool = False) -> None:
        """Pass one event to the link's sink (the result log calls this too); partials only if asked for."""
        if self._interim_results or not isinstance(event, Partial):
            self._sink.offer(event, replay)

    def error(self, code: str, message: str) -> None:
        """Tell the client of a refused message or frame (the session goes on), logged and counted."""
        logger.info("session %s: %s: %s", self.id, code, message)
        self.core.metrics.protocol_errors_total.inc(label_value=code)
        self.offer(Problem(code, message, self.stream or None))

    # ------------------------------------------------------------------ start

    def start(self, options: StartOptions, resume: ResumeRequest | None = None) -> None:
        """Start a session (or resume the held one ``resume`` names); the client hears ``Opened`` or a
        ``Problem`` (and, when the session cap is reached, ``Ended``). Call only while :attr:`is_open`."""
        if not self.is_open:
            raise RuntimeError(f"start on a link in phase {self.phase.value!r}; check is_open first")
        if self.channel is not None:
            self.error("already_started", "this session has started already; open a new connection for a new stream")
            return
        if resume is not None and self._resume(options, resume):
            return  # otherwise what failed was said; go on with a new session
        name = self.stream_name(options)
        opened = self._open_stream(options, name)
        if opened is None:
            return
        channel, converter = opened
        self.channel, self.stream, self.options = channel, name, options
        self.audio = SessionAudio(converter, self.core.scheduler)
        self.phase = Phase.STREAMING
        self._interim_results = options.interim_results
        self.results.attach(self, 0)
        self.core.hub.set_source(name, self.results)
        self.core.metrics.sessions_total.inc(label_value=self.protocol)
        self.offer(self._opened(resumed=False))
        compiled = channel.hotwords
        if compiled is not None and compiled.unspellable:
            self.offer(WarningMessage(
                "hotwords_ignored", f"the model's vocabulary cannot spell {len(compiled.unspellable)} hotword(s), "
                f"which are not boosted: {', '.join(repr(p) for p in compiled.unspellable[:10])}"
                f"{' ...' if len(compiled.unspellable) > 10 else ''}", name))
        logger.info("session %s: stream %s, %d Hz %s x%d, %d hotword(s)", self.id, name, options.sample_rate,
                    options.encoding, options.channels, len(options.hotwords))

    def _open_stream(self, options: StartOptions, name: str) -> tuple[Channel, PcmConverter] | None:
        """Check ``options`` and open stream ``name``'s engine channel; None after saying what is wrong."""
        try:
            converter = PcmConverter(options.sample_rate, options.encoding, options.channels)
            endpoint = self.core.endpoint.with_overrides(options.endpointing)
            hotwords = check_hotwords(list(options.hotwords), self.core.limits.max_hotwords)
            weight = self.core.limits.hotword_weight if options.hotword_weight is None else \
                check_hotword_weight(options.hotword_weight)
        except AudioError as exc:
            self.error("unsupported_audio", str(exc))
            return None
        except ConfigError as exc:
            self.error("bad_message", str(exc))
            return None
        except MessageError as exc:
            self.error(exc.code, str(exc))
            return None
        if not STREAM_NAME.fullmatch(name):
            self.error("bad_message", f"stream name {name!r} is not valid: letters, digits, '_', '.', '-', at most 64")
            return None
        scheduler = self.core.scheduler
        if name in scheduler.channels:
            self.error("stream_in_use", f"stream {name!r} is already sent by another source; choose another name")
            return None
        if self.core.is_full_for_new_session():
            self._refuse_busy()
            return None
        try:
            channel = scheduler.open(name, endpoint, is_live=options.live, pause_s=options.pause_s, hotwords=hotwords,
                                     hotword_weight=weight)
        except ValueError as exc:  # every channel is taken (sessions + microphone + file)
            self.error("server_busy", f"cannot open stream {name!r}: {exc}; try again later")
            return None
        return channel, converter

    def continue_from(self, carried: Carried, interim_results: bool, next_segment: int) -> bool:
        """Continue a session another replica ran (``streamer.session.failover``): a fresh recognizer from the
        end of its last final, finals numbered on, the finals the client lacks (from ``next_segment`` on)
        replayed. False after saying why it cannot (then the client's start goes on as a new session)."""
        opened = self._open_stream(carried.options, carried.stream)
        if opened is None:
            return False
        channel, converter = opened
        channel.continue_at(carried.next_segment,
                            round(carried.audio_frames * channel.sample_rate_hz / converter.sample_rate))
        self.id, self.channel, self.stream, self.options = carried.session, channel, carried.stream, carried.options
        self.audio = SessionAudio(converter, self.core.scheduler)
        self.audio.received_bytes = carried.audio_frames * converter.frame_bytes
        self.results.preload(carried.finals, skip_below=next_segment)
        self.resume_token, self.phase, self._interim_results = carried.token, Phase.STREAMING, interim_results
        self.core.metrics.sessions_resumed_total.inc()
        self.offer(self._opened(resumed=True))
        replayed = self.results.attach(self, next_segment)
        self.core.hub.set_source(self.stream, self.results)
        logger.info("session %s: continued from another replica at %.3f s of audio, segment %d; %d result(s) "
                    "replayed", self.id, self.received_s, carried.next_segment, replayed)
        return True

    def stream_name(self, options: StartOptions) -> str:
        """The stream a new session started with ``options`` is called (unnamed: ``<name_prefix>-<id>``)."""
        return options.stream or f"{self._name_prefix}-{self.id}"

    async def begin(self, options: StartOptions, resume: ResumeRequest | None = None) -> None:
        """`start`, the stream name leased across the cluster first when in one (`streamer.session.claim`)."""
        await start_claimed(self, options, resume)

    def _refuse_busy(self) -> None:
        cap = self.core.limits.session_cap
        self.core.metrics.sessions_refused_total.inc(label_value=self.protocol)
        self.error("server_busy", f"the server has {cap} sessions open, its maximum, counting sessions kept for "
                   "their clients to reconnect; try again later")
        self.phase = Phase.ENDING
        self.offer(Ended("server_busy", None))

    def _opened(self, resumed: bool) -> Opened:
        assert self.channel is not None and self.options is not None
        window_s = self.core.limits.resume_window_s
        if window_s > 0:  # a server without resume hands out no tokens
            if self.resume_token is not None:
                self.spent_tokens.add(self.resume_token)
            failover = self.core.failover
            self.resume_token = new_token() if failover is None else failover.issue(self)
            self.core.journal.token(self.id, self.stream, self.resume_token)
        compiled = self.channel.hotwords
        return Opened(self.id, self.stream, self.core.model, self.options.sample_rate, self.channel.endpoint.to_dict(),
                      self.channel.is_live, window_s, self.resume_token if window_s > 0 else None, resumed,
                      self.received_s, compiled.phrases if compiled else None, compiled.weight if compiled else None)

    @property
    def received_s(self) -> float:
        """Seconds of whole sample frames received in the session, unrounded: times the sample rate it is a
        whole number."""
        return self.audio.received_s if self.audio is not None else 0.0

    # ------------------------------------------------------------------ resume

    def _hold(self) -> None:
        """Keep the session for its client: results wait in the log, the channel stays open."""
        self.phase = Phase.HELD
        self.results.detach()
        logger.info("session %s: connection lost; stream %s is kept %g s for a resume", self.id, self.stream,
                    self.core.limits.resume_window_s)

    def move_away(self) -> None:
        """The session goes on on another replica (``streamer.session.handoff``): its link takes no more audio,
        and a held session stops waiting for its client."""
        self.phase = Phase.MOVED
        self._released.set()

    async def wait_for_resume(self) -> None:
        """Wait out the resume window of a held session; unless it was resumed or ended meanwhile, end it as a
        disconnect. Cancelling stops the wait and leaves the session held (the core's shutdown ends it)."""
        if self.phase is not Phase.HELD:
            return
        window_s = self.core.limits.resume_window_s
        try:
            async with asyncio.timeout(window_s):
                await self._released.wait()
        except TimeoutError:
            pass
        if self.phase is Phase.HELD:
            logger.info("session %s: not resumed within %g s; ending it", self.id, window_s)
            self.phase = Phase.ENDING
            await self._flush("disconnect", detach_first=True)

    def _resume(self, options: StartOptions, resume: ResumeRequest) -> bool:
        """Take over the session ``resume`` names; False (after a ``resume_failed`` problem) when it cannot be."""
        held, problem = self.core.find_resumable(resume)
        if held is not None and held.options is not None:
            problem = start_mismatch(held.options, held.stream, options)
        if held is None and (orphan := self.core.journal.take_orphan(resume.session, resume.token)):
            self._replay_orphan(orphan, resume.next_segment)
            return False
        if held is None or problem is not None:
            self.error("resume_failed", f"cannot resume session {resume.session!r}: {problem}; "
                       "starting a new session instead")
            return False
        if held.phase is Phase.STREAMING:  # the client is back before its old link was seen to break
            logger.info("session %s: resumed while its old connection looked open; dropping that one", held.id)
            held._hold()
            held.offer(Superseded(held.id))
        self.id, self.channel, self.audio, self.stream = held.id, held.channel, held.audio, held.stream
        self.options, self.results = held.options, held.results
        if self.audio is not None:  # the client re-sends whole sample frames from received_s on
            self.audio.resume()
        self.resume_token, self.spent_tokens = held.resume_token, held.spent_tokens
        held.phase, held.channel = Phase.MOVED, None
        held._released.set()
        self.phase = Phase.STREAMING
        self._interim_results = options.interim_results
        self.core.metrics.sessions_resumed_total.inc()
        self.offer(self._opened(resumed=True))
        replayed = self.results.attach(self, resume.next_segment)
        self.core.hub.set_source(self.stream, self.results)
        logger.info("session %s: resumed on a new connection at %.3f s of audio; %d result(s) replayed", self.id,
                    self.received_s, replayed)
        return True

    def _replay_orphan(self, orphan: Orphan, next_segment: int) -> None:
        """A session of the daemon's previous run (it restarted): say so, then replay the finals it kept."""
        reason, replay = orphan_replay(orphan, next_segment)
        self.error("resume_failed", reason)
        for msg in replay:
            self.offer(msg, replay=True)
        logger.info("session %s: resumed after a restart of the server: %d final(s) replayed, a new session follows",
                    orphan.session, sum(isinstance(msg, Final) for msg in replay))

    def _journal_final(self, final: Final) -> None:
        self.core.journal.final(self.id, final)
        if self.core.failover is not None:
            self.core.failover.on_final(self, final)

    # ------------------------------------------------------------------ audio, finalize, the end

    async def push_audio(self, data: bytes) -> None:
        """Convert the client's bytes and write them to the channel. A session that can wait waits here for room:
        an adapter that reads nothing more from its transport meanwhile slows its client down (back-pressure).

        Call only on a started session (:attr:`is_started`); an adapter tells its client otherwise in its own words.
        """
        if self.channel is None or self.audio is None:
            raise RuntimeError("audio for a session that has not started; check is_started first")
        if not data:
            self.offer(WarningMessage("empty_frame", "an empty binary frame carries no audio; it was ignored",
                                      self.stream))
            return
        audio, channel = self.audio, self.channel
        try:
            samples, first_clipping = audio.convert(data)
        except AudioError as exc:
            self.error("bad_audio", str(exc))
            return
        except Exception:  # a bug: said and logged like one in a message, never the end of the session
            logger.exception("session %s: converting an audio frame of %d bytes failed", self.id, len(data))
            self.error("internal_error", f"the server failed to convert this audio frame (a bug, logged as session "
                       f"{self.id}); the frame was discarded and the session goes on")
            return
        if first_clipping:
            self.offer(WarningMessage(
                "audio_clipped", "pcm_f32le samples must lie in [-1, 1]; louder ones were clipped (said once per "
                "session)", self.stream))
        await audio.write(channel, samples)

    def finalize(self) -> asyncio.Event:
        """End the open segment after the audio received so far (its final follows); keep listening.

        Returns an event set once that is done (the final, if the segment held speech, was offered first): an
        adapter whose protocol answers every flush, even an empty one, waits for it; others ignore it.
        """
        if self.channel is None:
            raise RuntimeError("finalize for a session that has not started; check is_started first")
        return self.core.scheduler.finalize(self.channel)

    async def stop(self) -> None:
        """No more audio: flush the last segment (its final first), then ``Ended`` with the accounting."""
        await self.end("stop")

    async def start_deadline(self) -> None:
        """End the link if it has not started a session within ``start_timeout_s`` (run it as a task from
        ``connect`` on; cancel it when the link ends)."""
        timeout_s = self.core.limits.start_timeout_s
        await asyncio.sleep(timeout_s)
        while self.is_taking_over and self.phase is Phase.AWAITING_START:  # its start came, and waits for a lease
            await asyncio.sleep(0.1)
        if self.phase is not Phase.AWAITING_START:
            return
        self.error("start_timeout", f"no 'start' within {timeout_s:g} s of connecting (server.start_timeout_s; "
                   "keepalive does not extend it); open a new connection and send 'start' first")
        await self.end("start_timeout")

    @property
    def accounting(self) -> Accounting | None:
        """What the session received so far; None before it started."""
        channel, audio = self.channel, self.audio
        if channel is None or audio is None:
            return None
        return Accounting(self.stream, channel.segmenter.segment, self.received_s,
                          channel.dropped_samples / channel.sample_rate_hz, audio.incomplete_bytes)

    async def end(self, reason: str) -> None:
        """Flush the last segment (its final reaches the client first), then offer ``Ended``.

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
        if not was_held:
            self.offer(Ended(reason, self.accounting))

    async def lost(self, resumable: bool) -> None:
        """The client's transport is gone (the adapter sends nothing more). ``resumable``: it broke rather than
        the client hanging up, so a started session is held for a resume (when the window is above 0); otherwise
        the open segment is flushed as ``disconnect`` to the other sinks."""
        if not self.is_open:
            return
        if self.phase is Phase.STREAMING and resumable and self.core.limits.resume_window_s > 0:
            self._hold()
        else:
            self.phase = Phase.ENDING
            await self._flush("disconnect", detach_first=True)

    async def _flush(self, reason: str, detach_first: bool, forget: bool = True) -> None:
        """Close the channel, its last final first; ``forget``: the session is over, its journal entry goes."""
        channel = self.channel
        if channel is None:
            return
        hub = self.core.hub
        if detach_first:
            hub.set_source(self.stream, None)  # nobody to send to: finals go to the other sinks
        elif self.audio is not None and not channel.is_closing:
            await self.audio.write_tail(channel, self.id)
        await self.core.scheduler.close(channel, reason)
        hub.set_source(self.stream, None)
        if self.core.leases is not None:
            self.core.leases.release(self.stream)
        if forget:
            self.core.journal.end(self.id)
            if self.core.failover is not None:
                self.core.failover.forget(self.id)
