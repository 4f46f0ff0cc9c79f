"""What OpenAI's transcription API answers, built from the core's finals: ``json``, ``text``, ``srt``, ``vtt``,
``verbose_json``, the server-sent events of ``stream=true``, error bodies, and text deltas.

Field names and shapes follow the ``openai`` SDK's types (``Transcription``, ``TranscriptionVerbose`` with
``segments`` and ``words``, ``TranscriptionTextDeltaEvent``/``TranscriptionTextDoneEvent``, the API's
``{"error": {...}}``). Where a field has no counterpart in a transducer (``temperature``, ``no_speech_prob``,
``seek``), it holds the neutral value and the README says so.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from streamer.protocol import Final
from streamer.subtitles import build_cues, to_srt, to_vtt

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object, as the HTTP API answers it (the realtime API puts it in an ``error`` event)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def transcript(finals: Iterable[Final]) -> str:
    """The whole text: the segments' texts, one space apart."""
    return " ".join(f.text for f in finals if f.text)


@dataclass(frozen=True, slots=True)
class _Word:
    """A final's word as :func:`streamer.subtitles.build_cues` takes it."""

    word: str
    start_s: float
    end_s: float


def render(response_format: str, finals: Sequence[Final], duration_s: float, language: str | None,
           granularities: Sequence[str]) -> tuple[bytes, str]:
    """The answer's body and ``Content-Type`` for one of :data:`RESPONSE_FORMATS`."""
    text = transcript(finals)
    if response_format == "text":
        return (text + "\n").encode(), "text/plain; charset=utf-8"
    if response_format in ("srt", "vtt"):
        cues = build_cues([_Word(w.word, w.start, w.end) for f in finals for w in f.words])
        body = to_srt(cues) if response_format == "srt" else to_vtt(cues)
        return body.encode(), "text/plain; charset=utf-8" if response_format == "srt" else "text/vtt; charset=utf-8"
    usage = {"type": "duration", "seconds": round(duration_s, 3)}
    if response_format == "verbose_json":
        verbose: dict[str, Any] = {"task": "transcribe", "language": language or "unknown",
                                   "duration": round(duration_s, 3), "text": text}
        if not granularities or "segment" in granularities:
            verbose["segments"] = [segment(i, f) for i, f in enumerate(finals)]
        if "word" in granularities:
            verbose["words"] = [{"word": w.word, "start": w.start, "end": w.end} for f in finals for w in f.words]
        verbose["usage"] = usage
        return _json(verbose), "application/json"
    return _json({"text": text, "usage": usage}), "application/json"


def segment(index: int, final: Final) -> dict[str, Any]:
    """A final as a ``verbose_json`` segment. ``avg_logprob`` is the log of the final's mean token confidence;
    ``compression_ratio`` is computed as Whisper does (text length over its zlib-compressed length)."""
    data = final.text.encode()
    ratio = len(data) / len(zlib.compress(data)) if data else 0.0
    return {"id": index, "seek": 0, "start": final.start, "end": final.end, "text": final.text,
            "tokens": list(final.token_ids), "temperature": 0.0,
            "avg_logprob": round(math.log(max(final.confidence, 1e-6)), 4),
            "compression_ratio": round(ratio, 4), "no_speech_prob": 0.0}


def sse(event: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``event`` as its data."""
    return b"data: " + json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


class SegmentText:
    """The append-only text of one segment, for protocols whose deltas cannot be taken back.

    A partial's ``stable`` prefix never changes any more (``streamer.engine.segmenting``), so it can be sent as
    it grows; the final sends the rest. Should a final ever not start with what was sent, nothing more is sent
    for the segment (its whole text still goes out in the protocol's completed or done message).
    """

    def __init__(self) -> None:
        self.sent = ""

    def grow(self, text: str) -> str:
        """The part of ``text`` (a stable prefix, or the final text) not sent yet; "" when none or it diverged."""
        if len(text) > len(self.sent) and text.startswith(self.sent):
            delta, self.sent = text[len(self.sent):], text
            return delta
        return ""
