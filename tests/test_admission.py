"""Capacity-aware admission, in-process with the tiny model (tests/test_server.py's fixtures): ``/readyz`` at capacity,
HTTP 503 at the handshake of every session route, the load in ``/metrics``, the HAProxy agent check (read with a raw
asyncio client), the drain on stop, ``capacity_streams = "auto"``; and a daemon without ``[admission]`` unchanged.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from wyoming.asr import Transcribe
from wyoming.audio import AudioStart
from wyoming.client import AsyncTcpClient
from wyoming.error import Error as WyomingError

from streamer.engine.capacity import _next_batch, measure_capacity, round_limit_s, speech_like
from streamer.engine.recognizer import Recognizer
from streamer.service import Daemon
from streamer.settings import Settings
from tests.test_server import (  # noqa: F401  (fixtures)
    Start,
    http_get,
    pcm,
    recognizer,
    recv,
    recv_all,
    recv_until,
    send_audio,
    start_daemon,
    start_msg,
    url,
)

TIMEOUT = float(os.environ.get("STREAMER_TEST_TIMEOUT_FACTOR", "1"))


async def agent_line(daemon: Daemon) -> str:
    """One agent check as HAProxy makes it: connect, read the line, close."""
    async with asyncio.timeout(5 * TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.agent.port)
        try:
            line = await reader.readline()
            assert await reader.read() == b""  # one line, then the server closes (HAProxy closed first here)
        finally:
            writer.close()
            await writer.wait_closed()
    assert line.endswith(b"\n")
    return line.decode("ascii").strip()


async def metric(daemon: Daemon, name: str) -> float:
    _, _, body = await http_get(daemon, "/metrics")
    samples = {s.name: s.value for family in text_string_to_metric_families(body) for s in family.samples}
    return samples[name]


async def open_session(daemon: Daemon, rate: int, stream: str) -> ClientConnection:
    ws = await connect(url(daemon, "/v1/listen"))
    await ws.send(start_msg(rate, stream=stream))
    assert (await recv(ws))["type"] == "ready"
    return ws


async def handshake_status(daemon: Daemon, path: str) -> tuple[int, str | None, str]:
    """The HTTP status of a WebSocket handshake to ``path`` (101 when it was accepted), Retry-After and the body."""
    try:
        async with asyncio.timeout(10 * TIMEOUT), connect(url(daemon, path)) as ws:
            await ws.close()
            return 101, None, ""
    except InvalidStatus as exc:
        response = exc.response
        return response.status_code, response.headers.get("Retry-After"), response.body.decode()


def post_upload(daemon: Daemon, wav: bytes) -> int:
    boundary = "xYz"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--{boundary}\r\n"
            f"Content-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n"
            ).encode() + wav + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"http://127.0.0.1:{daemon.port}/v1/audio/transcriptions", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=10 * TIMEOUT) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code


async def wyoming_answer(daemon: Daemon) -> str:
    """What the Wyoming port says to an utterance's start (``error:CODE``, or ``none`` when it took it)."""
    async with asyncio.timeout(10 * TIMEOUT), AsyncTcpClient("127.0.0.1", daemon.wyoming.port) as client:
        await client.write_event(Transcribe().event())
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        try:
            async with asyncio.timeout(1.0):
                event = await client.read_event()
        except TimeoutError:
            return "none"
        assert event is not None and WyomingError.is_type(event.type)
        return f"error:{WyomingError.from_event(event).code}"


ADMISSION = {"capacity_streams": 2, "agent_port": 0, "retry_after_s": 7}


async def test_at_capacity_readyz_says_so_every_session_route_is_refused_and_the_agent_drains(
    start_daemon: Start, pcm: tuple[bytes, int]  # noqa: F811
) -> None:
    daemon = await start_daemon(admission=ADMISSION, server={"max_sessions": 5}, wyoming={"enabled": True, "port": 0})
    data, rate = pcm
    assert await http_get(daemon, "/readyz") == (200, "text/plain; charset=utf-8", "ready\n")
    assert await agent_line(daemon) == "100% ready"
    assert await metric(daemon, "streamer_capacity_sessions") == 2
    assert await metric(daemon, "streamer_load_ratio") == 0
    first = await open_session(daemon, rate, "one")
    assert await agent_line(daemon) == "50% ready"
    assert await metric(daemon, "streamer_sessions_active") == 1
    second = await open_session(daemon, rate, "two")
    status, _, body = await http_get(daemon, "/readyz")
    assert (status, body) == (503, "not ready: at capacity 2/2 sessions\n")
    assert await agent_line(daemon) == "drain"
    assert await metric(daemon, "streamer_load_ratio") == 1
    for path in ("/v1/listen", "/deepgram/v1/listen?encoding=linear16&sample_rate=16000",
                 "/v1/realtime?intent=transcription"):
        status, retry_after, body = await handshake_status(daemon, path)
        assert (status, retry_after) == (503, "7") and "at capacity 2/2 sessions" in body, path
    assert await asyncio.to_thread(post_upload, daemon, b"RIFF") == 503  # refused before its body is read
    assert await wyoming_answer(daemon) == "error:server_busy"
    assert (await handshake_status(daemon, "/v1/captions?stream=one"))[0] == 101  # not a session
    assert daemon.metrics.sessions_refused_total.value("listen") == 1
    assert daemon.metrics.sessions_refused_total.value("wyoming") == 1
    # The open sessions go on: audio in, a final out; one ends and there is room again.
    await send_audio(first, data)
    await first.send(json.dumps({"type": "stop"}))
    messages, code = await recv_all(first)
    assert code == 1000 and any(m["type"] == "final" for m in messages)
    assert (await http_get(daemon, "/readyz"))[0] == 200
    assert await agent_line(daemon) == "50% ready"
    assert (await handshake_status(daemon, "/v1/listen"))[0] == 101
    await second.close()


async def test_without_admission_settings_a_full_box_behaves_as_before(
    start_daemon: Start, pcm: tuple[bytes, int]  # noqa: F811
) -> None:
    """No capacity: /readyz stays 200 at server.max_sessions, the handshake goes on and v1 says server_busy; the
    gauges report max_sessions as the capacity; an agent check (on its own) says 1% when full."""
    daemon = await start_daemon(server={"max_sessions": 1}, admission={"agent_port": 0})
    _, rate = pcm
    assert await metric(daemon, "streamer_capacity_sessions") == 1
    only = await open_session(daemon, rate, "only")
    assert (await http_get(daemon, "/readyz"))[:3:2] == (200, "ready\n")
    assert await agent_line(daemon) == "1% ready"
    assert await metric(daemon, "streamer_load_ratio") == 1
    async with connect(url(daemon, "/v1/listen")) as ws:
        messages, code = await recv_all(ws)
    assert code == 1013 and messages[0]["code"] == "server_busy"
    await only.close()


async def test_stop_drains_open_sessions_before_flushing(recognizer: Recognizer, pcm: tuple[bytes, int]) -> None:  # noqa: F811
    """Stopping with admission.drain_timeout_s: /readyz and the agent say draining, new sessions get 503, the open
    one finishes on its own (close 1000, not the shutdown's 1001), then the daemon exits 0."""
    settings = Settings(server={"port": 0, "close_timeout_s": 2.0},
                        admission={"capacity_streams": 4, "agent_port": 0, "drain_timeout_s": 60})
    daemon = Daemon(settings, recognizer)
    await daemon.start()
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    data, rate = pcm
    async with asyncio.timeout(10 * TIMEOUT):
        await daemon.ready.wait()
    ws = await open_session(daemon, rate, "draining")
    stop.set()
    async with asyncio.timeout(10 * TIMEOUT):
        while daemon.core.refusal_reason() != "draining":
            await asyncio.sleep(0.01)
    assert (await http_get(daemon, "/readyz"))[:3:2] == (503, "not ready: draining\n")
    assert await agent_line(daemon) == "drain"
    assert (await handshake_status(daemon, "/v1/listen"))[0] == 503
    await send_audio(ws, data)
    await ws.send(json.dumps({"type": "stop"}))
    messages, code = await recv_all(ws)
    assert code == 1000 and any(m["type"] == "final" for m in messages)
    async with asyncio.timeout(30 * TIMEOUT):
        assert await task == 0


async def test_auto_capacity_is_measured_at_start_and_reported(
    start_daemon: Start, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    caplog.set_level("INFO", logger="streamer.engine.capacity")
    daemon = await start_daemon(admission={"capacity_streams": "auto"}, server={"max_sessions": 8})
    measured = [r.getMessage() for r in caplog.records if r.getMessage().startswith("capacity: measured")]
    assert len(measured) == 1
    capacity = daemon.core.limits.capacity
    assert 1 <= capacity <= 8 and measured[0].startswith(f"capacity: measured {capacity} stream(s)")
    assert await metric(daemon, "streamer_capacity_sessions") == capacity


def test_measure_stays_in_its_bounds_and_budget(recognizer: Recognizer) -> None:  # noqa: F811
    """The search never tries past ``most``; a zero budget times nothing and says so (one stream, a lower bound)."""
    measure = measure_capacity(recognizer, most=3, max_batch=2, max_wait_s=0.01, budget_s=30)
    assert all(1 <= n <= 3 for n, _ in measure.tried) and 1 <= measure.streams <= 3
    assert measure.complete and measure.limit_s == round_limit_s(recognizer.chunk_seconds, 0.01)
    held = [n for n, s in measure.tried if s <= measure.limit_s]
    assert measure.streams == max(held, default=1)
    none = measure_capacity(recognizer, most=3, max_batch=2, max_wait_s=0.01, budget_s=0)
    assert (none.streams, none.tried, none.complete) == (1, (), False)


def test_search_doubles_then_bisects() -> None:
    assert [_next_batch(h, None, 100) for h in (1, 2, 64)] == [2, 4, 100]
    assert _next_batch(100, None, 100) is None
    assert [_next_batch(8, 16, 100), _next_batch(12, 16, 100), _next_batch(15, 16, 100)] == [12, 14, None]
    assert _next_batch(0, 1, 100) is None
    assert round_limit_s(0.08, 0.01) == 0.08 and round_limit_s(1.12, 0.01) == pytest.approx(0.145)


def test_speech_like_audio_differs_per_stream_and_is_bounded() -> None:
    a, b = speech_like(16000, seed=0), speech_like(16000, seed=1)
    assert a.dtype == np.float32 and a.shape == (16000,) and not np.array_equal(a, b)
    assert 0 < np.abs(a).max() < 1.0


@pytest.mark.parametrize("value", [-1, "lots", 1.5])
def test_bad_capacity_is_refused_with_a_clear_error(value: Any) -> None:
    with pytest.raises(ValidationError, match="capacity_streams"):
        Settings(admission={"capacity_streams": value})
