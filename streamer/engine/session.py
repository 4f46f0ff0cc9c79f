"""Segmentation of one stream's tokens into partials and finals (sans-I/O, on the inference thread).

A :class:`Segmenter` takes the tokens each recognizer step adds to a stream and turns them into
protocol messages: a :class:`~streamer.protocol.Partial` whenever the open segment's text changes,
and exactly one :class:`~streamer.protocol.Final` per segment, when an endpoint rule fires
(``streamer.engine.endpoint``), when an ``<EOU>`` token arrives, or when the caller cuts it
(``finalize``, stop, disconnect, shutdown). A segment in which nothing was recognized gets neither.

Times are on the stream's own clock (:class:`Clock`): seconds from its first sample, with audio the
daemon dropped counted and silence it padded in (to flush a segment) not counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from streamer.asr.hypothesis import TokenSpan
from streamer.asr.model import AsrModel
from streamer.engine.endpoint import Decision, EndpointConfig, decide
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

    Args:
        model: the model (tokenizer, end-of-utterance ids, frame shift, TDT or not).
        stream: the stream name put in every message.
        endpoint: the endpointing rules.
        clock: the stream's clock (shared with whoever feeds audio).
    """

    def __init__(self, model: AsrModel, stream: str, endpoint: EndpointConfig, clock: Clock) -> None:
        self.model, self.stream, self.endpoint, self.clock = model, stream, endpoint, clock
        self._eou = frozenset(model.config.eou_token_ids)
        self._frame_shift_s = model.config.frame_shift_s
        self._samples_per_frame = round(self._frame_shift_s * clock.sample_rate_hz)
        self.segment = 0  # number of the next final
        self._reset(0)

    def _reset(self, start_frame: int) -> None:
        self._tokens = TokenSpan()
        self._start_frame = start_frame
        self._first_speech: int | None = None
        self._speech_end: int | None = None
        self._text = ""
        self._stable = ""
        self.clock.forget_before(start_frame * self._samples_per_frame)

    @property
    def has_speech(self) -> bool:
        """True when the open segment holds at least one speech token."""
        return self._first_speech is not None

    def add(self, span: TokenSpan, frames_done: int) -> list[Partial | Final]:
        """Take one step's new tokens; ``frames_done`` is the stream's decoded encoder frames after it."""
        out: list[Partial | Final] = []
        begin = 0
        for i, token in enumerate(span.token_ids):
            if token in self._eou:  # the model says the utterance ended here
                self._append(span, begin, i + 1)
                out += self.cut("eou", span.token_frames[i] + max(span.token_durations[i], 1))
                begin = i + 1
        self._append(span, begin, len(span))
        decision = decide(
            self.endpoint, self._frame_shift_s, frames_done, self._start_frame, self._first_speech, self._speech_end
        )
        if decision is Decision.DISCARD:
            self._reset(frames_done)
        elif decision is not Decision.CONTINUE:
            out += self.cut(decision.value, frames_done)
        elif (partial := self._partial()) is not None:
            out.append(partial)
        return out

    def cut(self, reason: str, next_start_frame: int, end_fed: int | None = None) -> list[Final]:
        """End the open segment now: its final (none if nothing was recognized).

        Args:
            reason: what ended it (``Final.reason``).
            next_start_frame: the encoder frame the next segment starts at.
            end_fed: the fed sample where the segment's audio ended, when padding followed it: no time in
                the final lies past it (the last encoder frame may straddle the padding).
        """
        cap_s = None if end_fed is None else self.clock.seconds(end_fed)
        final = self._final(reason, cap_s) if len(self._tokens) else None
        self._reset(max(next_start_frame, self._start_frame))
        if final is None:
            return []
        self.segment += 1
        return [final]

    def _append(self, span: TokenSpan, begin: int, end: int) -> None:
        if begin >= end:
            return
        part = TokenSpan(*(values[begin:end] for values in (
            span.token_ids, span.token_frames, span.token_durations, span.token_confidences, span.token_logprobs
        )))
        self._tokens = self._tokens + part
        for token, frame, duration in zip(part.token_ids, part.token_frames, part.token_durations, strict=True):
            if token in self._eou:
                continue
            if self._first_speech is None:
                self._first_speech = frame
            self._speech_end = max(self._speech_end or 0, frame + max(duration, 1))

    def _seconds(self, frame: int) -> float:
        return self.clock.seconds(frame * self._samples_per_frame)

    def _partial(self) -> Partial | None:
        if self._first_speech is None or self._speech_end is None:
            return None
        text = make_transcript(self.model, self._tokens).text
        if text == self._text or not text.strip():
            return None
        self._text = text
        stable = self._stable_prefix(text)
        self._stable = stable if len(stable) >= len(self._stable) else self._stable
        return Partial(self.stream, self.segment, text, self._stable, self._seconds(self._first_speech),
                       self._seconds(self._speech_end))

    def _stable_prefix(self, text: str) -> str:
        """Text of the tokens before the last word start: later tokens can only extend the last word."""
        tok = self.model.tokenizer
        ids = [t for t in self._tokens.token_ids if t not in self._eou]
        if tok is None:
            return os.path.commonprefix([text, " ".join(str(t) for t in ids[:-1])])
        last_start = 0
        for i, t in enumerate(ids):
            if 0 <= t < tok.vocab_size and tok.is_word_start(t) and not tok.is_punctuation(t):
                last_start = i
        stable = tok.decode(ids[:last_start], strip_special=True)
        return stable if text.startswith(stable) else os.path.commonprefix([text, stable])

    def _final(self, reason: str, cap_s: float | None) -> Final | None:
        transcript = make_transcript(self.model, self._tokens)
        if not transcript.text.strip() or self._first_speech is None or self._speech_end is None:
            return None
        def at(encoder_s: float) -> float:
            t = self.clock.seconds(round(encoder_s * self.clock.sample_rate_hz))
            return t if cap_s is None else min(t, cap_s)

        words = tuple(WordTiming(w.word, at(w.start_s), at(w.end_s), round(w.confidence, 4)) for w in transcript.words)
        confidences = [c for t, c in zip(self._tokens.token_ids, self._tokens.token_confidences, strict=True)
                       if t not in self._eou]
        return Final(
            stream=self.stream,
            segment=self.segment,
            text=transcript.text,
            start=words[0].start if words else at(self._first_speech * self._frame_shift_s),
            end=words[-1].end if words else at(self._speech_end * self._frame_shift_s),
            words=words,
            token_ids=tuple(self._tokens.token_ids),
            confidence=round(sum(confidences) / len(confidences), 4) if confidences else 0.0,
            eou=transcript.eou,
            reason=reason,
        )
