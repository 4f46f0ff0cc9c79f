"""The messages of wire protocol v1 (see :mod:`streamer.protocol`) and their JSON: typed, immutable, always
valid JSON out. Standard library only.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
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
    hotwords: tuple[str, ...] | None = None  # None: left out on the wire (an older server refuses the field)
    hotword_weight: float | None = None
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
    so far (exact; re-send from there). ``hotwords`` (the phrases boosted) and ``hotword_weight`` are there only
    when the session has hotwords. ``latency_s`` is there only when the server streams a full-context model by
    buffering: the seconds of audio (chunk and look-ahead) a word waits for before it can be recognized.
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
    hotwords: tuple[str, ...] | None = None
    hotword_weight: float | None = None
    latency_s: float | None = None
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


@dataclass(frozen=True, slots=True)
class Moved:
    """The server is going away (a graceful drain) and moved the session: its open segment was finalized (that
    final came before this), and the server closes the connection (1012). The client reconnects (through the
    load balancer, to another replica) and resumes with ``resume_token``: the ``ready`` that answers says
    ``resumed: true`` and ``audio_s``, where to re-send audio from (here ``audio_s`` says it in advance);
    ``next_segment`` is the number of the session's next final."""

    session: str
    stream: str
    resume_token: str
    audio_s: float
    next_segment: int
    type: ClassVar[str] = "moved"

    def to_json(self) -> str:
        return _dumps(self)


ServerMessage = Ready | Partial | Final | Warning | Error | End | Moved
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




LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
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
        if value.isascii() or LONE_SURROGATE.search(value) is None:
            return value
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {_json_safe(k, where): _json_safe(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v, where) for v in value]
    return value

