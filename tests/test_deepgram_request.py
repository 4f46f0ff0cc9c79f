"""The Deepgram API's handshake rules without a server: which requests are Deepgram's, what their query asks for,
which key they carry; and G.711, the telephone encodings it accepts (checked against the standard library's codec)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from websockets.datastructures import Headers
from websockets.http11 import Request

from streamer.adapters.deepgram.request import (
    QueryError,
    credentials,
    is_deepgram,
    parse_query,
    select_subprotocol,
)
from streamer.audio.convert import PcmConverter
from streamer.audio.g711 import TABLES
from streamer.protocol import MAX_ENDPOINT_S


def request(path: str, **headers: str | list[str]) -> Request:
    h = Headers()
    for name, value in headers.items():
        for v in value if isinstance(value, list) else [value]:
            h[name.replace("_", "-")] = v
    return Request(path, h)


@pytest.mark.parametrize(("path", "headers", "expected"), [
    ("/v1/listen", {}, False),  # protocol v1: options come in 'start'
    ("/v1/listen?token=abc", {}, False),  # v1's token in the URL
    ("/v1/listen", {"Authorization": "Bearer abc"}, False),  # v1's token as a header
    ("/v1/listen?model=nova-3", {}, True),  # deepgram-sdk always sends model
    ("/v1/listen?encoding=linear16&sample_rate=16000", {"Authorization": "Bearer abc"}, True),
    ("/v1/listen", {"Authorization": "Token abc"}, True),  # Deepgram's key scheme
    ("/v1/listen", {"Sec_WebSocket_Protocol": "token, abc"}, True),  # a browser's key
    ("/deepgram/v1/listen", {}, True),  # always, whatever it carries
    ("/v1/captions?stream=x", {"Authorization": "Token abc"}, False),
    ("/deepgram/v1/captions", {}, False),
])
def test_the_rule_tells_deepgram_requests_from_protocol_v1(path: str, headers: dict[str, str], expected: bool) -> None:
    """/v1/listen is Deepgram's when the query has anything but token, the key is a Token, or a subprotocol is
    offered; /deepgram/v1/listen always is."""
    assert is_deepgram(request(path, **headers)) is expected


def test_a_full_query_maps_onto_the_core_start() -> None:
    """Every parameter the API reads: encoding to the core's name, milliseconds to seconds, flags, reported fields;
    the core always gets partials (SpeechStarted comes from them) and a client that can wait."""
    options = parse_query(request(
        "/v1/listen?model=nova-3&language=en-US&encoding=mulaw&sample_rate=8000&channels=2&interim_results=true"
        "&vad_events=true&endpointing=300&utterance_end_ms=1000&smart_format=true&keyterm=a&keyterm=b&stream=phone.1"
    ))
    assert (options.encoding, options.sample_rate, options.channels) == ("pcm_mulaw", 8000, 2)
    assert options.interim_results and options.vad_events and (options.model, options.language) == ("nova-3", "en-US")
    start = options.start_options()
    assert start.endpointing == {"trailing_silence_after_speech_s": 0.3} and start.pause_s == 1.0
    assert start.interim_results and not start.live and start.stream == "phone.1"


@pytest.mark.parametrize(("value", "rules"), [
    (None, {}), ("true", {}), ("false", {"trailing_silence_after_speech_s": MAX_ENDPOINT_S}),
    ("0", {"trailing_silence_after_speech_s": MAX_ENDPOINT_S}), ("25", {"trailing_silence_after_speech_s": 0.25}),
    ("250", {"trailing_silence_after_speech_s": 0.25}), ("1200", {"trailing_silence_after_speech_s": 1.2}),
])
def test_endpointing_sets_the_silence_rule(value: str | None, rules: dict[str, float]) -> None:
    """Milliseconds of silence end a segment, at least 250 (the gaps between words); false (or 0) never on silence;
    absent or true: the server's rule."""
    query = "encoding=linear16&sample_rate=16000" + ("" if value is None else f"&endpointing={value}")
    options = parse_query(request(f"/v1/listen?{query}"))
    assert options.start_options().endpointing == rules and not options.interim_results and not options.vad_events


@pytest.mark.parametrize(("query", "says"), [
    ("model=nova-3", "encoding is required"),
    ("encoding=opus&sample_rate=48000", "encoding='opus' is not supported; use linear16, mulaw or alaw"),
    ("encoding=linear16", "sample_rate is required with encoding=linear16"),
    ("encoding=linear16&sample_rate=fast", "sample_rate must be a whole number"),
    ("encoding=linear16&sample_rate=4000", "unsupported sample rate 4000 Hz"),
    ("encoding=linear16&sample_rate=16000&channels=9", "unsupported channel count 9"),
    ("encoding=linear16&sample_rate=16000&interim_results=yes", "interim_results must be true or false"),
    ("encoding=linear16&sample_rate=16000&endpointing=-5", "endpointing must be milliseconds of silence"),
    ("encoding=linear16&sample_rate=16000&utterance_end_ms=0", "utterance_end_ms must be from 1"),
    ("encoding=linear16&sample_rate=16000&multichannel=true", "multichannel=true is not supported"),
    ("encoding=linear16&sample_rate=16000&stream=no%20spaces", "is not a valid stream name"),
])
def test_a_query_the_server_cannot_serve_is_refused_with_the_reason(query: str, says: str) -> None:
    """Each refusal names the parameter and what to send instead (the client gets it as HTTP 400)."""
    with pytest.raises(QueryError) as caught:
        parse_query(request(f"/v1/listen?{query}"))
    assert says in str(caught.value)


def test_credentials_come_from_every_place_a_deepgram_client_puts_them() -> None:
    """Token and bearer schemes, a browser's subprotocol pair, ?token=; another scheme is a key that fails."""
    assert credentials(request("/v1/listen?model=x", Authorization="Token k1")) == ["k1"]
    assert credentials(request("/v1/listen?model=x", Authorization="bearer k2")) == ["k2"]
    assert credentials(request("/deepgram/v1/listen", Sec_WebSocket_Protocol="token, k3")) == ["k3"]
    assert credentials(request("/deepgram/v1/listen?token=k4")) == ["k4"]
    assert credentials(request("/deepgram/v1/listen", Authorization="Basic eDp5")) == ["Basic eDp5"]
    both = request("/deepgram/v1/listen?token=a", Authorization="Token b", Sec_WebSocket_Protocol="token, c")
    assert credentials(both) == ["a", "b", "c"]
    assert select_subprotocol(["token", "k3"]) == "token" and select_subprotocol(["chat"]) is None


@pytest.mark.parametrize("encoding", ["pcm_mulaw", "pcm_alaw"])
def test_g711_decodes_as_the_standard_library_codec_does(encoding: str) -> None:
    """Every byte of both laws decodes to the 16-bit value of Python's own audioop codec (until 3.13), scaled like
    s16le; the code points G.711 defines (silence, both extremes) hold everywhere."""
    known = {"pcm_mulaw": {0xFF: 0, 0x7F: 0, 0x00: -32124, 0x80: 32124},
             "pcm_alaw": {0xD5: 8, 0x55: -8, 0xAA: 32256, 0x2A: -32256}}[encoding]
    assert {code: round(float(TABLES[encoding][code]) * 32768) for code in known} == known
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")
    decode = audioop.ulaw2lin if encoding == "pcm_mulaw" else audioop.alaw2lin
    expected = np.frombuffer(decode(bytes(range(256)), 2), "<i2").astype(np.float32) / 32768
    np.testing.assert_array_equal(TABLES[encoding], expected)
    converter = PcmConverter(16000, encoding, 1)
    np.testing.assert_array_equal(converter.convert(bytes(range(256))), expected)  # 16 kHz: no resampling
