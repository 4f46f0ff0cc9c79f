"""Hermes over MQTT (Rhasspy's remote ASR): an adapter on the session core, connected to the broker of ``[mqtt]``.

Rhasspy with Speech to Text set to "Hermes MQTT" leaves recognition to whoever answers on its broker. This module
is that: one MQTT connection (aiomqtt, its own client id) that subscribes to

- ``hermes/asr/startListening``, ``stopListening``, ``toggleOn``, ``toggleOff`` (JSON), and
- ``hermes/audioServer/<siteId>/audioFrame`` and ``.../<sessionId>/audioSessionFrame`` (small WAV files),

for every site, or for ``hermes.site_ids`` only, and publishes ``hermes/asr/textCaptured``,
``partialTextCaptured``, ``hermes/error/asr`` and ``rhasspy/asr/<siteId>/<sessionId>/audioCaptured``. Each site's
messages go to its :class:`~streamer.adapters.hermes_session.SiteWorker`, in order; that is where a
``startListening`` becomes a core session (see :mod:`streamer.adapters.hermes_session` for the rules).

Here: the connection and its reconnect loop (as :class:`~streamer.server.mqtt.MqttSink`'s: capped exponential
backoff, a new client per attempt), parsing the JSON messages (a bad one gets ``hermes/error/asr`` with the topic
as ``context``), the toggles (per site, with Rhasspy's reasons: ``toggleOff`` adds its reason, ``toggleOn`` removes
it, and one without a reason clears them all; audio is ignored while any is set), and the outgoing queue: messages
wait while the broker is away, at most :data:`MAX_WAITING` (the oldest go first, counted and logged).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from typing import TYPE_CHECKING

import aiomqtt

from streamer.adapters import hermes_messages as hermes
from streamer.adapters.hermes_session import SiteWorker
from streamer.errors import ProtocolError
from streamer.server.mqtt import make_tls_context

if TYPE_CHECKING:
    from streamer.session import SessionCore
    from streamer.settings import HermesSettings, MqttSettings

logger = logging.getLogger("streamer.adapters.hermes")
_PAHO_LOGGER = logging.getLogger("streamer.adapters.hermes.paho")

MAX_WAITING = 1000  # outgoing messages held while the broker is away
MAX_SITES = 1000  # sites with a worker; startListening for more is refused


class HermesAdapter:
    """The Hermes ASR service; see the module docstring.

    Args:
        settings: ``[hermes]``.
        broker: ``[mqtt]``: host, port, TLS, login, keepalive.
        core: the session core.
        idle_timeout_s: a session without audio frames this long ends (``server.idle_timeout_s``).
        reconnect_min_s: first delay after a lost connection; it doubles per failed attempt.
        reconnect_max_s: the longest delay.
    """

    def __init__(self, settings: HermesSettings, broker: MqttSettings, core: SessionCore, idle_timeout_s: float,
                 reconnect_min_s: float = 0.5, reconnect_max_s: float = 30.0) -> None:
        self.settings, self.broker, self.core, self.idle_timeout_s = settings, broker, core, idle_timeout_s
        self._sites = set(settings.site_ids)
        self._reconnect_min_s, self._reconnect_max_s = reconnect_min_s, reconnect_max_s
        self._tls = make_tls_context(broker.ca_file, broker.cert_file, broker.key_file) if broker.tls else None
        self.workers: dict[str, SiteWorker] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.disabled: dict[str, set[str]] = {}  # toggleOff reasons per site
        self._outgoing: deque[tuple[str, bytes, int]] = deque()
        self.dropped_messages = 0
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self.connected = asyncio.Event()  # set while subscribed (tests wait for it)

    # ------------------------------------------------------------------ outgoing

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        """Queue a message (loop thread, never awaits)."""
        if len(self._outgoing) >= MAX_WAITING:
            self._outgoing.popleft()
            self.dropped_messages += 1
            if self.dropped_messages == 1 or self.dropped_messages % 100 == 0:
                logger.warning("Hermes: the broker is away; %d message(s) dropped so far, oldest first",
                               self.dropped_messages)
        self._outgoing.append((topic, payload, qos))
        self._wake.set()

    async def _pump(self, client: aiomqtt.Client) -> None:
        """Publish queued messages in order; a message leaves the queue only once published."""
        while True:
            while self._outgoing:
                topic, payload, qos = self._outgoing[0]
                await client.publish(topic, payload, qos=qos)
                if self._outgoing and self._outgoing[0][0] == topic and self._outgoing[0][1] is payload:
                    self._outgoing.popleft()
            if self._closing.is_set():
                return
            self._wake.clear()
            await self._wake.wait()

    # ------------------------------------------------------------------ incoming

    def subscriptions(self) -> list[str]:
        """The topics to subscribe to."""
        sites = sorted(self._sites) or ["+"]
        frames = [hermes.AUDIO_FRAME.format(site=s) for s in sites]
        frames += [hermes.AUDIO_SESSION_FRAME.format(site=s, session="+") for s in sites]
        return [hermes.START_LISTENING, hermes.STOP_LISTENING, hermes.TOGGLE_ON, hermes.TOGGLE_OFF, *frames]

    def _serves(self, site_id: str) -> bool:
        return not self._sites or site_id in self._sites

    def dispatch(self, topic: str, payload: bytes) -> None:
        """Handle one incoming message (loop thread, never awaits)."""
        if topic.startswith("hermes/audioServer/"):
            self._audio(topic, payload)
            return
        try:
            if topic == hermes.START_LISTENING:
                start = hermes.parse_start(payload)
                if self._serves(start.site_id):
                    self._start(start)
            elif topic == hermes.STOP_LISTENING:
                stop = hermes.parse_stop(payload)
                worker = self.workers.get(stop.site_id)
                if worker is not None and self._serves(stop.site_id):
                    worker.put("stop", stop)
            elif topic in (hermes.TOGGLE_ON, hermes.TOGGLE_OFF):
                toggle = hermes.parse_toggle(payload, topic)
                if self._serves(toggle.site_id):
                    self._toggle(toggle, on=topic == hermes.TOGGLE_ON)
        except ProtocolError as exc:
            site = hermes.site_of(payload)
            if site is None or self._serves(site):
                logger.info("Hermes: %s", exc)
                self.core.metrics.protocol_errors_total.inc(label_value="bad_message")
                self.publish(hermes.ERROR, hermes.error(str(exc), topic, site, None), 1)

    def _start(self, start: hermes.StartListening) -> None:
        worker = self.workers.get(start.site_id)
        if worker is None:
            if len(self.workers) >= MAX_SITES:
                self.publish(hermes.ERROR, hermes.error(
                    f"this server serves at most {MAX_SITES} sites; set hermes.site_ids", "server_busy",
                    start.site_id, start.session_id), 1)
                return
            worker = self.workers[start.site_id] = SiteWorker(start.site_id, self.core, self.publish,
                                                              self.idle_timeout_s)
            self._tasks[start.site_id] = asyncio.create_task(worker.run(), name=f"hermes-site-{start.site_id}")
        worker.put("start", start)

    def _audio(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")  # hermes/audioServer/<site>/audioFrame, .../<site>/<session>/audioSessionFrame
        if len(parts) == 4 and parts[3] == "audioFrame":
            site, session = parts[2], None
        elif len(parts) == 5 and parts[4] == "audioSessionFrame":
            site, session = parts[2], parts[3]
        else:
            return
        worker = self.workers.get(site)
        if worker is None or not worker.wants_audio or not self._serves(site):
            return  # audio servers stream all the time; only a listening session takes it
        if self.disabled.get(site):
            worker.touch()  # ignored, but the site is there: its session is not idle
            return
        worker.put("audio", (payload, session))

    def _toggle(self, toggle: hermes.Toggle, on: bool) -> None:
        reasons = self.disabled.setdefault(toggle.site_id, set())
        if not on:
            reasons.add(toggle.reason)
        elif toggle.reason:
            reasons.discard(toggle.reason)
        else:
            reasons.clear()
        if not reasons:
            del self.disabled[toggle.site_id]
        logger.info("Hermes: site %s %s", toggle.site_id,
                    f"off ({', '.join(sorted(r or 'unknown' for r in reasons))})" if reasons else "on")

    # ------------------------------------------------------------------ the connection

    def _client(self) -> aiomqtt.Client:
        broker = self.broker
        return aiomqtt.Client(
            broker.host, broker.port, username=broker.username,
            password=broker.password.get_secret_value() if broker.password else None,
            keepalive=broker.keepalive_s, tls_context=self._tls, logger=_PAHO_LOGGER,
        )

    async def run(self) -> None:
        """Serve until :meth:`close`; reconnect with backoff when the broker goes away."""
        attempt = 0
        while not self._closing.is_set():
            try:
                async with self._client() as client:
                    attempt = 0
                    await self._connection(client)
            except aiomqtt.MqttError as exc:
                if self._closing.is_set():
                    break
                delay = min(self._reconnect_max_s, self._reconnect_min_s * 2**attempt) * random.uniform(0.5, 1.0)
                (logger.warning if attempt == 0 else logger.debug)(
                    "Hermes: MQTT broker %s:%d unavailable (%s); retrying in %.1f s", self.broker.host,
                    self.broker.port, exc, delay)
                attempt += 1
                try:
                    async with asyncio.timeout(delay):
                        await self._closing.wait()
                except TimeoutError:
                    pass
            finally:
                self.connected.clear()

    async def _connection(self, client: aiomqtt.Client) -> None:
        await client.subscribe([(topic, 0) for topic in self.subscriptions()])
        self.connected.set()
        logger.info("Hermes: serving %s on MQTT %s:%d", ", ".join(sorted(self._sites)) or "every site",
                    self.broker.host, self.broker.port)
        pump = asyncio.create_task(self._pump(client), name="hermes-publish")
        reader = asyncio.create_task(self._read(client), name="hermes-read")
        closing = asyncio.create_task(self._closing.wait(), name="hermes-closing")
        try:
            done, _ = await asyncio.wait({pump, reader, closing}, return_when=asyncio.FIRST_COMPLETED)
            if closing in done:  # stop reading, deliver what is queued (close bounds the wait)
                reader.cancel()
                self._wake.set()
                await pump
            for task in done - {closing}:
                task.result()  # the MqttError that ended the connection
        finally:
            for task in (pump, reader, closing):
                task.cancel()
            await asyncio.gather(pump, reader, closing, return_exceptions=True)

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            data = payload if isinstance(payload, bytes) else str(payload or "").encode()
            self.dispatch(message.topic.value, data)

    async def close(self, timeout_s: float = 5.0) -> None:
        """End every site's session, deliver what is queued (within ``timeout_s``), disconnect; :meth:`run` returns."""
        await asyncio.gather(*(worker.close() for worker in self.workers.values()), return_exceptions=True)
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._closing.set()
        self._wake.set()
        if self._outgoing:
            try:
                async with asyncio.timeout(timeout_s):
                    while self._outgoing and self.connected.is_set():
                        await asyncio.sleep(0.02)
            except TimeoutError:
                logger.warning("Hermes: %d message(s) not delivered within %.0f s", len(self._outgoing), timeout_s)
