"""Wire protocol v1 of ``WS /v1/listen`` and ``WS /v1/captions``: typed messages, JSON in and out.

Standard library only, so a client can ``from streamer.protocol import ...`` without torch.

Session on ``/v1/listen``
=========================

1. The client opens ``ws://HOST:8765/v1/listen`` and sends one text message, :class:`Start`::

       {"type": "start", "sample_rate": 48000, "encoding": "pcm_s16le", "channels": 1,
        "stream": "kitchen", "interim_results": true,
        "endpointing": {"trailing_silence_after_speech_s": 0.8}}

   Only ``type``, ``sample_rate`` and ``encoding`` are required. ``sample_rate`` is 8000-48000 Hz (the
   server resamples to the model's rate), ``encoding`` is ``pcm_s16le`` or ``pcm_f32le`` (little
   endian, channels interleaved), ``channels`` 1-8 (mixed down to mono). ``stream`` names the stream
   for ``/v1/captions`` and MQTT topics (letters, digits, ``_ . -``, at most 64; default: the session
   id); two live sessions cannot share a name. ``interim_results: false`` turns partials off for this
   client only. ``endpointing`` overrides the server's rules for this session (see
   ``streamer.engine.endpoint``). ``resume`` continues a session whose connection dropped (see
   "Resuming a session"). ``live`` (default false) says whether the source can wait (see "Flow
   control"). Unknown fields are errors.
2. The server answers :class:`Ready` (session id, stream, model, protocol version, att_context_size,
   sample rate, the step period ``chunk_s``, the effective endpointing rules and ``live``; when the server keeps
   sessions across reconnects, also ``resume_token``, ``resume_window_s``, ``resumed`` and ``audio_s``:
   see "Resuming a session" below).
3. The client sends binary frames of audio in the declared encoding, of any length: the audio is a byte
   stream, and a frame may end in the middle of a sample (or of a sample frame of several channels), whose
   remaining bytes come first in the next frame. Only audio that ends on an incomplete sample frame loses
   those bytes (``end.incomplete_bytes`` says how many). Text messages in between: :class:`Finalize`
   (end the current segment now, keep listening), :class:`KeepAlive` (resets the idle timer),
   :class:`Stop` (no more audio: the server flushes the last segment, sends its final, then
   :class:`End` (with the seconds of audio received and dropped), and closes with 1000).
4. The server sends :class:`Partial` whenever the text of the open segment changes (``stable`` is the
   prefix of ``text`` that will not change any more) and exactly one :class:`Final` per segment,
   with words, times and confidence. Segments are numbered from 0 per stream; a segment in which
   nothing was recognized has no partial and no final and takes no number.

Times (``start``, ``end``, word times) are seconds on the stream's own clock: from its first sample,
counting audio the server dropped and not counting silence it padded in to flush a segment. No time lies
beyond the audio received so far (a partial's ``end`` is capped there, though its last token's predicted
duration may reach further). Endpointing rules are checked on every encoder frame (80 ms), not only at the
end of each model step, so a pause ends its segment whatever the look-ahead.

Flow control
============

A client that can wait (the default: a file, a batch job, a replay) is never thinned: while its audio
waits for recognition beyond ``engine.ring_capacity_s``, the server stops reading its socket, so TCP
slows the sender down, and the whole file is recognized at the speed the box allows. Each scheduling
round gives such a client one step, like every other stream, and live streams are served first, so a
fast client cannot take the box from live ones. A live source (``"live": true``: a microphone, or any
client paced at real time that must not fall behind) cannot wait: when the server falls more than
``engine.lag_warning_s`` behind it, it gets warning ``falling_behind`` (``seconds``: how far behind;
once, and again after it has caught up to half of that), and beyond ``engine.ring_capacity_s`` its
oldest audio is dropped with warning ``audio_dropped`` (``seconds``: how much). ``ready.live`` says which
rule applies; ``end.dropped_s`` is the account. ``/metrics`` has each live stream's lag
(``streamer_stream_lag_seconds{stream=...}``). The caption page, ``streamer mic --url`` and
``ws_client.py --mic/--realtime`` send ``"live": true``; ``ws_client.py FILE`` does not.

Resuming a session
==================

When ``server.resume_window_s`` is above 0 (default 10 s), every ``ready`` carries ``resume_token``
(a secret for this session, new in every ``ready``: a token resumes once), ``resume_window_s``,
``resumed`` (false for a new session) and ``audio_s`` (0 for a new session).

If the connection breaks without ``stop`` (no close frame from the client: a network drop, a laptop
that roams or sleeps, a server-side keepalive timeout), the server keeps the session for
``resume_window_s``: its recognizer state, open segment, stream name and the results its client may
have missed. Its partials and finals keep going to ``/v1/captions`` subscribers and MQTT meanwhile
(a final made while the client is away goes out to them at once and is kept for the client). A client
that closes the WebSocket itself (any close frame) without ``stop`` has hung up: its session ends at
once, as does one closed by the server for a policy reason (slow consumer, frame too large).

To resume, a new connection sends ``start`` with the same ``sample_rate``, ``encoding`` and
``channels`` (``stream`` and ``endpointing`` may be left out; if given they must match) and::

    "resume": {"session": "<session from ready>", "token": "<resume_token from the latest ready>",
               "next_segment": 3}

``next_segment`` is the number of the first segment whose final the client has not received (the
count of finals it has, since finals are numbered from 0; default 0: every final the server kept).
The server answers ``ready`` with ``resumed: true``, the same ``session`` and ``stream``, a new
``resume_token`` and ``audio_s``: the seconds of audio it received in the session so far, exact
(``audio_s * sample_rate``, rounded, is the number of sample frames). The client re-sends its audio
from that point on (clients keep a bounded buffer of recent audio for this; :class:`ClientSession` does
a client's bookkeeping) and then continues live.
After ``ready`` come, in order, the finals from ``next_segment`` on (those sent on the broken
connection, which may not have arrived, and those made while away), warnings made while away, the
open segment's latest partial, then live results. When the server no longer keeps some finals from
``next_segment`` on (it keeps the last ``server.max_pending_messages``), warning ``results_lost`` naming
them comes first. The replay does not count against the slow-consumer limit (see below). A session
whose old connection the server still believes open (it has not noticed the drop yet) is taken over:
that connection is dropped.

If the session cannot be resumed, the server sends error ``resume_failed`` saying why (no such
session, or it ended or its window expired; a wrong token; a token used already; a format, stream
or endpointing that differs from the session's; a server with resume off) and then treats the
``start`` as a new session without ``resume`` (which gets its own ``ready``, or its own error such as
``stream_in_use`` while the old session is still held). A mismatched ``start`` leaves the held session
alone. When the window passes without a resume, the session ends as a disconnect always did: its
open segment is flushed as a final with reason ``disconnect`` to the other sinks. A held session
counts against ``server.max_sessions`` until it ends; when only held sessions fill the cap, a new
connection is let in but may only resume one of them (a new session gets ``server_busy``, close
1013). At shutdown held sessions are flushed like any other. A resume is a ``/v1/listen`` request like
any other and needs the daemon's access token when it has tokens; the resume token is a second
secret, bound to its session, and is never logged.

After a restart of the server (a crash, or a stop while the session was held), with a state directory
(``state.dir``), the session cannot go on, but what it had is not lost: a ``start`` that resumes it with
its latest token gets error ``resume_failed`` saying the server restarted, then the finals from
``next_segment`` on that the session kept (their old stream name and segment numbers; warning
``results_lost`` first when some are no longer kept), then the ``start`` goes on as a new session. This
works once per session, within ``resume_window_s`` of the restarted server being ready.

Errors and limits
=================

An :class:`Error` names the offending input by ``code``; the offending message or frame is discarded
and the session goes on (the client may, for example, send a corrected ``start``). Codes:

- ``bad_json``: a text message that is not JSON (or not UTF-8);
- ``bad_message``: not an object, an unknown ``type``, a missing, unknown or ill-typed field; anything
  sent on ``/v1/captions`` (see there); a text message over one of the limits below (checked before or
  while the JSON is parsed; the reason names the limit);
- ``no_start``: audio or ``finalize``/``stop`` before ``start``;
- ``already_started``: a second ``start``;
- ``unsupported_audio``: sample rate, encoding or channel count out of range;
- ``bad_audio``: NaN or infinite float samples (the frame is dropped whole);
- ``stream_in_use``: another live source (or a session held for a resume) already sends that stream name;
- ``resume_failed``: the ``start`` could not resume the session it names (see above); a new session
  is started instead;
- ``server_busy``: the session cap is reached (then closed with 1013);
- ``not_ready``: the server is starting or stopping (then closed with 1013);
- ``start_timeout``: no ``start`` within ``server.start_timeout_s`` of connecting, keepalive or not (then 1008);
- ``idle_timeout``: nothing received for ``server.idle_timeout_s`` (the open segment is flushed,
  ``end`` sent, then closed with 1008);
- ``internal_error``: the server failed while handling this message (a bug: it is logged with a
  traceback and counted in ``streamer_protocol_errors_total``); the message is discarded and the
  session goes on.

Limits on a client's text message (a frame larger than ``server.max_frame_bytes`` is refused before
any of these, with close 1009), each refused with ``bad_message`` and a reason naming it:

- at most ``MAX_TEXT_BYTES`` (64 KiB) of UTF-8;
- arrays and objects nested at most ``MAX_JSON_DEPTH`` (16) deep (counted before the text is parsed);
- integers of at most ``MAX_INT_DIGITS`` (32) digits; other numbers of at most ``MAX_NUMBER_CHARS`` (64)
  characters whose value is a finite float (``1e400`` is refused); ``NaN``, ``Infinity`` and
  ``-Infinity`` are not JSON, and every field refuses them by name (e.g. "endpointing.max_segment_s must
  be a number of seconds, got nan");
- strings (and keys) of Unicode scalar values: a lone surrogate escape such as ``"\\ud800"`` is refused;
- ``resume.session`` and ``resume.token``: at most ``MAX_ID_CHARS`` (256) characters, no control
  characters.

Every number the server writes is valid JSON: a value it cannot state as a finite number (a
``confidence`` computed from absurd input, say) is sent as ``null``, and the cause is logged once.

A :class:`Warning` discards nothing the client sent: ``audio_dropped`` (a live session: the server fell
behind and dropped ``seconds`` of the oldest audio), ``falling_behind`` (a live session is ``seconds``
behind real time), ``audio_clipped`` (``pcm_f32le`` samples beyond [-1, 1] were clipped to it; said once
per session), ``empty_frame`` (an empty binary frame was ignored),
``results_lost`` (a resumed session could not replay every final from ``next_segment`` on: the server
keeps the last ``server.max_pending_messages``).

Close codes: 1000 after ``end``; 1001 when the server shuts down (every open segment is flushed and
``end`` sent first); 1008 idle timeout or a client too slow to read its results; 1009 a frame larger
than ``server.max_frame_bytes``; 1011 an internal error outside the handling of a text message (a
failure while handling one is error ``internal_error`` instead, and the session goes on); 1013 session cap
reached or not ready.

Captions on ``/v1/captions?stream=NAME``
========================================

A read-only subscription to the partials and finals of a named stream (the microphone, a file
source or a ``/v1/listen`` session), in the same JSON as above. Partials may be skipped when the
subscriber is behind (the latest wins); finals are never skipped: a subscriber that leaves
``server.max_pending_messages`` finals unread is closed with 1008. A subscriber sends nothing: the
first text or binary message it sends anyway gets error ``bad_message`` (``/v1/captions`` is
read-only; audio goes to ``/v1/listen``), and it and any later ones are dropped (the later ones
silently); the subscription goes on. A bad or missing name gets error ``bad_message`` and close 1008;
the subscription cap (``server.max_subscribers``) error ``server_busy`` and close 1013. At shutdown
subscribers get the flushed finals, then close 1001.

Each ``final`` and ``partial`` is also published to MQTT when enabled:
``<prefix>/<device>/<stream>/partial`` (QoS 0) and ``<prefix>/<device>/<stream>/final`` (QoS 1), with
the same JSON plus one last field ``run``, plus a retained ``<prefix>/<device>/status`` of
``online``/``offline``. ``run`` is a new id at every start of the daemon (its UTC start time and random
digits, e.g. ``"20250314T091502Z-3fa9c1"``; compare it for equality only). Segment numbers start again
at 0 after a restart, so a subscriber tells results apart by ``(run, segment)`` on a stream's topic.

Finals reach the broker at least once and in order per stream. With a state directory (``state.dir``,
by default systemd's ``StateDirectory=``) every final is committed to an SQLite journal on disk before
it is published and deleted once the broker acknowledged it: finals made while the broker is away
survive a crash, ``kill -9`` or a power cut, and are delivered first after the next start, with their
original payload (and so their old ``run``). A final whose acknowledgement was lost with the connection
or the process is sent again (a subscriber may see it twice: same ``run`` and ``segment``). While the
broker is connected no final is dropped; while it is away at most ``mqtt.outbox_size`` are kept, and
beyond that the oldest are dropped (counted in ``streamer_mqtt_finals_dropped_total``).

What a crash (``kill -9``, power loss) still loses: the open segment of every stream (its audio and
partials: it never becomes a final), a ``/v1/listen`` session and its resume state (a client that
reconnects with its ``resume`` gets ``resume_failed`` and a new session whose segments start at 0), and
the finals kept for a replay to that client (they were published to MQTT, and reach the broker there).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import re
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

from streamer.errors import ProtocolError

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
BYTES_PER_SAMPLE = {"pcm_s16le": 2, "pcm_f32le": 4}  # the PCM encodings a client may send
ENCODINGS = tuple(BYTES_PER_SAMPLE)
MIN_SAMPLE_RATE_HZ = 8000
MAX_SAMPLE_RATE_HZ = 48000
MAX_CHANNELS = 8
STREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Endpointing rules a client may override in ``start`` (they mirror streamer.engine.endpoint).
ENDPOINT_KEYS = ("trailing_silence_after_speech_s", "silence_without_speech_s", "max_segment_s")
MAX_ENDPOINT_S = 3600.0
RESUME_BUFFER_S = 30.0  # audio a live client keeps to re-send after a reconnect (the server says where it got to)
# Limits on a client's text message (see "Errors and limits"): checked before and while it is parsed, so a
# hostile document never reaches the recursive parser or the big-integer conversion.
MAX_TEXT_BYTES = 64 * 1024
MAX_JSON_DEPTH = 16
MAX_INT_DIGITS = 32
MAX_NUMBER_CHARS = 64
MAX_ID_CHARS = 256  # resume.session and resume.token (the server's are 12 and 43 characters)


class MessageError(ProtocolError):
    """A message breaks the protocol; ``code`` is the error code the server sends back."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- client -> server


@dataclass(frozen=True, slots=True)
class Resume:
    """In ``start``: continue session ``session`` (``token`` from its latest ``ready``); the client has the
    finals of the segments before ``next_segment``."""

    session: str
    token: str
    next_segment: int = 0


@dataclass(frozen=True, slots=True)
class Start:
    """Opens a session (or resumes one, with ``resume``): the audio format and the session's options."""

    sample_rate: int
    encoding: str
    channels: int = 1
    stream: str | None = None
    interim_results: bool = True
    endpointing: dict[str, float] = field(default_factory=dict)
    version: int = PROTOCOL_VERSION
    resume: Resume | None = None
    live: bool = False
    type: ClassVar[str] = "start"

    @property
    def frame_bytes(self) -> int:
        """Bytes of one sample frame (all channels)."""
        return BYTES_PER_SAMPLE[self.encoding] * self.channels

    def to_json(self) -> str:
        return _dumps(self)


@dataclass(frozen=True, slots=True)
class Finalize:
    """End the current segment now (its final follows) and keep listening."""

    type: ClassVar[str] = "finalize"

    def to_json(self) -> str:
        return _dumps(self)


@dataclass(frozen=True, slots=True)
class Stop:
    """No more audio: flush the last segment, send its final and ``end``, close."""

    type: ClassVar[str] = "stop"

    def to_json(self) -> str:
        return _dumps(self)


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """Nothing to say; resets the server's idle timer."""

    type: ClassVar[str] = "keepalive"

    def to_json(self) -> str:
        return _dumps(self)


ClientMessage = Start | Finalize | Stop | KeepAlive

# ---------------------------------------------------------------- server -> client


@dataclass(frozen=True, slots=True)
class Ready:
    """The session is open (or resumed); audio may follow.

    The resume fields are None (left out on the wire) when the server does not keep sessions:
    ``resume_token`` resumes this session once, within ``resume_window_s`` of a dropped connection;
    ``resumed`` is true when this ``start`` resumed one; ``audio_s`` is the audio received in the session
    so far (exact; re-send from there).
    """

    session: str
    stream: str
    model: str
    att_context_size: tuple[int, int]
    sample_rate: int
    chunk_s: float
    endpointing: dict[str, float]
    protocol_version: int = PROTOCOL_VERSION
    resume_token: str | None = None
    resume_window_s: float | None = None
    resumed: bool | None = None
    audio_s: float | None = None
    live: bool = False
    type: ClassVar[str] = "ready"

    def to_json(self) -> str:
        return _dumps(self)


@dataclass(frozen=True, slots=True)
class Partial:
    """The open segment's text so far; ``stable`` is a prefix of ``text`` that will not change."""

    stream: str
    segment: int
    text: str
    stable: str
    start: float
    end: float
    type: ClassVar[str] = "partial"

    def to_json(self) -> str:
        return _dumps(self)


@dataclass(frozen=True, slots=True)
class WordTiming:
    """One word of a final, seconds on the stream's clock, confidence in [0, 1]."""

    word: str
    start: float
    end: float
    confidence: float


@dataclass(frozen=True, slots=True)
class Final:
    """The one and only result of a segment.

    ``reason`` says what ended it: ``silence``, ``max_length``, ``eou`` (the model's end-of-utterance
    token), ``finalize``, ``stop``, ``disconnect``, ``idle`` or ``shutdown``. ``confidence`` is the
    mean of the token confidences; ``eou`` is true when the model emitted an end-of-utterance token.
    """

    stream: str
    segment: int
    text: str
    start: float
    end: float
    words: tuple[WordTiming, ...]
    token_ids: tuple[int, ...]
    confidence: float
    eou: bool
    reason: str
    type: ClassVar[str] = "final"

    def to_json(self) -> str:
        return _dumps(self)


@dataclass(frozen=True, slots=True)
class Warning:  # the message is called "warning" on the wire (shadows the builtin here only)
    """Something the client should know; nothing it sent was discarded (``seconds``: how much audio)."""

    code: str
    message: str
    stream: str | None = None
    seconds: float | None = None
    type: ClassVar[str] = "warning"

    def to_json(self) -> str:
        return _dumps(self)


@dataclass(frozen=True, slots=True)
class Error:
    """A message or frame from the client was discarded (or the session ends, see the close code)."""

    code: str
    message: str
    stream: str | None = None
    type: ClassVar[str] = "error"

    def to_json(self) -> str:
        return _dumps(self)


@dataclass(frozen=True, slots=True)
class End:
    """The session is over: no more messages follow.

    ``segments``: how many finals were sent. ``audio_s``: seconds of audio the server received in this
    session (at the client's sample rate; a client compares it with what it sent). ``dropped_s``: seconds
    of that audio the server dropped because it fell behind (also announced by ``audio_dropped``; only a
    live session drops). ``incomplete_bytes``: when the audio ended in the middle of a sample frame, the bytes
    of that last incomplete frame, which could not be used (left out when 0).
    """

    stream: str
    segments: int
    audio_s: float | None = None
    dropped_s: float | None = None
    incomplete_bytes: int | None = None
    type: ClassVar[str] = "end"

    def to_json(self) -> str:
        return _dumps(self)


ServerMessage = Ready | Partial | Final | Warning | Error | End
Message = ClientMessage | ServerMessage


def to_dict(msg: Message) -> dict[str, Any]:
    """The JSON object of a message (``type`` first), e.g. an MQTT payload.

    Always valid JSON and valid UTF-8 once dumped: a non-finite float becomes None (``null``; the first
    one of each field is logged) and a lone surrogate in a string becomes U+FFFD.
    """
    body = {key: _json_safe(value, f"{msg.type}.{key}") for key, value in asdict(msg).items() if value is not None}
    return {"type": msg.type, **body}


def _dumps(msg: Message) -> str:
    return json.dumps(to_dict(msg), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


_SURROGATE = re.compile(r"[\ud800-\udfff]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc
_reported_fields: set[str] = set()  # fields whose non-finite value was logged already (once each)


def _json_safe(value: Any, where: str) -> Any:
    """``value`` with what JSON cannot carry replaced: non-finite floats by None, lone surrogates by U+FFFD."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        if where not in _reported_fields:
            _reported_fields.add(where)
            logger.warning("%s was %r, which JSON cannot carry; sent as null (the input was probably absurd; "
                           "logged once per field)", where, value)
        return None
    if isinstance(value, str):
        if value.isascii() or _SURROGATE.search(value) is None:
            return value
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {_json_safe(k, where): _json_safe(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v, where) for v in value]
    return value


# ---------------------------------------------------------------- parsing


def parse_client_message(text: str | bytes) -> ClientMessage:
    """Parse one text message from a client, within the limits of "Errors and limits".

    Raises:
        MessageError: ``bad_json`` when it is not JSON (or, as bytes, not UTF-8); ``bad_message`` when it
            breaks a limit (size, depth, digits, a number out of range, a lone surrogate, a control
            character in an id), is not an object, has an unknown ``type``, lacks a field, has an unknown
            field or a value of the wrong type; ``unsupported_audio`` when ``start`` declares a format the
            server does not take. No other exception escapes.
    """
    obj = _load_client_object(text)
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
    raise MessageError("bad_message", f"unknown message type {_show(kind)}; expected one of: {known}")


def parse_server_message(text: str | bytes) -> ServerMessage:
    """Parse one message from the server (for clients). Unknown fields are ignored (newer servers)."""
    obj = _load_object(text)
    classes: dict[str, type] = {c.type: c for c in (Ready, Partial, Final, Warning, Error, End)}
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


def _load_client_object(text: str | bytes) -> dict[str, Any]:
    """A client message's object, parsed only after the size and depth limits held, with number hooks."""
    if isinstance(text, bytes | bytearray):
        _check_size(len(text))
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MessageError("bad_json", f"text message is not valid JSON: not UTF-8 ({exc})") from exc
    _check_size(len(text))  # a character is at least one byte: a long text is refused without encoding it
    _check_size(len(text.encode("utf-8", "surrogatepass")))
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise MessageError(
            "bad_message", f"arrays and objects nested {depth} deep; the limit is {MAX_JSON_DEPTH}"
        )
    try:
        obj = json.loads(text, parse_int=_parse_int, parse_float=_parse_float)  # NaN: see _parse_float
    except (ValueError, RecursionError) as exc:  # RecursionError cannot happen within the depth limit
        raise MessageError("bad_json", f"text message is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise MessageError("bad_message", f"a message must be a JSON object, got {type(obj).__name__}")
    _check_strings(obj)
    return obj


def _check_size(size: int) -> None:
    if size > MAX_TEXT_BYTES:
        raise MessageError(
            "bad_message", f"text message of at least {size} bytes is over the limit of {MAX_TEXT_BYTES} bytes; "
            "send audio as binary frames and keep control messages small"
        )


# A JSON string from its opening quote: escapes included, up to its closing quote or, unterminated, to the end
# of the text. It cannot fail to match once a quote is found (``\\.?`` takes even a trailing backslash), so a
# search never starts again inside a string: linear in the text, whatever the quotes and backslashes.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.?[^"\\]*)*(?:"|$)', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _json_depth(text: str) -> int:
    """How deep arrays and objects nest in ``text``, without parsing it (brackets inside strings ignored).

    Linear in the text; for text that is not JSON the count is approximate, and the parser refuses it.
    """
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:  # nearly every message: no need to look closer
        return 0
    outside = _JSON_STRING.sub("", text)
    return max(itertools.accumulate(map(_DEPTH_STEP.__getitem__, _BRACKETS.findall(outside))), default=0)


def _parse_int(literal: str) -> int:
    digits = len(literal) - literal.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise MessageError(
            "bad_message", f"an integer of {digits} digits is over the limit of {MAX_INT_DIGITS} digits"
        )
    return int(literal)


def _parse_float(literal: str) -> float:
    """A JSON number with a fraction or exponent, finite. (``NaN``, ``Infinity`` and ``-Infinity``, which are
    not JSON, parse to floats as before: every field that takes a number refuses a non-finite one by name.)"""
    if len(literal) > MAX_NUMBER_CHARS:
        raise MessageError(
            "bad_message", f"a number of {len(literal)} characters is over the limit of {MAX_NUMBER_CHARS}"
        )
    value = float(literal)
    if not math.isfinite(value):
        raise MessageError("bad_message", f"the number {literal} is out of range (it is not a finite float)")
    return value


def _check_strings(value: Any) -> None:
    """Refuse a string or key that is not made of Unicode scalar values (a lone surrogate escape)."""
    if isinstance(value, str):
        if not value.isascii() and _SURROGATE.search(value) is not None:
            raise MessageError(
                "bad_message", f"the string {_show(value)} holds a lone surrogate (not a Unicode character); "
                "send valid UTF-8 text"
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key)
            _check_strings(item)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item)


def _show(value: Any, max_chars: int = 100) -> str:
    """``repr(value)`` cut to ``max_chars`` (an error message never echoes a whole hostile input)."""
    text = repr(value)
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def _no_extra(obj: dict[str, Any], allowed: set[str], kind: str) -> None:
    extra = sorted(set(obj) - allowed - {"type"})
    if extra:
        raise MessageError(
            "bad_message", f"unknown field {_show(extra[0])} in {kind!r}" + (f"; allowed: {', '.join(sorted(allowed))}"
                                                                             if allowed else "")
        )


def _int(obj: dict[str, Any], key: str, default: int | None = None) -> int:
    value = obj.get(key, default)
    if value is None:
        raise MessageError("bad_message", f"'start' needs {key!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageError("bad_message", f"{key!r} must be an integer, got {_show(value)}")
    return value


def _parse_start(obj: dict[str, Any]) -> Start:
    allowed = {"sample_rate", "encoding", "channels", "stream", "interim_results", "endpointing", "version", "resume",
               "live"}
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
            "unsupported_audio", f"encoding {_show(encoding)} is not supported; use one of: {', '.join(ENCODINGS)}"
        )
    channels = _int(obj, "channels", 1)
    if not 1 <= channels <= MAX_CHANNELS:
        raise MessageError("unsupported_audio", f"channels must be 1-{MAX_CHANNELS}, got {channels}")
    stream = obj.get("stream")
    if stream is not None and not isinstance(stream, str):  # 7 is not "7": the rule below would read as satisfied
        raise MessageError("bad_message", f"'stream' must be a string, got {_show(stream)}")
    if stream is not None and not STREAM_NAME.fullmatch(stream):
        raise MessageError(
            "bad_message",
            f"stream name {_show(stream)} is invalid: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit",
        )
    interim = obj.get("interim_results", True)
    if not isinstance(interim, bool):
        raise MessageError("bad_message", f"'interim_results' must be true or false, got {_show(interim)}")
    live = obj.get("live", False)
    if not isinstance(live, bool):
        raise MessageError("bad_message", f"'live' must be true or false, got {_show(live)}")
    resume = _parse_resume(obj["resume"]) if obj.get("resume") is not None else None
    endpointing = _parse_endpointing(obj.get("endpointing", {}))
    return Start(rate, encoding, channels, stream, interim, endpointing, version, resume, live)


def _parse_resume(value: Any) -> Resume:
    if not isinstance(value, dict):
        raise MessageError("bad_message", f"'resume' must be an object, got {_show(value)}")
    _no_extra(value, {"session", "token", "next_segment"}, "resume")
    for key in ("session", "token"):
        if not isinstance(value.get(key), str) or not value[key]:
            raise MessageError("bad_message", f"'resume' needs {key!r}, a string from the session's 'ready'")
        if len(value[key]) > MAX_ID_CHARS:
            raise MessageError("bad_message", f"'resume.{key}' has {len(value[key])} characters, over the limit of "
                               f"{MAX_ID_CHARS}; send the one from the session's 'ready'")
        if _CONTROL.search(value[key]) is not None:
            raise MessageError("bad_message", f"'resume.{key}' {_show(value[key])} holds a control character; send "
                               "the one from the session's 'ready'")
    next_segment = value.get("next_segment", 0)
    if isinstance(next_segment, bool) or not isinstance(next_segment, int) or next_segment < 0:
        raise MessageError("bad_message", f"'resume.next_segment' must be an integer >= 0, got {_show(next_segment)}")
    return Resume(value["session"], value["token"], next_segment)


def _parse_endpointing(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise MessageError("bad_message", f"'endpointing' must be an object, got {_show(value)}")
    out: dict[str, float] = {}
    for key, seconds in value.items():
        if key not in ENDPOINT_KEYS:
            raise MessageError(
                "bad_message", f"unknown endpointing rule {_show(key)}; known: {', '.join(ENDPOINT_KEYS)}"
            )
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
            raise MessageError("bad_message", f"endpointing.{key} must be a number of seconds, got {_show(seconds)}")
        if not 0 < seconds <= MAX_ENDPOINT_S:
            raise MessageError("bad_message", f"endpointing.{key} must be in (0, {MAX_ENDPOINT_S:g}] s, got {seconds}")
        out[key] = float(seconds)
    return out


# ---------------------------------------------------------------- client bookkeeping for a resume


def listen_url(url: str) -> str:
    """The ``/v1/listen`` address of a daemon given as ``ws://host:port``, ``http://host:port/`` (what the
    daemon prints) or the full ``ws://host:port/v1/listen``; ``https://`` becomes ``wss://``.

    Raises:
        ValueError: not a ws, wss, http or https address.
    """
    if url.startswith(("http://", "https://")):
        url = "ws" + url[4:]
    if not url.startswith(("ws://", "wss://")):
        raise ValueError(f"{url!r}: expected ws://HOST:PORT (or wss://)")
    base = url.rstrip("/")
    return base if base.endswith("/v1/listen") else base + "/v1/listen"


class SentAudio:
    """A live client's most recent audio, kept to re-send what a dropped connection lost.

    Positions count sample frames (one sample per channel) since the client began, across sessions.
    Bounded: a block goes once ``max_frames`` newer frames are kept, so at least the last ``max_frames``
    are always there.

    Args:
        frame_bytes: bytes of one sample frame (:attr:`Start.frame_bytes`).
        max_frames: how many of the newest frames to keep, > 0.
    """

    def __init__(self, frame_bytes: int, max_frames: int) -> None:
        if frame_bytes <= 0 or max_frames <= 0:
            raise ValueError(f"frame_bytes and max_frames must be positive, got {frame_bytes} and {max_frames}")
        self.frame_bytes, self.max_frames = frame_bytes, max_frames
        self._blocks: deque[tuple[int, bytes]] = deque()  # (position of its first frame, payload)
        self.start = 0  # position of the oldest frame kept
        self.end = 0  # position after the newest frame

    def add(self, payload: bytes) -> None:
        """Append ``payload`` (whole frames, as sent on the wire); the oldest blocks go beyond the bound."""
        if len(payload) % self.frame_bytes:
            raise ValueError(f"{len(payload)} bytes are not whole frames of {self.frame_bytes} bytes")
        if not payload:
            return
        self._blocks.append((self.end, payload))
        self.end += len(payload) // self.frame_bytes
        while self.end - self._blocks[0][0] - len(self._blocks[0][1]) // self.frame_bytes >= self.max_frames:
            self._blocks.popleft()  # never the newest: the frames after it number 0 < max_frames
        self.start = self._blocks[0][0]

    def since(self, position: int) -> list[bytes]:
        """The audio from ``position`` on (from :attr:`start`, if that is later), as payloads to send."""
        out = []
        for first, payload in self._blocks:
            skip = max(0, position - first) * self.frame_bytes
            if skip < len(payload):
                out.append(payload[skip:])
        return out


class ClientSession:
    """What a live ``/v1/listen`` client keeps to resume its session after a dropped connection; no I/O.

    The client adds its audio to :attr:`audio` as it is captured, connected or not. On each connection it
    sends :meth:`start_message`, hands the ``ready`` to :meth:`on_ready` (after a ``resume_failed`` error
    the server starts a new session, whose ``ready`` follows), sends :meth:`unsent` audio calling
    :meth:`mark_sent` after each payload, and hands every ``final`` to :meth:`on_final` and ``end`` to
    :meth:`on_end`.

    Args:
        start: the ``start`` message (its ``resume`` is ignored).
        buffer_s: seconds of the newest audio kept to re-send.
    """

    def __init__(self, start: Start, buffer_s: float = RESUME_BUFFER_S) -> None:
        self.start = replace(start, resume=None)
        self.audio = SentAudio(start.frame_bytes, max(1, round(buffer_s * start.sample_rate)))
        self.ready: Ready | None = None  # the session's latest ready (session id, resume token); None: none to resume
        self.next_segment = 0  # finals received in this session: the first segment whose final is missing
        self.session_began = 0  # position of the session's first frame, plus any frames it never got
        self.sent = 0  # position up to which audio went to the current connection

    def start_message(self) -> Start:
        """The ``start`` for a new connection: it resumes the session when there is one with a token."""
        if self.ready is None or not self.ready.resume_token:
            return self.start
        return replace(self.start, resume=Resume(self.ready.session, self.ready.resume_token, self.next_segment))

    def on_ready(self, ready: Ready) -> int:
        """Take a ``ready`` and move :attr:`sent` back to where the server's session needs audio from.

        Returns:
            Sample frames the server needs that are no longer kept (0 unless the client was away longer than
            the buffer): they are skipped, so the session's audio has a gap there.
        """
        if ready.resumed:
            needed = self.session_began + round((ready.audio_s or 0.0) * self.start.sample_rate)
        else:  # a new session gets what the last one did not
            needed = self.session_began = self.sent
            self.next_segment = 0
        lost = max(0, self.audio.start - needed)
        self.session_began += lost  # the server never counts those frames: keep audio_s and positions in step
        self.ready, self.sent = ready, needed + lost
        return lost

    def on_final(self, final: Final) -> None:
        """Count a received final (a replayed one included)."""
        self.next_segment = max(self.next_segment, final.segment + 1)

    def on_end(self) -> None:
        """The session is over: the next connection starts a new one."""
        self.ready = None

    def unsent(self) -> list[bytes]:
        """The kept audio the current connection has not had yet, as payloads to send in order."""
        return self.audio.since(self.sent)

    def mark_sent(self, payload: bytes) -> None:
        """Count ``payload`` (one of :meth:`unsent`) as sent on the current connection."""
        self.sent += len(payload) // self.audio.frame_bytes

    @property
    def is_caught_up(self) -> bool:
        """Everything captured so far went to the current connection."""
        return self.sent >= self.audio.end

    async def send_audio(self, ws: Any, captured: asyncio.Event, is_source_done: Callable[[], bool]) -> None:
        """Send ``ws`` the kept audio it lacks, then live audio as ``captured`` signals it, and ``stop`` once
        ``is_source_done()`` and everything is sent. Cancelling loses nothing: unsent audio stays kept."""
        while True:
            captured.clear()
            for payload in self.unsent():
                await ws.send(payload)
                self.mark_sent(payload)
            if self.is_caught_up:
                if is_source_done():
                    await ws.send(Stop().to_json())
                    return
                await captured.wait()

    @property
    def session_audio_s(self) -> float:
        """Seconds of audio the session gets once everything captured is sent (compare with ``end.audio_s``)."""
        return (self.audio.end - self.session_began) / self.start.sample_rate
