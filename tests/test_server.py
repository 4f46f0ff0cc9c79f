"""The daemon in-process against real peers: websockets clients on a loopback port, HTTP, a mosquitto broker.

The recognizer is the tiny random model (its words are garbage, its tokens real), so these tests check
protocol behaviour: message order, exactly one final per segment, errors, limits, shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from streamer.asr.model import AsrModel
from streamer.engine.recognizer import Recognizer
from streamer.protocol import Final, WordTiming
from streamer.service import Daemon
from streamer.settings import Settings
from tests.fixtures_realpeers import Mosquitto

TIMEOUT = float(os.environ.get("STREAMER_TEST_TIMEOUT_FACTOR", "1"))
Start = Callable[..., Awaitable[Daemon]]


@pytest.fixture(scope="module")
def recognizer(tiny_nemo: Path) -> Recognizer:
    """The tiny model at 80 ms look-ahead: a step every 160 ms of audio, so partials come often."""
    return Recognizer(AsrModel.load(str(tiny_nemo)), (70, 1))


@pytest.fixture(scope="module")
def pcm(speech_wav: Path) -> tuple[bytes, int]:
    """The speech WAV as s16le bytes at its own rate (22.05 kHz: the server resamples)."""
    data, rate = sf.read(speech_wav, dtype="int16")
    return data.tobytes(), rate


@pytest.fixture
async def start_daemon(recognizer: Recognizer) -> AsyncIterator[Start]:
    """Start daemons on port 0 with setting overrides; each is stopped (and must exit 0) at teardown."""
    running: list[tuple[asyncio.Event, asyncio.Task[int]]] = []

    async def start(**sections: dict[str, Any]) -> Daemon:
        server = {"port": 0, "close_timeout_s": 2.0, **sections.pop("server", {})}
        daemon = Daemon(Settings(server=server, **sections), recognizer)
        await daemon.start()
        stop = asyncio.Event()
        running.append((stop, asyncio.create_task(daemon.run(stop))))
        async with asyncio.timeout(10 * TIMEOUT):
            await daemon.ready.wait()
        return daemon

    yield start
    for stop, task in running:
        stop.set()
        async with asyncio.timeout(30 * TIMEOUT):
            assert await task == 0


def url(daemon: Daemon, path: str) -> str:
    return f"ws://127.0.0.1:{daemon.port}{path}"


def start_msg(rate: int, **extra: Any) -> str:
    return json.dumps({"type": "start", "sample_rate": rate, "encoding": "pcm_s16le", **extra})


async def recv(ws: ClientConnection, timeout_s: float = 10.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s * TIMEOUT):
        return json.loads(await ws.recv())


async def recv_until(ws: ClientConnection, kind: str, timeout_s: float = 20.0) -> list[dict[str, Any]]:
    """Messages up to and including the first of type ``kind``."""
    out: list[dict[str, Any]] = []
    while not out or out[-1]["type"] != kind:
        out.append(await recv(ws, timeout_s))
    return out


async def recv_all(ws: ClientConnection, timeout_s: float = 20.0) -> tuple[list[dict[str, Any]], int | None]:
    """Every message until the server closes; returns them and the close code."""
    out: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout_s * TIMEOUT):
            async for message in ws:
                out.append(json.loads(message))
    except ConnectionClosed:
        pass
    return out, ws.close_code


async def send_audio(ws: ClientConnection, data: bytes, frame_bytes: int = 4410) -> None:
    for i in range(0, len(data), frame_bytes):
        await ws.send(data[i : i + frame_bytes])


def check_segments(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Exactly one final per segment, numbered from 0; partials only for the open segment."""
    finals = [m for m in messages if m["type"] == "final"]
    assert [f["segment"] for f in finals] == list(range(len(finals)))
    done = -1
    for m in messages:
        if m["type"] == "final":
            done = m["segment"]
        elif m["type"] == "partial":
            assert m["segment"] == done + 1
            assert m["text"].startswith(m["stable"])
    return finals


async def http_get(daemon: Daemon, path: str, method: str = "GET") -> tuple[int, str, str]:
    def get() -> tuple[int, str, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{daemon.port}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=10 * TIMEOUT) as r:
                return r.status, r.headers.get("Content-Type", ""), r.read().decode()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.headers.get("Content-Type", ""), e.read().decode()

    return await asyncio.to_thread(get)


# ---------------------------------------------------------------- the happy path


async def test_wav_gives_ready_partials_one_final_per_segment_and_end(start_daemon: Start, pcm: tuple[bytes, int]):
    """A WAV streamed to /v1/listen gives ready, partials, exactly one final per segment, end and close 1000."""
    daemon = await start_daemon()
    data, rate = pcm
    async with connect(url(daemon, "/v1/listen")) as ws:
        await ws.send(start_msg(rate, stream="kitchen", endpointing={"max_segment_s": 1.0}))
        ready = await recv(ws)
        assert ready["type"] == "ready" and ready["stream"] == "kitchen" and ready["protocol_version"] == 1
        assert ready["sample_rate"] == rate and ready["att_context_size"] == [70, 1]
        assert ready["endpointing"]["max_segment_s"] == 1.0 and len(ready["session"]) >= 8
        half = len(data) // 2 & ~1
        await send_audio(ws, data[:half])
        first = await recv_until(ws, "partial")
        await send_audio(ws, data[half:])
        await ws.send(json.dumps({"type": "stop"}))
        rest, code = await recv_all(ws)
    messages = first + rest
    assert code == 1000
    assert messages[-1] == {"type": "end", "stream": "kitchen", "segments": len(check_segments(messages)),
                            "audio_s": round(len(data) / 2 / rate, 3), "dropped_s": 0.0}  # every byte counted
    finals = check_segments(messages)
    assert len(finals) >= 2 and finals[-1]["reason"] == "stop"
    assert {f["reason"] for f in finals[:-1]} == {"max_length"}
    for f in finals:
        assert f["stream"] == "kitchen" and f["text"] and f["token_ids"] and 0 <= f["confidence"] <= 1
        assert f["start"] <= f["end"] <= len(data) / 2 / rate + 0.001
        assert all(f["start"] <= w["start"] <= w["end"] <= f["end"] for w in f["words"])
    assert any(m["type"] == "partial" for m in messages)


async def test_captions_subscriber_gets_the_same_finals(start_daemon: Start, pcm: tuple[bytes, int]) -> None:
    """A /v1/captions subscriber of the stream gets the same finals as the client sending the audio."""
    daemon = await start_daemon()
    data, rate = pcm
    async with connect(url(daemon, "/v1/captions?stream=room")) as sub, connect(url(daemon, "/v1/listen")) as ws:
        await ws.send(start_msg(rate, stream="room", endpointing={"max_segment_s": 1.0}))
        await send_audio(ws, data)
        await ws.send(json.dumps({"type": "stop"}))
        sent, _ = await recv_all(ws)
        expected = check_segments(sent)
        got: list[dict[str, Any]] = []
        while len([m for m in got if m["type"] == "final"]) < len(expected):
            got.append(await recv(sub))
    assert check_segments(got) == expected
    assert {m["type"] for m in got} <= {"partial", "final"}


async def test_finalize_ends_a_segment_and_keeps_listening(start_daemon: Start, pcm: tuple[bytes, int]) -> None:
    """finalize gives the open segment's final now; the session goes on to a second segment."""
    daemon = await start_daemon()
    data, rate = pcm
    half = len(data) // 2 & ~1
    async with connect(url(daemon, "/v1/listen")) as ws:
        await ws.send(start_msg(rate, stream="fin"))
        await recv(ws)
        await send_audio(ws, data[:half])
        await ws.send(json.dumps({"type": "finalize"}))
        first = await recv_until(ws, "final")
        assert first[-1]["reason"] == "finalize" and first[-1]["end"] <= half / 2 / rate + 0.001
        await send_audio(ws, data[half:])
        await ws.send(json.dumps({"type": "stop"}))
        rest, _ = await recv_all(ws)
    finals = check_segments(first + rest)
    assert [f["reason"] for f in finals] == ["finalize", "stop"]
    assert rest[-1]["segments"] == 2


async def test_interim_results_false_sends_no_partials(start_daemon: Start, pcm: tuple[bytes, int]) -> None:
    """A client that asks for no interim results gets finals only."""
    daemon = await start_daemon()
    data, rate = pcm
    async with connect(url(daemon, "/v1/listen")) as ws:
        await ws.send(start_msg(rate, interim_results=False, endpointing={"max_segment_s": 1.0}))
        await recv(ws)
        for i in range(0, len(data), 4410):
            await ws.send(data[i : i + 4410])
            await asyncio.sleep(0.001)  # let the scheduler interleave, so partials exist on the server
        await ws.send(json.dumps({"type": "stop"}))
        messages, _ = await recv_all(ws)
    assert {m["type"] for m in messages} == {"final", "end"}
    assert daemon.metrics.partials_total.value() > 0


# ---------------------------------------------------------------- bad input


async def test_bad_input_gets_clear_errors_and_the_session_goes_on(start_daemon: Start, pcm: tuple[bytes, int]):
    """Every bad message or frame gets an error or warning naming it; the session and another one keep working."""
    daemon = await start_daemon()
    data, rate = pcm
    async with connect(url(daemon, "/v1/listen")) as other, connect(url(daemon, "/v1/listen")) as ws:
        await other.send(start_msg(rate, stream="bystander"))
        await recv(other)

        async def expect(send: str | bytes, kind: str, code: str, fragment: str) -> dict[str, Any]:
            await ws.send(send)
            msg = await recv(ws)
            assert (msg["type"], msg["code"]) == (kind, code), msg
            assert fragment in msg["message"], msg
            return msg

        await expect(b"\x00\x01" * 100, "error", "no_start", "audio before 'start'")
        await expect(json.dumps({"type": "finalize"}), "error", "no_start", "before 'start'")
        await expect("{this is not json", "error", "bad_json", "not valid JSON")
        await expect('"start"', "error", "bad_message", "JSON object")
        await expect(json.dumps({"type": "transcribe"}), "error", "bad_message", "unknown message type 'transcribe'")
        await expect(json.dumps({"type": "start", "encoding": "pcm_s16le"}), "error", "bad_message", "sample_rate")
        await expect(start_msg(96000), "error", "unsupported_audio", "8000-48000 Hz")
        await expect(start_msg(4000), "error", "unsupported_audio", "out of range")
        await expect(
            json.dumps({"type": "start", "sample_rate": 16000, "encoding": "opus"}),
            "error",
            "unsupported_audio",
            "encoding 'opus' is not supported",
        )
        await expect(start_msg(16000, channels=9), "error", "unsupported_audio", "channels must be 1-8")
        await expect(start_msg(16000, stream="bystander"), "error", "stream_in_use", "'bystander'")
        await ws.send(json.dumps({"type": "start", "sample_rate": 16000, "encoding": "pcm_f32le", "stream": "bad"}))
        assert (await recv(ws))["type"] == "ready"
        await expect(start_msg(16000), "error", "already_started", "started already")
        await expect(np.array([0.1, np.nan, 0.2], "<f4").tobytes(), "error", "bad_audio", "NaN or infinite")
        await expect(np.array([np.inf, -np.inf], "<f4").tobytes(), "error", "bad_audio", "NaN or infinite")
        await expect(b"", "warning", "empty_frame", "empty binary frame")
        await ws.send(json.dumps({"type": "keepalive"}))
        # after all that, the session still recognizes audio
        audio = sf.read(io_wav(data, rate), dtype="float32")[0].astype("<f4").tobytes()
        await send_audio(ws, audio, 8820)
        await ws.send(json.dumps({"type": "stop"}))
        messages, code = await recv_all(ws)
        assert code == 1000 and messages[-1]["type"] == "end" and check_segments(messages)
        # and the other session was not disturbed
        await send_audio(other, data)
        await other.send(json.dumps({"type": "stop"}))
        messages, code = await recv_all(other)
        assert code == 1000 and check_segments(messages) and messages[-1]["type"] == "end"
    errors = daemon.metrics.protocol_errors_total
    assert errors.value("bad_audio") == 2 and errors.value("no_start") == 2


async def test_bad_start_fields_are_named_and_a_corrected_start_goes_on(start_daemon: Start, pcm: tuple[bytes, int]):
    """A start with an unknown key, a bad stream name or a bad endpointing override gets error bad_message naming the
    key or value (no stream yet); the connection stays open, the bad starts reserve no name, and a corrected start
    gets ready with its override. Once started, a bad start or control message is named the same way (with the
    stream) and the session goes on to end and close 1000; a bystander session is undisturbed."""
    daemon = await start_daemon()
    data, rate = pcm
    rule = "use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
    allowed = ("channels, encoding, endpointing, hotword_weight, hotwords, interim_results, live, resume, sample_rate, "
               "stream, version")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"rate": 1}, f"unknown field 'rate' in 'start'; allowed: {allowed}"),
        ({"stream": "kitchen", "endpoint": {}}, f"unknown field 'endpoint' in 'start'; allowed: {allowed}"),
        ({"stream": "a/b"}, f"stream name 'a/b' is invalid: {rule}"),
        ({"stream": ""}, f"stream name '' is invalid: {rule}"),
        ({"stream": "-x"}, f"stream name '-x' is invalid: {rule}"),
        ({"stream": "x" * 65}, f"stream name '{'x' * 65}' is invalid: {rule}"),
        ({"stream": 7}, "'stream' must be a string, got 7"),
        ({"stream": "kept", "endpointing": 1}, "'endpointing' must be an object, got 1"),
        (
            {"stream": "kept", "endpointing": {"rule1": 1}},
            "unknown endpointing rule 'rule1'; known: trailing_silence_after_speech_s, silence_without_speech_s, "
            "max_segment_s",
        ),
        (
            {"stream": "kept", "endpointing": {"max_segment_s": 0}},
            "endpointing.max_segment_s must be in (0, 3600] s, got 0",
        ),
        (
            {"stream": "kept", "endpointing": {"max_segment_s": "5"}},
            "endpointing.max_segment_s must be a number of seconds, got '5'",
        ),
        (
            {"stream": "kept", "endpointing": {"silence_without_speech_s": float("nan")}},
            "endpointing.silence_without_speech_s must be a number of seconds, got nan",
        ),
        # the bad override is named, not the name another session holds
        (
            {"stream": "taken", "endpointing": {"max_segment_s": 1e9}},
            "endpointing.max_segment_s must be in (0, 3600] s, got 1000000000.0",
        ),
    ]
    async with connect(url(daemon, "/v1/listen")) as other, connect(url(daemon, "/v1/listen")) as ws:
        await other.send(start_msg(rate, stream="taken"))
        assert (await recv(other))["type"] == "ready"
        for extra, message in cases:
            await ws.send(json.dumps({"type": "start", "sample_rate": rate, "encoding": "pcm_s16le", **extra}))
            assert await recv(ws) == {"type": "error", "code": "bad_message", "message": message}, extra
        await ws.send(start_msg(rate, stream="kept", endpointing={"max_segment_s": 1.5}))
        ready = await recv(ws)
        assert ready["type"] == "ready" and ready["stream"] == "kept" and ready["endpointing"]["max_segment_s"] == 1.5
        for bad, message in (
            (start_msg(rate, stream="kept", bogus=True), f"unknown field 'bogus' in 'start'; allowed: {allowed}"),
            (json.dumps({"type": "stop", "now": True}), "unknown field 'now' in 'stop'"),
        ):
            await ws.send(bad)
            assert await recv(ws) == {"type": "error", "code": "bad_message", "stream": "kept", "message": message}
        for client in (ws, other):
            await send_audio(client, data)
            await client.send(json.dumps({"type": "stop"}))
            messages, code = await recv_all(client)
            assert code == 1000 and check_segments(messages)[-1]["reason"] == "stop" and messages[-1]["type"] == "end"
    assert daemon.metrics.protocol_errors_total.value("bad_message") == len(cases) + 2


async def test_stop_or_finalize_before_start_is_an_error_and_a_start_still_works(
    start_daemon: Start, pcm: tuple[bytes, int]
) -> None:
    """stop or finalize before start gets error no_start naming the message (no stream key yet) and closes nothing;
    a start then gets ready, and the session's finals reach the client and a caption subscriber, then end and close
    1000."""
    daemon = await start_daemon()
    data, rate = pcm
    async with connect(url(daemon, "/v1/captions?stream=late")) as sub, connect(url(daemon, "/v1/listen")) as ws:
        for kind in ("stop", "finalize", "stop"):
            await ws.send(json.dumps({"type": kind}))
            assert await recv(ws) == {
                "type": "error",
                "code": "no_start",
                "message": f"'{kind}' before 'start'; send a 'start' message first",
            }
        await ws.send(start_msg(rate, stream="late"))
        ready = await recv(ws)
        assert ready["type"] == "ready" and ready["stream"] == "late"
        await send_audio(ws, data)
        await ws.send(json.dumps({"type": "stop"}))
        messages, code = await recv_all(ws)
        finals = check_segments(messages)
        assert code == 1000 and finals[-1]["reason"] == "stop" and messages[-1]["type"] == "end"
        seen = await recv_until(sub, "final")
        while len([m for m in seen if m["type"] == "final"]) < len(finals):
            seen += await recv_until(sub, "final")
        assert [m for m in seen if m["type"] == "final"] == finals
    assert daemon.metrics.protocol_errors_total.value("no_start") == 3


def io_wav(data: bytes, rate: int) -> Any:
    """The s16le bytes as an in-memory WAV file (to read them back as float32)."""
    import io

    buf = io.BytesIO()
    sf.write(buf, np.frombuffer(data, "<i2"), rate, format="WAV")
    buf.seek(0)
    return buf


async def test_frames_may_end_mid_sample_and_lose_nothing(start_daemon: Start, pcm: tuple[bytes, int]) -> None:
    """Audio is a byte stream: mono and stereo s16le cut into frames of odd sizes (mid-sample, mid-frame, as a
    byte-chunking relay does) are recognized exactly like whole frames, every byte counted; a stream that ends on
    an incomplete sample frame says so in ``end`` (incomplete_bytes) and loses only that."""
    daemon = await start_daemon()
    data, rate = pcm

    async def session(stream: str, channels: int, frame_bytes: int, tail: bytes = b"") -> list[dict[str, Any]]:
        audio = np.repeat(np.frombuffer(data, "<i2"), channels).tobytes() + tail
        async with connect(url(daemon, "/v1/listen")) as ws:
            await ws.send(start_msg(rate, channels=channels, stream=stream))
            assert (await recv(ws))["type"] == "ready"
            await send_audio(ws, audio, frame_bytes)
            await ws.send(json.dumps({"type": "stop"}))
            messages, code = await recv_all(ws)
        assert code == 1000 and check_segments(messages), messages
        assert not [m for m in messages if m["type"] in ("error", "warning")], messages
        assert messages[-1]["audio_s"] == round(len(data) / 2 / rate, 3)  # every whole sample frame counted
        return messages

    def tokens(messages: list[dict[str, Any]]) -> list[list[int]]:
        return [m["token_ids"] for m in messages if m["type"] == "final"]

    whole, mono, stereo = await asyncio.gather(
        session("whole", 1, 4410), session("mono", 1, 4409, tail=b"\x07"), session("stereo", 2, 4411 * 2 + 1)
    )
    assert tokens(whole) and tokens(mono) == tokens(whole) and tokens(stereo) == tokens(whole)
    assert mono[-1]["incomplete_bytes"] == 1 and "incomplete_bytes" not in stereo[-1]
    assert daemon.metrics.protocol_errors_total.value("bad_audio") == 0


async def test_oversized_frame_closes_1009_and_the_segment_still_reaches_subscribers(
    start_daemon: Start, pcm: tuple[bytes, int]
) -> None:
    """A frame over max_frame_bytes closes that client with 1009; its open segment is finalized for the others."""
    daemon = await start_daemon(server={"max_frame_bytes": 64 * 1024})
    data, rate = pcm
    async with connect(url(daemon, "/v1/captions?stream=big")) as sub:
        async with connect(url(daemon, "/v1/listen"), max_size=None) as ws:
            await ws.send(start_msg(rate, stream="big", endpointing={"max_segment_s": 60}))
            await recv(ws)
            await send_audio(ws, data[: len(data) // 2 & ~1])
            await recv_until(sub, "partial")
            await ws.send(b"\x00" * (64 * 1024 + 2))
            _, code = await recv_all(ws)
            assert code == 1009
        final = (await recv_until(sub, "final"))[-1]
        assert final["reason"] == "disconnect" and final["segment"] == 0
    async with connect(url(daemon, "/v1/listen")) as ws:  # the server is fine
        await ws.send(start_msg(rate, stream="big"))
        assert (await recv(ws))["type"] == "ready"


async def test_client_vanishing_mid_utterance_is_finalized_to_subscribers_and_mqtt(
    start_daemon: Start, pcm: tuple[bytes, int], tmp_path: Path
) -> None:
    """A client that drops its TCP connection mid-utterance: once its (short) resume window passes, its segment's
    final reaches captions and MQTT; a bystander session, mid-utterance across the drop, still gets its final
    (on MQTT too), end and close 1000."""
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed (apt install mosquitto)")
    import aiomqtt

    from tests.fixtures_realpeers import Mosquitto

    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        daemon = await start_daemon(
            server={"resume_window_s": 0.5},  # held this long, not the default 10 s, then finalized as a disconnect
            mqtt={"enabled": True, "host": "127.0.0.1", "port": broker.port, "device_id": "box"},
        )
        data, rate = pcm
        half = len(data) // 2 & ~1
        async with aiomqtt.Client("127.0.0.1", broker.port) as mqtt:
            await mqtt.subscribe("streamer/box/#", qos=1)
            async with (
                connect(url(daemon, "/v1/captions?stream=gone")) as sub,
                connect(url(daemon, "/v1/listen")) as other,
            ):
                await other.send(start_msg(rate, stream="stays", endpointing={"max_segment_s": 60}))
                await recv(other)
                await send_audio(other, data[:half])
                ws = await connect(url(daemon, "/v1/listen"))
                await ws.send(start_msg(rate, stream="gone", endpointing={"max_segment_s": 60}))
                assert (await recv(ws))["resume_window_s"] == 0.5
                await send_audio(ws, data[:half])
                await recv_until(sub, "partial")
                ws.transport.abort()  # vanish: no close frame, no stop
                final = (await recv_until(sub, "final", timeout_s=10))[-1]
                assert final["reason"] == "disconnect" and final["stream"] == "gone" and final["segment"] == 0
                # the bystander's utterance goes on across the drop
                await send_audio(other, data[half:])
                await other.send(json.dumps({"type": "finalize"}))
                kept = (await recv_until(other, "final"))[-1]
                assert kept["reason"] == "finalize" and kept["stream"] == "stays" and kept["segment"] == 0
                await other.send(json.dumps({"type": "stop"}))
                messages, code = await recv_all(other)
                assert code == 1000 and messages[-1]["type"] == "end"
            wanted = {"streamer/box/gone/final": final, "streamer/box/stays/final": kept}
            async with asyncio.timeout(10 * TIMEOUT):
                async for message in mqtt.messages:
                    if str(message.topic) in wanted:
                        got = json.loads(message.payload)
                        assert got == {**wanted.pop(str(message.topic)), "run": daemon.mqtt.run_id}
                        if not wanted:
                            break
    finally:
        broker.stop()


async def test_broker_restart_mid_stream_loses_no_final(
    start_daemon: Start, pcm: tuple[bytes, int], mosquitto_factory: Callable[..., Mosquitto]
) -> None:
    """The broker goes away mid-stream and comes back: every final the clients saw reaches MQTT, once, in order.

    A second session (stream "lobby"), open across the outage, makes a final while the broker is down and ends
    normally afterwards: neither session notices the outage.
    """
    import aiomqtt

    broker = mosquitto_factory(persistent=True)  # the listener's QoS 1 session survives the restart
    received: list[dict[str, Any]] = []

    async def listener() -> None:
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", broker.port, identifier="archive", clean_session=False) as c:
                    await c.subscribe("streamer/box/+/final", qos=1)
                    async for message in c.messages:
                        received.append(json.loads(message.payload))
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)

    async def wait_for(predicate: Callable[[], bool], what: str) -> None:
        async with asyncio.timeout(20 * TIMEOUT):
            while not predicate():
                await asyncio.sleep(0.02)

    async def utterance(ws: ClientConnection, audio: bytes) -> dict[str, Any]:
        await send_audio(ws, audio)
        await ws.send(json.dumps({"type": "finalize"}))
        return (await recv_until(ws, "final"))[-1]

    listening = asyncio.create_task(listener())
    try:
        daemon = await start_daemon(
            mqtt={"enabled": True, "host": "127.0.0.1", "port": broker.port, "device_id": "box"}
        )
        sink = daemon.mqtt
        data, rate = pcm
        piece = len(data) // 4 & ~1
        finals: list[dict[str, Any]] = []  # the hall client's
        published: list[dict[str, Any]] = []  # every final either client saw, in the order they were made
        async with connect(url(daemon, "/v1/listen")) as ws, connect(url(daemon, "/v1/listen")) as lobby:
            for client, name in ((ws, "hall"), (lobby, "lobby")):
                await client.send(start_msg(rate, stream=name, endpointing={"max_segment_s": 60}))
                assert (await recv(client))["type"] == "ready"
            await send_audio(lobby, data[:piece])  # mid-utterance when the broker goes
            for segment in range(6):
                if segment == 2:  # the broker goes down with two finals delivered
                    await wait_for(lambda: len(received) == 2, "the first finals arrive")
                    # and are acknowledged: a PUBACK lost with the broker would rightly mean a resend (QoS 1 is
                    # at least once), which this test would count as a duplicate
                    await wait_for(lambda: sink.outbox_depth == 0, "the broker acknowledged them")
                    # and the listener's own PUBACKs reached the broker: one still in flight when it stops makes
                    # the persistent broker redeliver that message to the listener after the restart (QoS 1 on
                    # the subscriber's side), a duplicate the daemon did not send
                    await asyncio.sleep(0.3)
                    await asyncio.to_thread(broker.stop)
                    await wait_for(lambda: not sink.connected, "the daemon notices")
                if segment == 3:  # the other session's final, made while the broker is down
                    published.append(await utterance(lobby, data[piece : 2 * piece]))
                    assert published[-1]["stream"] == "lobby" and published[-1]["segment"] == 0
                if segment == 5:  # four finals made while it was down
                    assert sink.outbox_depth == 4 and len(received) == 2
                    await asyncio.to_thread(broker.start)
                finals.append(await utterance(ws, data[(segment % 4) * piece : (segment % 4 + 1) * piece]))
                published.append(finals[-1])
            await lobby.send(json.dumps({"type": "stop"}))
            messages, code = await recv_all(lobby)
            assert code == 1000 and messages[-1]["type"] == "end"
            published += [m for m in messages if m["type"] == "final"]  # the stop's, if its short rest had words
        await wait_for(lambda: len(received) >= len(published), "every final after the restart")
        await asyncio.sleep(0.2)  # a duplicate would show up here
    finally:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
    assert [f["segment"] for f in finals] == list(range(6))
    assert received == [{**f, "run": sink.run_id} for f in published]  # MQTT payloads add the daemon's run id
    assert sink.dropped_finals == 0


# ---------------------------------------------------------------- limits


async def test_subscriber_that_never_reads_is_closed_1008(start_daemon: Start, pcm: tuple[bytes, int]) -> None:
    """A captions subscriber that stops reading is closed with 1008 (slow consumer); finals are never dropped.

    A second subscriber of the same stream reads along: it gets every final, is not closed, and still gets the
    final of a real /v1/listen session on that stream afterwards. A bystander session open across it all works on.
    (The flood itself is published in-process: a real session's finals are too small to fill the socket buffers.)
    """
    daemon = await start_daemon(server={"max_pending_messages": 8, "close_timeout_s": 10.0})
    data, rate = pcm
    half = len(data) // 2 & ~1
    big = Final("slow", 0, "x" * 65536, 0.0, 1.0, (WordTiming("x", 0.0, 1.0, 1.0),), (1,), 1.0, False, "silence")
    read: list[dict[str, Any]] = []

    async def read_along(ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                read.append(json.loads(message))

    async with (
        connect(url(daemon, "/v1/captions?stream=slow")) as reader,
        connect(url(daemon, "/v1/listen")) as other,
    ):
        reading = asyncio.create_task(read_along(reader))
        await other.send(start_msg(rate, stream="other", endpointing={"max_segment_s": 60}))
        await recv(other)
        await send_audio(other, data[:half])
        published = 0
        async with connect(url(daemon, "/v1/captions?stream=slow"), max_queue=1) as sub:
            async with asyncio.timeout(30 * TIMEOUT):
                while daemon.metrics.slow_consumers_total.value() == 0:  # until the socket buffers are full
                    daemon.hub.publish("slow", [big])
                    published += 1
                    await asyncio.sleep(0.001)
            messages, code = await recv_all(sub)
        assert code == 1008 and "slow consumer" in (sub.close_reason or "")
        assert messages and all(m["type"] == "final" for m in messages)
        async with asyncio.timeout(20 * TIMEOUT):
            while len(read) < published:
                await asyncio.sleep(0.01)
        assert read == [json.loads(big.to_json())] * published and not reading.done()
        async with asyncio.timeout(10 * TIMEOUT):
            while daemon.hub.subscriber_count != 1:  # the slow one's place is freed once its handler is done
                await asyncio.sleep(0.01)
        async with connect(url(daemon, "/v1/listen")) as ws:  # a real stream to the remaining subscriber
            await ws.send(start_msg(rate, stream="slow"))
            await recv(ws)
            await send_audio(ws, data[:half])
            await ws.send(json.dumps({"type": "finalize"}))
            final = (await recv_until(ws, "final"))[-1]
        async with asyncio.timeout(10 * TIMEOUT):
            while final not in read:
                await asyncio.sleep(0.01)
        assert {m["type"] for m in read[published:]} <= {"partial", "final"}
        await send_audio(other, data[half:])  # the bystander, mid-utterance all along
        await other.send(json.dumps({"type": "stop"}))
        others, code = await recv_all(other)
        assert code == 1000 and check_segments(others)[-1]["reason"] == "stop" and others[-1]["type"] == "end"
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
    assert daemon.metrics.slow_consumers_total.value() == 1


async def test_session_cap_refuses_with_a_reason(start_daemon: Start, pcm: tuple[bytes, int]) -> None:
    """With max_sessions = 1 a second client gets error server_busy and close 1013; the first session, mid-utterance
    across the refusal, goes on to its finals, end and close 1000; later clients get in again."""
    daemon = await start_daemon(server={"max_sessions": 1})
    data, rate = pcm
    half = len(data) // 2 & ~1
    async with connect(url(daemon, "/v1/listen")) as first:
        await first.send(start_msg(rate, endpointing={"max_segment_s": 60}))
        await recv(first)
        await send_audio(first, data[:half])
        async with connect(url(daemon, "/v1/listen")) as second:
            messages, code = await recv_all(second)
        assert code == 1013
        assert messages == [
            {
                "type": "error",
                "code": "server_busy",
                "message": "the server has 1 sessions open, its maximum; try again later",
            }
        ]
        await send_audio(first, data[half:])
        await first.send(json.dumps({"type": "stop"}))
        messages, code = await recv_all(first)
        assert code == 1000 and check_segments(messages)[-1]["reason"] == "stop"
        assert messages[-1]["type"] == "end" and messages[-1]["audio_s"] == round(len(data) / 2 / rate, 3)
    async with asyncio.timeout(10 * TIMEOUT):
        while daemon.server.sessions:  # the first session is flushed and gone only after its close handshake
            await asyncio.sleep(0.01)
    async with connect(url(daemon, "/v1/listen")) as third:
        await third.send(start_msg(rate))
        assert (await recv(third))["type"] == "ready"
    assert daemon.metrics.sessions_refused_total.value("listen") == 1


async def test_subscriber_cap_refuses_with_a_reason(start_daemon: Start, pcm: tuple[bytes, int]) -> None:
    """With max_subscribers = 1 a second /v1/captions client (of any stream) gets error server_busy and close 1013;
    the first subscriber still gets a real /v1/listen session's final, and once it leaves a new subscriber gets in
    and gets that session's next final."""
    daemon = await start_daemon(server={"max_subscribers": 1})
    data, rate = pcm
    half = len(data) // 2 & ~1

    async def subscribers(n: int) -> None:
        async with asyncio.timeout(10 * TIMEOUT):
            while daemon.hub.subscriber_count != n:
                await asyncio.sleep(0.01)

    async with connect(url(daemon, "/v1/listen")) as ws:
        await ws.send(start_msg(rate, stream="hall", endpointing={"max_segment_s": 60}))
        await recv(ws)
        async with connect(url(daemon, "/v1/captions?stream=hall")) as first:
            await subscribers(1)
            for path in ("/v1/captions?stream=hall", "/v1/captions?stream=other"):
                async with connect(url(daemon, path)) as refused:
                    messages, code = await recv_all(refused)
                assert code == 1013 and refused.close_reason == "server busy"
                assert messages == [
                    {
                        "type": "error",
                        "code": "server_busy",
                        "message": "the server has 1 subscriptions open, its maximum; try again later",
                    }
                ]
            await send_audio(ws, data[:half])
            await ws.send(json.dumps({"type": "finalize"}))
            final = (await recv_until(ws, "final"))[-1]
            assert (await recv_until(first, "final"))[-1] == final
        await subscribers(0)
        async with connect(url(daemon, "/v1/captions?stream=hall")) as later:
            await subscribers(1)
            await send_audio(ws, data[half:])
            await ws.send(json.dumps({"type": "stop"}))
            messages, code = await recv_all(ws)
            assert code == 1000 and messages[-1]["type"] == "end"
            (last,) = [m for m in messages if m["type"] == "final"]
            assert last["segment"] == 1 and last["reason"] == "stop"
            assert (await recv_until(later, "final"))[-1] == last
    assert daemon.metrics.sessions_refused_total.value("captions") == 2
    assert daemon.metrics.sessions_refused_total.value("listen") == 0


async def test_a_resume_older_than_the_kept_finals_warns_results_lost(start_daemon: Start, pcm: tuple[bytes, int]):
    """A resume whose next_segment is older than the finals the server keeps (server.max_pending_messages of them)
    gets ready, then warning results_lost naming the segments it cannot replay, then the kept finals in order, and
    the session goes on to end and close 1000: the replay is a burst the server made, not a slow consumer. A caption
    subscriber of the stream gets each final once, live."""
    daemon = await start_daemon(server={"max_pending_messages": 4, "resume_window_s": 30})
    data, rate = pcm
    piece = len(data) // 4 & ~1
    async with connect(url(daemon, "/v1/captions?stream=lost")) as sub:
        ws = await connect(url(daemon, "/v1/listen"))
        await ws.send(start_msg(rate, stream="lost", endpointing={"max_segment_s": 60}))
        ready = await recv(ws)
        finals: list[dict[str, Any]] = []
        for i in range(6):  # six finals, read as they come: the server keeps the last four
            await send_audio(ws, data[(i % 4) * piece : (i % 4 + 1) * piece])
            await ws.send(json.dumps({"type": "finalize"}))
            finals.append((await recv_until(ws, "final"))[-1])
        assert [f["segment"] for f in finals] == list(range(6))
        ws.transport.abort()  # no close frame: the session is kept for a resume
        async with connect(url(daemon, "/v1/listen")) as again:
            resume = {"session": ready["session"], "token": ready["resume_token"], "next_segment": 0}
            await again.send(start_msg(rate, resume=resume))
            resumed = await recv(again)
            assert resumed["type"] == "ready" and resumed["resumed"] is True, resumed
            assert round(resumed["audio_s"] * rate) == 6 * piece // 2
            assert await recv(again) == {
                "type": "warning",
                "code": "results_lost",
                "stream": "lost",
                "message": "the finals of segments 0-1 are no longer kept and are not replayed (2 final(s))",
            }
            assert [await recv(again) for _ in finals[2:]] == finals[2:]
            await send_audio(again, data[:piece])  # live again: a seventh segment
            await again.send(json.dumps({"type": "stop"}))
            messages, code = await recv_all(again)
        assert code == 1000 and messages[-1] == {"type": "end", "stream": "lost", "segments": 7,
                                                  "audio_s": round(7 * piece / 2 / rate, 3), "dropped_s": 0.0}
        last = [m for m in messages if m["type"] == "final"]
        assert [(f["segment"], f["reason"]) for f in last] == [(6, "stop")]
        seen = await recv_until(sub, "final")
        while len([m for m in seen if m["type"] == "final"]) < 7:
            seen += await recv_until(sub, "final")
    assert [m for m in seen if m["type"] == "final"] == [*finals, *last]
    assert daemon.metrics.slow_consumers_total.value() == 0


async def test_idle_session_is_flushed_and_closed(start_daemon: Start, pcm: tuple[bytes, int]) -> None:
    """A client silent for idle_timeout_s gets error idle_timeout, its segment's final, end, close 1008."""
    daemon = await start_daemon(server={"idle_timeout_s": 0.5})
    data, rate = pcm
    async with connect(url(daemon, "/v1/listen")) as ws:
        await ws.send(start_msg(rate, endpointing={"max_segment_s": 60}))
        await recv(ws)
        await send_audio(ws, data)
        messages, code = await recv_all(ws)
    assert code == 1008
    others = [m for m in messages if m["type"] != "partial"]
    assert [m["type"] for m in others] == ["error", "final", "end"]
    assert others[0]["code"] == "idle_timeout" and check_segments(messages)[-1]["reason"] == "idle"


async def test_captions_needs_a_valid_stream_name(start_daemon: Start) -> None:
    """/v1/captions without ?stream= or with a bad name: error bad_message, close 1008."""
    daemon = await start_daemon()
    for path in ("/v1/captions", "/v1/captions?stream=a/b"):
        async with connect(url(daemon, path)) as ws:
            messages, code = await recv_all(ws)
        assert code == 1008 and messages[0]["code"] == "bad_message" and "?stream=NAME" in messages[0]["message"]


async def test_captions_is_read_only_and_says_so_once(start_daemon: Start, pcm: tuple[bytes, int]) -> None:
    """Whatever a /v1/captions client sends (text or binary) gets one error bad_message saying the endpoint is
    read-only and where audio goes; later messages are dropped without a word. The subscription stays open: it, and
    a subscriber that sent nothing, get the finals of a real /v1/listen session on the stream, and nothing else."""
    daemon = await start_daemon()
    data, rate = pcm
    message = ("/v1/captions is read-only: it takes no messages or audio (this one and any later ones are ignored); "
               "send audio to /v1/listen")
    error = {"type": "error", "code": "bad_message", "stream": "room", "message": message}
    async with (
        connect(url(daemon, "/v1/captions?stream=room")) as texts,
        connect(url(daemon, "/v1/captions?stream=room")) as frames,
        connect(url(daemon, "/v1/captions?stream=room")) as quiet,
    ):
        await texts.send(start_msg(rate, stream="room"))
        assert await recv(texts) == error
        await frames.send(b"\x00\x01" * 100)
        assert await recv(frames) == error
        for sub in (texts, frames):  # said once: these get no answer
            await sub.send(b"\x00\x01" * 100)
            await sub.send(json.dumps({"type": "stop"}))
        async with connect(url(daemon, "/v1/listen")) as ws:
            await ws.send(start_msg(rate, stream="room", endpointing={"max_segment_s": 1.0}))
            await recv(ws)
            await send_audio(ws, data)
            await ws.send(json.dumps({"type": "stop"}))
            messages, code = await recv_all(ws)
        finals = check_segments(messages)
        assert code == 1000 and len(finals) >= 2
        for sub in (texts, frames, quiet):
            got: list[dict[str, Any]] = []
            while len([m for m in got if m["type"] == "final"]) < len(finals):
                got.append(await recv(sub))
            assert check_segments(got) == finals and {m["type"] for m in got} <= {"partial", "final"}
    assert daemon.metrics.protocol_errors_total.value("bad_message") == 2


# ---------------------------------------------------------------- HTTP


async def test_http_endpoints(start_daemon: Start, pcm: tuple[bytes, int]) -> None:
    """/healthz, /readyz, /metrics (Prometheus text with the documented series), / and 404/405 on one port."""
    daemon = await start_daemon()
    data, rate = pcm
    async with connect(url(daemon, "/v1/listen")) as ws:
        await ws.send(start_msg(rate))
        await recv(ws)
        await send_audio(ws, data)
        await ws.send(json.dumps({"type": "stop"}))
        await recv_all(ws)
    assert await http_get(daemon, "/healthz") == (200, "text/plain; charset=utf-8", "ok\n")
    assert (await http_get(daemon, "/readyz"))[:3:2] == (200, "ready\n")
    status, ctype, body = await http_get(daemon, "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in body.splitlines() if line[0] != "#"}
    assert values['streamer_sessions_total{protocol="listen"}'] == 1 and values["streamer_ready"] == 1
    assert values['streamer_sessions_total{protocol="deepgram"}'] == 0  # every protocol's series from the start
    assert values["streamer_audio_seconds_total"] == pytest.approx(len(data) / 2 / rate, abs=0.05)
    assert values["streamer_finals_total"] >= 1 and values["streamer_step_seconds_count"] >= 1
    assert values['streamer_batch_size_bucket{le="+Inf"}'] == values["streamer_batch_size_count"]
    for name in (
        "streamer_streams",
        "streamer_real_time_factor",
        "streamer_audio_dropped_seconds_total",
        "streamer_mqtt_outbox_depth",
        "streamer_caption_subscribers",
    ):
        assert name in values
    status, ctype, page = await http_get(daemon, "/")
    assert status == 200 and ctype.startswith("text/html") and "<html" in page.lower()
    assert (await http_get(daemon, "/nope"))[0] == 404
    assert (await http_get(daemon, "/healthz", method="POST"))[0] == 405


async def test_readyz_is_503_until_ready(recognizer: Recognizer) -> None:
    """Bound but not yet serving (READY=1 not sent): /readyz says 503, /healthz 200, /v1/listen is refused."""
    daemon = Daemon(Settings(server={"port": 0}), recognizer)
    await daemon.start()
    try:
        assert (await http_get(daemon, "/readyz"))[0] == 503
        assert (await http_get(daemon, "/healthz"))[0] == 200
        async with connect(url(daemon, "/v1/listen")) as ws:
            messages, code = await recv_all(ws)
        assert code == 1013 and messages[0]["code"] == "not_ready"
    finally:
        await daemon.server.close()


# ---------------------------------------------------------------- shutdown


async def test_shutdown_flushes_open_segments_to_every_sink(recognizer: Recognizer, pcm: tuple[bytes, int]) -> None:
    """Stopping the daemon: the open segment's final reaches client and subscriber, then end and close 1001."""
    daemon = Daemon(Settings(server={"port": 0, "close_timeout_s": 2.0}), recognizer)
    await daemon.start()
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    await daemon.ready.wait()
    data, rate = pcm
    async with connect(url(daemon, "/v1/captions?stream=open")) as sub, connect(url(daemon, "/v1/listen")) as ws:
        await ws.send(start_msg(rate, stream="open", endpointing={"max_segment_s": 60}))
        await recv(ws)
        await send_audio(ws, data[: len(data) // 2 & ~1])
        await recv_until(sub, "partial")
        stop.set()
        messages, code = await recv_all(ws)
        assert code == 1001
        assert [m["type"] for m in messages if m["type"] != "partial"] == ["final", "end"]
        final = check_segments(messages)[-1]
        assert final["reason"] == "shutdown"
        got, sub_code = await recv_all(sub)
        assert sub_code == 1001 and [m for m in got if m["type"] == "final"] == [final]
    async with asyncio.timeout(20 * TIMEOUT):
        assert await task == 0


@pytest.mark.audio
async def test_microphone_stream_reaches_caption_subscribers(
    recognizer: Recognizer, virtual_mic: Any, speech_wav: Path
) -> None:
    """[mic] enabled: the virtual PulseAudio mic is stream "mic"; subscribers get partials, and its final at stop."""
    daemon = Daemon(
        Settings(
            server={"port": 0, "close_timeout_s": 2.0},
            mic={"enabled": True, "device": virtual_mic.device, "name": "mic"},
        ),
        recognizer,
    )
    await daemon.start()
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await daemon.ready.wait()
        async with connect(url(daemon, "/v1/captions?stream=mic")) as sub:
            await asyncio.to_thread(virtual_mic.play, speech_wav)
            partial = (await recv_until(sub, "partial"))[-1]
            assert partial["stream"] == "mic"
            stop.set()
            messages, code = await recv_all(sub)
        assert code == 1001 and check_segments([partial, *messages])[-1]["reason"] == "shutdown"
    finally:
        stop.set()
        async with asyncio.timeout(20 * TIMEOUT):
            assert await task == 0


async def test_shutdown_flushes_to_mqtt_and_publishes_offline(
    recognizer: Recognizer, pcm: tuple[bytes, int], tmp_path: Path
) -> None:
    """At shutdown the open segment's final is published on MQTT (QoS 1), then the retained status turns offline."""
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed (apt install mosquitto)")
    import aiomqtt

    from tests.fixtures_realpeers import Mosquitto

    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        settings = Settings(
            server={"port": 0, "close_timeout_s": 2.0},
            mqtt={"enabled": True, "host": "127.0.0.1", "port": broker.port, "device_id": "box"},
        )
        daemon = Daemon(settings, recognizer)
        await daemon.start()
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        await daemon.ready.wait()
        data, rate = pcm
        async with aiomqtt.Client("127.0.0.1", broker.port) as mqtt:
            await mqtt.subscribe("streamer/box/#", qos=1)
            async with connect(url(daemon, "/v1/listen")) as ws:
                await ws.send(start_msg(rate, stream="tv", endpointing={"max_segment_s": 60}))
                await recv(ws)
                await send_audio(ws, data[: len(data) // 2 & ~1])
                await recv_until(ws, "partial")
                stop.set()
                messages, code = await recv_all(ws)
            assert code == 1001
            (final,) = [m for m in messages if m["type"] == "final"]
            seen: list[tuple[str, Any]] = []
            async with asyncio.timeout(10 * TIMEOUT):
                async for message in mqtt.messages:
                    payload = message.payload.decode() if isinstance(message.payload, bytes) else message.payload
                    seen.append((str(message.topic), payload))
                    if seen[-1] == ("streamer/box/status", "offline"):
                        break
        finals = [json.loads(p) for t, p in seen if t == "streamer/box/tv/final"]
        assert finals == [{**final, "run": daemon.mqtt.run_id}] and final["reason"] == "shutdown"
        async with asyncio.timeout(20 * TIMEOUT):
            assert await task == 0
    finally:
        broker.stop()

