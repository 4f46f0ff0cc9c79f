"""SRT/WebVTT subtitles from word times: line limits, cue splitting, timing, and the CLI."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from streamer.cli import main
from streamer.subtitles import MAX_CHARS, build_cues, to_srt, to_vtt, wrap


@dataclass
class W:
    word: str
    start_s: float
    end_s: float


def words_from(text: str, start: float = 0.0, step: float = 0.3, gaps: dict[int, float] | None = None) -> list[W]:
    out, t = [], start
    for i, w in enumerate(text.split()):
        t += (gaps or {}).get(i, 0.0)
        out.append(W(w, t, t + step * 0.8))
        t += step
    return out


def test_lines_respect_the_limit_and_balance() -> None:
    """Wrapped lines never exceed the limit and two-line cues are balanced."""
    text = "the quick brown fox jumps over the lazy dog and keeps running far away"
    lines = wrap(text.split())
    assert len(lines) == 2 and all(len(line) <= MAX_CHARS for line in lines)
    assert abs(len(lines[0]) - len(lines[1])) <= 12
    assert " ".join(lines) == text


def test_cues_split_on_pauses_sentences_length_and_duration() -> None:
    """A long pause and a sentence end start new cues; long runs are cut by size and duration."""
    ws = words_from("hello there. how are you today my friend", gaps={5: 2.0})
    cues = build_cues(ws)
    assert [" ".join(c.lines) for c in cues] == ["hello there.", "how are you", "today my friend"]
    long = words_from(" ".join(["word"] * 60), step=0.2)
    cues = build_cues(long)
    assert all(len(c.lines) <= 2 and all(len(x) <= MAX_CHARS for x in c.lines) for c in cues)
    assert all(c.end_s - c.start_s <= 6.0 + 1e-6 for c in cues)
    assert sum(len(" ".join(c.lines).split()) for c in cues) == 60


def test_cues_do_not_overlap_and_stay_readable() -> None:
    """Cues are ordered, never overlap, and a short cue is stretched when there is room."""
    ws = [W("hi.", 0.0, 0.2), W("yes", 3.0, 3.1), W("no", 3.15, 3.3)]
    cues = build_cues(ws)
    assert cues[0].end_s >= 0.7 - 1e-9
    for a, b in zip(cues, cues[1:], strict=False):
        assert a.end_s <= b.start_s


def test_srt_and_vtt_formats() -> None:
    """SRT numbers cues with comma milliseconds; WebVTT has its header and dot milliseconds."""
    cues = build_cues(words_from("one two three. four five", start=3661.5))
    srt = to_srt(cues)
    assert srt.startswith("1\n01:01:01,500 --> ")
    assert re.findall(r"^\d+$", srt, flags=re.M) == ["1", "2"]
    vtt = to_vtt(cues)
    assert vtt.startswith("WEBVTT\n\n01:01:01.500 --> ")
    assert to_srt([]) == "" and to_vtt([]) == "WEBVTT\n\n"


def test_cli_writes_subtitles(capsys, tmp_path: Path, tiny_nemo: Path, speech_wav: Path) -> None:
    """`transcribe --format srt|vtt` prints cues whose times lie inside the audio, and --output-dir writes files."""
    assert main(["transcribe", "--model", str(tiny_nemo), "--format", "vtt", str(speech_wav)]) == 0
    vtt = capsys.readouterr().out
    assert vtt.startswith("WEBVTT")
    times = re.findall(r"(\d\d):(\d\d):(\d\d)\.(\d\d\d) --> ", vtt)
    assert times, "the tiny model emits words, so there are cues"
    assert main(["transcribe", "--model", str(tiny_nemo), "--format", "srt", "--output-dir", str(tmp_path),
                 str(speech_wav), str(speech_wav)]) == 0
    assert (tmp_path / f"{speech_wav.stem}.srt").read_text().startswith("1\n00:00:")
    assert main(["transcribe", "--model", str(tiny_nemo), "--format", "srt", str(speech_wav), str(speech_wav)]) == 2
    assert "--output-dir" in capsys.readouterr().err
