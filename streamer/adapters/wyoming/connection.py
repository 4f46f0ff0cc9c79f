"""One Wyoming client connection: events in, core calls out (a thin adapter on :mod:`streamer.session`).

Events, as the ``wyoming`` package (1.10) defines them:

- ``describe`` → ``info`` (:mod:`.info`); ``ping`` → ``pong``; ``select-program`` naming ``streamer`` is accepted.
- ``transcribe`` {name?, language?, context?, transcript_names?, transcript_terms?}: the language of the next
  utterances (checked against ``wyoming.languages``) and their hotwords: the names, then the terms (names take
  priority, as the ``wyoming`` package says), each utterance a session with these as its
  :attr:`~streamer.session.events.StartOptions.hotwords` until the next ``transcribe`` replaces them. Beyond
  ``engine.max_hotwords`` the first ones are kept (names first), and a phrase the core would refuse (empty, too long,
  a control character) is left out, each said in an ``error`` event while the utterance goes on. ``name`` and
  ``context`` are accepted and ignored (one model serves every connection).
- ``audio-start`` {rate, width, channels} opens an utterance: a core session with those as
  :class:`~streamer.session.events.StartOptions` (width 1: ``pcm_u8``, 2: ``pcm_s16le``, 4: ``pcm_s32le``; the core
  converts, resamples and mixes the channels down, and refuses what it cannot). A session that can wait: audio is
  never dropped, and a client sending faster than recognition is slowed down (we read nothing meanwhile).
- ``audio-chunk`` + PCM payload → :meth:`~streamer.session.machine.Session.push_audio`; its format must be
  the utterance's.
- ``audio-stop`` → :meth:`~streamer.session.machine.Session.stop`; the transcript follows (:mod:`.utterance`).

Several utterances per connection, one after the other, each a session of its own (a stream named
``wyoming-<session id>``). Anything else gets Wyoming's ``error`` {text, code} and the connection goes on: an unknown
event, a malformed header (reported once, then lines are skipped until a header parses), an oversized block, audio
before ``audio-start`` (once per run of it), a refused format. The connection is closed after
``server.idle_timeout_s`` without an event (an open utterance ends as ``idle``, with its transcript), at shutdown
(after the open utterance's transcript) and when the client goes (its open utterance is flushed to the other sinks).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from streamer.adapters.wyoming.framing import EventReader, FramingError, WyomingEvent
from streamer.adapters.wyoming.info import PROGRAM
from streamer.adapters.wyoming.outbox import Outbox
from streamer.adapters.wyoming.utterance import AudioFormat, Utterance, error_event
from streamer.protocol import MessageError, check_hotwords
from streamer.session import Problem, SessionCore, StartOptions

if TYPE_CHECKING:
    from streamer.settings import ServerSettings

logger = logging.getLogger(__name__)

ENCODINGS = {1: "pcm_u8", 2: "pcm_s16le", 4: "pcm_s32le"}  # Wyoming's sample width in bytes → the core's encoding
SPOKEN = "describe, transcribe, audio-start, audio-chunk, audio-stop, ping and select-program"


class WyomingConnection:
    """One client connection; see the module docstring.

    Args:
        core: the session core.
        settings: the ``[server]`` settings (idle timeout, frame and queue limits).
        info: the ``info`` event.
        languages: the model's languages, the first the default.
        reader: the connection's incoming stream.
        writer: its outgoing stream.
    """

    def __init__(self, core: SessionCore, settings: ServerSettings, info: WyomingEvent, languages: list[str],
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.core, self.settings, self.info, self.languages = core, settings, info, languages
        self.events = EventReader(reader, settings.max_frame_bytes)
        self.outbox = Outbox(writer, settings.max_pending_messages, settings.close_timeout_s)
        self.language = languages[0]  # of the next utterance
        self.hotwords: list[str] = []  # of the next utterances: the last transcribe's names and terms
        self.utterance: Utterance | None = None  # between audio-start and audio-stop
        self.is_in_sync = True  # the last header parsed (see FramingError.in_sync)
        self.orphan_chunks = 0  # audio-chunk events dropped since the last audio-start, audio-stop or other event
        self._is_stopping = False  # an audio-stop is being flushed: its transcript is still to come
        self._close_requested = False

    def close(self) -> None:
        """Close after the events queued (the server shuts down, or the utterance ended other than by audio-stop);
        an utterance being stopped gets its transcript first."""
        if self._is_stopping:
            self._close_requested = True
        else:
            self.outbox.close_after_queue()

    async def run(self) -> None:
        """Read and handle events until the client goes, the idle timeout, or :meth:`close`; then wind down."""
        sender = asyncio.create_task(self.outbox.run(), name="wyoming-send")
        try:
            await self._receive()
        finally:
            utterance, self.utterance = self.utterance, None
            if utterance is not None and utterance.session is not None:
                if utterance.session.is_open:
                    await utterance.session.lost(resumable=False)  # no resume in Wyoming: flushed to the other sinks
                self.core.release(utterance.session)
            self.outbox.close_after_queue()
            try:
                async with asyncio.timeout(self.settings.close_timeout_s * 2):
                    await asyncio.shield(sender)
            except TimeoutError:
                sender.cancel()

    async def _receive(self) -> None:
        idle_s = self.settings.idle_timeout_s
        while not self.outbox.is_closing and not self.outbox.is_broken:
            await self.outbox.room()
            try:
                async with asyncio.timeout(idle_s):
                    event = await self.events.read()
            except TimeoutError:
                await self._idle(idle_s)
                return
            except FramingError as exc:
                if exc.in_sync or self.is_in_sync:
                    self._error(exc.code, str(exc))
                self.is_in_sync = exc.in_sync
                continue
            except (ConnectionError, OSError):
                return
            if event is None:
                return
            self.is_in_sync = True
            try:
                await self._dispatch(event)
            except Exception:  # a bug: said and logged, never the end of the connection
                logger.exception("wyoming: handling a %r event failed", event.type)
                self._error("internal_error", f"the server failed to handle this {event.type!r} event (a bug, "
                            "logged); the event was discarded and the connection goes on")

    async def _idle(self, idle_s: float) -> None:
        waiting = self.events.waiting_for or "the next event"
        message = (f"nothing received for {idle_s:g} s (server.idle_timeout_s) while waiting for {waiting}; "
                   "the connection is closed")
        self._error("idle_timeout", message)
        utterance = self.utterance
        if utterance is not None and utterance.session is not None and utterance.session.is_open:
            await utterance.session.end("idle")  # its transcript, then the close
        self.close()

    def _error(self, code: str, message: str) -> None:
        """An ``error`` event: through the open utterance's session (logged and counted by the core), else here."""
        utterance = self.utterance
        if utterance is not None and utterance.session is not None and utterance.session.is_open:
            utterance.session.error(code, message)
            return
        logger.info("wyoming: %s: %s", code, message)
        self.core.metrics.protocol_errors_total.inc(label_value=code)
        self.outbox.put(error_event(code, message))

    async def _dispatch(self, event: WyomingEvent) -> None:
        kind, data = event.type, event.data
        if kind != "audio-chunk":
            self.orphan_chunks = 0
        if kind == "audio-chunk":
            await self._audio_chunk(data, event.payload)
        elif kind == "audio-start":
            await self._audio_start(data)
        elif kind == "audio-stop":
            await self._audio_stop()
        elif kind == "transcribe":
            self._transcribe(data)
        elif kind == "describe":
            self.outbox.put(self.info)
        elif kind == "ping":
            self.outbox.put(WyomingEvent("pong", {"text": data.get("text")}))
        elif kind == "select-program":
            if data.get("name") != PROGRAM:
                self._error("unknown_program", f"no program {data.get('name')!r} here; 'info' lists one: {PROGRAM!r}")
        else:
            self._error("unsupported_event", f"streamer's Wyoming service does not handle {kind!r} events (it is "
                        f"speech-to-text only); it handles {SPOKEN}")

    def _transcribe(self, data: dict[str, Any]) -> None:
        if self.utterance is not None:
            self._error("bad_event", "'transcribe' during an utterance; send it before 'audio-start' (it was ignored)")
            return
        self.hotwords = self._hotwords(data)
        language = data.get("language")
        if language is None:
            return
        if not isinstance(language, str):
            self._error("bad_event", f"'language' of 'transcribe' must be a string, got {language!r}")
            return
        ours = self._our_language(language)
        if ours is None:
            self._error("unsupported_language", f"the model speaks {', '.join(self.languages)}, not {language!r}; "
                        f"the audio will be transcribed as {self.languages[0]!r}")
        self.language = ours or self.languages[0]

    def _hotwords(self, data: dict[str, Any]) -> list[str]:
        """``transcribe``'s names, then its terms, as the core takes them (what it would refuse is left out, said)."""
        phrases: list[str] = []
        for key in ("transcript_names", "transcript_terms"):  # names first: they take priority
            value = data.get(key)
            if value is None:
                continue
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                self._error("bad_event", f"'{key}' of 'transcribe' must be a list of strings; it was ignored")
                continue
            phrases += value
        kept: list[str] = []
        for phrase in phrases:
            try:
                kept += check_hotwords([phrase])
            except MessageError as exc:
                self._error("bad_event", f"{exc}; that phrase is not boosted")
        kept = list(dict.fromkeys(kept))
        cap = self.core.limits.max_hotwords
        if len(kept) > cap:
            self._error("too_many_hotwords", f"'transcribe' lists {len(kept)} names and terms; this server boosts at "
                        f"most {cap} (engine.max_hotwords): the first {cap} are used, names first")
            kept = kept[:cap]
        return kept

    def _our_language(self, language: str) -> str | None:
        """The model's language that ``language`` names: the same tag, or its primary subtag ("en-US" → "en")."""
        wanted = language.lower().replace("_", "-")
        for ours in self.languages:
            if ours.lower().replace("_", "-") in (wanted, wanted.split("-")[0]):
                return language if ours.lower() == wanted else ours
        return None

    async def _audio_start(self, data: dict[str, Any]) -> None:
        if self.utterance is not None:
            self._error("bad_event", "'audio-start' while an utterance is open; send 'audio-stop' first (ignored)")
            return
        fields = {key: data.get(key) for key in ("rate", "width", "channels")}
        bad = [key for key, value in fields.items() if isinstance(value, bool) or not isinstance(value, int)]
        if bad:
            self._error("bad_event", f"'audio-start' needs whole numbers for 'rate', 'width' and 'channels'; "
                        f"{', '.join(repr(key) for key in bad)} {'is' if len(bad) == 1 else 'are'} not")
            return
        audio = AudioFormat(**fields)
        utterance = self.utterance = Utterance(self.outbox, audio, self.language, self.close)
        if audio.width not in ENCODINGS:
            self._error("unsupported_audio", f"sample width {audio.width} bytes is not supported; use 1 (8-bit "
                        "unsigned), 2 (16-bit) or 4 (32-bit signed); the utterance's audio is dropped")
            return
        session = self.core.connect(utterance, protocol="wyoming", name_prefix="wyoming")
        if isinstance(session, Problem):
            self._error(session.code, f"{session.message}; the utterance's audio is dropped")
            return
        utterance.session = session
        await session.begin(StartOptions(audio.rate, ENCODINGS[audio.width], audio.channels, hotwords=self.hotwords))
        if not session.is_started:  # refused (the core said why): this utterance's audio goes nowhere
            self.core.release(session)
            utterance.session = None

    async def _audio_chunk(self, data: dict[str, Any], payload: bytes) -> None:
        utterance = self.utterance
        if utterance is None:
            self.orphan_chunks += 1
            if self.orphan_chunks == 1:
                self._error("no_audio_start", "'audio-chunk' before 'audio-start'; send 'audio-start' with the rate, "
                            "width and channels first (this chunk and any more before it are dropped)")
            return
        session = utterance.session
        if session is None or not session.is_open:
            return  # refused at audio-start, or ended (idle, shutdown): already said
        declared = utterance.audio
        differs = [f"{key} {data[key]!r}" for key in ("rate", "width", "channels")
                   if key in data and data[key] != getattr(declared, key)]
        if differs:
            self._error("bad_audio", f"an 'audio-chunk' with {', '.join(differs)} in an utterance that 'audio-start' "
                        f"declared as {declared.rate} Hz, width {declared.width}, {declared.channels} channel(s); "
                        "the chunk was dropped")
            return
        if payload:
            await session.push_audio(payload)

    async def _audio_stop(self) -> None:
        utterance, self.utterance = self.utterance, None
        if utterance is None:
            self._error("no_audio_start", "'audio-stop' without 'audio-start'; nothing to transcribe")
            return
        session = utterance.session
        if session is None:
            utterance.refused()
            return
        self._is_stopping = True
        try:
            if session.is_open:
                await session.stop()  # the finals, then Ended: the transcript
        finally:
            self._is_stopping = False
            self.core.release(session)
            if self._close_requested:
                self.outbox.close_after_queue()
