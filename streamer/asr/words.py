"""Group recognized tokens into words with start and end times.

Follows NeMo's word timestamps for TDT (``compute_timestamps``, ``_refine_timestamps_tdt``): a token
spans encoder frames ``[frame, frame + duration)``, a punctuation token sits at the end of the token
before it, and a word runs from its first token's start to its last token's end.

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import SupportsFloat, SupportsInt

from streamer.asr import clocks
from streamer.asr.tokenizer import WORD_START, Tokenizer


@dataclass(frozen=True, slots=True)
class Word:
    """One recognized word: its text, its time span in seconds, and a confidence in [0, 1]."""

    word: str
    start_s: float
    end_s: float
    confidence: float


@dataclass(slots=True)
class _Span:
    """Tokens of one word being built, with frame bounds."""

    token_ids: list[int]
    start_frame: int
    end_frame: int
    confidence: float


def words_from_tokens(
    tokenizer: Tokenizer,
    token_ids: Sequence[SupportsInt],
    token_frames: Sequence[SupportsInt],
    token_durations: Sequence[SupportsInt] | None = None,
    token_confidences: Sequence[SupportsFloat] | None = None,
    frame_shift_s: float = clocks.ENCODER_FRAME_S,
) -> list[Word]:
    """Words of a hypothesis, with times in seconds from the start of the audio.

    A word begins at a token whose piece starts with ``▁`` (or at the first token) unless that token is
    punctuation, which always joins the word before it. Special tokens (``<EOU>``, ``<EOB>``, ids outside
    the vocabulary) are skipped. Token times, in encoder frames:

    - TDT (``token_durations`` given): ``[frame, frame + max(duration, 1))``. NeMo's end is
      ``frame + duration``; we keep a word at least one frame long so a duration-0 token still has a span.
    - RNNT/CTC (no durations): ``[frame, frame + 1)``.
    - Punctuation: start = end = the previous token's end (NeMo's ``_refine_timestamps_tdt``), so it
      never moves its word's end. A bare ``▁`` piece right before punctuation joins the previous word too
      (``"name ▁ ,"`` is the word ``"name,"``, as the decoded text reads), and a word whose text is empty
      (a trailing bare ``▁``) is dropped.

    Word confidence is the *minimum* of its tokens' confidences (the weakest token bounds how sure we are
    of the word, as in NeMo's ``min`` aggregation); 1.0 when no confidences are given.

    Args:
        tokenizer: the model's tokenizer.
        token_ids: (U,) token ids.
        token_frames: (U,) encoder frame of each token.
        token_durations: (U,) TDT durations in encoder frames, or None.
        token_confidences: (U,) per-token confidences, or None.
        frame_shift_s: seconds per encoder frame (0.08 for 10 ms hop and 8x subsampling).

    Returns:
        The words in order.
    """
    ids = [int(t) for t in token_ids]
    frames = [int(t) for t in token_frames]
    durations = [max(int(d), 1) for d in token_durations] if token_durations is not None else [1] * len(ids)
    confidences = [float(c) for c in token_confidences] if token_confidences is not None else [1.0] * len(ids)
    if not len(ids) == len(frames) == len(durations) == len(confidences):
        raise ValueError(
            f"words: token lists differ in length (ids {len(ids)}, frames {len(frames)}, "
            f"durations {len(durations)}, confidences {len(confidences)})"
        )
    spans: list[_Span] = []
    for token_id, frame, duration, confidence in zip(ids, frames, durations, confidences, strict=True):
        if token_id in tokenizer.special_ids or not 0 <= token_id < tokenizer.vocab_size:
            continue
        if tokenizer.is_punctuation(token_id) and spans:
            if len(spans) > 1 and _is_bare_space(tokenizer, spans[-1]):
                # "word ▁ ," : the lone space and the comma both belong to the word before.
                space = spans.pop()
                spans[-1].token_ids.extend(space.token_ids)
                spans[-1].confidence = min(spans[-1].confidence, space.confidence)
            last = spans[-1]  # punctuation takes the previous token's end: the word's end does not move
            last.token_ids.append(token_id)
            last.confidence = min(last.confidence, confidence)
        elif tokenizer.is_word_start(token_id) or not spans:
            spans.append(_Span([token_id], frame, frame + duration, confidence))
        else:
            last = spans[-1]
            last.token_ids.append(token_id)
            last.end_frame = frame + duration
            last.confidence = min(last.confidence, confidence)
    words = [
        Word(
            word=tokenizer.decode(span.token_ids),
            start_s=span.start_frame * frame_shift_s,
            end_s=span.end_frame * frame_shift_s,
            confidence=span.confidence,
        )
        for span in spans
    ]
    return [word for word in words if word.word]  # a trailing lone "▁" is no word


def _is_bare_space(tokenizer: Tokenizer, span: _Span) -> bool:
    """True if the span holds only bare ``▁`` pieces (a space with no word after it yet)."""
    return all(tokenizer.id_to_piece(i) == WORD_START for i in span.token_ids)
