"""One named audio stream in the daemon: a ring buffer on the loop side, recognition on the inference side.

The event loop writes audio (:meth:`Channel.write`) and requests (:meth:`Channel.finalize`,
:meth:`Channel.close`); the scheduler takes the buffered audio and the requests in order
(:meth:`Channel.take`, loop thread) and hands them to the inference thread (:meth:`Channel.absorb`,
:meth:`Channel.after_step`), which alone touches the recognizer's :class:`Stream` and the
:class:`Segmenter`. No field is written by both threads; the loop reads ``samples_wanted`` and
``has_backlog`` only after a step has finished.

Requests keep their place in the audio: a ``finalize`` covers exactly the audio written before it.
To recognize that audio now, rather than when the next chunk fills, the channel pads silence up to
the chunk boundary (the stream's clock does not count it).

Backlog: each round takes only the audio the stream's next step needs (all of it up to the last request,
when there is one), so audio received but not yet recognized waits in the ring, whose bound applies to it.
A *live* channel (a microphone, a client that cannot wait) overwrites its oldest audio when the ring is
full, and the loss is counted. A channel that is not live never loses audio: its writer checks
:attr:`Channel.room_samples` and waits for rounds to make room (back-pressure), see
``Scheduler.write_waiting``.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from streamer.asr.hypothesis import TokenSpan
from streamer.audio.ring import RingBuffer
from streamer.engine.buffered import AnyRecognizer
from streamer.engine.endpoint import EndpointConfig
from streamer.engine.hotwords import CompiledHotwords, Hotwords, compile_hotwords
from streamer.engine.pause import Pause
from streamer.engine.segmenting import Clock, Segmenter
from streamer.protocol import Final, Partial

Event = Partial | Final | Pause
MAX_PENDING_REQUESTS = 8  # finalize requests beyond this merge into the last one
CONTINUE_LEAD_IN_S = 0.5  # silence before the audio of a continued stream (not on its clock)


class Request(enum.Enum):
    FINALIZE = "finalize"
    CLOSE = "close"


@dataclass(slots=True)
class Work:
    """What the loop took from a channel for one scheduling round."""

    samples: np.ndarray  # (S,) float32 16 kHz, oldest first
    dropped: int  # samples the ring lost just before ``samples``
    requests: list[tuple[int, Request, str]] = field(default_factory=list)  # (offset into samples, what, reason)


class Channel:
    """See the module docstring.

    Args:
        recognizer: the shared recognizer.
        name: the stream name (also in every message).
        endpoint: this stream's endpointing rules.
        ring_capacity_s: audio the ring holds (before a live channel drops the oldest).
        is_live: True: drop the oldest audio when the ring is full; False: the writer waits for room.
        pause_s: the segmenter says :class:`~streamer.engine.pause.Pause` after this long without speech;
            None: never.
        hotwords: words and phrases to boost in this stream (checked already), or None.
    """

    def __init__(
        self, recognizer: AnyRecognizer, name: str, endpoint: EndpointConfig, ring_capacity_s: float,
        is_live: bool = True,
        pause_s: float | None = None,
        hotwords: Hotwords | None = None,
    ) -> None:
        model = recognizer.model
        self.recognizer, self.name, self.endpoint, self.is_live = recognizer, name, endpoint, is_live
        self.sample_rate_hz = model.config.features.sample_rate
        # loop side
        self._ring = RingBuffer(max(1, round(ring_capacity_s * self.sample_rate_hz)))
        self._taken = 0  # ring position (samples ever written) up to which audio was taken or dropped
        self._requests: deque[tuple[int, Request, str]] = deque()
        self.is_closing = False  # close() was called: no more audio is accepted
        self.is_queued = False  # in the scheduler's ready queue or in a running step
        self.dropped_samples = 0
        self.is_lag_warned = False  # a falling_behind warning went out and the backlog has not shrunk since
        # inference side (read by the loop only between steps)
        self.stream = recognizer.create_stream(name)
        # compiled here, before the stream's first step (a tree of 100 phrases takes a few milliseconds)
        self.hotwords: CompiledHotwords | None = None
        if hotwords is not None and hotwords.phrases:
            self.hotwords = compile_hotwords(model.tokenizer, hotwords, recognizer.device)
            self.stream.hotwords = self.hotwords.tree
        self.clock = Clock(self.sample_rate_hz)
        self.segmenter = Segmenter(model, name, endpoint, self.clock, pause_s)
        self._fed = 0  # samples given to the recognizer, padding included
        self.is_closed = False  # the close request was processed: the last final is out
        self.has_backlog = False  # a full chunk is waiting for the next step
        self.samples_wanted = self._samples_to_ready()

    # ------------------------------------------------------------------ loop side

    def continue_at(self, segment: int, own_samples: int) -> None:
        """Continue a stream another replica ran (a resumed session): its next final is numbered ``segment`` and
        its clock starts at ``own_samples`` (model-rate samples). Call right after opening, before any audio."""
        self.segmenter.continue_at(segment, own_samples)
        lead_in = round(CONTINUE_LEAD_IN_S * self.sample_rate_hz)  # a fresh recognizer hears speech from its start
        self.clock.padded(0, lead_in)
        self._feed(np.zeros(lead_in, dtype=np.float32))  # no step has run yet: the stream is not shared
        self.settle()

    def write(self, samples: np.ndarray) -> int:
        """Buffer 16 kHz float32 samples; returns how many old samples the ring dropped to make room.

        A channel that is not live must be given at most :attr:`room_samples` (it would drop otherwise).
        """
        if self.is_closing or samples.size == 0:
            return 0
        return self._ring.write(samples)

    @property
    def room_samples(self) -> int:
        """Samples the ring takes now without dropping any."""
        return self._ring.capacity_samples - len(self._ring)

    @property
    def backlog_s(self) -> float:
        """Seconds of received audio waiting for recognition (in the ring; at most one more chunk is in the
        recognizer)."""
        return len(self._ring) / self.sample_rate_hz

    def finalize(self) -> None:
        """End the current segment after the audio written so far."""
        if not self.is_closing:
            self._request(Request.FINALIZE, "finalize")

    def close(self, reason: str) -> None:
        """No more audio: flush everything, ending the last segment with ``reason``."""
        if not self.is_closing:
            self.is_closing = True
            self._request(Request.CLOSE, reason)

    def _request(self, what: Request, reason: str) -> None:
        at = self._ring.written_total
        if self._requests and self._requests[-1][1] is Request.FINALIZE and (
            len(self._requests) >= MAX_PENDING_REQUESTS or self._requests[-1][0] == at
        ):
            self._requests.pop()  # the later request covers the earlier one's audio too
        self._requests.append((at, what, reason))

    @property
    def buffered_samples(self) -> int:
        return len(self._ring)

    @property
    def is_due(self) -> bool:
        """True when a step would make progress (loop side; only while no step of this channel runs)."""
        if self.is_closed:
            return False
        return bool(self._requests) or self.has_backlog or 0 < self.samples_wanted <= len(self._ring)

    def take(self) -> Work:
        """The audio the next step needs (all of it up to the last request, if any) and the requests (loop side).

        The rest stays in the ring: a backlog is bounded there, and a round never feeds a stream more than
        one step's worth, so every due channel gets its turn.
        """
        ring = self._ring
        begin = ring.written_total - len(ring)  # ring position of the oldest waiting sample
        dropped = begin - self._taken
        want = 0 if self.has_backlog else self.samples_wanted
        if self._requests:
            want = max(want, self._requests[-1][0] - begin)
        samples = ring.read(want)
        self._taken = begin + samples.size
        self.dropped_samples += dropped
        requests = [(max(0, at - begin), what, reason) for at, what, reason in self._requests]
        self._requests.clear()
        return Work(samples, dropped, requests)

    # ------------------------------------------------------------------ inference side

    def absorb(self, work: Work) -> list[Event]:
        """Feed the taken audio; carry out finalize and close requests at their place in it."""
        out: list[Event] = []
        self.clock.dropped(self._fed, work.dropped)
        done = 0
        for offset, what, reason in work.requests:
            self._feed(work.samples[done:offset])
            done = max(done, offset)
            if what is Request.FINALIZE:
                out += self._flush_segment(reason)
            else:
                out += self._finish(reason)
        self._feed(work.samples[done:])
        return out

    def after_step(self, span: TokenSpan) -> list[Event]:
        """Events from one batched step's new tokens for this channel."""
        self.stream.tokens = TokenSpan()  # the segmenter keeps the segment's tokens; don't grow forever
        return self.segmenter.add(span, self.stream.frames_done)

    def settle(self) -> None:
        """After the round: note what the loop needs to decide when to schedule this channel again."""
        self.has_backlog = not self.is_closed and self.stream.is_ready
        self.samples_wanted = 0 if self.is_closed else self._samples_to_ready()

    def _feed(self, samples: np.ndarray) -> None:
        if samples.size and not self.stream.input_done:
            self.stream.accept_waveform(samples)
            self._fed += samples.size

    def _step_alone(self) -> list[Event]:
        out: list[Event] = []
        while self.stream.is_ready:
            (span,) = self.recognizer.step([self.stream])
            out += self.after_step(span)
        return out

    def _flush_segment(self, reason: str) -> list[Event]:
        """Recognize all audio fed so far (padding silence to the chunk boundary), then cut the segment."""
        out = self._step_alone()
        real_end = self._fed
        while self.stream.samples_recognized < real_end:  # some real audio is not recognized yet
            pad = max(1, self._samples_to_ready())
            self.clock.padded(self._fed, pad)
            self._feed(np.zeros(pad, dtype=np.float32))
            out += self._step_alone()
        return out + self.segmenter.cut(reason, self.stream.frames_done, end_fed=real_end)

    def _finish(self, reason: str) -> list[Event]:
        if self.is_closed:
            return []
        self.clock.padded(self._fed, 1 << 40)  # the front end pads the tail: times stop at the real end
        self.stream.input_finished()
        out = self._step_alone()
        self.is_closed = True
        return out + self.segmenter.cut(reason, self.stream.frames_done, end_fed=self._fed)

    def _samples_to_ready(self) -> int:
        """More samples the stream needs before its next full step (0: it is ready)."""
        return self.stream.samples_to_ready
