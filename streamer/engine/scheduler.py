"""The asyncio scheduler: batches ready channels onto the single inference thread, without polling.

A channel becomes *due* when its ring holds the audio its next chunk needs, or when it has a request
(finalize, close). :meth:`Scheduler.poke` (loop thread, after each write or request) puts a due
channel in the ready queue, at most once. :meth:`Scheduler.run` sleeps on that queue, collects up to
``max_batch`` channels, waiting at most ``max_wait_ms`` for more once it has one, takes their audio
and requests, and runs one round on the inference thread: each channel absorbs its audio (carrying
out its requests), then one batched :meth:`Recognizer.step` serves all of them. Events go to
``publish(stream, events)`` on the loop; channels still due go back in the queue.

Queue bound: a channel is in the queue at most once, so it never holds more than the open channels.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from streamer.engine.channel import Channel, Event, Work
from streamer.engine.endpoint import EndpointConfig
from streamer.engine.recognizer import Recognizer
from streamer.protocol import Warning as WarningMessage

logger = logging.getLogger(__name__)

Publish = Callable[[str, Sequence[Event | WarningMessage]], None]


@dataclass(frozen=True, slots=True)
class StepStats:
    """One round, for metrics: how long it took, how many channels, how much audio it covered."""

    seconds: float
    batch_size: int
    audio_seconds: float
    dropped_seconds: float


class Scheduler:
    """See the module docstring.

    Args:
        recognizer: the shared recognizer; only the inference thread calls it.
        publish: called on the loop with each channel's events, in order.
        max_batch: most channels in one step.
        max_wait_ms: how long a round waits for more channels once it has one.
        max_channels: most open channels (bounds the ready queue).
        ring_capacity_s: audio buffered per channel before the oldest is dropped.
        on_step: called on the loop after each round (metrics).
    """

    def __init__(
        self,
        recognizer: Recognizer,
        publish: Publish,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        max_channels: int = 64,
        ring_capacity_s: float = 10.0,
        on_step: Callable[[StepStats], None] | None = None,
    ) -> None:
        self.recognizer = recognizer
        # a ring must hold a whole chunk or its stream could never become ready
        self.ring_capacity_s = max(ring_capacity_s, 2 * recognizer.chunk_seconds + 0.5)
        self._publish = publish
        self._max_batch = max(1, max_batch)
        self._max_wait_s = max(0.0, max_wait_ms / 1000)
        self._on_step = on_step
        self._ready: asyncio.Queue[Channel] = asyncio.Queue(maxsize=max(1, max_channels) + 1)
        self._closed: dict[Channel, asyncio.Event] = {}
        self._asr_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asr")
        self.channels: dict[str, Channel] = {}
        self.last_progress = time.monotonic()  # read by the watchdog
        self.steps = 0
        self._round_started: float | None = None  # monotonic time the running round began
        self._round_done = asyncio.Event()

    # ------------------------------------------------------------------ channels (loop thread)

    def poke(self, channel: Channel) -> None:
        """Queue ``channel`` if it has work and is not queued yet. Call after each write or request."""
        if not channel.is_queued and channel.is_due:
            channel.is_queued = True
            self._ready.put_nowait(channel)

    def open(self, name: str, endpoint: EndpointConfig) -> Channel:
        """A new channel for stream ``name``.

        Raises:
            ValueError: a channel of that name is open, or ``max_channels`` are.
        """
        if name in self.channels:
            raise ValueError(f"stream {name!r} is already open")
        if len(self.channels) >= self._ready.maxsize - 1:
            raise ValueError(f"{len(self.channels)} streams are open, the maximum")
        channel = Channel(self.recognizer, name, endpoint, self.ring_capacity_s)
        self.channels[name] = channel
        self._closed[channel] = asyncio.Event()
        return channel

    async def close(self, channel: Channel, reason: str) -> None:
        """Flush ``channel`` (its last final is published before this returns) and unregister it.

        Cancelling stops the wait; the flush still happens once the scheduler runs.
        """
        channel.close(reason)
        self.poke(channel)
        done = self._closed.get(channel)
        if done is not None:
            await done.wait()

    async def close_all(self, reason: str) -> None:
        """Flush every open channel (shutdown)."""
        await asyncio.gather(*(self.close(c, reason) for c in list(self.channels.values())))

    def is_stuck(self, limit_s: float) -> bool:
        """True when a round has been running on the inference thread for more than ``limit_s``."""
        started = self._round_started
        return started is not None and time.monotonic() - started > limit_s

    async def wait_round(self) -> None:
        """Wait until the next round has finished (lets a file source wait for room in its ring)."""
        await self._round_done.wait()

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Batch due channels and step them off the loop. Cancel to stop; a running step finishes first."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                batch = [await self._ready.get()]  # sleeps until there is work
                deadline = loop.time() + self._max_wait_s
                while len(batch) < self._max_batch:
                    try:
                        async with asyncio.timeout_at(deadline):
                            batch.append(await self._ready.get())
                    except TimeoutError:
                        break
                await self._round(loop, batch)
        finally:
            self._asr_thread.shutdown(wait=False, cancel_futures=True)
            for done in self._closed.values():  # nothing will flush any more: release whoever waits
                done.set()

    async def _round(self, loop: asyncio.AbstractEventLoop, batch: list[Channel]) -> None:
        works = [c.take() for c in batch]
        for channel, work in zip(batch, works, strict=True):
            if work.dropped:
                seconds = round(work.dropped / channel.sample_rate_hz, 3)
                logger.warning("stream %s: fell behind, dropped %.2f s of the oldest audio", channel.name, seconds)
                self._publish(channel.name, [WarningMessage(
                    "audio_dropped",
                    f"the server fell behind and dropped {seconds:.2f} s of the oldest audio",
                    channel.name,
                    seconds,
                )])
        started = time.perf_counter()
        self._round_started = time.monotonic()
        try:
            # shield: a cancelled scheduler must not leave a step half-applied on a channel
            results = await asyncio.shield(loop.run_in_executor(self._asr_thread, self._step, batch, works))
        finally:
            self._round_started = None
        elapsed = time.perf_counter() - started
        self.last_progress = time.monotonic()
        self.steps += 1
        self._round_done.set()
        self._round_done = asyncio.Event()
        for channel, events in zip(batch, results, strict=True):
            if events:
                self._publish(channel.name, events)
            channel.is_queued = False
            if channel.is_closed:
                self.channels.pop(channel.name, None)
                done = self._closed.pop(channel, None)
                if done is not None:
                    done.set()
            else:
                self.poke(channel)
        if self._on_step is not None:
            audio = sum(w.samples.size for w in works) / self.recognizer.model.config.features.sample_rate
            dropped = sum(w.dropped for w in works) / self.recognizer.model.config.features.sample_rate
            self._on_step(StepStats(elapsed, len(batch), audio, dropped))

    def _step(self, batch: list[Channel], works: list[Work]) -> list[list[Event]]:
        """The inference thread: absorb each channel's work, then one batched step for the ready ones."""
        events: list[list[Event]] = []
        for channel, work in zip(batch, works, strict=True):
            try:
                events.append(channel.absorb(work))
            except Exception:
                logger.exception("stream %s: recognition failed", channel.name)
                raise
        ready = [c for c in batch if not c.is_closed and c.stream.is_ready]
        if ready:
            spans = self.recognizer.step([c.stream for c in ready])
            for channel, span in zip(ready, spans, strict=True):
                events[batch.index(channel)] += channel.after_step(span)
        for channel in batch:
            channel.settle()
        return events

    def warm_up(self) -> None:
        """One step on a second of silence (blocking; call before serving): first-call costs paid now."""
        import numpy as np

        channel = Channel(self.recognizer, "warm-up", EndpointConfig(), self.ring_capacity_s)
        channel.write(np.zeros(channel.samples_wanted + 1, dtype=np.float32))
        channel.close("warm-up")
        self._asr_thread.submit(self._step, [channel], [channel.take()]).result()
