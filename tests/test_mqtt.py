"""MqttSink against a real mosquitto on a loopback port: topics, QoS, retained status, last will, outages, auth, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from streamer.protocol import Final, Partial, WordTiming, to_dict
from streamer.server.mqtt import MqttSink, topic_level
from tests.fixtures_realpeers import TIMEOUT_FACTOR, Mosquitto

pytestmark = pytest.mark.broker

WAIT_S = 5 * TIMEOUT_FACTOR


def partial(stream: str, segment: int, text: str) -> dict[str, Any]:
    """A partial event as the engine emits it."""
    return {"type": "partial", "stream": stream, "segment": segment, "text": text, "stable": "", "start": 0.0,
            "end": 0.5}  # fmt: skip


def final(stream: str, segment: int, text: str = "turn on the lights") -> dict[str, Any]:
    """A final event as the engine emits it."""
    return {
        "type": "final", "stream": stream, "segment": segment, "text": text, "start": 1.0 * segment,
        "end": 1.0 * segment + 0.8, "words": [{"word": "turn", "start": 0.1, "end": 0.3, "confidence": 0.9}],
        "token_ids": [5, 17], "confidence": 0.9, "eou": False,
    }  # fmt: skip


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Wait, bounded, for a condition that only the passage of network events can make true."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)
    assert predicate(), what


@contextlib.asynccontextmanager
async def subscriber(broker: Mosquitto, *topics: str, **client_args: Any) -> AsyncIterator[asyncio.Queue[Any]]:
    """A connected aiomqtt client subscribed (QoS 1) to ``topics``; its messages arrive in the queue."""
    queue: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
    async with aiomqtt.Client(broker.host, broker.port, **client_args) as client:
        for topic in topics:
            await client.subscribe(topic, qos=1)

        async def collect() -> None:
            async for message in client.messages:
                queue.put_nowait(message)

        task = asyncio.create_task(collect())
        try:
            yield queue
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


async def receive(queue: asyncio.Queue[Any]) -> aiomqtt.Message:
    """The next message from a `subscriber` queue, waiting a bounded time."""
    async with asyncio.timeout(WAIT_S):
        return await queue.get()


@contextlib.asynccontextmanager
async def running(sink: MqttSink) -> AsyncIterator[asyncio.Task[None]]:
    """Run the sink as a task until the block ends, then close it (bounded)."""
    task = asyncio.create_task(sink.run())
    try:
        yield task
    finally:
        async with asyncio.timeout(WAIT_S):
            await sink.close(timeout_s=2.0)
            await task


def new_sink(broker: Mosquitto, **kwargs: Any) -> MqttSink:
    """A sink for ``broker`` with device 'den' and fast reconnects, unless ``kwargs`` say otherwise."""
    kwargs.setdefault("device", "den")
    kwargs.setdefault("reconnect_min_s", 0.05)
    kwargs.setdefault("reconnect_max_s", 0.3)
    return MqttSink(broker.host, broker.port, **kwargs)


async def test_online_is_retained_and_the_will_says_offline_when_the_daemon_dies(mosquitto_broker: Mosquitto) -> None:
    """A late subscriber sees retained 'online'; SIGKILLing the publisher makes the broker send 'offline'."""
    code = (
        "import asyncio\n"
        "from streamer.server.mqtt import MqttSink\n"
        "async def main():\n"
        f"    sink = MqttSink('127.0.0.1', {mosquitto_broker.port}, device='den')\n"
        "    task = asyncio.create_task(sink.run())\n"
        "    while not sink.connected:\n"
        "        await asyncio.sleep(0.01)\n"
        "    print('connected', flush=True)\n"
        "    await task\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=subprocess.PIPE)
    try:
        async with asyncio.timeout(4 * WAIT_S):
            assert await proc.stdout.readline() == b"connected\n"  # type: ignore[union-attr]
        async with subscriber(mosquitto_broker, "streamer/den/status") as status:
            online = await receive(status)
            assert (online.payload, online.retain, online.qos) == (b"online", True, 1)
            proc.kill()  # no DISCONNECT: the broker must publish the will
            offline = await receive(status)
            assert offline.payload == b"offline"
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    async with subscriber(mosquitto_broker, "streamer/den/status") as status:
        retained = await receive(status)
        assert (retained.payload, retained.retain) == (b"offline", True)


async def test_partials_qos0_and_finals_qos1_with_json_payloads(mosquitto_broker: Mosquitto) -> None:
    """Partials go to .../partial at QoS 0, finals to .../final at QoS 1, each the event's JSON; others are not sent."""
    sink = new_sink(mosquitto_broker, prefix="asr")
    async with subscriber(mosquitto_broker, "asr/den/+/+") as messages, running(sink):
        await until(lambda: sink.connected, "the sink connects")
        sink.offer({"type": "warning", "stream": "kitchen", "message": "lagging"})
        sink.offer(partial("kitchen", 0, "turn on"))
        got = await receive(messages)
        assert (str(got.topic), got.qos) == ("asr/den/kitchen/partial", 0)
        assert json.loads(got.payload) == {**partial("kitchen", 0, "turn on"), "run": sink.run_id}
        sink.offer(final("kitchen", 0))
        got = await receive(messages)
        assert (str(got.topic), got.qos, got.retain) == ("asr/den/kitchen/final", 1, False)
        assert json.loads(got.payload) == {**final("kitchen", 0), "run": sink.run_id}
    assert messages.empty()
    assert (sink.published_finals, sink.published_partials, sink.outbox_depth) == (1, 1, 0)


async def test_latest_partial_wins_and_a_final_supersedes_it(mosquitto_broker: Mosquitto) -> None:
    """Partials offered faster than they are sent collapse to the newest; a final drops its stream's pending partial."""
    sink = new_sink(mosquitto_broker)
    async with subscriber(mosquitto_broker, "streamer/den/+/+") as messages, running(sink):
        await until(lambda: sink.connected, "the sink connects")
        for text in ("turn", "turn on", "turn on the"):  # no await in between: the pump sees only the last
            sink.offer(partial("kitchen", 0, text))
        sink.offer(partial("hall", 3, "good"))
        got = [await receive(messages), await receive(messages)]
        assert sorted((str(m.topic), json.loads(m.payload)["text"]) for m in got) == [
            ("streamer/den/hall/partial", "good"),
            ("streamer/den/kitchen/partial", "turn on the"),
        ]
        sink.offer(partial("kitchen", 1, "dim"))
        sink.offer(final("kitchen", 1, "dim the lights"))
        got = [await receive(messages)]
        assert str(got[0].topic) == "streamer/den/kitchen/final"
        await asyncio.sleep(0.1)
        assert messages.empty()  # the superseded partial was never sent


async def test_finals_survive_a_broker_restart_in_order(
    mosquitto_factory: Callable[..., Mosquitto], caplog: pytest.LogCaptureFixture
) -> None:
    """Finals offered while the broker is down wait in the outbox and arrive after reconnecting: none lost, in order.
    The lost connection is a warning in the log, not an ERROR (paho calls it one; nothing went wrong)."""
    caplog.set_level(logging.INFO, logger="streamer.server.mqtt")
    broker = mosquitto_factory(persistent=True)  # the subscriber's session (and its queue) survives the restart
    received: list[int] = []
    clients: list[aiomqtt.Client] = []

    async def persistent_subscriber() -> None:
        while True:
            try:
                async with aiomqtt.Client(broker.host, broker.port, identifier="listener", clean_session=False) as c:
                    clients.append(c)
                    await c.subscribe("streamer/den/+/final", qos=1)
                    async for message in c.messages:
                        received.append(json.loads(message.payload)["segment"])
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)

    listener = asyncio.create_task(persistent_subscriber())
    sink = new_sink(broker)
    try:
        async with running(sink):
            await until(lambda: sink.connected, "the sink connects")
            for segment in range(5):
                sink.offer(final("kitchen", segment))
            await until(lambda: len(received) == 5, "the first finals arrive")
            # The broker handles a connection's packets in order: once this is acknowledged, so are the five
            # finals, and the broker will not redeliver them to the listener after the restart.
            await clients[-1].publish("sync", qos=1)
            await asyncio.to_thread(broker.stop)
            await until(lambda: not sink.connected, "the sink notices the broker is gone")
            for segment in range(5, 15):
                sink.offer(final("kitchen", segment))
                await asyncio.sleep(0.01)  # reconnect attempts fail meanwhile
            assert sink.outbox_depth == 10 and not sink.connected
            await asyncio.to_thread(broker.start)
            await until(lambda: len(received) >= 15, "the held finals arrive after the restart")
            # Several finals are in flight at once: their PUBACKs may reach the sink after the listener has them.
            await until(lambda: sink.outbox_depth == 0, "the broker acknowledges the held finals")
            assert sink.connections == 2
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
    assert received == list(range(15)), received
    assert (sink.published_finals, sink.dropped_finals) == (15, 0)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_paho_reporting_a_reset_connection_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A broker killed mid-connection makes paho log "failed to receive on socket: ... reset by peer" at ERROR
    (seen on every broker restart in the soak); the sink reconnects and loses nothing, so the daemon logs it as a
    warning. Other paho errors stay errors."""
    paho = logging.getLogger("streamer.server.mqtt.paho")  # the logger MqttSink hands aiomqtt
    with caplog.at_level(logging.INFO, logger="streamer.server.mqtt.paho"):
        paho.error("failed to receive on socket: %s", ConnectionResetError(104, "Connection reset by peer"))
        paho.error("some other failure")
    assert [(r.levelname, r.getMessage()[:26]) for r in caplog.records] == [
        ("WARNING", "failed to receive on socke"), ("ERROR", "some other failure")]


async def test_outbox_is_bounded_drops_the_oldest_and_says_so(
    mosquitto_broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """Past outbox_size the oldest finals go, counted, and logged once for the outage; the newest are delivered."""
    sink = new_sink(mosquitto_broker, outbox_size=4)
    with caplog.at_level(logging.WARNING, logger="streamer.server.mqtt"):
        for segment in range(7):  # not running yet: as if the broker were away
            sink.offer(final("kitchen", segment))
    assert (sink.outbox_depth, sink.dropped_finals) == (4, 3)
    assert sum("MQTT outbox full" in record.getMessage() for record in caplog.records) == 1
    async with subscriber(mosquitto_broker, "streamer/den/+/final") as messages, running(sink):
        got = [json.loads((await receive(messages)).payload)["segment"] for _ in range(4)]
    assert got == [3, 4, 5, 6]


async def test_username_and_password_are_used(mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path) -> None:
    """With a password file, the right credentials connect and wrong ones are refused (and retried)."""
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed (apt install mosquitto)")
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "alice", "s3cret"], check=True)
    broker = mosquitto_factory(anonymous=False, extra_config=f"password_file {passwords}")
    good = new_sink(broker, username="alice", password="s3cret")
    async with subscriber(broker, "streamer/den/status", username="alice", password="s3cret") as status:
        async with running(good):
            assert (await receive(status)).payload == b"online"
    bad = new_sink(broker, username="alice", password="wrong")
    async with running(bad):
        await until(lambda: bad.last_error is not None, "the broker refuses the connection")
        assert not bad.connected and "authori" in (bad.last_error or "").lower()


@pytest.fixture
def broker_certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key: the broker's identity and the client's CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "broker.pem", tmp_path / "broker.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


# paho-mqtt 2.2 does not close the socket of a failed TLS handshake (`Client._ssl_wrap_socket`); it is closed
# when collected, with a ResourceWarning.
@pytest.mark.filterwarnings("ignore:unclosed <ssl.SSLSocket:ResourceWarning")
async def test_tls_verifies_the_broker_with_the_given_ca(
    mosquitto_factory: Callable[..., Mosquitto], broker_certificate: tuple[Path, Path]
) -> None:
    """tls=True with the broker's CA connects over TLS; without that CA the certificate is rejected."""
    cert, key = broker_certificate
    broker = mosquitto_factory(extra_config=f"certfile {cert}\nkeyfile {key}")
    client_tls = ssl.create_default_context(cafile=str(cert))
    sink = new_sink(broker, tls=True, tls_ca_file=str(cert))
    async with subscriber(broker, "streamer/den/+/final", tls_context=client_tls) as messages, running(sink):
        sink.offer(final("kitchen", 0))
        assert json.loads((await receive(messages)).payload)["segment"] == 0
    untrusting = new_sink(broker, tls=True)  # system CAs only
    async with running(untrusting):
        await until(lambda: untrusting.last_error is not None, "the handshake fails")
        assert "CERTIFICATE_VERIFY_FAILED" in (untrusting.last_error or "")
    gc.collect()  # collect paho's leaked sockets here, under this test's warning filter


async def test_close_drains_the_outbox_then_publishes_offline(mosquitto_broker: Mosquitto) -> None:
    """close() delivers pending finals, then retained 'offline', then disconnects; run() returns."""
    sink = new_sink(mosquitto_broker)
    async with subscriber(mosquitto_broker, "streamer/den/#") as messages:
        task = asyncio.create_task(sink.run())
        await until(lambda: sink.connected, "the sink connects")
        assert (await receive(messages)).payload == b"online"
        for segment in range(20):
            sink.offer(final("hall", segment))
        async with asyncio.timeout(WAIT_S):
            await sink.close(timeout_s=3.0)
            await task
        got = [await receive(messages) for _ in range(21)]
    assert [json.loads(m.payload)["segment"] for m in got[:20]] == list(range(20))
    assert (str(got[20].topic), got[20].payload) == ("streamer/den/status", b"offline")
    assert not sink.connected and sink.outbox_depth == 0
    async with subscriber(mosquitto_broker, "streamer/den/status") as status:
        retained = await receive(status)
        assert (retained.payload, retained.retain) == (b"offline", True)


async def test_close_returns_promptly_without_a_broker(mosquitto_broker: Mosquitto) -> None:
    """With the broker gone, close() ends run() at once and reports the undelivered finals."""
    mosquitto_broker.stop()
    sink = new_sink(mosquitto_broker, reconnect_min_s=5.0, reconnect_max_s=5.0)
    task = asyncio.create_task(sink.run())
    await until(lambda: sink.last_error is not None, "the connection is refused")
    sink.offer(final("hall", 0))
    async with asyncio.timeout(1.0 * TIMEOUT_FACTOR):  # well inside the 5 s backoff
        await sink.close(timeout_s=3.0)
        await task
    assert sink.outbox_depth == 1 and "refused" in (sink.last_error or "").lower()


async def test_close_is_bounded_when_the_broker_hangs(mosquitto_broker: Mosquitto) -> None:
    """A broker that stops answering (SIGSTOP) cannot hold close() much past its timeout; the final stays queued."""
    sink = new_sink(mosquitto_broker)
    task = asyncio.create_task(sink.run())
    await until(lambda: sink.connected, "the sink connects")
    assert mosquitto_broker.proc is not None
    mosquitto_broker.proc.send_signal(signal.SIGSTOP)
    try:
        sink.offer(final("hall", 0))
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(WAIT_S):
            await sink.close(timeout_s=0.5)
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert loop.time() - started < 3.5 * TIMEOUT_FACTOR  # 0.5 s, then at most 1 s each for offline and DISCONNECT
        assert sink.outbox_depth == 1
    finally:
        mosquitto_broker.proc.send_signal(signal.SIGCONT)
    gc.collect()


def test_stream_names_stay_one_topic_level() -> None:
    """Wildcards and separators in client-chosen names cannot add levels or subscribe-wildcards to a topic."""
    assert topic_level("kitchen") == "kitchen"
    assert topic_level("a/b+c#d\0") == "a_b_c_d_"
    assert topic_level("") == "_"


def test_mqtt_does_not_import_torch() -> None:
    """Layer rule: streamer.server never imports torch."""
    code = "import sys, streamer.server.mqtt; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60 * TIMEOUT_FACTOR)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


async def test_payloads_are_the_websocket_messages_byte_for_byte(mosquitto_broker: Mosquitto) -> None:
    """What the hub offers (protocol.to_dict) is published as exactly the bytes the WebSocket sends, plus "run"."""
    words = (WordTiming("caf\u00e9", 0.1, 0.4, 0.8),)
    messages_sent = [
        Partial("kitchen", 0, "caf\u00e9 au", "caf\u00e9", 0.0, 0.48),
        Final("kitchen", 0, "caf\u00e9 au lait", 0.0, 1.2, words, (7, 9), 0.8, False, "silence"),
    ]
    sink = new_sink(mosquitto_broker)
    async with subscriber(mosquitto_broker, "streamer/den/+/+") as messages, running(sink):
        await until(lambda: sink.connected, "the sink connects")
        for message in messages_sent:
            sink.offer(to_dict(message))
            got = await receive(messages)
            assert got.payload == f'{message.to_json()[:-1]},"run":"{sink.run_id}"}}'.encode()


async def test_a_resend_after_reconnect_keeps_the_order(mosquitto_factory: Callable[..., Mosquitto]) -> None:
    """The broker restarts while many finals are in flight: the sink resends from the oldest unacknowledged one,
    so the listener gets every final, and never one before an older one it has not had (at the break some may
    come twice: delivery is at least once)."""
    broker = mosquitto_factory(persistent=True)
    received: list[int] = []

    async def persistent_subscriber() -> None:
        while True:
            try:
                async with aiomqtt.Client(broker.host, broker.port, identifier="listener", clean_session=False) as c:
                    await c.subscribe("streamer/den/+/final", qos=1)
                    async for message in c.messages:
                        received.append(json.loads(message.payload)["segment"])
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)

    async def produce(sink: MqttSink) -> None:
        for segment in range(300):
            sink.offer(final("kitchen", segment))
            await asyncio.sleep(0.002)

    listener = asyncio.create_task(persistent_subscriber())
    sink = new_sink(broker, max_inflight=20)
    try:
        async with running(sink):
            await until(lambda: sink.connected, "the sink connects")
            async with asyncio.timeout(WAIT_S):
                while not received:  # the listener has subscribed
                    sink.offer(final("kitchen", -1))
                    await asyncio.sleep(0.05)
            producer = asyncio.create_task(produce(sink))
            await until(lambda: len(received) >= 30, "the first finals arrive")
            await asyncio.to_thread(broker.restart)
            await producer
            await until(lambda: 299 in received and sink.outbox_depth == 0, "every final arrives", 4 * WAIT_S)
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
    got = [segment for segment in received if segment >= 0]
    assert sorted(set(got)) == list(range(300))
    highest = -1
    for segment in got:
        assert segment <= highest + 1, f"final {segment} came before final {highest + 1}: {got}"
        highest = max(highest, segment)
    assert sink.dropped_finals == 0 and sink.connections == 2
