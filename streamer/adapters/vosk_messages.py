"""The Vosk server's WebSocket messages (vosk-server ``websocket/asr_server.py``): what a client sends, what it gets.

Client → server: an optional text message ``{"config": {"sample_rate": 16000, "words": true, "max_alternatives": 0,
"phrase_list": [...]}}`` (vosk-server looks for ``config`` anywhere in the text; so do we, then parse it), binary
frames of s16le mono audio, ``{"reset" : 1}`` (end the utterance now, keep going) and ``{"eof" : 1}`` (the end).
vosk-server compares the last two with these exact strings; we parse them as JSON, so any spacing works.

Server → client, one message per client message but the config: ``{"partial": "..."}`` while an utterance goes on,
``{"result": [{"conf", "end", "start", "word"}...], "text": "..."}`` when one ended (``result`` only with words on,
vosk-server's default, and only when there are words), or with ``max_alternatives`` above 0
``{"alternatives": [{"confidence", "result": [{"end", "start", "word"}...], "text"}]}`` (greedy decoding has one
alternative; ``confidence`` is our mean word confidence in [0, 1], where Vosk gives a lattice score). Times are
seconds from the first sample of the connection. Standard library only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from streamer.protocol import Final, MessageError
from streamer.protocol.limits import load_client_object, show

PHRASE_LIST_NOTE = "phrase_list is accepted and not used yet (per-session hotwords are separate work)"


@dataclass(slots=True)
class VoskConfig:
    """A connection's settings: vosk-server's defaults until a config message changes them."""

    sample_rate: int
    words: bool = True
    max_alternatives: int = 0
    phrase_list: list[str] = field(default_factory=list)
    has_rate: bool = False  # the client named its rate


@dataclass(frozen=True, slots=True)
class Command:
    """A text message that is not a config: ``eof``, ``reset``, or something else (``unknown``, with why)."""

    kind: str
    problem: str = ""


def is_config(text: str) -> bool:
    """vosk-server's own test: a text message that mentions ``config`` is one."""
    return "config" in text


def apply_config(config: VoskConfig, text: str) -> list[str]:
    """Apply a config message to ``config``; returns notes for the log.

    Raises:
        MessageError: not JSON, no ``config`` object, or a field of the wrong type (``sample_rate`` not a whole
            positive number, ``words`` not a boolean or 0/1, ``max_alternatives`` not a whole number >= 0,
            ``phrase_list`` not a list). The range of ``sample_rate`` is the session core's to check.
    """
    body = load_client_object(text).get("config")
    if not isinstance(body, dict):
        raise MessageError("bad_config", f"'config' must be a JSON object, got {show(body)}")
    notes = []
    if "sample_rate" in body:
        config.sample_rate, config.has_rate = _whole(body["sample_rate"], "sample_rate", minimum=1), True
    if "words" in body:
        words = body["words"]
        if isinstance(words, bool) or (isinstance(words, int) and words in (0, 1)):
            config.words = bool(words)
        else:
            raise MessageError("bad_config", f"'words' must be true, false, 1 or 0, got {show(words)}")
    if "max_alternatives" in body:
        config.max_alternatives = _whole(body["max_alternatives"], "max_alternatives", minimum=0)
    if "phrase_list" in body:
        phrases = body["phrase_list"]
        if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
            raise MessageError("bad_config", f"'phrase_list' must be a list of strings, got {show(phrases)}")
        config.phrase_list = phrases
        notes.append(PHRASE_LIST_NOTE)
    if "model" in body:
        notes.append("'model' is ignored: the daemon's model serves every connection")
    return notes


def _whole(value: Any, key: str, minimum: int) -> int:
    """A whole number, as vosk-server's ``float(...)``/``int(...)`` would take it (a numeric string too)."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number) \
            or number != int(number) or number < minimum:
        raise MessageError("bad_config", f"{key!r} must be a whole number of at least {minimum}, got {show(value)}")
    return int(number)


def parse_command(text: str) -> Command:
    """``{"eof" : 1}``, ``{"reset" : 1}``, or what is wrong with any other text message."""
    try:
        body = load_client_object(text)
    except MessageError as exc:
        return Command("unknown", str(exc))
    if body.get("eof"):
        return Command("eof")
    if body.get("reset"):
        return Command("reset")
    return Command("unknown", f"unknown message {show(text)}; send binary audio, a config, {{\"reset\" : 1}} or "
                   "{\"eof\" : 1}")


def partial(text: str) -> str:
    return _dumps({"partial": text})


def result(finals: Sequence[Final], config: VoskConfig) -> str:
    """One reply for ``finals`` (several are joined into one utterance; none is an empty result)."""
    text = " ".join(f.text for f in finals if f.text)
    words = [w for f in finals for w in f.words]
    if config.max_alternatives > 0:
        scores = [w.confidence for w in words] or [f.confidence for f in finals]
        alternative: dict[str, Any] = {"confidence": _number(sum(scores) / len(scores) if scores else 0.0, 6)}
        if config.words and words:
            alternative["result"] = [{"end": _number(w.end, 3), "start": _number(w.start, 3), "word": w.word}
                                     for w in words]
        alternative["text"] = text
        return _dumps({"alternatives": [alternative]})
    body: dict[str, Any] = {}
    if config.words and words:
        body["result"] = [{"conf": _number(w.confidence, 6), "end": _number(w.end, 3), "start": _number(w.start, 3),
                           "word": w.word} for w in words]
    body["text"] = text
    return _dumps(body)


def error(message: str) -> str:
    """Our addition: vosk-server has no error message (it closes the connection); a client that reads one more
    reply sees why, the close reason says it too."""
    return _dumps({"error": message})


def _number(value: float, digits: int) -> float:
    return round(value, digits) if math.isfinite(value) else 0.0


def _dumps(body: dict[str, Any]) -> str:
    return json.dumps(body, ensure_ascii=False, allow_nan=False)
