"""The asyncio scheduler: batches ready channels onto the single inference thread, without polling.

A channel becomes *due* when its ring holds the audio its next chunk needs, or when it has a request
(finalize, close). :meth:`Scheduler.poke` (loop thread, after each write or request) puts a due
channel in a ready queue, at most once. :meth:`Scheduler.run` sleeps until one is due, collects up to
``max_batch`` channels, waiting at most ``max_wait_ms`` for more once it has one (and not at all when
every open channel is in the batch already), takes their audio and requests, and runs one round on the
inference thread: each channel absorbs its audio (carrying out its requests), then one batched
:meth:`Recognizer.step` serves all of them. Events go to ``publish(stream, events)`` on the loop;
channels still due go back in the queue.

Fair share: a round feeds each channel one step's worth of audio, so a client sending faster than real
time gets a step per round like everyone else, never the whole box. Live channels (a microphone, a
client that cannot wait) are served before channels that can wait (back-pressured clients, files):
those fill the batch's remaining places. Writers of channels that can wait use
:meth:`Scheduler.write_waiting`, which waits for rounds to make room instead of dropping audio.

A live channel's backlog (audio received but not recognized) sits in its ring, bounded by
``ring_capacity_s``; when it passes ``lag_warning_s`` its client gets warning ``falling_behind`` once
(again after the backlog has shrunk below half of that), and when the ring overflows, ``audio_dropped``.

Queue bound: a channel is in a queue at most once, so they never hold more than the open channels.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from streamer.engine.buffered import AnyRecognizer
from streamer.engine.channel import Channel, Event, Work
from streamer.engine.endpoint import EndpointConfig
from streamer.engine.hotwords import Hotwords
from streamer.protocol import Warning as WarningMessage
from streamer.protocol.limits import DEFAULT_HOTWORD_WEIGHT

logger = logging.getLogger(__name__)

Publish = Callable[[str, Sequence[Event | WarningMessage]], None]


@dataclass(frozen=True, slots=True)
class StepStats:
    """One round, for metrics: how long it took, how many channels, how much audio it covered."""

    seconds: float
    batch_size: int
    audio_seconds: float
    dropped_seconds: float
    streams: tuple[str, ...] = ()  # the channels in the round, in batch order


class Scheduler:
    """See the module docstring.

    Args:
        recognizer: the shared recognizer; only the inference thread calls it.
        publish: called on the loop with each channel's events, in order.
        max_batch: most channels in one step.
        max_wait_ms: how long a round waits for more channels once it has one.
        max_channels: most open channels (bounds the ready queue).
        ring_capacity_s: audio buffered per channel (before a live channel drops the oldest).
        lag_warning_s: a live channel this far behind gets warning ``falling_behind``.
        on_step: called on the loop after each round (metrics).
    """

    def __init__(
        self,
        recognizer: AnyRecognizer,
        publish: Publish,
        max_batch: int = 64,
        max_wait_ms: float = 10.0,
        max_channels: int = 64,
        ring_capacity_s: float = 10.0,
        lag_warning_s: float = 2.0,
        on_step: Callable[[StepStats], None] | None = None,
    ) -> None:
        self.recognizer = recognizer
        # a ring must hold a whole chunk or its stream could never become ready
        self.ring_capacity_s = max(ring_capacity_s, 2 * recognizer.chunk_seconds + 0.5)
        self._publish = publish
        self._max_batch = max(1, max_batch)
        self._max_wait_s = max(0.0, max_wait_ms / 1000)
        self._lag_warning_s = lag_warning_s
        self._on_step = on_step
        self._max_channels = max(1, max_channels) + 1
        self._ready_live: deque[Channel] = deque()
        self._ready_waiting: deque[Channel] = deque()  # channels that can wait: served after the live ones
        self._has_ready = asyncio.Event()
        self._closed: dict[Channel, asyncio.Event] = {}
        self._finalizing: dict[Channel, list[asyncio.Event]] = {}  # finalize requests not yet taken by a round
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
            (self._ready_live if channel.is_live else self._ready_waiting).append(channel)
            self._has_ready.set()

    def open(self, name: str, endpoint: EndpointConfig, is_live: bool = True, pause_s: float | None = None,
             hotwords: Sequence[str] = (), hotword_weight: float = DEFAULT_HOTWORD_WEIGHT) -> Channel:
        """A new channel for stream ``name``; ``is_live`` and ``pause_s``: see :class:`Channel`; ``hotwords``
        (checked by :func:`streamer.protocol.check_hotwords`) are boosted at ``hotword_weight``
        (:mod:`streamer.engine.hotwords`).

        Raises:
            ValueError: a channel of that name is open, or ``max_channels`` are.
        """
        if name in self.channels:
            raise ValueError(f"stream {name!r} is already open")
        if len(self.channels) >= self._max_channels - 1:
            raise ValueError(f"{len(self.channels)} streams are open, the maximum")
        words = Hotwords(tuple(hotwords), hotword_weight) if hotwords else None
        channel = Channel(self.recognizer, name, endpoint, self.ring_capacity_s, is_live, pause_s, hotwords=words)
        self.channels[name] = channel
        self._closed[channel] = asyncio.Event()
        return channel

    def finalize(self, channel: Channel) -> asyncio.Event:
        """End ``channel``'s segment after the audio written so far (its final follows, if anything was said).

        Returns an event that is set once that is done: after the round that carried the request out has
        published its events (the final, or nothing when the segment held no speech), or at once on a channel
        that is closing. A protocol that answers every flush (Deepgram's ``Finalize``) waits for it.
        """
        done = asyncio.Event()
        if channel.is_closing or channel.is_closed:
            done.set()
            return done
        channel.finalize()
        self._finalizing.setdefault(channel, []).append(done)
        self.poke(channel)
        return done

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
        """Wait until the next round has finished."""
        await self._round_done.wait()

    async def write_waiting(self, channel: Channel, samples: np.ndarray) -> int:
        """Write ``samples`` to a channel that can wait, waiting for rounds to make room: nothing is dropped.

        Returns how many were written: all of them, unless the channel was closed meanwhile. Cancelling is
        safe: the samples written so far stay written, the rest is not. Two tasks must not write one channel
        at once (their audio would interleave).
        """
        done = 0
        while done < samples.size and not channel.is_closing:
            n = min(channel.room_samples, samples.size - done)
            if n:
                channel.write(samples[done : done + n])
                done += n
                self.poke(channel)
            if done < samples.size:
                await self.wait_round()  # the ring is full, so the channel is due: a round will come
        return done

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Batch due channels and step them off the loop. Cancel to stop; a running step finishes first."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._has_ready.wait()  # sleeps until there is work
                batch = self._collect([])
                deadline = loop.time() + self._max_wait_s
                while len(batch) < self._max_batch and len(batch) < len(self.channels):  # others may come
                    try:
                        async with asyncio.timeout_at(deadline):
                            await self._has_ready.wait()
                    except TimeoutError:
                        break
                    batch = self._collect(batch)
                await self._round(loop, batch)
        finally:
            self._asr_thread.shutdown(wait=False, cancel_futures=True)
            for done in (*self._closed.values(), *(e for events in self._finalizing.values() for e in events)):
                done.set()  # nothing will flush any more: release whoever waits

    def _collect(self, batch: list[Channel]) -> list[Channel]:
        """Add due channels to ``batch`` up to ``max_batch``: live ones first."""
        for queue in (self._ready_live, self._ready_waiting):
            while queue and len(batch) < self._max_batch:
                batch.append(queue.popleft())
        if not self._ready_live and not self._ready_waiting:
            self._has_ready.clear()
        return batch

    async def _round(self, loop: asyncio.AbstractEventLoop, batch: list[Channel]) -> None:
        works = [c.take() for c in batch]
        flushed = [e for c in batch for e in self._finalizing.pop(c, ())]  # their requests are in these works
        for channel, work in zip(batch, works, strict=True):
            self._tell_lag(channel, work)
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
        for done in flushed:  # before a close completes: a flush answered before a stop's end goes out first
            done.set()
        for channel in batch:
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
            self._on_step(StepStats(elapsed, len(batch), audio, dropped, tuple(c.name for c in batch)))

    def _tell_lag(self, channel: Channel, work: Work) -> None:
        """Warn a live channel's client when audio was dropped, or once when its backlog passes the threshold."""
        warnings = []
        if work.dropped:
            seconds = round(work.dropped / channel.sample_rate_hz, 3)
            logger.warning("stream %s: fell behind, dropped %.2f s of the oldest audio", channel.name, seconds)
            warnings.append(WarningMessage(
                "audio_dropped", f"the server fell behind and dropped {seconds:.2f} s of the oldest audio",
                channel.name, seconds,
            ))
        if channel.is_live:
            behind_s = channel.backlog_s + work.samples.size / channel.sample_rate_hz
            if not channel.is_lag_warned and behind_s >= self._lag_warning_s:
                channel.is_lag_warned = True
                logger.warning("stream %s: %.2f s behind real time", channel.name, behind_s)
                warnings.append(WarningMessage(
                    "falling_behind",
                    f"the server is {behind_s:.2f} s behind this stream's audio (it drops the oldest audio past "
                    f"{self.ring_capacity_s:g} s)", channel.name, round(behind_s, 3),
                ))
            elif channel.is_lag_warned and behind_s < self._lag_warning_s / 2:
                channel.is_lag_warned = False
        if warnings:
            self._publish(channel.name, warnings)

    def lags_s(self) -> dict[str, float]:
        """Each open live channel's backlog in seconds (for ``/metrics``)."""
        return {name: c.backlog_s for name, c in self.channels.items() if c.is_live}

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
