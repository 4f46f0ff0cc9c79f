"""One Hermes site: its listening sessions on the session core, one at a time, driven by the site's messages in order.

A :class:`SiteWorker` takes the site's messages (start, stop, audio frames) from a queue and handles them one after
the other, so a site's session never races itself, while the awaits of one site (flushing a session) never hold up
another's audio. Each ``startListening`` becomes a :class:`Listening`: a core session on the stream
``hermes-<siteId>`` (on ``/v1/captions`` and MQTT like any other) and the core's sink, which turns the core's events
into Hermes messages:

- the first audio frame starts the core session in that frame's format (rate, channels, sample format); a later
  frame in another format is refused (``format_changed``);
- a partial → ``partialTextCaptured`` with the session's text so far;
- with ``stopOnSilence`` the first final → ``textCaptured`` at once, then the session is stopped; without it the
  finals are gathered and ``stopListening`` (or the session's end for any reason) publishes them as one
  ``textCaptured``; every ``startListening`` gets exactly one ``textCaptured``, empty when nothing was recognized
  or the session could not run;
- a problem (a bad frame, an unsupported format, a refusal, a timeout) → ``hermes/error/asr`` with the core's code as
  ``context``; a frame problem is said once per session and code, later frames like it are dropped quietly;
- with ``sendAudioCaptured``, Rhasspy's ``audioCaptured`` carries the session's audio (the first
  :data:`MAX_CAPTURED_S` seconds) after ``textCaptured``.

A session that gets no audio frame for ``idle_timeout_s`` (the audio server is gone) ends with ``idle_timeout``.
Everything runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from streamer.adapters import hermes_messages as hermes
from streamer.adapters.wavframe import WavFrame, read_wav, write_wav
from streamer.errors import AudioError
from streamer.protocol import Final, Partial
from streamer.session import Ended, Event, Problem, Session, StartOptions

if TYPE_CHECKING:
    from streamer.session import SessionCore

logger = logging.getLogger("streamer.adapters.hermes")

Publish = Callable[[str, bytes, int], None]  # topic, payload, QoS: queued, never awaits
Notify = Callable[[str, "Listening"], None]  # what a session tells its site's worker
MAX_CAPTURED_S = 60.0  # audio kept for audioCaptured
MAX_QUEUED_FRAMES = 2000  # a site's audio frames waiting for its worker (about two minutes of Rhasspy's)


def stream_name(site_id: str) -> str:
    """The core stream of a site: ``hermes-<siteId>`` with other characters than ``A-Za-z0-9_.-`` as ``_``."""
    return f"hermes-{re.sub(r'[^A-Za-z0-9_.-]', '_', site_id)}"[:64]


class Listening:
    """One ``startListening`` on the core: its session's sink (see the module docstring).

    Args:
        start: the request.
        publish: queues an MQTT message.
        notify: tells the site's worker (on the loop, never awaiting) ``("captured", self)`` when a final ended a
            ``stopOnSilence`` session and ``("ended", self)`` once the core ended the session.
    """

    def __init__(self, start: hermes.StartListening, publish: Publish, notify: Notify) -> None:
        self.start, self._publish, self._notify = start, publish, notify
        self.session: Session | None = None
        self.finals: list[Final] = []
        self.format: tuple[int, int, str] | None = None  # the frames' format once the core session started
        self.refused_format: tuple[int, int, str] | None = None  # a format the core would not start with
        self.is_captured = False  # textCaptured went out
        self.is_ended = False
        self.first_audio_at: float | None = None
        self.told: set[str] = set()  # frame problems said in this session
        self._captured_audio = bytearray() if start.send_audio_captured else None

    @property
    def is_listening(self) -> bool:
        """True while audio frames are for this session."""
        return not self.is_captured and not self.is_ended

    def _seconds(self) -> float:
        return 0.0 if self.first_audio_at is None else time.monotonic() - self.first_audio_at

    def offer(self, event: Event, replay: bool = False) -> None:
        """The core's events as Hermes messages (loop thread; never awaits)."""
        start = self.start
        if isinstance(event, Partial):
            if self.is_listening:
                text = " ".join([*(f.text for f in self.finals if f.text), event.text])
                self._publish(hermes.PARTIAL_TEXT_CAPTURED, hermes.partial_text_captured(start, text, self._seconds()),
                              0)
        elif isinstance(event, Final):
            if self.is_listening:
                self.finals.append(event)
                if start.stop_on_silence:
                    self.capture()
                    self._notify("captured", self)  # the worker stops the core session
        elif isinstance(event, Problem):
            message = event.message
            if event.code == "start_timeout":  # the core's words are protocol v1's
                message = (f"no audio frame on hermes/audioServer/{start.site_id}/audioFrame came within "
                           "server.start_timeout_s of startListening; the session is ended")
            self._publish(hermes.ERROR, hermes.error(message, event.code, start.site_id, start.session_id), 1)
        elif isinstance(event, Ended):
            self.is_ended = True
            self.capture()
            self._notify("ended", self)

    def capture(self) -> None:
        """Publish ``textCaptured`` (once) and, when asked for, ``audioCaptured``."""
        if self.is_captured:
            return
        self.is_captured = True
        start = self.start
        self._publish(hermes.TEXT_CAPTURED, hermes.text_captured(start, self.finals, self._seconds()), 1)
        logger.info("site %s session %s: captured %r", start.site_id, start.session_id,
                    " ".join(f.text for f in self.finals))
        if self._captured_audio is not None and self.format is not None:
            rate, channels, encoding = self.format
            topic = hermes.AUDIO_CAPTURED.format(site=start.site_id, session=start.session_id or "")
            self._publish(topic, write_wav(bytes(self._captured_audio), rate, channels, encoding), 0)

    def keep(self, frame: WavFrame) -> None:
        """Note a frame's arrival and keep its audio for ``audioCaptured``."""
        if self.first_audio_at is None:
            self.first_audio_at = time.monotonic()
        kept = self._captured_audio
        if kept is not None:
            rate, channels, encoding = frame.format_key
            frame_bytes = (2 if encoding == "pcm_s16le" else 4) * channels
            room = int(MAX_CAPTURED_S * rate) * frame_bytes - len(kept)
            kept += frame.pcm[: max(0, room)]


class SiteWorker:
    """A site's messages, one at a time (see the module docstring).

    Args:
        site_id: the site.
        core: the session core.
        publish: queues an MQTT message.
        idle_timeout_s: a session without audio frames this long ends.
    """

    def __init__(self, site_id: str, core: SessionCore, publish: Publish, idle_timeout_s: float) -> None:
        self.site_id, self.core, self._publish, self.idle_timeout_s = site_id, core, publish, idle_timeout_s
        self.queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()  # control messages are never dropped
        self.current: Listening | None = None
        self.pending_starts = 0  # start messages queued and not yet handled
        self.queued_frames = 0  # audio frames queued and not yet handled: at most MAX_QUEUED_FRAMES
        self.dropped_frames = 0
        self._deadline: asyncio.Task[None] | None = None
        self._last_audio = time.monotonic()

    @property
    def wants_audio(self) -> bool:
        """True when an audio frame that arrives now belongs to a session (one is open, or about to open)."""
        return self.pending_starts > 0 or (self.current is not None and self.current.is_listening)

    def touch(self) -> None:
        """A frame came that is not for recognition (the site is toggled off): the session is not idle."""
        self._last_audio = time.monotonic()

    def put(self, kind: str, item: object) -> None:
        """Queue a message for the worker (loop thread, never awaits); an audio frame beyond the bound is dropped."""
        if kind == "audio":
            if self.queued_frames >= MAX_QUEUED_FRAMES:
                self.dropped_frames += 1
                if self.dropped_frames == 1:
                    logger.warning("site %s: %d audio frames wait for its worker; dropping the newest", self.site_id,
                                   MAX_QUEUED_FRAMES)
                return
            self.queued_frames += 1
        elif kind == "start":
            self.pending_starts += 1
        self.queue.put_nowait((kind, item))

    async def run(self) -> None:
        """Handle the site's messages until cancelled."""
        while True:
            kind = "idle"
            try:
                kind, item = await self._next()
                await self._handle(kind, item)
            except Exception:  # a bug: said and logged, never the end of the site
                logger.exception("site %s: handling a %s message failed", self.site_id, kind)
                self._publish(hermes.ERROR, hermes.error(
                    f"the server failed to handle this {kind} message (a bug, logged); it was discarded",
                    "internal_error", self.site_id, None), 1)

    async def _next(self) -> tuple[str, object]:
        while True:
            listening = self.current
            timeout_s = None
            if listening is not None and listening.is_listening:
                timeout_s = max(0.0, self._last_audio + self.idle_timeout_s - time.monotonic())
            try:
                async with asyncio.timeout(timeout_s):
                    return await self.queue.get()
            except TimeoutError:
                if listening is self.current and listening is not None and listening.session is not None:
                    await self._idle(listening, listening.session)

    async def _handle(self, kind: str, item: object) -> None:
        if kind == "start":
            self.pending_starts -= 1
            assert isinstance(item, hermes.StartListening)
            await self._start(item)
        elif kind == "stop":
            assert isinstance(item, hermes.StopListening)
            listening = self.current
            if listening is None or (item.session_id is not None and item.session_id != listening.start.session_id):
                logger.debug("site %s: stopListening for session %s, which is not listening", self.site_id,
                             item.session_id)
                return
            await self._finish(listening)
        elif kind == "audio":
            self.queued_frames -= 1
            payload, session_id = item  # type: ignore[misc]
            await self._audio(payload, session_id)
        elif kind == "captured":  # stopOnSilence: its final went out; end the core session
            if isinstance(item, Listening):
                await self._finish(item)
        elif kind == "ended":
            if isinstance(item, Listening):
                self._retire(item)

    async def _start(self, start: hermes.StartListening) -> None:
        if self.current is not None:  # a new session on the site replaces the old one, whose text goes out first
            await self._finish(self.current)
            self._retire(self.current)
        listening = Listening(start, self._publish, self.put)
        session = self.core.connect(listening, protocol="hermes", name_prefix="hermes")
        if isinstance(session, Problem):
            listening.offer(session)
            listening.offer(Ended(session.code, None))
            return
        listening.session = session
        self.current, self._last_audio = listening, time.monotonic()
        self._deadline = asyncio.create_task(session.start_deadline(), name=f"hermes-start-deadline-{session.id}")
        logger.info("site %s: listening (session %s, stopOnSilence %s)", self.site_id, start.session_id,
                    start.stop_on_silence)

    async def _audio(self, payload: bytes, session_id: str | None) -> None:
        self._last_audio = time.monotonic()
        listening = self.current
        if listening is None or not listening.is_listening or listening.session is None:
            return
        if session_id is not None and session_id != listening.start.session_id:
            return  # an audioSessionFrame of another session
        session = listening.session
        if not session.is_open:
            return
        try:
            frame = read_wav(payload)
        except AudioError as exc:
            self._tell_once(listening, session, "bad_frame", f"{exc}; the frame was dropped (later bad frames of "
                            "this session are dropped without another message)")
            return
        if not session.is_started:
            if frame.format_key == listening.refused_format:
                return
            await session.begin(StartOptions(frame.sample_rate, frame.encoding, frame.channels,
                                             stream=stream_name(self.site_id), live=True))
            if not session.is_started:  # the core said why (unsupported_audio, stream_in_use, server_busy)
                listening.refused_format = frame.format_key
                return
            listening.format = frame.format_key
        elif frame.format_key != listening.format:
            self._tell_once(listening, session, "format_changed", f"this frame is {_shown(frame.format_key)}, the "
                            f"session's audio {_shown(listening.format)}; frames in another format are dropped")
            return
        listening.keep(frame)
        await session.push_audio(frame.pcm)

    def _tell_once(self, listening: Listening, session: Session, code: str, message: str) -> None:
        if code not in listening.told:
            listening.told.add(code)
            session.error(code, message)

    async def _idle(self, listening: Listening, session: Session) -> None:
        if session.is_open:
            session.error("idle_timeout", f"no audio frame for {self.idle_timeout_s:g} s on "
                          f"hermes/audioServer/{self.site_id}/audioFrame; the session is ended")
        await session.end("idle")

    async def _finish(self, listening: Listening) -> None:
        """Stop the core session (its last final first); the sink publishes what it has not yet."""
        if listening.session is not None:
            await listening.session.stop()

    def _retire(self, listening: Listening) -> None:
        if listening.session is not None:
            self.core.release(listening.session)
        if listening is self.current:
            self.current = None
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

    async def close(self) -> None:
        """End the site's session (shutdown: the core flushed it already, this only releases it)."""
        listening = self.current
        if listening is not None and listening.session is not None:
            await listening.session.end("shutdown")
            self._retire(listening)


def _shown(key: tuple[int, int, str] | None) -> str:
    if key is None:
        return "unknown"
    rate, channels, encoding = key
    return f"{rate} Hz x{channels} {encoding}"
