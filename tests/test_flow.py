"""Flow control: clients that can wait are slowed down and lose nothing; live ones keep drop-oldest and are told.

Real daemons on loopback (the tiny random model: deterministic tokens for the same audio), real websockets
clients, plus the scheduler in-process for the order of service.
"""
# ruff: noqa: F811  (pytest fixtures imported from test_server are redefined as test parameters)

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect

from streamer.engine.endpoint import EndpointConfig
from streamer.engine.recognizer import Recognizer
from streamer.engine.scheduler import Scheduler, StepStats
from streamer.server.metrics import Metrics
from tests.test_server import (  # noqa: F401  (fixtures)
    Start,
    check_segments,
    pcm,
    recognizer,
    recv,
    recv_all,
    send_audio,
    start_daemon,
    start_msg,
    url,
)

TIMEOUT = float(os.environ.get("STREAMER_TEST_TIMEOUT_FACTOR", "1"))
REPEATS = 5  # the test speech five times over: far more than the 1 s ring


async def stream_at_once(daemon: Any, data: bytes, rate: int, frame_bytes: int, **start: Any) -> list[dict[str, Any]]:
    """Send all of ``data`` as fast as the socket takes it, then stop; every message until the close."""
    async with connect(url(daemon, "/v1/listen"), max_size=None) as ws:
        await ws.send(start_msg(rate, **start))
        ready = await recv(ws)
        assert ready["type"] == "ready", ready
        await send_audio(ws, data, frame_bytes)
        await ws.send(json.dumps({"type": "stop"}))
        messages, code = await recv_all(ws, 60)
    assert code == 1000, messages[-3:]
    return [ready, *messages]


def finals_tokens(messages: list[dict[str, Any]]) -> list[int]:
    return [t for m in messages if m["type"] == "final" for t in m["token_ids"]]


async def test_a_client_faster_than_real_time_is_slowed_down_and_loses_nothing(
    start_daemon: Start, pcm: tuple[bytes, int]
) -> None:
    """A file sent as fast as the socket goes (no "live") through a 1 s ring: back-pressure, nothing dropped, no
    warning, and the words of a daemon whose ring holds the whole file."""
    data, rate = pcm
    audio = data * REPEATS
    small = await start_daemon(engine={"ring_capacity_s": 1.0}, endpointing={"max_segment_s": 2.0})
    roomy = await start_daemon(engine={"ring_capacity_s": 60.0}, endpointing={"max_segment_s": 2.0})
    fast = await stream_at_once(small, audio, rate, 8820)
    reference = await stream_at_once(roomy, audio, rate, 8820)
    assert fast[0]["live"] is False
    assert not [m for m in fast if m["type"] in ("warning", "error")], [m for m in fast if m["type"] == "warning"]
    end = fast[-1]
    assert end["type"] == "end" and end["dropped_s"] == 0 and end["audio_s"] == round(len(audio) / 2 / rate, 3)
    assert check_segments(fast[1:]) and finals_tokens(fast) == finals_tokens(reference) != []
    assert small.metrics.audio_dropped_seconds_total.value() == 0


async def test_a_live_client_that_falls_behind_loses_its_oldest_audio_and_is_told(
    start_daemon: Start, pcm: tuple[bytes, int]
) -> None:
    """"live": true keeps drop-oldest: a burst far beyond the 1 s ring gets falling_behind, then audio_dropped, and
    end.dropped_s accounts for it."""
    data, rate = pcm
    audio = data * REPEATS
    daemon = await start_daemon(engine={"ring_capacity_s": 1.0, "lag_warning_s": 0.5})
    messages = await stream_at_once(daemon, audio, rate, len(audio), live=True)  # one frame: the ring overflows
    assert messages[0]["live"] is True
    warnings = [m for m in messages if m["type"] == "warning"]
    codes = [w["code"] for w in warnings]
    assert "falling_behind" in codes and "audio_dropped" in codes, warnings
    behind = warnings[codes.index("falling_behind")]
    assert behind["seconds"] >= 0.5 and "behind" in behind["message"]
    dropped = sum(w["seconds"] for w in warnings if w["code"] == "audio_dropped")
    end = messages[-1]
    assert end["dropped_s"] > 0 and end["dropped_s"] == pytest.approx(dropped, abs=0.01)
    assert daemon.metrics.audio_dropped_seconds_total.value() == pytest.approx(dropped, abs=0.01)


@pytest.fixture(scope="module")
def speech(pcm: tuple[bytes, int]) -> np.ndarray:
    import soxr

    data, rate = pcm
    return soxr.resample(np.frombuffer(data, "<i2").astype(np.float32) / 32768, rate, 16000).astype(np.float32)


async def test_live_channels_are_served_before_channels_that_can_wait(recognizer: Recognizer, speech: np.ndarray):
    """With one place per round, a live channel that is due goes first even when a waiting one was due earlier;
    each round feeds a channel one step's worth, so the waiting one keeps its backlog in the ring."""
    stats: list[StepStats] = []
    scheduler = Scheduler(recognizer, lambda name, ev: None, max_batch=1, on_step=stats.append)
    waiting = scheduler.open("file", EndpointConfig(), is_live=False)
    live = scheduler.open("mic", EndpointConfig(), is_live=True)
    waiting.write(speech[:16000])
    scheduler.poke(waiting)
    live.write(speech[:3200])
    scheduler.poke(live)
    runner = asyncio.create_task(scheduler.run())
    try:
        async with asyncio.timeout(30 * TIMEOUT):
            while len(stats) < 3:
                await scheduler.wait_round()
    finally:
        runner.cancel()
    assert stats[0].streams == ("mic",) and stats[1].streams == ("file",)
    assert waiting.buffered_samples > 0  # one chunk per round, not the whole second


async def test_write_waiting_never_drops(recognizer: Recognizer, speech: np.ndarray) -> None:
    """A writer of a channel that can wait is held until rounds make room: 10x the ring, nothing dropped."""
    scheduler = Scheduler(recognizer, lambda name, ev: None, ring_capacity_s=0.5)
    channel = scheduler.open("file", EndpointConfig(), is_live=False)
    audio = np.concatenate([speech] * 4)
    assert audio.size > 5 * scheduler.ring_capacity_s * 16000
    runner = asyncio.create_task(scheduler.run())
    try:
        async with asyncio.timeout(60 * TIMEOUT):
            assert await scheduler.write_waiting(channel, audio) == audio.size
            await scheduler.close(channel, "stop")
    finally:
        runner.cancel()
    assert channel.dropped_samples == 0 and channel.stream.samples_in >= audio.size


def test_each_live_stream_lag_is_in_metrics(recognizer: Recognizer, speech: np.ndarray) -> None:
    """/metrics shows how far behind each live stream is (streams that can wait are not lagging, they wait)."""
    scheduler = Scheduler(recognizer, lambda name, ev: None)
    scheduler.open("kitchen", EndpointConfig()).write(speech[:24000])
    scheduler.open("file", EndpointConfig(), is_live=False).write(speech[:8000])
    metrics = Metrics()
    metrics.stream_lag_seconds.source = scheduler.lags_s
    metrics.max_stream_lag_seconds.source = lambda: max(scheduler.lags_s().values(), default=0.0)
    text = metrics.render()
    assert 'streamer_stream_lag_seconds{stream="kitchen"} 1.5\n' in text and 'stream="file"' not in text
    assert "streamer_max_stream_lag_seconds 1.5\n" in text


