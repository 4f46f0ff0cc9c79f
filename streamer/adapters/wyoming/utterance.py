"""One Wyoming utterance (``audio-start`` to ``audio-stop``) as one core session: the session's sink, turning the
core's events into Wyoming events.

``Opened`` → ``transcript-start``; partials and finals → ``transcript-chunk`` deltas (:mod:`.transcript`);
``Problem`` → ``error``; ``Ended`` with its accounting (the session ran) → ``transcript`` with the whole text, then
``transcript-stop``, the order the ``wyoming`` package gives streaming speech-to-text (the plain ``transcript``
stays for clients that predate streaming). An ``Ended`` other than ``stop`` (``idle``, ``shutdown``) also closes the
connection once those are written. Warnings have no Wyoming event; they are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from streamer.adapters.wyoming.framing import WyomingEvent
from streamer.adapters.wyoming.outbox import Outbox
from streamer.adapters.wyoming.transcript import TranscriptStream
from streamer.protocol import Final, Partial
from streamer.session import Ended, Event, Opened, Problem, Session, Superseded

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """What ``audio-start`` declared: Hz, bytes per sample, interleaved channels."""

    rate: int
    width: int
    channels: int


def error_event(code: str, message: str) -> WyomingEvent:
    """Wyoming's ``error``: ``text`` for people, ``code`` for programs."""
    return WyomingEvent("error", {"text": message, "code": code})


class Utterance:
    """One utterance's session and what its client has been told (the session's sink).

    Args:
        outbox: the connection's send queue.
        audio: the declared format.
        language: the language the transcript is in (``transcript.language``).
        on_closing: called when the session ended other than by ``audio-stop``: the connection is to close.
    """

    def __init__(self, outbox: Outbox, audio: AudioFormat, language: str, on_closing: Callable[[], None]) -> None:
        self.outbox, self.audio, self.language, self._on_closing = outbox, audio, language, on_closing
        self.session: Session | None = None  # None: refused at audio-start; its audio is dropped until audio-stop
        self.transcript = TranscriptStream()
        self.is_done = False  # the transcript was sent

    def offer(self, event: Event, replay: bool = False) -> None:
        """The core's events as Wyoming events, queued in order (loop thread; never awaits)."""
        if isinstance(event, Partial):
            self.outbox.put_chunk(self.transcript.partial(event))
        elif isinstance(event, Final):
            self.outbox.put_chunk(self.transcript.final(event))
        elif isinstance(event, Opened):
            self.outbox.put(WyomingEvent("transcript-start", {"language": self.language}))
        elif isinstance(event, Problem):
            self.outbox.put(error_event(event.code, event.message))
        elif isinstance(event, Ended):
            if event.accounting is not None:
                self._send_transcript()
            if event.reason != "stop":
                self._on_closing()
        elif isinstance(event, Superseded):  # only a resume supersedes, and Wyoming sessions are never held
            self._on_closing()
        else:
            logger.info("wyoming: %s (Wyoming has no warning event)", event)

    def _send_transcript(self) -> None:
        if self.is_done:
            return
        self.is_done = True
        self.outbox.put(WyomingEvent("transcript", {"text": self.transcript.text, "language": self.language}))
        self.outbox.put(WyomingEvent("transcript-stop"))

    def refused(self) -> None:
        """``audio-stop`` of an utterance refused at ``audio-start`` (an ``error`` said why): an empty
        ``transcript``, so a client waiting for one (Home Assistant ignores ``error``) is not left hanging."""
        if not self.is_done:
            self.is_done = True
            self.outbox.put(WyomingEvent("transcript", {"text": "", "language": self.language}))
