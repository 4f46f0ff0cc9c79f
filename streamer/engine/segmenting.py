"""Segmentation of one stream's tokens into partials and finals (sans-I/O, on the inference thread).

A :class:`Segmenter` takes the tokens each recognizer step adds to a stream and turns them into
protocol messages: a :class:`~streamer.protocol.Partial` whenever the open segment's text changes,
and exactly one :class:`~streamer.protocol.Final` per segment, when an endpoint rule fires
(``streamer.engine.endpoint``), when an ``<EOU>`` token arrives, or when the caller cuts it
(``finalize``, stop, disconnect, shutdown). A segment in which nothing was recognized gets neither.

Optionally (``pause_s``, for protocols that report it, e.g. Deepgram's ``UtteranceEnd``) it also says when the
speaker has paused: a :class:`Pause` once no speech token came for ``pause_s`` after the stream's last one, across
segment ends. It is a second silence rule beside endpointing's (which ends segments), on the same per-frame
check: "no token emitted" is silence here too, so no separate voice-activity detector is needed.

Times are on the stream's own clock (:class:`Clock`): seconds from its first sample, with audio the
daemon dropped counted and silence it padded in (to flush a segment) not counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from streamer.asr.hypothesis import TokenSpan
from streamer.asr.model import AsrModel
from streamer.asr.tokenizer import Tokenizer
from streamer.engine.endpoint import Decision, EndpointConfig, decide
from streamer.engine.pause import Pause
from streamer.engine.recognizer import make_transcript
from streamer.protocol import Final, Partial, WordTiming


@dataclass(frozen=True, slots=True)
class _Anchor:
    fed: int  # position in the samples given to the recognizer
    own: int  # the same position on the stream's own clock
    slope: int  # 1: audio, 0: padding (time stands still)


class Clock:
    """Maps positions in the samples fed to the recognizer to the stream's own clock.

    Fed audio differs from the stream's audio where the ring buffer dropped samples (the stream's
    clock jumps ahead) and where silence was padded in to flush a segment (the clock stands still).
    """

    def __init__(self, sample_rate_hz: int) -> None:
        self.sample_rate_hz = sample_rate_hz
        self._anchors = [_Anchor(0, 0, 1)]

    def start_at(self, own: int) -> None:
        """Begin the stream's clock at ``own`` samples rather than 0 (a stream continued from another replica)."""
        self._anchors = [_Anchor(0, own, 1)]

    def own(self, fed: int) -> int:
        """The stream-clock sample of fed sample ``fed``."""
        for a in reversed(self._anchors):
            if a.fed <= fed:
                return a.own + a.slope * (fed - a.fed)
        return fed  # before the first anchor (forgotten history): unchanged

    def seconds(self, fed: int) -> float:
        """The stream-clock time of fed sample ``fed``, rounded to the millisecond."""
        return round(self.own(fed) / self.sample_rate_hz, 3)

    def dropped(self, fed: int, num_samples: int) -> None:
        """``num_samples`` of the stream's audio were lost just before fed sample ``fed``."""
        if num_samples > 0:
            self._anchors.append(_Anchor(fed, self.own(fed) + num_samples, 1))

    def padded(self, fed: int, num_samples: int) -> None:
        """``num_samples`` of silence that the stream never had were fed from sample ``fed`` on."""
        if num_samples > 0:
            at = self.own(fed)
            self._anchors += [_Anchor(fed, at, 0), _Anchor(fed + num_samples, at, 1)]

    def forget_before(self, fed: int) -> None:
        """Drop anchors nobody will ask about again (the clock's memory stays bounded)."""
        keep = 0
        for i, a in enumerate(self._anchors):
            if a.fed <= fed:
                keep = i
        del self._anchors[:keep]


class Segmenter:
    """Cuts one stream's token sequence into segments; see the module docstring.

    Endpoint rules are applied frame by frame inside each step's encoder frames, not only at the step's
    end, so a pause ends its segment whatever the look-ahead (with 1.12 s chunks, a 1.5 s pause could
    otherwise fall between two checks and join two utterances). No time in a result lies beyond the audio
    received. A step's work does not grow with the segment: the partial's text is decoded incrementally.

    Args:
        model: the model (tokenizer, end-of-utterance ids, frame shift, TDT or not).
        stream: the stream name put in every message.
        endpoint: the endpointing rules.
        clock: the stream's clock (shared with whoever feeds audio).
        pause_s: say :class:`Pause` after this long without speech after speech; None: never.
    """

    def __init__(
        self, model: AsrModel, stream: str, endpoint: EndpointConfig, clock: Clock, pause_s: float | None = None
    ) -> None:
        self.model, self.stream, self.endpoint, self.clock = model, stream, endpoint, clock
        self.pause_s = pause_s
        self._last_speech_end: int | None = None  # frame after the stream's latest speech token, in any segment
        self._pause_told = True  # the Pause after _last_speech_end went out (or there was no speech yet)
        self._eou = frozenset(model.config.eou_token_ids)
        self._frame_shift_s = model.config.frame_shift_s
        self._samples_per_frame = round(self._frame_shift_s * clock.sample_rate_hz)
        self._frames_seen = 0  # encoder frames the rules have looked at
        self.segment = 0  # number of the next final
        self._reset(0)

    def continue_at(self, segment: int, own: int) -> None:
        """Continue a stream another replica ran: number the next final ``segment`` and start the clock at
        stream-clock sample ``own`` (call before any audio)."""
        self.segment = segment
        self.clock.start_at(own)

    def _reset(self, start_frame: int) -> None:
        self._tokens: list[tuple[int, int, int, float, float]] = []  # (id, frame, duration, confidence, logprob)
        self._start_frame = start_frame
        self._first_speech: int | None = None
        self._speech_end: int | None = None
        self._text = ""
        self._stable = ""
        self._speech_ids: list[int] = []  # the segment's ids without end-of-utterance markers
        self._split = 0  # the last index of _speech_ids where the text may be cut (a word start)
        self._committed = 0  # _speech_ids[:_committed] are decoded in _committed_text (a cut point)
        self._committed_text = ""
        self.clock.forget_before(start_frame * self._samples_per_frame)

    @property
    def has_speech(self) -> bool:
        """True when the open segment holds at least one speech token."""
        return self._first_speech is not None

    def add(self, span: TokenSpan, frames_done: int) -> list[Partial | Final | Pause]:
        """Take one step's new tokens; ``frames_done`` is the stream's decoded encoder frames after it.

        No time in a result lies beyond the decoded frames (audio the recognizer has had, so audio received):
        a token's predicted duration may reach further. The cap depends on the audio alone, not on when it came.
        """
        cap_s = self._seconds(frames_done)
        out: list[Partial | Final | Pause] = []
        rows = list(zip(span.token_ids, span.token_frames, span.token_durations, span.token_confidences,
                        span.token_logprobs, strict=True))
        i = 0
        for frame_end in range(self._frames_seen + 1, frames_done + 1):  # the rules after each decoded frame
            while i < len(rows) and rows[i][1] < frame_end:
                out += self._take(rows[i], cap_s)
                i += 1
            decision = decide(
                self.endpoint, self._frame_shift_s, frame_end, self._start_frame, self._first_speech, self._speech_end
            )
            if decision is Decision.DISCARD:
                self._reset(frame_end)
            elif decision is not Decision.CONTINUE:
                out += self._cut(decision.value, frame_end, cap_s)
            if (pause := self._pause(frame_end, cap_s)) is not None:
                out.append(pause)
        for row in rows[i:]:
            out += self._take(row, cap_s)
        self._frames_seen = max(self._frames_seen, frames_done)
        if (partial := self._partial(cap_s)) is not None:
            out.append(partial)
        return out

    def _take(self, row: tuple[int, int, int, float, float], cap_s: float | None) -> list[Final]:
        """Add one token to the open segment; an end-of-utterance token ends it."""
        token, frame, duration = row[0], row[1], row[2]
        self._tokens.append(row)
        if token in self._eou:  # the model says the utterance ended here
            return self._cut("eou", frame + max(duration, 1), cap_s)
        if self._first_speech is None:
            self._first_speech = frame
        self._speech_end = max(self._speech_end or 0, frame + max(duration, 1))
        self._last_speech_end, self._pause_told = max(self._last_speech_end or 0, self._speech_end), False
        tok = self.model.tokenizer
        if tok is not None and 0 <= token < tok.vocab_size and _is_cut_point(tok, token):
            self._split = len(self._speech_ids)
        self._speech_ids.append(token)
        return []

    def _pause(self, frame_end: int, cap_s: float) -> Pause | None:
        """A :class:`Pause` when ``pause_s`` has passed without speech at encoder frame ``frame_end`` (once).

        Measured on the stream's clock, so silence padded in to flush a segment does not count.
        """
        last = self._last_speech_end
        if self.pause_s is None or self._pause_told or last is None:
            return None
        last_s = self._seconds(last, cap_s)
        if self._seconds(frame_end, cap_s) - last_s < self.pause_s - 1e-6:
            return None
        self._pause_told = True
        return Pause(self.stream, last_s)

    def cut(self, reason: str, next_start_frame: int, end_fed: int | None = None) -> list[Final]:
        """End the open segment now: its final (none if nothing was recognized).

        Args:
            reason: what ended it (``Final.reason``).
            next_start_frame: the encoder frame the next segment starts at.
            end_fed: the fed sample where the segment's audio ended (padding may follow it): no time in the
                final lies past it (the last encoder frame may straddle the padding).
        """
        return self._cut(reason, next_start_frame, None if end_fed is None else self.clock.seconds(end_fed))

    def _cut(self, reason: str, next_start_frame: int, cap_s: float | None) -> list[Final]:
        final = self._final(reason, cap_s) if self._tokens else None
        self._reset(max(next_start_frame, self._start_frame))
        self._frames_seen = max(self._frames_seen, self._start_frame)
        if final is None:
            return []
        self.segment += 1
        return [final]

    def _span(self) -> TokenSpan:
        if not self._tokens:
            return TokenSpan()
        ids, frames, durations, confidences, logprobs = zip(*self._tokens, strict=True)
        return TokenSpan(ids, frames, durations, confidences, logprobs)

    def _seconds(self, frame: int, cap_s: float | None = None) -> float:
        t = self.clock.seconds(frame * self._samples_per_frame)
        return t if cap_s is None else min(t, cap_s)

    def _partial(self, cap_s: float | None) -> Partial | None:
        if self._first_speech is None or self._speech_end is None:
            return None
        text = self._partial_text()
        if text == self._text or not text.strip():
            return None
        self._text = text
        stable = self._committed_text if text.startswith(self._committed_text) else os.path.commonprefix(
            [text, self._committed_text])
        self._stable = stable if len(stable) >= len(self._stable) else self._stable
        start = self._seconds(self._first_speech, cap_s)
        return Partial(self.stream, self.segment, text, self._stable, start, self._seconds(self._speech_end, cap_s))

    def _partial_text(self) -> str:
        """The open segment's text, decoding only the tokens since the last cut point that was decoded before.

        Tokens before the last word start can only be followed by more words, so their text is final (the
        stable prefix); it is kept, and a step decodes just the rest: work per step stays bounded however long
        the segment grows (a client may ask for segments of an hour).
        """
        tok = self.model.tokenizer
        if tok is None:
            return " ".join(str(t) for t in self._speech_ids)
        if self._split > self._committed:
            more = tok.decode(self._speech_ids[self._committed : self._split], strip_special=True)
            self._committed_text = _join(self._committed_text, more)
            self._committed = self._split
        return _join(self._committed_text, tok.decode(self._speech_ids[self._committed :], strip_special=True))

    def _final(self, reason: str, cap_s: float | None) -> Final | None:
        span = self._span()
        transcript = make_transcript(self.model, span)
        if not transcript.text.strip() or self._first_speech is None or self._speech_end is None:
            return None
        def at(encoder_s: float) -> float:
            t = self.clock.seconds(round(encoder_s * self.clock.sample_rate_hz))
            return t if cap_s is None else min(t, cap_s)

        words = tuple(WordTiming(w.word, at(w.start_s), at(w.end_s), round(w.confidence, 4)) for w in transcript.words)
        confidences = [c for t, c in zip(span.token_ids, span.token_confidences, strict=True) if t not in self._eou]
        return Final(
            stream=self.stream,
            segment=self.segment,
            text=transcript.text,
            start=words[0].start if words else at(self._first_speech * self._frame_shift_s),
            end=words[-1].end if words else at(self._speech_end * self._frame_shift_s),
            words=words,
            token_ids=tuple(span.token_ids),
            confidence=round(sum(confidences) / len(confidences), 4) if confidences else 0.0,
            eou=transcript.eou,
            reason=reason,
        )


def _is_cut_point(tok: Tokenizer, token: int) -> bool:
    """True for a token whose text starts a new word with a letter or digit: the text before it is final, and
    decoding the two sides apart and joining them with one space gives the whole text."""
    piece = tok.id_to_piece(token)
    return tok.is_word_start(token) and len(piece) > 1 and piece[1].isalnum()


def _join(left: str, right: str) -> str:
    """The text of two token runs decoded apart, the right one starting at a cut point (see _is_cut_point)."""
    return f"{left} {right}" if left and right else left or right
