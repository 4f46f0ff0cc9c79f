"""[cluster]'s parts against real peers: stream leases in a real redis-server, the results bus on a real mosquitto,
and a session core whose starts claim their names (the tiny model; no daemon)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from redis.asyncio import Redis

from streamer.asr.model import AsrModel
from streamer.engine.endpoint import EndpointConfig
from streamer.engine.recognizer import Recognizer
from streamer.engine.scheduler import Scheduler
from streamer.protocol import Final, Partial, ServerMessage, Warning
from streamer.server.fanout import Hub
from streamer.server.metrics import Metrics
from streamer.server.mqtt import MqttSink
from streamer.server.results_bus import ResultsBus
from streamer.server.session_journal import SessionStore
from streamer.server.stream_leases import LeaseStoreError, StreamLeases
from streamer.session import Event, ModelInfo, Opened, Problem, Session, SessionCore, SessionLimits, StartOptions
from tests.fixtures_realpeers import TIMEOUT_FACTOR, Mosquitto, free_port
from tests.fixtures_redis import RedisServer

WAIT_S = 15.0 * TIMEOUT_FACTOR


async def until(predicate: Callable[[], Any], what: str) -> None:
    async with asyncio.timeout(WAIT_S):
        while not await predicate() if asyncio.iscoroutinefunction(predicate) else not predicate():
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def leases(server: RedisServer, node: str, ttl_s: float = 10.0) -> AsyncIterator[StreamLeases]:
    store = StreamLeases(server.url, node, f"run-{node}", ttl_s, prefix="test")
    try:
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def store_client(server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(server.url, decode_responses=True, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


# ------------------------------------------------------------------ leases


async def test_a_name_is_leased_once_across_nodes_and_free_again_once_released(redis_server: RedisServer) -> None:
    async with leases(redis_server, "node-a") as a, leases(redis_server, "node-b") as b, \
            store_client(redis_server) as store:
        first = await a.claim("kitchen")
        assert first.granted and first.new
        assert await store.get("test:stream:kitchen") == "node-a/run-node-a"
        assert 0 < await store.pttl("test:stream:kitchen") <= 10_000
        again = await a.claim("kitchen")  # this process holds it: granted without a new lease
        assert again.granted and not again.new
        refused = await b.claim("kitchen")
        assert not refused.granted and refused.holder == "node-a"
        a.release("kitchen")

        async def b_gets_it() -> bool:
            return (await b.claim("kitchen")).granted

        await until(b_gets_it, "node-b's claim after node-a released the name")
        assert await store.get("test:stream:kitchen") == "node-b/run-node-b"


async def test_release_and_renewal_touch_only_a_lease_that_is_still_ours(redis_server: RedisServer) -> None:
    async with leases(redis_server, "node-a") as a, store_client(redis_server) as store:
        assert (await a.claim("porch")).granted and (await a.claim("den")).granted
        await store.delete("test:stream:den")  # expired while the store was away: renewal takes it back
        await store.set("test:stream:porch", "node-c/other-run")  # expired, and another node took it
        await a.renew_once()
        assert await store.get("test:stream:den") == "node-a/run-node-a"
        assert "porch" not in a.held and "den" in a.held
        a.held.add("porch")  # as if it still believed it held it: its release must not delete node-c's lease
        a.release("porch")
        a.release("den")
        await until(lambda: not a._releasing, "the releases")
        assert await store.get("test:stream:porch") == "node-c/other-run"
        assert await store.get("test:stream:den") is None


async def test_a_lease_outlives_its_ttl_while_renewed_and_lapses_without(redis_server: RedisServer) -> None:
    async with leases(redis_server, "node-a", ttl_s=1.5) as a, leases(redis_server, "node-b") as b:
        assert (await a.claim("kitchen")).granted and (await a.claim("porch")).granted
        renewer = asyncio.create_task(a.run())
        try:
            a.held.discard("porch")  # as if its stream had ended on a replica that could not delete the lease
            await asyncio.sleep(4.0)  # well past the ttl: renewed every 0.5 s
            assert not (await b.claim("kitchen")).granted
            assert (await b.claim("porch")).granted  # not renewed: it lapsed
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)


async def test_an_unreachable_store_is_an_error_naming_it() -> None:
    store = StreamLeases(f"redis://127.0.0.1:{free_port()}/0", "node-a", "run", 10.0)
    try:
        with pytest.raises(LeaseStoreError, match=r"lease store redis://127\.0\.0\.1:\d+/0 is unreachable"):
            await store.claim("kitchen")
        assert not store.held and store.store_up is False
    finally:
        await store.close()


# ------------------------------------------------------------------ session starts that claim their names


class Client:
    """A link's sink: every event in order."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def offer(self, event: Event, replay: bool = False) -> None:
        self.events.append(event)


@pytest.fixture(scope="module")
def tiny_recognizer(tiny_nemo: Path) -> Recognizer:
    return Recognizer(AsrModel.load(str(tiny_nemo)))


@contextlib.asynccontextmanager
async def core_with(recognizer: Recognizer, store: StreamLeases | None) -> AsyncIterator[SessionCore]:
    metrics, hub = Metrics(), Hub()
    scheduler = Scheduler(recognizer, hub.publish, max_channels=10)
    model = ModelInfo("tiny", tuple(recognizer.att_context_size), round(recognizer.chunk_seconds, 3))
    core = SessionCore(SessionLimits(), scheduler, hub, metrics, EndpointConfig(), model, SessionStore(None), store)
    core.is_ready = True
    task = asyncio.create_task(scheduler.run())
    try:
        yield core
    finally:
        await core.shutdown()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def link(core: SessionCore) -> tuple[Session, Client]:
    client = Client()
    session = core.connect(client)
    assert isinstance(session, Session), session
    return session, client


def problems(client: Client) -> list[Problem]:
    return [e for e in client.events if isinstance(e, Problem)]


async def test_a_start_claims_its_name_and_the_end_releases_it(
    redis_server: RedisServer, tiny_recognizer: Recognizer
) -> None:
    async with leases(redis_server, "node-a") as a, leases(redis_server, "node-b") as b, \
            core_with(tiny_recognizer, a) as core_a, core_with(tiny_recognizer, b) as core_b:
        on_a, client_a = link(core_a)
        await on_a.begin(StartOptions(16000, "pcm_s16le", stream="kitchen"))
        assert on_a.is_started and isinstance(client_a.events[0], Opened)
        on_b, client_b = link(core_b)
        await on_b.begin(StartOptions(16000, "pcm_s16le", stream="kitchen"))
        assert not on_b.is_started
        [refused] = problems(client_b)
        assert refused.code == "stream_in_use" and "'node-a'" in refused.message
        second_a, client_second = link(core_a)  # a second source on the same replica: the single daemon's answer
        await second_a.begin(StartOptions(16000, "pcm_s16le", stream="kitchen"))
        assert [p.code for p in problems(client_second)] == ["stream_in_use"] and "kitchen" in a.held
        await on_a.stop()

        async def b_starts() -> bool:
            await on_b.begin(StartOptions(16000, "pcm_s16le", stream="kitchen"))
            return on_b.is_started

        await until(b_starts, "node-b's start once node-a's stream ended")
        assert "kitchen" in b.held and "kitchen" not in a.held


async def test_with_the_store_down_a_new_stream_is_refused_not_ready(
    redis_server: RedisServer, tiny_recognizer: Recognizer
) -> None:
    async with leases(redis_server, "node-a") as a, core_with(tiny_recognizer, a) as core:
        running, _ = link(core)
        await running.begin(StartOptions(16000, "pcm_s16le", stream="kitchen"))
        redis_server.stop()
        session, client = link(core)
        await session.begin(StartOptions(16000, "pcm_s16le", stream="porch"))
        assert not session.is_started and "porch" not in core.scheduler.channels
        [refused] = problems(client)
        assert refused.code == "not_ready" and "unreachable" in refused.message and "try again later" in refused.message
        assert running.is_started  # a running stream goes on
        redis_server.start()
        await session.begin(StartOptions(16000, "pcm_s16le", stream="porch"))
        assert session.is_started


async def test_without_leases_begin_is_start(tiny_recognizer: Recognizer) -> None:
    async with core_with(tiny_recognizer, None) as core:
        first, _ = link(core)
        await first.begin(StartOptions(16000, "pcm_s16le", stream="kitchen"))
        second, client = link(core)
        await second.begin(StartOptions(16000, "pcm_s16le", stream="kitchen"))
        assert first.is_started and [p.code for p in problems(client)] == ["stream_in_use"]


# ------------------------------------------------------------------ the results bus


class Viewers:
    """The hub's side of the bus: what it relays, per stream."""

    def __init__(self, streams: list[str]) -> None:
        self.streams = streams
        self.got: list[ServerMessage] = []

    def relay(self, stream: str, msg: ServerMessage) -> None:
        self.got.append(msg)

    def subscribed_streams(self) -> list[str]:
        return self.streams


def partial(stream: str, segment: int, text: str) -> dict[str, Any]:
    return {"type": "partial", "stream": stream, "segment": segment, "text": text, "stable": "", "start": 0.0,
            "end": 1.0}


def final(stream: str, segment: int, text: str) -> dict[str, Any]:
    return {"type": "final", "stream": stream, "segment": segment, "text": text, "start": 0.0, "end": 1.0,
            "words": [], "token_ids": [], "confidence": 0.9, "eou": False, "reason": "silence"}


@contextlib.asynccontextmanager
async def task(coro: Any) -> AsyncIterator[asyncio.Task[Any]]:
    running = asyncio.create_task(coro)
    try:
        yield running
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_the_bus_relays_other_runs_results_once_in_order_and_skips_its_own(mosquitto_broker: Mosquitto) -> None:
    viewers = Viewers(["kitchen"])
    bus = ResultsBus(viewers, lambda stream: False, "run-b", "127.0.0.1", mosquitto_broker.port)
    other = MqttSink("127.0.0.1", mosquitto_broker.port, device="node-a", run_id="run-a")
    own = MqttSink("127.0.0.1", mosquitto_broker.port, device="node-b", run_id="run-b")
    async with task(bus.run()), task(other.run()), task(own.run()):
        await until(lambda: bus.connected and other.connected and own.connected, "connections")
        own.offer(final("den", 0, "mine"))
        other.offer(partial("kitchen", 0, "turn"))
        await until(lambda: len(viewers.got) == 1, "the partial")
        for segment, text in enumerate(("turn on the lights", "set a timer", "thanks")):
            other.offer(final("kitchen", segment, text))
        await until(lambda: other.published_finals == 3, "the finals at the broker")
        async with aiomqtt.Client("127.0.0.1", mosquitto_broker.port) as raw:  # a resend, a stale partial, junk
            payload = json.dumps({**final("kitchen", 1, "set a timer"), "run": "run-a"})
            await raw.publish("streamer/node-a/kitchen/final", payload, qos=1)
            await raw.publish("streamer/node-a/kitchen/partial", json.dumps({**partial("kitchen", 2, "th"),
                                                                               "run": "run-a"}), qos=1)
            await raw.publish("streamer/node-a/kitchen/final", b"\xff not json", qos=1)
            await raw.publish("streamer/node-a/kitchen/final", json.dumps({**final("kitchen", 3, "last"),
                                                                             "run": "run-a"}), qos=1)
        await until(lambda: any(getattr(m, "text", "") == "last" for m in viewers.got), "the last final")
        await other.close()
        await own.close()
    assert [(type(m).__name__, m.segment, m.text) for m in viewers.got if isinstance(m, Partial | Final)] == [
        ("Partial", 0, "turn"), ("Final", 0, "turn on the lights"), ("Final", 1, "set a timer"),
        ("Final", 2, "thanks"), ("Final", 3, "last")]
    assert bus.duplicates == 1


async def test_viewers_of_remote_streams_are_told_when_the_bus_goes_down(mosquitto_broker: Mosquitto) -> None:
    viewers = Viewers(["kitchen", "mic"])
    bus = ResultsBus(viewers, lambda stream: stream == "mic", "run-b", "127.0.0.1", mosquitto_broker.port,
                     reconnect_min_s=0.1, reconnect_max_s=0.2)
    async with task(bus.run()):
        await until(lambda: bus.connected, "the bus")
        mosquitto_broker.stop()
        await until(lambda: viewers.got, "the warning")
        mosquitto_broker.start()
        await until(lambda: bus.connected, "the bus back")
    [warning] = viewers.got
    assert isinstance(warning, Warning) and warning.code == "results_bus_down" and warning.stream == "kitchen"
