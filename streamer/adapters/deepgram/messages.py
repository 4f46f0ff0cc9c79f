"""Deepgram's live messages as this server writes them: JSON text made from the session core's results.

What goes out (field names as Deepgram's live API and ``deepgram-sdk`` 7.x define them):

- ``Results``: ``channel_index`` [0, 1], ``start`` and ``duration`` (the window of audio the result covers; windows
  tile the stream: each final's starts where the previous final's ended), ``is_final``, ``speech_final`` (the
  segment ended on a pause: the server's endpointing; never on the answer to a ``Finalize``, whose flush pads
  silence), ``from_finalize`` (the answer to a client ``Finalize``),
  ``channel.alternatives[0]`` (``transcript``, ``confidence``, ``words`` with ``word``, ``start``, ``end``,
  ``confidence`` and ``punctuated_word``) and ``metadata`` (``request_id``, ``model_info``, ``model_uuid``). An
  interim result (a core partial) has the text and the window but no word timings (``words`` is empty, confidence 0):
  the core gives them with the final only.
- ``SpeechStarted`` (``channel`` [0], ``timestamp``), ``UtteranceEnd`` (``channel`` [0, 1], ``last_word_end``),
  ``Metadata`` (``request_id``, ``created``, ``duration``: seconds of audio received, ``channels``, ``sha256`` of the
  audio bytes, ``models`` and ``model_info``) before the connection closes, and ``Error`` (``variant``,
  ``description``, and for a text message that could not be read, ``message``: its start).

The model reported is the one that runs (e.g. ``streamer-tdt-small``), whatever the client's ``model`` asked for;
that request is echoed in ``Metadata`` (``model_requested``, ``language``) beside Deepgram's own fields.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from typing import Any

from streamer import __version__
from streamer.protocol import Final, Partial

CHANNEL_INDEX = [0, 1]  # channel 0 of 1: a client's channels are mixed down to one
SPEECH_FINAL_REASONS = frozenset({"silence", "eou"})  # the segment ended because the speaker stopped
MODEL_ARCH = "fastconformer-tdt"
MAX_ECHOED_CHARS = 200  # an unreadable text message is quoted back up to this many characters


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def seconds(value: float) -> float:
    """A time or confidence as it is sent: rounded to the millisecond, 0 for a value that is not finite."""
    return round(value, 3) if math.isfinite(value) else 0.0


@dataclass(frozen=True, slots=True)
class ModelReport:
    """The running model as Deepgram clients see it (``metadata.model_info``); ``uuid`` is derived from the name."""

    name: str
    version: str = __version__
    arch: str = MODEL_ARCH
    uuid: str = ""

    def __post_init__(self) -> None:
        if not self.uuid:
            object.__setattr__(self, "uuid", str(uuid.uuid5(uuid.NAMESPACE_URL, f"streamer:{self.name}")))

    def info(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "arch": self.arch}


@dataclass(frozen=True, slots=True)
class FinalizeAck:
    """The answer to a ``Finalize`` that ended no segment (nothing was said since the last final): an empty final
    result with ``from_finalize`` true, covering the audio received up to the ``Finalize`` (``upto_s``)."""

    upto_s: float


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    timestamp: float

    def to_json(self) -> str:
        return dumps({"type": "SpeechStarted", "channel": [0], "timestamp": seconds(self.timestamp)})


@dataclass(frozen=True, slots=True)
class UtteranceEnd:
    last_word_end: float

    def to_json(self) -> str:
        return dumps({"type": "UtteranceEnd", "channel": CHANNEL_INDEX, "last_word_end": seconds(self.last_word_end)})


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    """Deepgram's ``Error``: ``variant`` names the kind (``SchemaError``: a text message that could not be read)."""

    variant: str
    description: str
    message: str | None = None

    def to_json(self) -> str:
        body = {"type": "Error", "variant": self.variant, "description": self.description}
        if self.message is not None:
            body["message"] = self.message[:MAX_ECHOED_CHARS]
        return dumps(body)


@dataclass(frozen=True, slots=True)
class ConfigureReply:
    """The answer to a ``Configure``: success, or failure with one of Deepgram's codes."""

    request_id: str
    code: str | None = None  # None: success
    description: str = ""

    def to_json(self) -> str:
        if self.code is None:
            return dumps({"type": "ConfigureSuccess", "request_id": self.request_id})
        return dumps({"type": "ConfigureFailure", "request_id": self.request_id, "code": self.code,
                      "description": self.description})


@dataclass(frozen=True, slots=True)
class Metadata:
    """The last message before the server closes: what the session received."""

    request_id: str
    created: str
    duration_s: float
    channels: int
    sha256: str
    model: ModelReport
    model_requested: str | None = None
    language: str | None = None

    def to_json(self) -> str:
        body: dict[str, Any] = {
            "type": "Metadata", "transaction_key": "deprecated", "request_id": self.request_id,
            "sha256": self.sha256, "created": self.created, "duration": seconds(self.duration_s),
            "channels": self.channels, "models": [self.model.uuid], "model_info": {self.model.uuid: self.model.info()},
        }
        if self.model_requested is not None:
            body["model_requested"] = self.model_requested
        if self.language is not None:
            body["language"] = self.language
        return dumps(body)


class ResultsWriter:
    """Writes one connection's ``Results`` in order; keeps where the last final ended (windows tile the stream).

    Call :meth:`render` as messages are sent, in the order they go out (the outbox does): the window of a result
    starts where the previous final's ended.

    Args:
        request_id: the connection's id, in every result.
        model: the model reported.
    """

    def __init__(self, request_id: str, model: ModelReport) -> None:
        self.request_id, self.model = request_id, model
        self._metadata = {"request_id": request_id, "model_info": model.info(), "model_uuid": model.uuid}
        self.cursor_s = 0.0  # where the last final's window ended
        self.finalized: set[int] = set()  # segments whose final answers a client's Finalize (from_finalize)

    def render(self, msg: Any) -> str:
        """The wire text of a queued message: a core partial or final (queued as they are, so that the outbox's rule
        holds: the latest partial wins, a final drops its segment's partial), a finalize answer, or one of ours."""
        if isinstance(msg, Partial):
            return self._results(msg.text, 0.0, [], msg.end, is_final=False)
        if isinstance(msg, Final):
            words = [{"word": w.word, "start": seconds(w.start), "end": seconds(w.end),
                      "confidence": seconds(w.confidence), "punctuated_word": w.word} for w in msg.words]
            from_finalize = msg.segment in self.finalized  # the answer to a Finalize is not an endpoint: the
            speech_final = msg.reason in SPEECH_FINAL_REASONS and not from_finalize  # flush pads silence to cut
            self.finalized.discard(msg.segment)
            text = self._results(msg.text, msg.confidence, words, msg.end, True, speech_final, from_finalize)
            self.cursor_s = max(self.cursor_s, msg.end)
            return text
        if isinstance(msg, FinalizeAck):
            text = self._results("", 0.0, [], msg.upto_s, is_final=True, from_finalize=True)
            self.cursor_s = max(self.cursor_s, msg.upto_s)
            return text
        return str(msg.to_json())

    def _results(
        self, transcript: str, confidence: float, words: list[dict[str, Any]], end_s: float, is_final: bool,
        speech_final: bool = False, from_finalize: bool = False,
    ) -> str:
        start = self.cursor_s
        alternative = {"transcript": transcript, "confidence": seconds(confidence), "words": words}
        return dumps({
            "type": "Results", "channel_index": CHANNEL_INDEX, "duration": seconds(max(0.0, end_s - start)),
            "start": seconds(start), "is_final": is_final, "speech_final": speech_final, "from_finalize": from_finalize,
            "channel": {"alternatives": [alternative]}, "metadata": self._metadata,
        })
