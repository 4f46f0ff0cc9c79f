"""Bad input to the Deepgram-compatible API gets Deepgram's own error shapes, says what is wrong, and loses nothing
else: a query the server cannot serve (HTTP 400 with a JSON body), a missing or doubled key (401, 400), text that is
not a Deepgram message (``Error``, the session goes on), audio after ``CloseStream`` (``Error``, not transcribed), a
silent connection (close 1011 NET-0001), and a daemon stopping (the open segment is flushed as a final result, to
MQTT too).

Against ``streamer serve`` with the default model (fixtures of ``test_deepgram.py``), raw websockets clients, which
show the HTTP status and body, the close code and reason that the SDK hides.
"""
# ruff: noqa: F811  (pytest fixtures imported from test_deepgram are redefined as test parameters)

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.fixtures_realpeers import Mosquitto
from tests.test_deepgram import (  # noqa: F401  (fixtures)
    FIRST,
    IDLE_S,
    RATE,
    SECOND,
    TIMEOUT,
    TOKEN,
    ApiError,
    AsyncDeepgramClient,
    Served,
    check_words,
    daemon,
    results,
    send_audio,
    serve,
    silence,
    speech,
    text,
    until_closed,
)
from tests.test_mqtt import receive, subscriber

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings(r"ignore:websockets\.\S+ is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:websockets.legacy is deprecated:DeprecationWarning"),
]
KEY = {"Authorization": f"Token {TOKEN}"}
AUDIO = f"/v1/listen?model=nova-3&encoding=linear16&sample_rate={RATE}"


async def refused(uri: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    """Status and JSON body of a handshake that must be refused."""
    with pytest.raises(InvalidStatus) as info:
        async with asyncio.timeout(10 * TIMEOUT), connect(uri, additional_headers=headers):
            pass
    response = info.value.response
    assert response.headers["Content-Type"] == "application/json"
    return response.status_code, json.loads(response.body)


@pytest.mark.parametrize(("query", "status", "says"), [
    ("?model=nova-3&encoding=opus&sample_rate=48000", 400, "encoding='opus' is not supported; use linear16"),
    ("?model=nova-3&encoding=linear16", 400, "sample_rate is required with encoding=linear16"),
    ("?model=nova-3", 400, "encoding is required"),
    (f"?model=nova-3&encoding=linear16&sample_rate={RATE}&interim_results=maybe", 400, "interim_results must be"),
    ("?model=nova-3&encoding=linear16&sample_rate=96000", 400, "unsupported sample rate 96000 Hz"),
])
async def test_a_query_the_server_cannot_serve_gets_400_saying_why(
    daemon: Served, query: str, status: int, says: str
) -> None:
    """The handshake is refused before any audio, with Deepgram's JSON error body naming the parameter."""
    code, body = await refused(daemon.url(f"/v1/listen{query}"), KEY)
    assert code == status and body["err_code"] == "Bad Request" and says in body["err_msg"], body
    assert body["request_id"]


async def test_missing_wrong_or_doubled_keys_are_refused(daemon: Served) -> None:
    """No key or a wrong one: 401 INVALID_AUTH; two keys in one request: 400; the SDK raises ApiError 400 on a bad
    query too."""
    assert (await refused(daemon.url(AUDIO), {}))[0] == 401
    code, body = await refused(daemon.url(AUDIO), {"Authorization": "Token wrong"})
    assert code == 401 and body["err_code"] == "INVALID_AUTH"
    code, body = await refused(daemon.url(f"{AUDIO}&token={TOKEN}"), KEY)
    assert code == 400 and "more than one key" in body["err_msg"]
    client = AsyncDeepgramClient(api_key=TOKEN, environment=daemon.environment())
    with pytest.raises(ApiError) as info:
        async with client.listen.v1.connect(model="nova-3", encoding="flac", sample_rate="16000"):
            pass
    assert info.value.status_code == 400


async def test_text_that_is_no_deepgram_message_gets_an_error_and_the_session_goes_on(
    daemon: Served, speech: dict[str, bytes]
) -> None:
    """Not JSON, an unknown type, a JSON array, nesting past the limit: each gets Error (SchemaError, quoting what
    came), and the speech sent around them is transcribed; Configure with keyterms is declined, without is fine."""
    garbage = ["hello", '{"type": "Nope"}', "[1, 2]", "[" * 40 + "]" * 40]
    async with connect(daemon.url(AUDIO), additional_headers=KEY) as ws:
        await send_audio(ws, speech[FIRST][: len(speech[FIRST]) // 2])
        for message in garbage:
            await ws.send(message)
        await ws.send(json.dumps({"type": "Configure", "keyterms": ["kitchen"]}))
        await ws.send(json.dumps({"type": "Configure", "features": {"numerals": True}}))
        await send_audio(ws, speech[FIRST][len(speech[FIRST]) // 2 :])
        await ws.send(json.dumps({"type": "CloseStream"}))
        messages = await until_closed(ws)
    errors = [m for m in messages if m["type"] == "Error"]
    assert [e["variant"] for e in errors] == ["SchemaError"] * 4 and [e["message"] for e in errors] == garbage
    assert "not valid JSON" in errors[0]["description"] and "unknown message type 'Nope'" in errors[1]["description"]
    assert "nested 40 deep" in errors[3]["description"]
    failure, success = (m for m in messages if m["type"].startswith("Configure"))
    assert failure["type"] == "ConfigureFailure" and failure["code"] == "CONFIGURE_KEYTERMS_NOT_SUPPORTED"
    assert success["type"] == "ConfigureSuccess"
    check_words(" ".join(text(r) for r in results(messages)), FIRST)
    assert messages[-1]["type"] == "Metadata" and ws.close_code == 1000


async def test_audio_after_closestream_is_refused_once_and_not_counted(
    daemon: Served, speech: dict[str, bytes]
) -> None:
    """Binary frames after CloseStream: one Error (AudioAfterCloseStream) before Metadata, whose duration counts only
    the audio before CloseStream; the final result holds the first sentence only."""
    async with connect(daemon.url(AUDIO), additional_headers=KEY) as ws:
        await send_audio(ws, speech[FIRST])
        await ws.send(json.dumps({"type": "CloseStream"}))
        await send_audio(ws, speech[SECOND])
        messages = await until_closed(ws)
    kinds = [m["type"] for m in messages]
    assert kinds.count("Error") == 1 and kinds.index("Error") < kinds.index("Metadata") == len(kinds) - 1
    error = messages[kinds.index("Error")]
    assert error["variant"] == "AudioAfterCloseStream" and "not transcribed" in error["description"]
    check_words(" ".join(text(r) for r in results(messages)), FIRST)
    assert messages[-1]["duration"] == round(len(speech[FIRST]) / 2 / RATE, 3) and ws.close_code == 1000


async def test_an_empty_binary_frame_closes_the_stream(daemon: Served, speech: dict[str, bytes]) -> None:
    """Deepgram's older way to end a stream, an empty binary frame, works as CloseStream."""
    async with connect(daemon.url(AUDIO), additional_headers=KEY) as ws:
        await send_audio(ws, speech[SECOND])
        await ws.send(b"")
        messages = await until_closed(ws)
    check_words(" ".join(text(r) for r in results(messages)), SECOND)
    assert messages[-1]["type"] == "Metadata" and ws.close_code == 1000


async def test_a_silent_connection_is_closed_with_net_0001(daemon: Served, speech: dict[str, bytes]) -> None:
    """Audio, then nothing for the idle timeout: the open segment's final result, Metadata, close 1011 NET-0001."""
    async with connect(daemon.url(AUDIO), additional_headers=KEY) as ws:
        await send_audio(ws, speech[FIRST])
        started = time.monotonic()
        messages = await until_closed(ws)
    waited = time.monotonic() - started
    assert ws.close_code == 1011 and ws.close_reason.startswith("NET-0001"), (ws.close_code, ws.close_reason)
    assert waited >= IDLE_S - 0.1
    check_words(" ".join(text(r) for r in results(messages)), FIRST)
    assert messages[-1]["type"] == "Metadata"


async def test_sigterm_flushes_the_open_segment_as_a_deepgram_final_and_to_mqtt(
    tmp_path: Path, speech: dict[str, bytes], mosquitto_broker: Mosquitto
) -> None:
    """A daemon stopping mid-sentence sends the open segment as a final result, then Metadata, closes with 1001, and
    exits 0; the client did not have to send CloseStream. The session's stream is on MQTT like any other: the same
    final reaches the broker, with reason shutdown."""
    served = serve(tmp_path, STREAMER_MQTT__ENABLED="true", STREAMER_MQTT__HOST="127.0.0.1",
                   STREAMER_MQTT__PORT=str(mosquitto_broker.port), STREAMER_MQTT__DEVICE_ID="dgtest")
    try:
        async with subscriber(mosquitto_broker, "streamer/dgtest/dg-stop/final") as finals, connect(
            served.url(f"{AUDIO}&interim_results=true&endpointing=false&stream=dg-stop"), additional_headers=KEY
        ) as ws:
            await send_audio(ws, speech[FIRST] + silence(0.5))
            async with asyncio.timeout(60 * TIMEOUT):  # the words are recognized: an interim result has them
                while not (message := json.loads(await ws.recv()))["channel"]["alternatives"][0]["transcript"]:
                    pass
            served.proc.send_signal(signal.SIGTERM)
            messages = [message, *await until_closed(ws)]
            published = json.loads((await receive(finals)).payload)
        assert ws.close_code == 1001
        assert await asyncio.to_thread(served.proc.wait, 60 * TIMEOUT) == 0
    finally:
        if served.proc.poll() is None:
            served.proc.kill()
    (final,) = results(messages)
    check_words(text(final), FIRST)
    assert not final["speech_final"] and messages[-1]["type"] == "Metadata"
    assert published["reason"] == "shutdown" and published["text"] == text(final)
