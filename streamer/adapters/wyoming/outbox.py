"""A Wyoming connection's send queue: the events the core and the adapter offer (on the loop, never awaiting) are
written in order by one task.

Home Assistant writes a whole utterance before it reads anything, so the transcript chunks of a long utterance
would pile up here unread: consecutive ``transcript-chunk`` events that are still waiting merge into one (the
client concatenates them anyway), which keeps the queue a few events long. Everything else is sent as it is; the
reader waits for :meth:`Outbox.room` before it reads the next event, so a client that sends and never reads only
slows itself down.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from streamer.adapters.wyoming.framing import WyomingEvent, encode_event

logger = logging.getLogger(__name__)

CHUNK = "transcript-chunk"


class Outbox:
    """Events waiting to be written to one connection.

    Args:
        writer: the connection's stream.
        max_events: past this many waiting events, :meth:`room` waits.
        close_timeout_s: how long closing waits for the transport to flush.
    """

    def __init__(self, writer: asyncio.StreamWriter, max_events: int, close_timeout_s: float) -> None:
        self._writer, self.max_events, self._close_timeout_s = writer, max_events, close_timeout_s
        self._queue: collections.deque[WyomingEvent] = collections.deque()
        self._changed = asyncio.Event()  # an event was queued, or one was written, or closing began
        self.is_closing = False  # no more events are taken; the queue is written, then the connection closed
        self.is_broken = False  # writing failed: the client is gone

    def put(self, event: WyomingEvent) -> None:
        """Queue an event (dropped once closing began or the connection broke)."""
        if self.is_closing or self.is_broken:
            return
        self._queue.append(event)
        self._changed.set()

    def put_chunk(self, text: str) -> None:
        """Queue a transcript delta, merged into a chunk that is still waiting."""
        if not text:
            return
        if self._queue and self._queue[-1].type == CHUNK and not (self.is_closing or self.is_broken):
            self._queue[-1] = WyomingEvent(CHUNK, {"text": self._queue[-1].data["text"] + text})
            return
        self.put(WyomingEvent(CHUNK, {"text": text}))

    def close_after_queue(self) -> None:
        """Take no more events; write those waiting, then close the connection."""
        self.is_closing = True
        self._changed.set()

    async def room(self) -> None:
        """Wait while more than ``max_events`` events wait (a client that does not read its events)."""
        while len(self._queue) > self.max_events and not self.is_broken:
            self._changed.clear()
            await self._changed.wait()

    async def run(self) -> None:
        """Write events as they come until closing and the queue is empty, then close the connection.
        Cancelling closes it at once."""
        writer = self._writer
        try:
            while True:
                while self._queue:
                    writer.write(encode_event(self._queue.popleft()))
                    self._changed.set()
                    await writer.drain()
                if self.is_closing:
                    break
                self._changed.clear()
                await self._changed.wait()
        except (ConnectionError, OSError) as exc:
            logger.info("wyoming: a client went away before reading its events (%s)", exc)
            self.is_broken = True
            self._changed.set()
        finally:
            writer.close()
        try:
            async with asyncio.timeout(self._close_timeout_s):
                await writer.wait_closed()
        except (TimeoutError, ConnectionError, OSError):
            writer.transport.abort()
