"""The results bus of a cluster: every replica's partials and finals, read back from the MQTT broker, reach this
replica's ``/v1/captions`` viewers of streams that another replica recognizes ([cluster], ``README.md``
"Scaling out").

Each replica already publishes its streams' results (`streamer.server.mqtt.MqttSink`:
``<prefix>/<device>/<stream>/partial`` QoS 0 and ``.../final`` QoS 1, payload with ``run``). The bus subscribes to
``<prefix>/+/+/partial`` and ``<prefix>/+/+/final`` and hands each result to the caption hub
(`streamer.server.fanout.Hub.relay`: subscribers only, never the sink again). What it skips:

- results of this process (their ``run`` is its own): its viewers have them from the hub already;
- a final seen already: delivery is at least once, so a final whose ``(run, segment)`` is not above the last one
  of its stream is dropped (each final reaches a viewer once, in order);
- a partial of a segment whose final came already (stale);
- a payload that is not a result (logged once per topic, never fatal).

The bus down (the broker unreachable): viewers of streams sent to other replicas get warning ``results_bus_down``
once per outage, then nothing from those streams until it is back; results made meanwhile are not replayed here
(the sending client and any persistent MQTT subscriber still get every final). Viewers of this replica's own
streams are not affected. The bus reconnects with capped backoff, like the sink.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import aiomqtt

from streamer.protocol import Final, MessageError, Partial, ServerMessage, Warning, parse_server_message

logger = logging.getLogger(__name__)

MAX_TRACKED = 10_000  # (stream, run) pairs whose last final is remembered; the least recently used go first


class CaptionHub(Protocol):
    """What the bus uses of `streamer.server.fanout.Hub`."""

    def relay(self, stream: str, msg: ServerMessage) -> None: ...

    def subscribed_streams(self) -> list[str]: ...


class ResultsBus:
    """Subscribes to every replica's results and relays other replicas' ones to ``hub``; see the module docstring.

    Args:
        hub: this replica's caption hub.
        is_local: whether this replica recognizes a stream (its viewers need no warning when the bus is down).
        own_run: this process's ``run`` (`MqttSink.run_id`): results carrying it are skipped.
        host: broker host (the [mqtt] one).
        port: broker port.
        prefix: first topic level.
        tls_context: a client TLS context, or None.
        username: broker user name.
        password: its password.
        keepalive_s: MQTT keepalive.
        reconnect_min_s: first delay after a lost connection; it doubles per failed attempt.
        reconnect_max_s: the longest delay between attempts.
    """

    def __init__(
        self,
        hub: CaptionHub,
        is_local: Callable[[str], bool],
        own_run: str,
        host: str,
        port: int = 1883,
        *,
        prefix: str = "streamer",
        tls_context: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
        keepalive_s: int = 30,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
    ) -> None:
        self.hub, self._is_local, self.own_run = hub, is_local, own_run
        self.host, self.port = host, port
        self.topics = tuple(f"{prefix.strip('/')}/+/+/{kind}" for kind in ("partial", "final"))
        self._tls_context, self._username, self._password = tls_context, username, password
        self._keepalive_s = keepalive_s
        self._reconnect_min_s, self._reconnect_max_s = reconnect_min_s, reconnect_max_s
        self._last_final: OrderedDict[tuple[str, str], int] = OrderedDict()  # (stream, run) -> last final's segment
        self._bad_topics: set[str] = set()
        self.connected = False
        self.relayed = 0  # results handed to the hub
        self.duplicates = 0  # finals dropped as seen already

    async def run(self) -> None:
        """Subscribe and relay until cancelled; reconnect with backoff when the broker goes away."""
        attempt = 0
        while True:
            try:
                async with self._new_client() as client:
                    for topic, qos in zip(self.topics, (0, 1), strict=True):
                        await client.subscribe(topic, qos=qos)
                    self.connected, attempt = True, 0
                    logger.info("results bus: subscribed to %s on %s:%d", " and ".join(self.topics), self.host,
                                self.port)
                    async for message in client.messages:
                        self.receive(str(message.topic), message.payload)
            except aiomqtt.MqttError as exc:
                delay = min(self._reconnect_max_s, self._reconnect_min_s * 2**attempt) * random.uniform(0.5, 1.0)
                (logger.warning if attempt == 0 else logger.debug)(
                    "results bus: broker %s:%d unavailable (%s); retrying in %.1f s", self.host, self.port,
                    exc or type(exc).__name__, delay)
                if self.connected:
                    self._tell_viewers_bus_down()
                self.connected = False
                attempt += 1
                await asyncio.sleep(delay)

    def _new_client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.host, self.port, username=self._username, password=self._password, keepalive=self._keepalive_s,
            tls_context=self._tls_context,
        )

    def _tell_viewers_bus_down(self) -> None:
        for stream in self.hub.subscribed_streams():
            if self._is_local(stream):
                continue
            self.hub.relay(stream, Warning(
                "results_bus_down", f"this server lost the results bus (MQTT broker {self.host}:{self.port}): results "
                "of streams sent to other servers do not reach it until the bus is back, and those made meanwhile "
                "are not shown here", stream))

    def receive(self, topic: str, payload: bytes | bytearray | str | int | float | None) -> None:
        """One message of a results topic: relay it to the hub unless it is ours, seen already, stale or bad."""
        text = payload if isinstance(payload, bytes | bytearray | str) else b""
        try:
            obj = json.loads(text)
            run = obj.get("run") if isinstance(obj, dict) else None
            msg = parse_server_message(text)
        except (ValueError, MessageError) as exc:
            self._bad(topic, str(exc))
            return
        if run == self.own_run:
            return
        if not isinstance(msg, Partial | Final) or not isinstance(run, str):
            self._bad(topic, "not a partial or final with a 'run'")
            return
        if self._is_seen(msg, run):
            return
        self.relayed += 1
        self.hub.relay(msg.stream, msg)

    def _is_seen(self, msg: Partial | Final, run: str) -> bool:
        """A final not above its stream's last (a resend), or a partial of a segment already final."""
        key = (msg.stream, run)
        last = self._last_final.get(key)
        if last is not None and msg.segment <= last:
            if isinstance(msg, Final):
                self.duplicates += 1
            return True
        if isinstance(msg, Final):
            self._last_final[key] = msg.segment
            self._last_final.move_to_end(key)
            while len(self._last_final) > MAX_TRACKED:
                self._last_final.popitem(last=False)
        return False

    def _bad(self, topic: str, why: str) -> None:
        if topic not in self._bad_topics and len(self._bad_topics) < MAX_TRACKED:
            self._bad_topics.add(topic)
            logger.warning("results bus: ignoring a message on %s that is not a result (%s)", topic, why)
