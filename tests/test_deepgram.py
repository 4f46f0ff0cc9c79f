"""The Deepgram-compatible live API with Deepgram's own client as the peer.

``streamer serve`` runs as a subprocess on a loopback port with the bundled default model and a token; the official
``deepgram-sdk`` (sync and async clients, pointed at it with ``DeepgramClientEnvironment`` as Pipecat does) streams
espeak-ng speech and must get the spoken words, with Deepgram's events. Raw websockets clients play a browser
(subprotocol key) and check what the SDK hides. Bad input is ``test_deepgram_bad_input.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamer.audio.g711 import TABLES
from streamer.training.evaluate import word_error_rate
from tests.speech import espeak_sentences

with warnings.catch_warnings():  # the SDK imports websockets' deprecated legacy client
    warnings.simplefilter("ignore", DeprecationWarning)
    from deepgram import AsyncDeepgramClient, DeepgramClient, DeepgramClientEnvironment
    from deepgram.core.api_error import ApiError
    from deepgram.core.events import EventType

MODEL = Path(__file__).resolve().parents[1] / "models" / "streamer-tdt-small" / "model.nemo"
TIMEOUT = float(os.environ.get("STREAMER_TEST_TIMEOUT_FACTOR", "1"))
TOKEN = "dg-test-key-7f3a"
IDLE_S = 2.0  # the daemon's [deepgram] idle_timeout_s in these tests
FIRST, SECOND = "please turn off the lights in the kitchen", "set a timer for ten minutes"
RATE = 22050  # espeak-ng's rate: the server resamples
FRAME_BYTES = 4410  # 100 ms of s16le

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} is missing from this checkout"),
    # the SDK's async client is built on websockets' legacy client, which warns when it is used
    pytest.mark.filterwarnings(r"ignore:websockets\.\S+ is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:websockets.legacy is deprecated:DeprecationWarning"),
]


@dataclass
class Served:
    """A ``streamer serve`` subprocess on a loopback port."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def environment(self, prefix: str = "") -> DeepgramClientEnvironment:
        """What a Deepgram client is given: this daemon as every Deepgram host (``prefix``: a path before /v1)."""
        http, ws = f"http://127.0.0.1:{self.port}{prefix}", f"ws://127.0.0.1:{self.port}{prefix}"
        return DeepgramClientEnvironment(base=http, production=ws, agent=ws, agent_rest=http)


def serve(directory: Path, **env: str) -> Served:
    """Start ``streamer serve`` (default model, TOKEN, a 2 s Deepgram idle timeout) and wait until it is ready."""
    port_file, log = directory / "port", directory / "serve.log"
    with log.open("wb") as err:  # a file, not a pipe nobody reads
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamer", "serve", "--port-file", str(port_file)], stdout=subprocess.DEVNULL,
            stderr=err, env={**os.environ, "STREAMER_SERVER__PORT": "0", "STREAMER_SERVER__AUTH_TOKENS": json.dumps(
                [TOKEN]), "STREAMER_DEEPGRAM__IDLE_TIMEOUT_S": str(IDLE_S), **env},
        )
    deadline = time.monotonic() + 120 * TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"streamer serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if port_file.is_file() and port_file.read_text().strip():
            port = int(port_file.read_text())
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return Served(proc, port, log)
            except OSError:
                pass
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"streamer serve was not ready within 120 s:\n{log.read_text()[-3000:]}")


def stop(served: Served) -> int:
    served.proc.terminate()
    return served.proc.wait(60 * TIMEOUT)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = serve(tmp_path_factory.mktemp("daemon"))
    yield served
    stop(served)


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Each sentence as s16le bytes at 22.05 kHz, spoken by espeak-ng."""
    spoken = espeak_sentences(tmp_path_factory.mktemp("speech"), (FIRST, SECOND), dtype="int16")
    assert all(rate == RATE for _, rate in spoken.values())
    return {text: data.tobytes() for text, (data, _) in spoken.items()}


def silence(seconds: float) -> bytes:
    return bytes(2 * round(seconds * RATE))


def g711(pcm: bytes, encoding: str) -> bytes:
    """s16le as G.711 bytes: each sample's nearest code point of the law (a plain encoder for tests)."""
    table = TABLES[encoding] * 32768
    order = np.argsort(table)
    samples = np.frombuffer(pcm, "<i2").astype(np.float32)
    at = np.clip(np.searchsorted(table[order], samples), 1, 255)
    nearer = np.where(samples - table[order][at - 1] < table[order][at] - samples, at - 1, at)
    return order[nearer].astype(np.uint8).tobytes()


def check_words(transcript: str, spoken: str) -> None:
    wer, errors, words = word_error_rate([spoken], [transcript])
    assert wer <= 0.35, f"{errors}/{words} word errors: {transcript!r} for {spoken!r}"


def results(messages: list[dict[str, Any]], is_final: bool = True) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] == "Results" and m["is_final"] is is_final]


def text(result: dict[str, Any]) -> str:
    return str(result["channel"]["alternatives"][0]["transcript"])


async def until_closed(ws: ClientConnection) -> list[dict[str, Any]]:
    """Every message until the server closes the connection."""
    out = []
    try:
        async with asyncio.timeout(60 * TIMEOUT):
            async for message in ws:
                out.append(json.loads(message))
    except ConnectionClosed:
        pass
    return out


async def send_audio(ws: ClientConnection, data: bytes, frame_bytes: int = FRAME_BYTES) -> None:
    for i in range(0, len(data), frame_bytes):
        await ws.send(data[i : i + frame_bytes])


def sync_session(served: Served, audio: bytes, **query: str) -> list[dict[str, Any]]:
    """One session with the SDK's sync client: ``audio`` in 100 ms frames, then CloseStream; every message."""
    client = DeepgramClient(api_key=TOKEN, environment=served.environment())
    messages: list[dict[str, Any]] = []
    with client.listen.v1.connect(model="nova-3", encoding="linear16", sample_rate=str(RATE), **query) as conn:
        conn.on(EventType.MESSAGE, lambda message: messages.append(message.dict()))
        listener = threading.Thread(target=conn.start_listening, daemon=True)
        listener.start()
        for i in range(0, len(audio), FRAME_BYTES):
            conn.send_media(audio[i : i + FRAME_BYTES])
        conn.send_close_stream()
        listener.join(60 * TIMEOUT)
        assert not listener.is_alive(), "the server did not close after CloseStream"
    return messages


async def test_the_sync_client_gets_the_spoken_words_with_deepgram_events(
    daemon: Served, speech: dict[str, bytes]
) -> None:
    """Two sentences with pauses, given the daemon's base URL: interim results, a speech_final result per sentence
    with the words, SpeechStarted before and UtteranceEnd after each, results tiling the stream, one request_id and
    model on every message, Metadata with the exact audio received last."""
    audio = speech[FIRST] + silence(1.5) + speech[SECOND] + silence(1.5)
    messages = await asyncio.to_thread(
        sync_session, daemon, audio, interim_results="true", vad_events="true", utterance_end_ms="1000",
        endpointing="500", language="en-US",
    )
    kinds = [m["type"] for m in messages]
    assert kinds[0] == "SpeechStarted" and kinds[-1] == "Metadata" and kinds.count("Metadata") == 1, kinds
    finals = results(messages)
    assert [f["speech_final"] for f in finals] == [True, True] and not any(f["from_finalize"] for f in finals)
    check_words(text(finals[0]), FIRST)
    check_words(text(finals[1]), SECOND)
    assert results(messages, is_final=False) and all(text(r) for r in results(messages, is_final=False))
    # per sentence: SpeechStarted, interim results (as many as the steps made, maybe none), the final, UtteranceEnd
    events = [m["type"] if m["type"] != "Results" else ("final" if m["is_final"] else "interim") for m in messages]
    assert [e for e in events if e != "interim"] == ["SpeechStarted", "final", "UtteranceEnd"] * 2 + ["Metadata"]
    assert events.index("interim") < events.index("final")  # interims of a segment come before its final
    ends = [m for m in messages if m["type"] == "UtteranceEnd"]
    for final, end in zip(finals, ends, strict=True):
        words = final["channel"]["alternatives"][0]["words"]
        assert abs(end["last_word_end"] - words[-1]["end"]) <= 0.2 and end["channel"] == [0, 1]
        assert " ".join(w["word"] for w in words) == text(final)
        assert all(w["start"] < w["end"] and 0 <= w["confidence"] <= 1 and w["punctuated_word"] for w in words)
        assert final["start"] <= words[0]["start"] and words[-1]["end"] <= final["start"] + final["duration"] + 1e-3
    assert finals[1]["start"] == pytest.approx(finals[0]["start"] + finals[0]["duration"], abs=1e-3)
    metadata = messages[-1]
    ids = {m["metadata"]["request_id"] for m in messages if m["type"] == "Results"}
    assert ids == {metadata["request_id"]}
    assert {m["metadata"]["model_info"]["name"] for m in messages if m["type"] == "Results"} == {"streamer-tdt-small"}
    assert metadata["duration"] == round(len(audio) / 2 / RATE, 3) and metadata["channels"] == 1
    assert metadata["sha256"] == hashlib.sha256(audio).hexdigest()
    assert (metadata["model_requested"], metadata["language"]) == ("nova-3", "en-US")


async def test_the_async_client_at_the_deepgram_path_with_mulaw_finalize_and_keepalive(
    daemon: Served, speech: dict[str, bytes]
) -> None:
    """At /deepgram/v1/listen (a base URL with a path, as Pipecat's base_url takes it), μ-law audio: Finalize gives
    the first sentence's final with from_finalize; KeepAlive holds the connection past the idle timeout; a Finalize
    with nothing said is answered empty; CloseStream flushes the second sentence; no interim results unasked."""
    client = AsyncDeepgramClient(api_key=TOKEN, environment=daemon.environment("/deepgram"))
    messages: list[dict[str, Any]] = []
    arrived = asyncio.Event()

    async def on_message(message: Any) -> None:
        messages.append(message.dict())
        arrived.set()

    async def wait_for(count: int) -> None:
        async with asyncio.timeout(60 * TIMEOUT):
            while len(results(messages)) < count:
                arrived.clear()
                await arrived.wait()

    async with client.listen.v1.connect(model="nova-3", encoding="mulaw", sample_rate=str(RATE)) as conn:
        conn.on(EventType.MESSAGE, on_message)
        listening = asyncio.create_task(conn.start_listening())
        await conn.send_media(g711(speech[FIRST], "pcm_mulaw"))
        await conn.send_finalize()
        await wait_for(1)
        for _ in range(3):  # 3 s without audio, past the 2 s idle timeout, kept open by KeepAlive
            await asyncio.sleep(1.0)
            await conn.send_keep_alive()
        await conn.send_finalize()
        await wait_for(2)
        await conn.send_media(g711(speech[SECOND], "pcm_mulaw"))
        await conn.send_close_stream()
        async with asyncio.timeout(60 * TIMEOUT):
            await listening
    finals = results(messages)
    assert [(f["from_finalize"], f["speech_final"]) for f in finals] == [(True, False), (True, False), (False, False)]
    check_words(text(finals[0]), FIRST)
    assert text(finals[1]) == "" and finals[1]["channel"]["alternatives"][0]["words"] == []
    check_words(text(finals[2]), SECOND)
    assert not results(messages, is_final=False) and messages[-1]["type"] == "Metadata"
    assert not [m for m in messages if m["type"] in ("SpeechStarted", "UtteranceEnd", "Error")]
    assert messages[-1]["duration"] == round((len(speech[FIRST]) + len(speech[SECOND])) / 2 / RATE, 3)


# The queries Pipecat's DeepgramSTTService and LiveKit's deepgram.STT send with their defaults (read from their
# source: pipecat main 2026-08, livekit-plugins-deepgram 1.7.0), at 16 kHz.
FRAMEWORK_QUERIES = {
    "pipecat": "model=nova-3-general&language=en&detect_entities=false&diarize=false&dictation=false"
               "&interim_results=true&numerals=false&profanity_filter=true&punctuate=true&smart_format=false"
               "&encoding=linear16&channels=1&multichannel=false&sample_rate=16000",
    "livekit": "model=nova-3&punctuate=true&smart_format=false&no_delay=true&interim_results=true&encoding=linear16"
               "&vad_events=true&sample_rate=16000&channels=1&endpointing=25&filler_words=true&profanity_filter=false"
               "&numerals=false&mip_opt_out=false&language=en-US",
}


@pytest.mark.parametrize("framework", sorted(FRAMEWORK_QUERIES))
async def test_what_pipecat_and_livekit_send_is_served(
    daemon: Served, speech: dict[str, bytes], framework: str
) -> None:
    """Their default queries are accepted as they are (unknown parameters ignored) and give the spoken words in one
    final result: LiveKit's 25 ms endpointing counts as 250 ms, so the gaps between words do not cut the sentence."""
    audio = soxr.resample(np.frombuffer(speech[FIRST], "<i2"), RATE, 16000).astype("<i2").tobytes()
    async with connect(daemon.url(f"/v1/listen?{FRAMEWORK_QUERIES[framework]}"), additional_headers={
            "Authorization": f"Token {TOKEN}"}) as ws:
        await send_audio(ws, audio, 3200)
        await ws.send(json.dumps({"type": "CloseStream"}))
        messages = await until_closed(ws)
    assert messages[-1]["type"] == "Metadata" and ws.close_code == 1000
    assert not [m for m in messages if m["type"] == "Error"]
    (final,) = results(messages)
    check_words(text(final), FIRST)
    assert [m["type"] for m in messages].count("SpeechStarted") == (framework == "livekit")  # vad_events=true


async def test_protocol_v1_keeps_v1_listen_beside_deepgram(daemon: Served, speech: dict[str, bytes]) -> None:
    """A v1 client (no query, a Bearer token, 'start' first) on /v1/listen gets v1's ready, final and end."""
    async with connect(daemon.url("/v1/listen"), additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": RATE, "encoding": "pcm_s16le"}))
        assert json.loads(await ws.recv())["type"] == "ready"
        await send_audio(ws, speech[FIRST])
        await ws.send(json.dumps({"type": "stop"}))
        messages = await until_closed(ws)
    assert messages[-1]["type"] == "end" and ws.close_code == 1000
    check_words(" ".join(m["text"] for m in messages if m["type"] == "final"), FIRST)


async def test_a_browser_key_as_subprotocol_alaw_and_captions_of_the_named_stream(
    daemon: Served, speech: dict[str, bytes]
) -> None:
    """A browser's Sec-WebSocket-Protocol 'token, <key>' gets 'token' back; A-law audio; the session's stream
    (?stream=) reaches /v1/captions subscribers like any other."""
    captions = await connect(daemon.url("/v1/captions?stream=dg-kitchen"),
                             additional_headers={"Authorization": f"Bearer {TOKEN}"})
    query = "/v1/listen?encoding=alaw&sample_rate=22050&stream=dg-kitchen&model=nova-3"
    async with captions, connect(daemon.url(query), subprotocols=["token", TOKEN]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "token"
        await send_audio(ws, g711(speech[FIRST], "pcm_alaw"), 2205)
        await ws.send(json.dumps({"type": "CloseStream"}))
        messages = await until_closed(ws)
        async with asyncio.timeout(30 * TIMEOUT):
            while (caption := json.loads(await captions.recv()))["type"] != "final":
                pass
    assert [m["type"] for m in messages][-1] == "Metadata" and ws.close_code == 1000
    check_words(text(results(messages)[0]), FIRST)
    assert caption["stream"] == "dg-kitchen" and caption["text"] == text(results(messages)[0])


async def test_keys_are_the_daemons_tokens(daemon: Served) -> None:
    """A wrong key is refused with 401: the async client raises ApiError 401, the sync one websockets' InvalidStatus
    (deepgram-sdk 7.17 only converts the legacy client's exception); the token as an access token (Bearer) is let
    in."""
    query = {"model": "nova-3", "encoding": "linear16", "sample_rate": "16000"}
    with pytest.raises(ApiError) as info:
        async with AsyncDeepgramClient(api_key="not-a-token", environment=daemon.environment()).listen.v1.connect(
            **query
        ):
            pass
    assert info.value.status_code == 401

    def refused_sync() -> int:
        with pytest.raises(InvalidStatus) as info:
            with DeepgramClient(api_key="not-a-token", environment=daemon.environment()).listen.v1.connect(**query):
                pass
        return info.value.response.status_code

    assert await asyncio.to_thread(refused_sync) == 401
    bearer = AsyncDeepgramClient(access_token=TOKEN, environment=daemon.environment())
    async with bearer.listen.v1.connect(model="nova-3", encoding="linear16", sample_rate="16000") as conn:
        await conn.send_close_stream()
        message = await asyncio.wait_for(conn.recv(), 30 * TIMEOUT)
    assert message.dict()["type"] == "Metadata"
