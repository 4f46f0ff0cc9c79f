"""Publish partials and finals to an MQTT broker, keeping finals through broker outages and restarts.

Topics (``architecture.md`` §5), payloads the WebSocket's JSON plus a last field ``run``:

- ``<prefix>/<device>/status``: retained ``online`` while connected; ``offline`` on `MqttSink.close`, and
  as the last will when the connection dies without a goodbye.
- ``<prefix>/<device>/<stream>/partial``, QoS 0: the latest partial per stream wins; older ones are
  replaced, never queued.
- ``<prefix>/<device>/<stream>/final``, QoS 1: kept in an outbox (`streamer.server.mqtt_outbox`), in order,
  until the broker acknowledged them (PUBACK). Up to ``max_inflight`` finals are in flight at once, so the
  outbox drains at the broker's pace. With a `FinalJournal` (the state directory), each final is committed
  to disk before the client sees it and deleted after its PUBACK; finals left by a crash are delivered first
  after the next start, with the payload (and ``run``) they were made with. Delivery is at least once: a final whose
  PUBACK was lost with the connection (or with the process) is sent again.

``run`` is a new id at every start of the daemon (`streamer.server.mqtt_topics.new_run_id`): segment numbers
start again at 0 after a restart, so ``(run, segment)`` names a result uniquely on a stream's topics.

Overflow: the bound ``outbox_size`` applies only while the broker is not connected; then the *oldest*
final is dropped, counted in `MqttSink.dropped_finals` (``streamer_mqtt_finals_dropped_total``) and
logged once per outage. While connected nothing is dropped.

aiomqtt 2.x has no automatic reconnection; `MqttSink.run` reconnects with capped exponential backoff
and jitter. Each attempt uses a new `aiomqtt.Client` rather than re-entering the old one: paho keeps
unacknowledged QoS 1 messages inside the client and resends them on reconnect, which would duplicate
every final the outbox sends again (and could reorder them).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import aiomqtt

from streamer.errors import ConfigError
from streamer.server.journal import FinalJournal
from streamer.server.mqtt_outbox import FinalOutbox, QueuedFinal
from streamer.server.mqtt_topics import OFFLINE, ONLINE, compact_json, new_run_id, topic_level

logger = logging.getLogger(__name__)


class _LostConnectionIsAWarning(logging.Filter):
    """paho logs a broker that went away ("failed to receive on socket: ... reset by peer") as ERROR, but the sink
    reconnects and loses nothing (it logs the outage itself): keep it at WARNING, so ERROR means a real fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and str(record.msg).startswith("failed to receive on socket"):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_PAHO_LOGGER = logging.getLogger(f"{__name__}.paho")
_PAHO_LOGGER.addFilter(_LostConnectionIsAWarning())


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
        outbox_size: most finals held while the broker is not connected; the oldest is dropped beyond that.
        max_inflight: most finals published and not yet acknowledged at once.
        keepalive_s: MQTT keepalive; a silently dead connection is noticed after about 1.5 times this.
        client_id: MQTT client identifier; random when None. Two clients with one id evict each other.
        publish_timeout_s: how long one publish may wait for the broker before the connection is abandoned.
        reconnect_min_s: first delay after a lost connection; it doubles per failed attempt.
        reconnect_max_s: the longest delay between attempts.
        encode: turns an event into its payload; the default gives the WebSocket's bytes.
        journal: the durable queue of finals (its queued finals are delivered first); None keeps finals in
            memory only. The sink owns it from here on and closes it in `close`.
        run_id: the ``run`` field of every payload; None makes a new one (`new_run_id`).
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
        max_inflight: int = 20,
        keepalive_s: int = 30,
        client_id: str | None = None,
        publish_timeout_s: float = 10.0,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        encode: Callable[[Mapping[str, Any]], str] = compact_json,
        journal: FinalJournal | None = None,
        run_id: str | None = None,
    ) -> None:
        if outbox_size < 1:
            raise ConfigError(f"mqtt outbox_size must be at least 1, got {outbox_size}")
        if max_inflight < 1:
            raise ConfigError(f"mqtt max_inflight must be at least 1, got {max_inflight}")
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
        self.outbox_size, self.max_inflight = outbox_size, max_inflight
        self.run_id = run_id or new_run_id()
        self._encode = encode
        self._wake = asyncio.Event()
        self._outbox = FinalOutbox(outbox_size, journal, f"{host}:{port}", on_saved=self._wake.set)
        self._closing = asyncio.Event()
        self._run_task: asyncio.Task[None] | None = None
        self.connected = False
        self.published_finals = 0
        self.published_partials = 0
        self.connections = 0  # successful connections, the first included
        self.last_error: str | None = None
        self.recovered_finals = self._outbox.recover()

    @property
    def outbox_depth(self) -> int:
        """Finals waiting for the broker's acknowledgement."""
        return len(self._outbox.finals)

    @property
    def unsaved_finals(self) -> int:
        """Finals not yet committed to the journal (all of them without one): what a crash now would lose."""
        return self._outbox.unsaved

    @property
    def dropped_finals(self) -> int:
        """Finals dropped from the full outbox while the broker was away."""
        return self._outbox.dropped

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
        payload = self._encode({**event, "run": self.run_id})
        if kind == "partial":
            self._outbox.partials[stream] = (topic, payload)
        else:
            self._outbox.add_final(stream, topic, payload, self.connected)
        self._wake.set()

    # ------------------------------------------------------------ the connection

    async def run(self) -> None:
        """Publish until `close`; on a lost or refused connection, reconnect with backoff.

        One task at a time. Returns after `close`. Cancelling publishes ``offline`` (waiting at most a
        second) and disconnects; finals still in the outbox stay there (and in the journal).
        """
        if self._run_task is not None and not self._run_task.done():
            raise RuntimeError("MqttSink.run is already running")
        self._run_task = me = asyncio.current_task()
        journal = self._outbox.journal
        writer = asyncio.create_task(journal.run(), name="mqtt-journal") if journal is not None else None
        try:
            await self._connect_until_closed(me)
        finally:
            if writer is not None and journal is not None:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
                await journal.flush()
        if self._outbox.finals:
            kept = f"kept in {journal.path} for the next start" if journal is not None else "lost"
            logger.warning("MQTT sink stopped with %d final(s) undelivered: %s", len(self._outbox.finals), kept)

    async def _connect_until_closed(self, me: asyncio.Task[Any] | None) -> None:
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
                len(self._outbox.finals),
            )
            attempt += 1
            try:
                async with asyncio.timeout(delay):
                    await self._closing.wait()
            except TimeoutError:
                pass

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
            max_inflight_messages=self.max_inflight,
            logger=_PAHO_LOGGER,
        )

    async def _session(self, client: aiomqtt.Client) -> None:
        """One connection: announce ``online``, publish until closing or until the connection breaks."""
        try:
            await client.publish(self.status_topic, ONLINE, qos=1, retain=True)
            self.connected, self.last_error = True, None
            self.connections += 1
            logger.info(
                "MQTT connected to %s:%d as %s (run %s); %d final(s) to deliver",
                self.host,
                self.port,
                self.status_topic,
                self.run_id,
                len(self._outbox.finals),
            )
            if self._outbox.dropped_in_outage:
                logger.warning("MQTT broker back: %d final(s) were dropped while it was away (outbox_size %d)",
                               self._outbox.dropped_in_outage, self.outbox_size)
                self._outbox.dropped_in_outage = 0
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
        """Publish finals in order, up to ``max_inflight`` at once, and the latest partials once no final
        waits; return once all is acknowledged after `close`. A failed publish ends the connection."""
        self._outbox.reconnected()
        publishing: set[asyncio.Task[None]] = set()
        try:
            while True:
                self._wake.clear()
                self._launch(client, publishing)
                while self._outbox.partials and not self._outbox.sendable():
                    stream = next(iter(self._outbox.partials))
                    topic, payload = self._outbox.partials.pop(stream)
                    await client.publish(topic, payload, qos=0)
                    self.published_partials += 1
                if self._closing.is_set() and not self._outbox.finals and not self._outbox.partials:
                    return
                if self._outbox.sendable() and len(publishing) < self.max_inflight:
                    continue  # offered while we were publishing partials
                wake = asyncio.ensure_future(self._wake.wait())
                try:
                    done, _ = await asyncio.wait({*publishing, wake}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    wake.cancel()
                for task in done - {wake}:
                    publishing.discard(task)
                    task.result()  # an MqttError ends this connection
        finally:
            for task in publishing:
                task.cancel()
            await asyncio.gather(*publishing, return_exceptions=True)

    def _launch(self, client: aiomqtt.Client, publishing: set[asyncio.Task[None]]) -> None:
        """Start publishing the next finals, in order, while the window has room."""
        while len(publishing) < self.max_inflight and self._outbox.sendable():
            final = self._outbox.take()
            # Tasks take their first step in the order they were created, and that step hands the message to
            # paho (which numbers and sends it) before any await: the broker receives the finals in order.
            publishing.add(asyncio.create_task(self._publish_final(client, final), name="mqtt-final"))

    async def _publish_final(self, client: aiomqtt.Client, final: QueuedFinal) -> None:
        acknowledged = False
        try:
            await client.publish(final.topic, final.payload, qos=1)
            acknowledged = True
        finally:
            if self._outbox.published(final, acknowledged):
                self.published_finals += 1

    async def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what can be delivered within ``timeout_s``, publish ``offline`` and disconnect; `run` returns.

        Past ``timeout_s`` the run task is cancelled, which still says ``offline`` (about a second more).
        Whatever is undelivered stays in the journal. Safe to call when `run` never started or already ended;
        do not call it twice at once.
        """
        self._closing.set()
        self._wake.set()
        task = self._run_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            try:
                async with asyncio.timeout(timeout_s):
                    await asyncio.shield(task)
            except TimeoutError:
                logger.warning("MQTT close: %d final(s) not delivered within %.1f s; giving up",
                               len(self._outbox.finals), timeout_s)
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        await self._close_journal()

    async def _close_journal(self) -> None:
        """Commit what is pending and close the journal (its undelivered finals wait for the next start)."""
        journal = self._outbox.journal
        if journal is None:
            return
        await journal.flush()
        self._outbox.journal = None
        await journal.close()
