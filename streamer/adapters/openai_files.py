"""OpenAI's file transcription API, ``POST /v1/audio/transcriptions``: an adapter on the session core.

Wire to core: the ``multipart/form-data`` form (``file``, ``model``, ``language``, ``prompt``,
``response_format``, ``timestamp_granularities[]``, ``stream``) becomes one session on
``core.connect(protocol="openai")`` that can wait (``live: false``: the upload is never thinned, the scheduler
slows it down instead and serves live streams first); the file, decoded a block at a time
(:class:`~streamer.audio.blocks.AudioBlocks`: any format ``streamer transcribe`` reads), goes in as 16 kHz
``pcm_f32le`` through ``push_audio``, then ``stop``. Core to wire: the finals become the chosen response format
(:mod:`streamer.adapters.openai_formats`); with ``stream=true`` the answer is server-sent events as recognition
goes, ``transcript.text.delta`` from each partial's stable prefix and each final, ``transcript.text.done`` with
the whole text at the end. The session is a stream like any other (``openai-<id>`` on ``/v1/captions`` and MQTT).

The query parameter ``stream=NAME`` (not the form's ``stream`` field) names the stream for captions and MQTT.
``model`` is accepted whatever it names and reported back (header ``X-Streamer-Model`` names the model that ran);
``language`` is accepted and not used; ``prompt`` becomes the session's hotwords (its comma-, semicolon- or
line-separated terms, :func:`~streamer.adapters.openai_session.prompt_hotwords`).

Bad input gets OpenAI's error shape (``{"error": {"message", "type", "param", "code"}}``) with 400 (no file, a
file that is not audio, a bad field), 413 (over ``server.max_upload_bytes``), 408 (the upload stalled), and
503 when the server is busy, starting or stopping.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from streamer.adapters.openai_formats import RESPONSE_FORMATS, SegmentText, error_body, render, sse, transcript
from streamer.adapters.openai_session import prompt_hotwords
from streamer.asr import clocks
from streamer.audio.blocks import AudioBlocks
from streamer.errors import AudioError, ProtocolError
from streamer.protocol import Final, Partial
from streamer.server.http_body import BodyError, HttpExchange
from streamer.server.multipart import FilePart, Form, FormError, parse_form
from streamer.session import Ended, Event, Problem, Session, SessionCore, StartOptions

logger = logging.getLogger(__name__)

RATE_HZ = clocks.SAMPLE_RATE_HZ  # AudioBlocks' output: the model's rate, so the core does not resample again
GRANULARITIES = ("word", "segment")
BODY_CODES = {HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "request_too_large", HTTPStatus.REQUEST_TIMEOUT: "request_timeout",
              HTTPStatus.NOT_IMPLEMENTED: "not_implemented"}
START_STATUS = {"server_busy": 503, "not_ready": 503, "bad_message": 400, "stream_in_use": 409}


class ApiError(ProtocolError):
    """A request refused with OpenAI's error shape; ``counted``: the core counted it already (its own problem)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", counted: bool = False) -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind, self.counted = status, param, code, kind, counted

    def body(self) -> dict[str, object]:
        return error_body(str(self), self.kind, self.param, self.code)


@dataclass(frozen=True, slots=True)
class TranscriptionRequest:
    """The form's fields, checked."""

    file: FilePart
    model: str | None
    language: str | None
    prompt: str | None
    response_format: str
    granularities: tuple[str, ...]
    stream: bool


def parse_request(form: Form) -> TranscriptionRequest:
    """The form as a request; unknown fields (``temperature``, ``include[]``, ``chunking_strategy``...) are ignored.

    Raises:
        ApiError: no file, or a field with a value OpenAI's API would refuse too.
    """
    file = form.files.get("file")
    if file is None:
        detail = " (it came as a text field: send the file's content, e.g. curl -F file=@speech.wav)" if \
            form.get("file") is not None else ""
        raise ApiError(400, f"no audio: the form needs the audio file as its 'file' field{detail}", "file",
                       "missing_required_parameter")
    response_format = form.get("response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(400, f"invalid response_format {response_format!r}: supported are "
                       f"{', '.join(RESPONSE_FORMATS)}", "response_format", "invalid_value")
    granularities = tuple(form.fields.get("timestamp_granularities[]", []) +
                          form.fields.get("timestamp_granularities", []))
    for value in granularities:
        if value not in GRANULARITIES:
            raise ApiError(400, f"invalid timestamp_granularities[] value {value!r}: supported are word, segment",
                           "timestamp_granularities", "invalid_value")
    stream_text = (form.get("stream") or "false").strip().lower()
    if stream_text not in ("true", "false"):
        raise ApiError(400, f"invalid stream value {stream_text[:20]!r}: send true or false", "stream",
                       "invalid_value")
    return TranscriptionRequest(file, form.get("model"), form.get("language"), form.get("prompt"), response_format,
                                granularities, stream_text == "true")


class FileSink:
    """The session's client side: keeps the finals, says how it ended, and passes text deltas on (``on_text``)."""

    def __init__(self) -> None:
        self.finals: list[Final] = []
        self.problem: Problem | None = None
        self.ended: Ended | None = None
        self.is_ended = asyncio.Event()
        self.on_text: Callable[[str], None] | None = None
        self._segment = -1
        self._text = SegmentText()
        self._streamed = False  # some text went out as deltas: the next segment's first one starts with a space

    def offer(self, event: Event, replay: bool = False) -> None:
        if isinstance(event, Partial):
            self._grow(event.segment, event.stable)
        elif isinstance(event, Final):
            self._grow(event.segment, event.text)
            self.finals.append(event)
        elif isinstance(event, Problem):
            self.problem = event
        elif isinstance(event, Ended):
            self.ended = event
            self.is_ended.set()

    def _grow(self, segment: int, text: str) -> None:
        if segment != self._segment:
            self._segment, self._text = segment, SegmentText()
        first = not self._text.sent
        delta = self._text.grow(text)
        if delta and self.on_text is not None:
            self.on_text((" " if first and self._streamed else "") + delta)
            self._streamed = True


class TranscriptionsRoute:
    """The handler of ``POST /v1/audio/transcriptions`` (see the module docstring).

    Args:
        core: the session core.
        max_upload_bytes: the largest request body taken (``server.max_upload_bytes``).
        block_s: seconds of audio decoded and pushed at a time.
    """

    def __init__(self, core: SessionCore, max_upload_bytes: int, block_s: float = 2.0) -> None:
        self.core, self.max_upload_bytes, self.block_s = core, max_upload_bytes, block_s

    async def __call__(self, exchange: HttpExchange) -> None:
        sink = FileSink()
        session = self.core.connect(sink, protocol="openai", name_prefix="openai")
        if isinstance(session, Problem):  # before reading a byte of the upload
            self._refuse(exchange, ApiError(503, session.message, code=session.code, kind="server_error", counted=True),
                         {"Retry-After": "1"})
            return
        try:
            await self._serve(exchange, session, sink)
        except ApiError as exc:
            self._refuse(exchange, exc)
        finally:
            if session.is_open:  # the client left, or the request failed: the rest goes to the other sinks
                await session.lost(resumable=False)
            self.core.release(session)

    async def _serve(self, exchange: HttpExchange, session: Session, sink: FileSink) -> None:
        request, blocks = await self._read(exchange)
        try:
            name = parse_qs(urlsplit(exchange.request.path).query).get("stream", [None])[-1]
            hotwords = prompt_hotwords(request.prompt, self.core.limits.max_hotwords)
            await session.begin(StartOptions(RATE_HZ, "pcm_f32le", stream=name, interim_results=request.stream,
                                             live=False, hotwords=hotwords))
            if not session.is_started:
                problem = sink.problem or Problem("internal_error", "the session did not start")
                status = START_STATUS.get(problem.code, 500)
                raise ApiError(status, problem.message, "stream" if status in (400, 409) else None, problem.code,
                               "server_error" if status >= 500 else "invalid_request_error", counted=True)
            model = self.core.model.model
            headers = {"X-Streamer-Model": model, "X-Streamer-Stream": session.stream}
            logger.info("session %s: OpenAI transcription of %r (%d bytes), model %r asked, %s runs", session.id,
                        request.file.filename, len(request.file.data), request.model, model)
            if request.stream:
                exchange.start_stream(200, "text/event-stream; charset=utf-8", headers)
                sink.on_text = lambda delta: exchange.send_chunk(sse({"type": "transcript.text.delta",
                                                                      "delta": delta}))
            failure = await self._push(exchange, session, blocks)
        finally:
            await asyncio.to_thread(blocks.close)
        if exchange.gone.is_set():
            return
        if failure is None:
            await session.stop()
            await sink.is_ended.wait()
            if sink.ended is not None and sink.ended.reason != "stop":
                failure = ApiError(503, "the server is shutting down; the transcription did not finish: send the "
                                   "file again", code="server_shutting_down", kind="server_error")
        if request.stream:
            last = error_body(str(failure), failure.kind, failure.param, failure.code) if failure else \
                {"type": "transcript.text.done", "text": transcript(sink.finals)}
            exchange.send_chunk(sse(last))
            exchange.end_stream()
        elif failure is not None:
            raise failure
        else:
            accounting = sink.ended.accounting if sink.ended else None
            duration_s = accounting.received_s if accounting else 0.0
            body, content_type = render(request.response_format, sink.finals, duration_s, request.language,
                                        request.granularities)
            exchange.respond(200, body, content_type, headers)

    async def _read(self, exchange: HttpExchange) -> tuple[TranscriptionRequest, AudioBlocks]:
        """The request and its opened audio file."""
        try:
            body = await exchange.read_body(self.max_upload_bytes)
            request = parse_request(parse_form(body, exchange.request.headers.get("Content-Type")))
        except BodyError as exc:
            code = BODY_CODES.get(exc.status, "bad_request")
            raise ApiError(exc.status, str(exc), code=code) from None
        except FormError as exc:
            raise ApiError(400, str(exc), code="invalid_form") from None
        name = request.file.filename or "file"
        try:
            blocks = await asyncio.to_thread(AudioBlocks, io.BytesIO(request.file.data), name, self.block_s)
        except AudioError as exc:
            raise ApiError(400, f"{str(exc).rstrip('.')}: send audio that streamer transcribe reads (WAV, FLAC, MP3, "
                           "Ogg Vorbis or Opus, ...)", "file", "invalid_file_format") from None
        return request, blocks

    async def _push(self, exchange: HttpExchange, session: Session, blocks: AudioBlocks) -> ApiError | None:
        """Decode and push the file; an :class:`ApiError` when it turns out corrupt part way."""
        while session.is_open and not exchange.gone.is_set():
            try:
                block = await asyncio.to_thread(blocks.read)
            except AudioError as exc:
                return ApiError(400, str(exc), "file", "invalid_file_format")
            if block is None:
                return None
            if block.size:
                await session.push_audio(block.tobytes())
            await exchange.drain()
        return None

    def _refuse(self, exchange: HttpExchange, error: ApiError, headers: dict[str, str] | None = None) -> None:
        if not error.counted:
            self.core.metrics.protocol_errors_total.inc(label_value=error.code or "bad_request")
        logger.info("OpenAI transcription refused (%d): %s", error.status, error)
        if exchange.response_started:
            return
        exchange.respond(error.status, json.dumps(error.body()).encode(), "application/json", headers)
