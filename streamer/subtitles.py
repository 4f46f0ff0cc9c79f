"""Subtitles (SubRip ``.srt`` and WebVTT ``.vtt``) from word timestamps.

Cues follow common captioning guidance: at most two lines of at most 42 characters, at most 6 s
on screen, a new cue after a pause or at the end of a sentence, at least 0.7 s on screen when the
next cue leaves room, and never overlapping. Stdlib only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class TimedWord(Protocol):
    word: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Cue:
    start_s: float
    end_s: float
    lines: tuple[str, ...]


MAX_CHARS = 42
MAX_LINES = 2
MAX_DURATION_S = 6.0
MAX_GAP_S = 0.8
MIN_DURATION_S = 0.7
SENTENCE_END = (".", "?", "!")


def wrap(words: Sequence[str], max_chars: int = MAX_CHARS) -> tuple[str, ...]:
    """Split words into lines of at most ``max_chars`` (a longer single word gets a line of its own),
    balancing two lines so the first is not much longer than the second."""
    text = " ".join(words)
    if len(text) <= max_chars:
        return (text,)
    best: tuple[str, ...] | None = None
    for i in range(1, len(words)):
        first, second = " ".join(words[:i]), " ".join(words[i:])
        if len(first) <= max_chars and len(second) <= max_chars:
            if best is None or abs(len(first) - len(second)) < abs(len(best[0]) - len(best[1])):
                best = (first, second)
    if best is not None:
        return best
    lines, line = [], ""
    for w in words:  # greedy fallback for text that does not fit two lines
        if line and len(line) + 1 + len(w) > max_chars:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}" if line else w
    return (*lines, line) if line else tuple(lines)


def build_cues(
    words: Sequence[TimedWord],
    max_chars: int = MAX_CHARS,
    max_lines: int = MAX_LINES,
    max_duration_s: float = MAX_DURATION_S,
    max_gap_s: float = MAX_GAP_S,
) -> list[Cue]:
    """Group timed words into cues (see the module docstring for the rules)."""
    groups: list[list[TimedWord]] = []
    current: list[TimedWord] = []
    for w in words:
        if current:
            prev = current[-1]
            if (
                w.start_s - prev.end_s > max_gap_s
                or len(wrap([x.word for x in current] + [w.word], max_chars)) > max_lines
                or w.end_s - current[0].start_s > max_duration_s
                or prev.word.endswith(SENTENCE_END)
            ):
                groups.append(current)
                current = []
        current.append(w)
    if current:
        groups.append(current)
    cues = []
    for i, group in enumerate(groups):
        start = group[0].start_s
        end = max(group[-1].end_s, start + MIN_DURATION_S)
        if i + 1 < len(groups):
            end = min(end, groups[i + 1][0].start_s)
        end = max(end, group[-1].end_s, start + 0.001)
        cues.append(Cue(start, end, wrap([w.word for w in group], max_chars)))
    return cues


def _timestamp(seconds: float, sep: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(cues: Sequence[Cue]) -> str:
    """SubRip text: numbered cues, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``."""
    blocks = [
        f"{i}\n{_timestamp(c.start_s, ',')} --> {_timestamp(c.end_s, ',')}\n" + "\n".join(c.lines)
        for i, c in enumerate(cues, 1)
    ]
    return "\n\n".join(blocks) + ("\n" if blocks else "")


def to_vtt(cues: Sequence[Cue]) -> str:
    """WebVTT text: ``WEBVTT`` header, cues with ``HH:MM:SS.mmm --> HH:MM:SS.mmm``."""
    blocks = [
        f"{_timestamp(c.start_s, '.')} --> {_timestamp(c.end_s, '.')}\n" + "\n".join(c.lines) for c in cues
    ]
    return "WEBVTT\n\n" + "\n\n".join(blocks) + ("\n" if blocks else "")
