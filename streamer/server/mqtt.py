"""Publish partials and finals to an MQTT broker, keeping finals through broker outages.

Topics (``architecture.md`` §5), payloads the same JSON as on the WebSocket:

- ``<prefix>/<device>/status``: retained ``online`` while connected; ``offline`` on `MqttSink.close`, and
  as the last will when the connection dies without a goodbye.
- ``<prefix>/<device>/<stream>/partial``, QoS 0: the latest partial per stream wins; older ones are
  replaced, never queued.
- ``<prefix>/<device>/<stream>/final``, QoS 1: kept in a bounded outbox, in order, until the broker
  acknowledged them (PUBACK). Overflow policy: when the outbox is full the *oldest* final is dropped,
  counted in `MqttSink.dropped_finals` and logged. Delivery is at least once: a final whose PUBACK was
  lost with the connection is sent again after reconnecting.

aiomqtt 2.x has no automatic reconnection; `MqttSink.run` reconnects with capped exponential backoff
and jitter. Each attempt uses a new `aiomqtt.Client` rather than re-entering the old one: paho keeps
unacknowledged QoS 1 messages inside the client and resends them on reconnect, which would duplicate
every final the outbox sends again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import ssl
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiomqtt

from streamer.errors import ConfigError

logger = logging.getLogger(__name__)

ONLINE: Final = "online"
OFFLINE: Final = "offline"
_UNSAFE_IN_TOPIC_LEVEL: Final = str.maketrans({"/": "_", "+": "_", "#": "_", "\0": "_"})


def topic_level(name: str) -> str:
    """``name`` made safe as one topic level: ``/``, ``+``, ``#`` and NUL become ``_``; empty becomes ``_``."""
    return name.translate(_UNSAFE_IN_TOPIC_LEVEL) or "_"


def compact_json(event: Mapping[str, Any]) -> str:
    """The WebSocket's encoding of a message (``streamer.protocol``): compact, UTF-8 kept as is."""
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


def make_tls_context(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext:
    """A client TLS context that verifies the broker (against ``ca_file``, else the system CAs).

    Args:
        ca_file: PEM file of the CA(s) that signed the broker's certificate.
        cert_file: PEM client certificate, for brokers that require one.
        key_file: its private key, if not inside ``cert_file``.

    Raises:
        ConfigError: a file cannot be read or is not a certificate or key.
    """
    try:
        context = ssl.create_default_context(cafile=ca_file)
        if cert_file is not None:
            context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot set up MQTT TLS from ca_file={ca_file!r}, cert_file={cert_file!r}: {exc}") from exc
    return context


@dataclass(frozen=True, slots=True)
class _Final:
    seq: int
    topic: str
    payload: str


class MqttSink:
    """The daemon's MQTT publisher: `offer` events from the loop thread, `run` as a task, `close` at shutdown.

    Args:
        host: broker host name or address.
        port: broker port (8883 is customary with TLS).
        prefix: first topic level.
        device: second topic level; defaults to this machine's host name.
        tls: False, True (verify the broker with ``tls_ca_file`` or the system CAs), or a ready context.
        tls_ca_file: see `make_tls_context`.
        tls_cert_file: see `make_tls_context`.
        tls_key_file: see `make_tls_context`.
        username: broker user name, if it requires one.
        password: its password.
        outbox_size: most finals held while the broker is away; the oldest is dropped beyond that.
        keepalive_s: MQTT keepalive; a silently dead connection is noticed after about 1.5 times this.
        client_id: MQTT client identifier; random when None. Two clients with one id evict each other.
        publish_timeout_s: how long one publish may wait for the broker before the connection is abandoned.
        reconnect_min_s: first delay after a lost connection; it doubles per failed attempt.
        reconnect_max_s: the longest delay between attempts.
        encode: turns an event into its payload; the default gives the WebSocket's bytes.
    """

    def __init__(
        self,
        host: str,
        port: int = 1883,
        *,
        prefix: str = "streamer",
        device: str | None = None,
        tls: bool | ssl.SSLContext = False,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        username: str | None = None,
        password: str | None = None,
        outbox_size: int = 1000,
        keepalive_s: int = 30,
        client_id: str | None = None,
        publish_timeout_s: float = 10.0,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        encode: Callable[[Mapping[str, Any]], str] = compact_json,
    ) -> None:
        if outbox_size < 1:
            raise ConfigError(f"mqtt outbox_size must be at least 1, got {outbox_size}")
        if any(char in prefix for char in "+#\0") or not prefix.strip("/"):
            raise ConfigError(f"mqtt prefix {prefix!r} must be non-empty, without '+', '#' or NUL")
        self.host, self.port = host, port
        self.device = topic_level(device if device is not None else socket.gethostname())
        self.base_topic = f"{prefix.strip('/')}/{self.device}"
        self.status_topic = f"{self.base_topic}/status"
        if tls is True:
            self._tls_context: ssl.SSLContext | None = make_tls_context(tls_ca_file, tls_cert_file, tls_key_file)
        else:
            self._tls_context = tls or None
        self._username, self._password = username, password
        self._keepalive_s, self._client_id = keepalive_s, client_id
        self._publish_timeout_s = publish_timeout_s
        self._reconnect_min_s, self._reconnect_max_s = reconnect_min_s, reconnect_max_s
        self.outbox_size = outbox_size
        self._encode = encode
        self._outbox: deque[_Final] = deque()
        self._partials: dict[str, tuple[str, str]] = {}  # stream -> (topic, payload), latest only
        self._in_flight: _Final | None = None
        self._next_seq = 0
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._run_task: asyncio.Task[None] | None = None
        self.connected = False
        self.published_finals = 0
        self.published_partials = 0
        self.dropped_finals = 0
        self.connections = 0  # successful connections, the first included
        self.last_error: str | None = None

    @property
    def outbox_depth(self) -> int:
        """Finals waiting for the broker's acknowledgement."""
        return len(self._outbox)

    def offer(self, event: Mapping[str, Any]) -> None:
        """Queue an event for publishing. Called on the loop thread; never awaits, never blocks.

        Partials and finals are published; other event types (warnings, ``end``) are not MQTT's business.
        A final also discards its stream's unsent partial, which it supersedes.
        """
        kind = event.get("type")
        if kind not in ("partial", "final"):
            return
        stream = topic_level(str(event.get("stream") or "default"))
        topic = f"{self.base_topic}/{stream}/{kind}"
        payload = self._encode(event)
        if kind == "partial":
            self._partials[stream] = (topic, payload)
        else:
            self._partials.pop(stream, None)
            self._outbox.append(_Final(self._next_seq, topic, payload))
            self._next_seq += 1
            if len(self._outbox) > self.outbox_size:
                self._drop_oldest_final()
        self._wake.set()

    def _drop_oldest_final(self) -> None:
        """Outbox overflow: drop the oldest final that is not being published right now."""
        index = 1 if self._outbox[0] is self._in_flight else 0
        dropped = self._outbox[index]
        del self._outbox[index]
        self.dropped_finals += 1
        logger.warning(
            "MQTT outbox full (%d finals, broker %s:%d %s): dropped the oldest final, for %s; %d dropped so far",
            self.outbox_size,
            self.host,
            self.port,
            "connected" if self.connected else "unreachable",
            dropped.topic,
            self.dropped_finals,
        )

    async def run(self) -> None:
        """Publish until `close`; on a lost or refused connection, reconnect with backoff.

        One task at a time. Returns after `close`. Cancelling publishes ``offline`` (waiting at most a
        second) and disconnects; finals still in the outbox stay there.
        """
        if self._run_task is not None and not self._run_task.done():
            raise RuntimeError("MqttSink.run is already running")
        self._run_task = me = asyncio.current_task()
        attempt = 0
        while not self._closing.is_set():
            connections = self.connections
            try:
                async with self._new_client() as client:
                    await self._session(client)
            except aiomqtt.MqttError as exc:
                self.last_error = str(exc) or type(exc).__name__
                if me is not None and me.cancelling():  # leaving the client failed while we were being cancelled
                    raise asyncio.CancelledError from exc
            finally:
                self.connected = False
            if self._closing.is_set():
                break
            if self.connections != connections:  # this attempt connected, then lost the broker
                attempt = 0
            delay = min(self._reconnect_max_s, self._reconnect_min_s * 2**attempt) * random.uniform(0.5, 1.0)
            (logger.warning if attempt == 0 else logger.debug)(
                "MQTT broker %s:%d unavailable (%s); retrying in %.1f s, %d final(s) waiting",
                self.host,
                self.port,
                self.last_error,
                delay,
                len(self._outbox),
            )
            attempt += 1
            try:
                async with asyncio.timeout(delay):
                    await self._closing.wait()
            except TimeoutError:
                pass
        if self._outbox:
            logger.warning("MQTT sink stopped with %d final(s) undelivered", len(self._outbox))

    def _new_client(self) -> aiomqtt.Client:
        """A fresh client for one connection attempt; the will marks this device offline if we vanish."""
        return aiomqtt.Client(
            self.host,
            self.port,
            username=self._username,
            password=self._password,
            identifier=self._client_id,
            will=aiomqtt.Will(self.status_topic, OFFLINE, qos=1, retain=True),
            keepalive=self._keepalive_s,
            timeout=self._publish_timeout_s,
            tls_context=self._tls_context,
            logger=logging.getLogger(f"{__name__}.paho"),
        )

    async def _session(self, client: aiomqtt.Client) -> None:
        """One connection: announce ``online``, publish until closing or until the connection breaks."""
        try:
            await client.publish(self.status_topic, ONLINE, qos=1, retain=True)
            self.connected, self.last_error = True, None
            self.connections += 1
            logger.info(
                "MQTT connected to %s:%d as %s; %d final(s) to deliver",
                self.host,
                self.port,
                self.status_topic,
                len(self._outbox),
            )
            pump = asyncio.create_task(self._pump(client), name="mqtt-pump")
            watch = asyncio.create_task(self._watch(client), name="mqtt-watch")
            try:
                done, _ = await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (pump, watch):
                    task.cancel()
                await asyncio.gather(pump, watch, return_exceptions=True)
            for task in done:
                task.result()  # raises the MqttError that ended the connection
            await client.publish(self.status_topic, OFFLINE, qos=1, retain=True)
        except asyncio.CancelledError:
            # A goodbye DISCONNECT keeps the broker from sending our will, so say "offline" ourselves. Being
            # cancelled, wait briefly: for this publish and for the DISCONNECT that leaving the client waits on.
            client.timeout = 1.0
            try:
                await client.publish(self.status_topic, OFFLINE, qos=1, retain=True, timeout=1.0)
            except aiomqtt.MqttError:
                pass
            raise

    async def _watch(self, client: aiomqtt.Client) -> None:
        """Raise `aiomqtt.MqttError` as soon as the connection drops (we subscribe to nothing)."""
        async for _ in client.messages:
            pass

    async def _pump(self, client: aiomqtt.Client) -> None:
        """Publish finals in order, then the latest partials; return once all is sent after `close`."""
        while True:
            self._wake.clear()
            while self._outbox:
                final = self._in_flight = self._outbox[0]
                try:
                    await client.publish(final.topic, final.payload, qos=1)
                finally:
                    self._in_flight = None
                if self._outbox and self._outbox[0] is final:
                    self._outbox.popleft()
                self.published_finals += 1
            while self._partials:
                stream = next(iter(self._partials))
                topic, payload = self._partials.pop(stream)
                await client.publish(topic, payload, qos=0)
                self.published_partials += 1
            if self._outbox or self._partials:  # offered while we were publishing
                continue
            if self._closing.is_set():
                return
            await self._wake.wait()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what can be delivered within ``timeout_s``, publish ``offline`` and disconnect; `run` returns.

        Past ``timeout_s`` the run task is cancelled, which still says ``offline`` (about a second more).
        Safe to call when `run` never started or already ended; do not call it twice at once.
        """
        self._closing.set()
        self._wake.set()
        task = self._run_task
        if task is None or task.done() or task is asyncio.current_task():
            return
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(task)
        except TimeoutError:
            logger.warning(
                "MQTT close: %d final(s) not delivered within %.1f s; giving up", len(self._outbox), timeout_s
            )
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
