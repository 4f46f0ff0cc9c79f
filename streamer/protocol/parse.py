"""Parsing protocol v1's messages (see :mod:`streamer.protocol`): a client's strictly, within the limits, with
errors that name the offending field; a server's leniently (a newer server may add fields). Standard library only.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import fields
from typing import Any

from streamer.protocol.limits import MAX_ID_CHARS, check_hotword_weight, check_hotwords, load_client_object, show
from streamer.protocol.messages import (
    ENCODINGS,
    ENDPOINT_KEYS,
    MAX_CHANNELS,
    MAX_ENDPOINT_S,
    MAX_SAMPLE_RATE_HZ,
    MIN_SAMPLE_RATE_HZ,
    PROTOCOL_VERSION,
    STREAM_NAME,
    ClientMessage,
    End,
    Error,
    Final,
    Finalize,
    KeepAlive,
    MessageError,
    Moved,
    Partial,
    Ready,
    Resume,
    ServerMessage,
    Start,
    Stop,
    Warning,
    WordTiming,
)

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc


def parse_client_message(text: str | bytes) -> ClientMessage:
    """Parse one text message from a client, within the limits of "Errors and limits".

    Raises:
        MessageError: ``bad_json`` when it is not JSON (or, as bytes, not UTF-8); ``bad_message`` when it
            breaks a limit (size, depth, digits, a number out of range, a lone surrogate, a control
            character in an id), is not an object, has an unknown ``type``, lacks a field, has an unknown
            field or a value of the wrong type; ``unsupported_audio`` when ``start`` declares a format the
            server does not take. No other exception escapes.
    """
    obj = load_client_object(text)
    kind = obj.get("type")
    if kind == "start":
        return _parse_start(obj)
    for cls in (Finalize, Stop, KeepAlive):
        if kind == cls.type:
            _no_extra(obj, set(), kind)
            return cls()
    known = ", ".join(("start", "finalize", "stop", "keepalive"))
    if kind is None:
        raise MessageError("bad_message", f"message has no 'type'; expected one of: {known}")
    raise MessageError("bad_message", f"unknown message type {show(kind)}; expected one of: {known}")


def parse_server_message(text: str | bytes) -> ServerMessage:
    """Parse one message from the server (for clients). Unknown fields are ignored (newer servers)."""
    obj = _load_object(text)
    classes: dict[str, type] = {c.type: c for c in (Ready, Partial, Final, Warning, Error, End, Moved)}
    cls = classes.get(obj.get("type"))  # type: ignore[arg-type]
    if cls is None:
        raise MessageError("bad_message", f"unknown server message type {obj.get('type')!r}")
    kwargs = {}
    for f in fields(cls):
        if f.name in obj:
            kwargs[f.name] = obj[f.name]
    try:
        if cls is Final:
            kwargs["words"] = tuple(WordTiming(**w) for w in kwargs.get("words", ()))
            kwargs["token_ids"] = tuple(kwargs.get("token_ids", ()))
        if cls is Ready:
            kwargs["att_context_size"] = tuple(kwargs.get("att_context_size", ()))
            if kwargs.get("hotwords") is not None:
                kwargs["hotwords"] = tuple(kwargs["hotwords"])
        return cls(**kwargs)
    except TypeError as exc:
        raise MessageError("bad_message", f"{obj.get('type')}: {exc}") from exc


def _load_object(text: str | bytes) -> dict[str, Any]:
    """A server message's object (a client trusts its server: no limits beyond what the parser has)."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise MessageError("bad_json", f"text message is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise MessageError("bad_message", f"a message must be a JSON object, got {type(obj).__name__}")
    return obj



def _no_extra(obj: dict[str, Any], allowed: set[str], kind: str) -> None:
    extra = sorted(set(obj) - allowed - {"type"})
    if extra:
        raise MessageError(
            "bad_message", f"unknown field {show(extra[0])} in {kind!r}" + (f"; allowed: {', '.join(sorted(allowed))}"
                                                                             if allowed else "")
        )


def _int(obj: dict[str, Any], key: str, default: int | None = None) -> int:
    value = obj.get(key, default)
    if value is None:
        raise MessageError("bad_message", f"'start' needs {key!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageError("bad_message", f"{key!r} must be an integer, got {show(value)}")
    return value


def _parse_start(obj: dict[str, Any]) -> Start:
    allowed = {"sample_rate", "encoding", "channels", "stream", "interim_results", "endpointing", "version", "resume",
               "live", "hotwords", "hotword_weight"}
    _no_extra(obj, allowed, "start")
    version = _int(obj, "version", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise MessageError("bad_message", f"protocol version {version} is not supported; this server speaks 1")
    rate = _int(obj, "sample_rate")
    if not MIN_SAMPLE_RATE_HZ <= rate <= MAX_SAMPLE_RATE_HZ:
        raise MessageError(
            "unsupported_audio",
            f"sample_rate {rate} Hz is out of range; send {MIN_SAMPLE_RATE_HZ}-{MAX_SAMPLE_RATE_HZ} Hz",
        )
    encoding = obj.get("encoding")
    if encoding is None:
        raise MessageError("bad_message", "'start' needs 'encoding' (pcm_s16le or pcm_f32le)")
    if encoding not in ENCODINGS:
        raise MessageError(
            "unsupported_audio", f"encoding {show(encoding)} is not supported; use one of: {', '.join(ENCODINGS)}"
        )
    channels = _int(obj, "channels", 1)
    if not 1 <= channels <= MAX_CHANNELS:
        raise MessageError("unsupported_audio", f"channels must be 1-{MAX_CHANNELS}, got {channels}")
    stream = obj.get("stream")
    if stream is not None and not isinstance(stream, str):  # 7 is not "7": the rule below would read as satisfied
        raise MessageError("bad_message", f"'stream' must be a string, got {show(stream)}")
    if stream is not None and not STREAM_NAME.fullmatch(stream):
        raise MessageError(
            "bad_message",
            f"stream name {show(stream)} is invalid: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit",
        )
    interim = obj.get("interim_results", True)
    if not isinstance(interim, bool):
        raise MessageError("bad_message", f"'interim_results' must be true or false, got {show(interim)}")
    live = obj.get("live", False)
    if not isinstance(live, bool):
        raise MessageError("bad_message", f"'live' must be true or false, got {show(live)}")
    resume = _parse_resume(obj["resume"]) if obj.get("resume") is not None else None
    endpointing = _parse_endpointing(obj.get("endpointing", {}))
    hotwords = check_hotwords(obj["hotwords"]) if "hotwords" in obj else None  # the server's own cap: the core's
    weight = obj.get("hotword_weight")
    if weight is not None:
        weight = check_hotword_weight(weight)
    return Start(rate, encoding, channels, stream, interim, endpointing, version, resume, live, hotwords, weight)


def _parse_resume(value: Any) -> Resume:
    if not isinstance(value, dict):
        raise MessageError("bad_message", f"'resume' must be an object, got {show(value)}")
    _no_extra(value, {"session", "token", "next_segment"}, "resume")
    for key in ("session", "token"):
        if not isinstance(value.get(key), str) or not value[key]:
            raise MessageError("bad_message", f"'resume' needs {key!r}, a string from the session's 'ready'")
        if len(value[key]) > MAX_ID_CHARS:
            raise MessageError("bad_message", f"'resume.{key}' has {len(value[key])} characters, over the limit of "
                               f"{MAX_ID_CHARS}; send the one from the session's 'ready'")
        if _CONTROL.search(value[key]) is not None:
            raise MessageError("bad_message", f"'resume.{key}' {show(value[key])} holds a control character; send "
                               "the one from the session's 'ready'")
    next_segment = value.get("next_segment", 0)
    if isinstance(next_segment, bool) or not isinstance(next_segment, int) or next_segment < 0:
        raise MessageError("bad_message", f"'resume.next_segment' must be an integer >= 0, got {show(next_segment)}")
    return Resume(value["session"], value["token"], next_segment)


def _parse_endpointing(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise MessageError("bad_message", f"'endpointing' must be an object, got {show(value)}")
    out: dict[str, float] = {}
    for key, seconds in value.items():
        if key not in ENDPOINT_KEYS:
            raise MessageError(
                "bad_message", f"unknown endpointing rule {show(key)}; known: {', '.join(ENDPOINT_KEYS)}"
            )
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
            raise MessageError("bad_message", f"endpointing.{key} must be a number of seconds, got {show(seconds)}")
        if not 0 < seconds <= MAX_ENDPOINT_S:
            raise MessageError("bad_message", f"endpointing.{key} must be in (0, {MAX_ENDPOINT_S:g}] s, got {seconds}")
        out[key] = float(seconds)
    return out


