"""Fan-out of results: each stream's events go to its source client, its caption subscribers and MQTT.

Every WebSocket client gets an :class:`Outbox`, a per-client queue with a written overflow policy
(backpressure does not suit broadcast): the latest partial wins (an unsent partial is replaced by a
newer one and dropped when a final arrives), every other message queues in order up to
``max_pending`` and is never dropped; a client that falls that far behind is closed with 1008
("slow consumer") instead. The results a resumed session replays come on top of that bound (they are a
burst the server makes, not results the client left unread). Everything runs on the event loop; ``offer``
never awaits.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from streamer.protocol import Final, Partial, ServerMessage, to_dict

logger = logging.getLogger(__name__)

SLOW_CONSUMER = 1008


class EventSink(Protocol):
    """Where MQTT events go (``streamer.server.mqtt.MqttSink``)."""

    def offer(self, event: dict[str, Any]) -> None: ...


class MessageSink(Protocol):
    """Where a stream's messages for its source client go: an :class:`Outbox`, or a session's
    ``streamer.session.results.ResultLog``, which keeps them across a reconnect."""

    def offer(self, msg: ServerMessage) -> None: ...


class Outbox:
    """Messages to one WebSocket client; see the module docstring.

    Args:
        ws: the connection.
        max_pending: most queued messages (finals and others) before the client is closed with 1008.
        close_timeout_s: how long a close handshake may take before the TCP connection is dropped.
        interim_results: False drops every partial (a ``/v1/listen`` client that asked for none).
        on_slow: called once when the client is closed for being slow.
        render: a message's text on the wire, when it is sent; default: its ``to_json()`` (protocol v1). Another
            protocol's adapter queues the core's messages and renders them in its own shape.
    """

    def __init__(
        self,
        ws: ServerConnection,
        max_pending: int,
        close_timeout_s: float,
        interim_results: bool = True,
        on_slow: Callable[[], None] | None = None,
        render: Callable[[Any], str] | None = None,
    ) -> None:
        self._render: Callable[[Any], str] = render or _to_json
        self._ws, self._max = ws, max(1, max_pending)
        self._close_timeout_s = close_timeout_s
        self._interim = interim_results
        self._on_slow = on_slow
        self._queue: deque[ServerMessage] = deque()
        self._partial: Partial | None = None
        self._close_with: tuple[int, str] | None = None
        self._wake = asyncio.Event()
        self._kick: asyncio.Task[None] | None = None
        self._is_stopped = False
        self._replay_room = 0  # replayed messages queued since the queue was last empty: room above _max
        self.is_slow = False

    def offer(self, msg: ServerMessage, replay: bool = False) -> None:
        """Queue one message (loop thread; never awaits). ``replay``: a result a resumed session sends again;
        it does not count against ``max_pending``."""
        if self.is_slow or self._close_with is not None:
            return
        if isinstance(msg, Partial):
            if not self._interim:
                return
            self._partial = msg
        else:
            if replay:
                self._replay_room += 1
            elif len(self._queue) >= self._max + self._replay_room:
                self._slow()
                return
            if isinstance(msg, Final):
                self._partial = None  # the final supersedes its segment's partial
            self._queue.append(msg)
        self._wake.set()

    def close_after_queue(self, code: int, reason: str) -> None:
        """Send what is queued, then close with ``code``; nothing offered later is sent."""
        if self._close_with is None:
            self._close_with = (code, reason)
            self._wake.set()

    def stop(self) -> None:
        """The connection is gone: :meth:`run` returns once it has tried to send what is queued."""
        self._is_stopped = True
        self._wake.set()

    def set_interim_results(self, enabled: bool) -> None:
        self._interim = enabled
        if not enabled:
            self._partial = None

    def _slow(self) -> None:
        self.is_slow = True
        logger.warning("client %s: %d results not read; closing it (slow consumer)", self._ws.id, self._max)
        if self._on_slow is not None:
            self._on_slow()
        # run() may be stuck in send() on a full socket, so close from here; the send then fails.
        self._kick = asyncio.get_running_loop().create_task(
            self._close(SLOW_CONSUMER, "slow consumer: results were not read fast enough"), name="ws-kick"
        )
        self._wake.set()

    async def _close(self, code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(self._close_timeout_s):
                await self._ws.close(code, reason)
        except TimeoutError:
            self._ws.transport.abort()  # the client does not read: not even the close frame gets through

    async def run(self) -> None:
        """Send until closed (by us, the client, or as a slow consumer). Cancelling may drop one message."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self.is_slow:
                    break
                while self._queue and not self.is_slow:
                    await self._ws.send(self._render(self._queue.popleft()))
                if not self._queue:
                    self._replay_room = 0
                if (partial := self._partial) is not None and not self.is_slow:
                    self._partial = None
                    await self._ws.send(self._render(partial))
                if self._close_with is not None and not self._queue and self._partial is None:
                    await self._close(*self._close_with)
                    break
                if self._is_stopped:
                    break
        except ConnectionClosed:
            pass
        if self._kick is not None:
            await self._kick


def _to_json(msg: ServerMessage) -> str:
    return msg.to_json()


class Hub:
    """Routes each stream's events to its sinks.

    Args:
        mqtt: the MQTT sink, or None.
        on_event: called for each partial and final (metrics).
    """

    def __init__(self, mqtt: EventSink | None = None, on_event: Callable[[ServerMessage], None] | None = None) -> None:
        self.mqtt = mqtt
        self._on_event = on_event
        self._sources: dict[str, MessageSink] = {}
        self._subscribers: dict[str, set[Outbox]] = {}

    def set_source(self, stream: str, sink: MessageSink | None) -> None:
        """The client that sends a stream's audio (it also gets warnings); None once it is gone."""
        if sink is None:
            self._sources.pop(stream, None)
        else:
            self._sources[stream] = sink

    def subscribe(self, stream: str, outbox: Outbox) -> None:
        self._subscribers.setdefault(stream, set()).add(outbox)

    def unsubscribe(self, stream: str, outbox: Outbox) -> None:
        subs = self._subscribers.get(stream)
        if subs is not None:
            subs.discard(outbox)
            if not subs:
                del self._subscribers[stream]

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subscribers.values())

    def subscribers(self) -> Iterable[Outbox]:
        return [o for subs in self._subscribers.values() for o in subs]

    def relay(self, stream: str, msg: ServerMessage) -> None:
        """A result (or a warning) of a stream another replica recognizes, from the cluster's results bus: to this
        replica's subscribers of ``stream`` only (its source and MQTT have it already)."""
        for sub in tuple(self._subscribers.get(stream, ())):
            sub.offer(msg)

    def subscribed_streams(self) -> list[str]:
        """The streams that have subscribers."""
        return list(self._subscribers)

    def publish(self, stream: str, events: Iterable[ServerMessage]) -> None:
        """Deliver events in order: all to the source client; partials and finals to subscribers and MQTT."""
        source = self._sources.get(stream)
        for msg in events:
            if source is not None:
                source.offer(msg)
            if not isinstance(msg, Partial | Final):
                continue
            if self._on_event is not None:
                self._on_event(msg)
            for sub in tuple(self._subscribers.get(stream, ())):
                sub.offer(msg)
            if self.mqtt is not None:
                self.mqtt.offer(to_dict(msg))
