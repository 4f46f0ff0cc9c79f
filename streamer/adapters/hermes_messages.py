"""Hermes' ASR messages as Rhasspy speaks them (``rhasspyhermes.asr``): topics, the JSON we read and the JSON we write.

Read: ``hermes/asr/startListening`` ``{siteId, sessionId, lang, stopOnSilence, sendAudioCaptured, wakewordId,
intentFilter}``, ``stopListening`` ``{siteId, sessionId}``, ``toggleOn``/``toggleOff`` ``{siteId, reason}``. Keys are
camelCase; absent keys take Rhasspy's defaults (``siteId`` ``"default"``, ``stopOnSilence`` true); unknown keys are
ignored, as Rhasspy's own services do. Written: ``textCaptured``, ``partialTextCaptured``, ``hermes/error/asr`` and
Rhasspy's ``audioCaptured``. Standard library only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from streamer.errors import ProtocolError
from streamer.protocol import Final, MessageError
from streamer.protocol.limits import load_client_object

START_LISTENING = "hermes/asr/startListening"
STOP_LISTENING = "hermes/asr/stopListening"
TOGGLE_ON = "hermes/asr/toggleOn"
TOGGLE_OFF = "hermes/asr/toggleOff"
TEXT_CAPTURED = "hermes/asr/textCaptured"
PARTIAL_TEXT_CAPTURED = "hermes/asr/partialTextCaptured"
ERROR = "hermes/error/asr"
AUDIO_FRAME = "hermes/audioServer/{site}/audioFrame"  # payload: a small WAV file
AUDIO_SESSION_FRAME = "hermes/audioServer/{site}/{session}/audioSessionFrame"  # the same, for one session
AUDIO_CAPTURED = "rhasspy/asr/{site}/{session}/audioCaptured"  # payload: the session's audio as one WAV file
DEFAULT_SITE = "default"
MAX_ID_CHARS = 256  # siteId, sessionId and the like


@dataclass(frozen=True, slots=True)
class StartListening:
    """``hermes/asr/startListening``: open a session on a site."""

    site_id: str = DEFAULT_SITE
    session_id: str | None = None
    lang: str | None = None
    stop_on_silence: bool = True  # the first final ends the session (Rhasspy's default)
    send_audio_captured: bool = False
    wakeword_id: str | None = None


@dataclass(frozen=True, slots=True)
class StopListening:
    """``hermes/asr/stopListening``: end the site's session (``session_id`` None: whichever it is)."""

    site_id: str = DEFAULT_SITE
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class Toggle:
    """``hermes/asr/toggleOn`` or ``toggleOff``; ``reason`` ``""`` is Rhasspy's UNKNOWN."""

    site_id: str = DEFAULT_SITE
    reason: str = ""


def _object(payload: bytes, topic: str) -> dict[str, Any]:
    """The payload's JSON object, read within protocol v1's limits on a client's message (size, depth, numbers)."""
    try:
        return load_client_object(payload)
    except MessageError as exc:
        raise ProtocolError(f"{topic}: {exc}") from exc


def _text(body: dict[str, Any], key: str, topic: str, default: str | None) -> str | None:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise ProtocolError(f"{topic}: {key!r} must be a non-empty string of at most {MAX_ID_CHARS} characters, "
                            f"got {value!r:.80}")
    return value


def _flag(body: dict[str, Any], key: str, topic: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"{topic}: {key!r} must be true or false, got {value!r:.80}")
    return value


def site_of(payload: bytes) -> str | None:
    """The ``siteId`` of a payload that failed to parse, when there is one to name in the error."""
    try:
        site = json.loads(payload).get("siteId")
    except (ValueError, AttributeError):
        return None
    return site if isinstance(site, str) and len(site) <= MAX_ID_CHARS else None


def parse_start(payload: bytes) -> StartListening:
    """Raises ProtocolError: not a JSON object, or a field of the wrong type."""
    body, topic = _object(payload, START_LISTENING), START_LISTENING
    return StartListening(
        str(_text(body, "siteId", topic, DEFAULT_SITE)), _text(body, "sessionId", topic, None),
        _text(body, "lang", topic, None), _flag(body, "stopOnSilence", topic, True),
        _flag(body, "sendAudioCaptured", topic, False), _text(body, "wakewordId", topic, None),
    )


def parse_stop(payload: bytes) -> StopListening:
    """Raises ProtocolError: not a JSON object, or a field of the wrong type."""
    body, topic = _object(payload, STOP_LISTENING), STOP_LISTENING
    return StopListening(str(_text(body, "siteId", topic, DEFAULT_SITE)), _text(body, "sessionId", topic, None))


def parse_toggle(payload: bytes, topic: str) -> Toggle:
    """Raises ProtocolError: not a JSON object, or a field of the wrong type."""
    body = _object(payload, topic)
    reason = body.get("reason", "")
    if not isinstance(reason, str):
        raise ProtocolError(f"{topic}: 'reason' must be a string, got {reason!r:.80}")
    return Toggle(str(_text(body, "siteId", topic, DEFAULT_SITE)), reason)


def likelihood(finals: Sequence[Final]) -> float:
    """The mean word confidence of ``finals`` (a final without words counts with its own confidence)."""
    scores = [w.confidence for f in finals for w in f.words] or [f.confidence for f in finals]
    return _number(sum(scores) / len(scores), 4) if scores else 0.0


def asr_tokens(finals: Sequence[Final], text: str) -> list[list[dict[str, Any]]]:
    """Rhasspy's ``asrTokens``: one list of ``{value, confidence, rangeStart, rangeEnd, time: {start, end}}``;
    ranges are character offsets into ``text``, times seconds from the session's first audio."""
    tokens, cursor = [], 0
    for final in finals:
        for word in final.words:
            at = text.find(word.word, cursor)
            start = at if at >= 0 else cursor
            end = start + len(word.word)
            cursor = end
            tokens.append({"value": word.word, "confidence": _number(word.confidence, 4), "rangeStart": start,
                           "rangeEnd": end, "time": {"start": _number(word.start, 3), "end": _number(word.end, 3)}})
    return [tokens]


def text_captured(start: StartListening, finals: Sequence[Final], seconds: float) -> bytes:
    """``hermes/asr/textCaptured`` for the finals of one session (joined; empty when nothing was recognized)."""
    text = " ".join(f.text for f in finals if f.text)
    return _dumps({
        "text": text, "likelihood": likelihood(finals), "seconds": round(seconds, 3), "siteId": start.site_id,
        "sessionId": start.session_id, "wakewordId": start.wakeword_id, "asrTokens": asr_tokens(finals, text),
        "lang": start.lang,
    })


def partial_text_captured(start: StartListening, text: str, seconds: float) -> bytes:
    """``hermes/asr/partialTextCaptured`` (Snips): the session's text so far. Partials carry no confidence
    estimate, so ``likelihood`` is 0."""
    return _dumps({"text": text, "likelihood": 0.0, "seconds": round(seconds, 3), "siteId": start.site_id,
                   "sessionId": start.session_id})


def error(message: str, context: str, site_id: str | None, session_id: str | None) -> bytes:
    """``hermes/error/asr``: ``error`` says what went wrong, ``context`` its code or the topic it came on."""
    return _dumps({"error": message, "context": context, "siteId": site_id, "sessionId": session_id})


def _number(value: float, digits: int) -> float:
    """``value`` rounded; 0 for a value JSON cannot carry (NaN, infinity), which no result should hold."""
    return round(value, digits) if math.isfinite(value) else 0.0


def _dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, allow_nan=False).encode()
