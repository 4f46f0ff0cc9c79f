"""A Deepgram live request's handshake: is it Deepgram's, what does its query ask for, which key does it carry.

**Which requests are Deepgram's.** ``/deepgram/v1/listen`` always is. ``/v1/listen`` is shared with protocol v1, and
the handshake request alone decides (:func:`is_deepgram`): it is a Deepgram request when its query string has any
parameter other than ``token`` (Deepgram clients always send some: ``deepgram-sdk`` 7 requires ``model``, Pipecat and
LiveKit send ``encoding`` and ``sample_rate``), or its ``Authorization`` header uses the ``Token`` scheme, or it
offers a WebSocket subprotocol (a browser's ``Sec-WebSocket-Protocol: token, <key>``). Protocol v1 clients send
none of these (their options come in the ``start`` message, their token as ``Bearer`` or ``?token=``), so they keep
``/v1/listen`` as before. Nothing is read from the connection to decide, so neither side waits for the other.

**The query** (:func:`parse_query`; parameters may repeat, the last one counts; unknown ones are ignored):
``encoding`` (``linear16``, ``mulaw``, ``alaw``; required, as this server decodes no containers) and ``sample_rate``
(required with it, 8000-48000), ``channels`` (1-8, mixed down), ``interim_results`` and ``vad_events`` (``true`` or
``false``, default false), ``endpointing`` (milliseconds of silence that end a segment, with ``speech_final``, at
least :data:`MIN_ENDPOINTING_MS`; ``false`` or 0: never on silence; ``true`` or absent: the server's
``[endpointing]`` rule), ``utterance_end_ms`` (milliseconds without a word before ``UtteranceEnd``), ``model`` and
``language`` (any value: reported, not acted on: the server runs its own model), ``keyterm`` and ``keywords``
(repeatable: the session's hotwords, boosted in decoding; a keyword's ``:intensifier`` is dropped, and a
negative one, which asks Deepgram to suppress the word, leaves that word out), and this server's ``stream``
(the stream name for captions and MQTT; default ``deepgram-<session>``). ``multichannel=true`` is refused:
channels are mixed down, not transcribed apart.

**Credentials** (:func:`credentials`): ``Authorization: Token <key>`` (or ``Bearer``/``bearer <key>``, as the SDK
sends with an access token), a browser's ``Sec-WebSocket-Protocol: token, <key>``, or ``?token=<key>``; exactly one,
checked against the daemon's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request

from streamer.audio.convert import PcmConverter
from streamer.errors import AudioError, ProtocolError
from streamer.protocol import MAX_ENDPOINT_S, MAX_HOTWORDS, STREAM_NAME, MessageError, check_hotwords
from streamer.session import StartOptions

DEEPGRAM_PATH = "/deepgram/v1/listen"
SHARED_PATH = "/v1/listen"  # protocol v1's too: is_deepgram tells them apart
ENCODINGS = {"linear16": "pcm_s16le", "mulaw": "pcm_mulaw", "alaw": "pcm_alaw"}  # Deepgram's name: the core's
AUTH_SCHEMES = ("token", "bearer")  # in Authorization, and as a browser's subprotocol
MAX_QUERY_FIELDS = 200
MAX_MS = 3_600_000  # an hour: longer values of endpointing or utterance_end_ms mean nothing more
# The engine's silence is time without a recognized token (streamer.engine.endpoint), not an energy detector's: gaps
# of up to about 200 ms fall between the words of fluent speech (espeak-ng at 190 words a minute is cut into phrases
# at 160 ms and into words at 80 ms). Shorter endpointing values count as this much, so LiveKit's default of 25 ms
# ends segments at pauses, as Deepgram's audio-based endpointing does, and not after every word.
MIN_ENDPOINTING_MS = 250
MAX_REPORTED_CHARS = 100  # model and language are echoed back up to this many characters


class QueryError(ProtocolError):
    """The query string asks for something this server cannot do (HTTP 400 at the handshake)."""


@dataclass(frozen=True, slots=True)
class DeepgramOptions:
    """What a Deepgram request's query asks for, checked.

    Attributes:
        encoding: the core's name for it (``pcm_s16le``, ``pcm_mulaw``, ``pcm_alaw``).
        sample_rate: Hz.
        channels: interleaved channels.
        interim_results: send interim (not final) results.
        vad_events: send ``SpeechStarted``.
        endpointing: the core's endpointing overrides (empty: the server's rules).
        utterance_end_s: send ``UtteranceEnd`` after this long without a word; None: never.
        model: the model the client asked for (reported only).
        language: the language it asked for (reported only).
        stream: the stream name; None: the core names it.
    """

    encoding: str
    sample_rate: int
    channels: int = 1
    interim_results: bool = False
    vad_events: bool = False
    endpointing: tuple[tuple[str, float], ...] = ()
    utterance_end_s: float | None = None
    model: str | None = None
    language: str | None = None
    stream: str | None = None
    hotwords: tuple[str, ...] = ()

    def start_options(self) -> StartOptions:
        """The core's start; it always sends partials, as ``SpeechStarted`` comes from them (the adapter drops
        them when ``interim_results`` is false). The client may wait (no audio is dropped; TCP slows a fast sender)."""
        return StartOptions(self.sample_rate, self.encoding, self.channels, self.stream, interim_results=True,
                            live=False, endpointing=dict(self.endpointing), pause_s=self.utterance_end_s,
                            hotwords=self.hotwords)


def _query(request: Request) -> list[tuple[str, str]]:
    """The request's query parameters in order (ValueError: more than :data:`MAX_QUERY_FIELDS`)."""
    return parse_qsl(urlsplit(request.path).query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)


def subprotocols(headers: Headers) -> list[str]:
    """The subprotocols a client offers, in order (``Sec-WebSocket-Protocol``, comma-separated, maybe repeated)."""
    return [p.strip() for value in headers.get_all("Sec-WebSocket-Protocol") for p in value.split(",") if p.strip()]


def is_deepgram(request: Request) -> bool:
    """True when ``request`` is for the Deepgram API (see the module docstring for the rule)."""
    path = urlsplit(request.path).path
    if path == DEEPGRAM_PATH:
        return True
    if path != SHARED_PATH:
        return False
    try:
        if any(key != "token" for key, _ in _query(request)):
            return True
    except ValueError:  # too many parameters: no v1 client sends any
        return True
    if any(value.strip().partition(" ")[0].lower() == "token" for value in request.headers.get_all("Authorization")):
        return True
    return bool(subprotocols(request.headers))


def select_subprotocol(offered: list[str]) -> str | None:
    """The subprotocol to answer a browser with: the auth scheme it offered first (it needs one echoed back)."""
    for name in offered:
        if name.lower() in AUTH_SCHEMES:
            return name
    return None


def credentials(request: Request) -> list[str]:
    """Every key the request carries, however it carries it (more than one is refused as ambiguous)."""
    try:
        offered = [value for key, value in _query(request) if key == "token"]
    except ValueError:
        offered = []
    for value in request.headers.get_all("Authorization"):
        scheme, _, key = value.strip().partition(" ")
        offered.append(key.strip() if scheme.lower() in AUTH_SCHEMES else value)  # another scheme: no key of ours
    names = subprotocols(request.headers)
    for i, name in enumerate(names[:-1]):
        if name.lower() in AUTH_SCHEMES:
            offered.append(names[i + 1])
            break
    return offered


def parse_query(request: Request, max_hotwords: int = MAX_HOTWORDS) -> DeepgramOptions:
    """The options a Deepgram request asks for (at most ``max_hotwords`` keyterms and keywords: the server's
    ``engine.max_hotwords``).

    Raises:
        QueryError: a parameter is missing, malformed or asks for what this server cannot do; the message says
            which and what to send instead.
    """
    try:
        pairs = _query(request)
    except ValueError as exc:
        raise QueryError(f"more than {MAX_QUERY_FIELDS} query parameters") from exc
    params = dict(pairs)  # a repeated parameter: the last one counts (keyterm and keywords: every one)
    if _flag(params, "multichannel"):
        raise QueryError("multichannel=true is not supported: channels are mixed down and transcribed as one; "
                         "leave multichannel out or false")
    name = params.get("encoding")
    if name is None:
        raise QueryError("encoding is required: this server takes raw audio only (encoding=linear16, mulaw or alaw, "
                         "with sample_rate), not containers such as WAV or Ogg")
    encoding = ENCODINGS.get(name.lower())
    if encoding is None:
        raise QueryError(f"encoding={_show(name)} is not supported; use linear16, mulaw or alaw")
    if "sample_rate" not in params:
        raise QueryError(f"sample_rate is required with encoding={name}: the audio's rate in Hz, e.g. 16000")
    sample_rate = _integer(params, "sample_rate")
    channels = _integer(params, "channels") if "channels" in params else 1
    try:
        PcmConverter(sample_rate, encoding, channels)  # the core's own check of the format
    except AudioError as exc:
        raise QueryError(str(exc)) from exc
    stream = params.get("stream")
    if stream is not None and not STREAM_NAME.fullmatch(stream):
        raise QueryError(f"stream={_show(stream)} is not a valid stream name: letters, digits, '_', '.', '-', "
                         "at most 64, starting with a letter or digit")
    return DeepgramOptions(
        encoding, sample_rate, channels,
        interim_results=_flag(params, "interim_results"),
        vad_events=_flag(params, "vad_events"),
        endpointing=_endpointing(params.get("endpointing")),
        utterance_end_s=_utterance_end_s(params),
        model=_reported(params.get("model")),
        language=_reported(params.get("language")),
        stream=stream,
        hotwords=_hotwords(pairs, max_hotwords),
    )


def _hotwords(pairs: list[tuple[str, str]], max_count: int) -> tuple[str, ...]:
    """Every ``keyterm``, and every ``keywords`` word without its ``:intensifier`` (negative: left out)."""
    terms = []
    for key, value in pairs:
        if key == "keyterm":
            terms.append(value)
        elif key == "keywords":
            word, _, boost = value.rpartition(":") if ":" in value else (value, "", "")
            try:
                if boost and float(boost) < 0:
                    continue  # Deepgram's suppression: not something boosting can do
            except ValueError:
                word = value  # a colon that is part of the word
            terms.append(word)
    try:
        return check_hotwords(terms, max_count, where="keyterm/keywords")
    except MessageError as exc:
        raise QueryError(str(exc)) from exc


def _show(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:40] + "...")


def _reported(value: str | None) -> str | None:
    return None if value is None else value[:MAX_REPORTED_CHARS]


def _flag(params: dict[str, str], key: str) -> bool:
    value = params.get(key)
    if value is None or value.lower() == "false":
        return False
    if value.lower() == "true":
        return True
    raise QueryError(f"{key} must be true or false, got {_show(value)}")


def _integer(params: dict[str, str], key: str) -> int:
    value = params[key]
    if not value.isdecimal() or len(value) > 9:
        raise QueryError(f"{key} must be a whole number, got {_show(value)}")
    return int(value)


def _endpointing(value: str | None) -> tuple[tuple[str, float], ...]:
    """``endpointing`` as the core's override of the silence rule (the pause that ends a segment)."""
    if value is None or value.lower() == "true":
        return ()
    if value.lower() == "false" or value == "0":  # never on silence: segments end at max_segment_s or on Finalize
        return (("trailing_silence_after_speech_s", MAX_ENDPOINT_S),)
    if not value.isdecimal() or len(value) > 9 or int(value) > MAX_MS:
        raise QueryError(f"endpointing must be milliseconds of silence (1 to {MAX_MS}) or false, got {_show(value)}")
    return (("trailing_silence_after_speech_s", max(int(value), MIN_ENDPOINTING_MS) / 1000),)


def _utterance_end_s(params: dict[str, str]) -> float | None:
    if "utterance_end_ms" not in params:
        return None
    ms = _integer(params, "utterance_end_ms")
    if not 1 <= ms <= MAX_MS:
        raise QueryError(f"utterance_end_ms must be from 1 to {MAX_MS} milliseconds, got {ms}")
    return ms / 1000
