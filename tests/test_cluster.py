"""Two real daemons in a cluster (issue 21 item 2): one results bus on a real mosquitto, stream names leased in a real
redis-server. A client streams speech to replica A; viewers on A and on B see the same finals; B refuses A's stream
name while A sends it and takes it once A's stream ended, or once A was killed and the lease's ttl passed. A daemon
without [cluster] subscribes to nothing and never touches the store."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.fixtures_realpeers import Mosquitto
from tests.fixtures_redis import RedisServer
from tests.serve_process import TIMEOUT, Served, serve
from tests.speech import espeak_sentences

MODEL = Path(__file__).resolve().parents[1] / "models" / "streamer-tdt-small" / "model.nemo"
FIRST, SECOND = "please turn off the lights in the kitchen", "set a timer for ten minutes"
TTL_S = 2.0
WAIT_S = 60.0 * TIMEOUT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.broker,
    pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} is missing from this checkout"),
]


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int]:
    """Both sentences with a pause between and after, as s16le bytes at espeak-ng's rate."""
    spoken = espeak_sentences(tmp_path_factory.mktemp("spoken"), (FIRST, SECOND), dtype="int16")
    rate = spoken[FIRST][1]
    pause = np.zeros(round(1.5 * rate), dtype=np.int16)
    return np.concatenate([spoken[FIRST][0], pause, spoken[SECOND][0], pause]).tobytes(), rate


def env_of(broker: Mosquitto, store: RedisServer, node: str | None) -> dict[str, str]:
    """A replica's settings (node None: a single daemon that has the store's URL but [cluster] off)."""
    env = {"STREAMER_MQTT__ENABLED": "true", "STREAMER_MQTT__HOST": "127.0.0.1",
           "STREAMER_MQTT__PORT": str(broker.port), "STREAMER_CLUSTER__STORE_URL": store.url}
    if node is not None:
        env |= {"STREAMER_CLUSTER__ENABLED": "true", "STREAMER_CLUSTER__NODE_ID": node,
                "STREAMER_CLUSTER__LEASE_TTL_S": str(TTL_S)}
    return env


@contextlib.asynccontextmanager
async def replica(tmp_path: Path, broker: Mosquitto, store: RedisServer, node: str) -> AsyncIterator[Served]:
    folder = tmp_path / node
    folder.mkdir()
    async with serve(folder, env_of(broker, store, node)) as served:
        await served.wait_for_log("results bus: subscribed")
        yield served


class Viewer:
    """A /v1/captions subscriber that records every message in the background."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws, self.messages = ws, []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in self.ws:
                self.messages.append(json.loads(message))

    def finals(self) -> list[tuple[int, str]]:
        return [(m["segment"], m["text"]) for m in self.messages if m["type"] == "final"]


async def recv(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(WAIT_S):
        return json.loads(await ws.recv())


def start(stream: str, rate: int) -> str:
    return json.dumps({"type": "start", "sample_rate": rate, "encoding": "pcm_s16le", "stream": stream})


async def start_when_free(ws: ClientConnection, stream: str, rate: int) -> dict[str, Any]:
    """Send ``start`` until it is not refused as ``stream_in_use`` (a lease is released, or expires, meanwhile)."""
    async with asyncio.timeout(WAIT_S):
        while True:
            await ws.send(start(stream, rate))
            answer = await recv(ws)
            if answer.get("code") != "stream_in_use":
                return answer
            await asyncio.sleep(0.2)


async def stream_speech(ws: ClientConnection, pcm: bytes) -> list[dict[str, Any]]:
    """Send the audio, then ``stop``; every message up to ``end``."""
    for i in range(0, len(pcm), 8820):
        await ws.send(pcm[i : i + 8820])
    await ws.send(json.dumps({"type": "stop"}))
    out = []
    while not out or out[-1]["type"] != "end":
        out.append(await recv(ws))
    return out


async def test_viewers_on_both_replicas_get_the_finals_and_names_are_unique(
    tmp_path: Path, mosquitto_broker: Mosquitto, redis_server: RedisServer, speech: tuple[bytes, int]
) -> None:
    pcm, rate = speech
    async with replica(tmp_path, mosquitto_broker, redis_server, "node-a") as a, \
            replica(tmp_path, mosquitto_broker, redis_server, "node-b") as b:
        url_a, url_b = f"ws://127.0.0.1:{a.port}", f"ws://127.0.0.1:{b.port}"
        async with connect(f"{url_a}/v1/captions?stream=kitchen") as ws_va, \
                connect(f"{url_b}/v1/captions?stream=kitchen") as ws_vb, \
                connect(f"{url_a}/v1/listen") as client, connect(f"{url_b}/v1/listen") as other:
            on_a, on_b = Viewer(ws_va), Viewer(ws_vb)
            await client.send(start("kitchen", rate))
            assert (await recv(client))["type"] == "ready"
            await other.send(start("kitchen", rate))
            refused = await recv(other)
            assert refused["type"] == "error" and refused["code"] == "stream_in_use", refused
            assert "'node-a'" in refused["message"]
            messages = await stream_speech(client, pcm)
            finals = [(m["segment"], m["text"]) for m in messages if m["type"] == "final"]
            assert len(finals) >= 2 and "kitchen" in finals[0][1] and "timer" in " ".join(t for _, t in finals)
            async with asyncio.timeout(WAIT_S):
                while on_b.finals() != finals or on_a.finals() != finals:
                    assert len(on_b.finals()) <= len(finals), (on_b.finals(), finals)  # never a final twice
                    await asyncio.sleep(0.05)
            assert any(m["type"] == "partial" for m in on_b.messages)
            segments_b = [m["segment"] for m in on_b.messages if m["type"] in ("partial", "final")]
            assert segments_b == sorted(segments_b)  # in order
            assert (await start_when_free(other, "kitchen", rate))["type"] == "ready"  # A's stream ended
            await other.send(json.dumps({"type": "stop"}))
        async with connect(f"{url_a}/v1/listen") as client, connect(f"{url_b}/v1/listen") as other:
            await client.send(start("porch", rate))
            assert (await recv(client))["type"] == "ready"
            await client.send(pcm[:8820])
            await other.send(start("porch", rate))
            assert (await recv(other))["code"] == "stream_in_use"
            a.proc.kill()  # kill -9: no release; the lease lapses after its ttl
            await a.proc.wait()
            assert (await start_when_free(other, "porch", rate))["type"] == "ready"
    subscribes = mosquitto_broker.log.read_text(errors="replace").count("Received SUBSCRIBE")
    assert subscribes >= 2  # each replica subscribed to the results topics


async def test_without_cluster_there_is_no_subscription_and_no_store_connection(
    tmp_path: Path, mosquitto_broker: Mosquitto, redis_server: RedisServer, speech: tuple[bytes, int]
) -> None:
    pcm, rate = speech
    store = Redis.from_url(redis_server.url, socket_timeout=5)
    try:
        before = (await store.info("stats"))["total_connections_received"]
        async with serve(tmp_path, env_of(mosquitto_broker, redis_server, None)) as single:
            await single.wait_for_log("MQTT connected")
            async with connect(f"ws://127.0.0.1:{single.port}/v1/listen") as client:
                await client.send(start("kitchen", rate))
                assert (await recv(client))["type"] == "ready"
                messages = await stream_speech(client, pcm[: len(pcm) // 2])
            assert any(m["type"] == "final" for m in messages)
            assert "results bus" not in single.log.read_text() and "lease" not in single.log.read_text()
        after = (await store.info("stats"))["total_connections_received"]  # on this test's one connection
    finally:
        await store.aclose()
    assert after == before
    broker_log = mosquitto_broker.log.read_text(errors="replace")
    assert "Received PUBLISH" in broker_log and "Received SUBSCRIBE" not in broker_log  # it used the broker only so
