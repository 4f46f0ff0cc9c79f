"""``admission.capacity_streams = "auto"``: how many live streams this box's engine keeps up with, measured at start-up.

The measure times the engine's batched round (each stream's audio absorbed, then one batched
:meth:`~streamer.engine.recognizer.Recognizer.step`, split into rounds of ``engine.max_batch`` as the scheduler
splits them) on synthetic speech-like audio, for 1, 2, 4, ... streams, then bisects between the last batch that
held and the first that did not. A batch *holds* when its round (the median of :data:`TIMED_ROUNDS`):

- keeps real time: it takes at most one chunk of audio (``recognizer.chunk_seconds``), so a stream's backlog does
  not grow; and
- keeps the margin ``streamer loadtest`` judges by (partials' p95 lag at most 300 ms): a chunk that becomes due
  waits for the round in progress, then for its own, so two rounds plus ``engine.max_wait_ms`` fit in
  :data:`LAG_MARGIN_S`. The model's look-ahead (the chunk itself) is not counted: no capacity changes it.

It is the engine alone, on the CPU this process may use: no network, audio conversion or clients. The end-to-end
figure an operator should configure comes from ``streamer loadtest`` against the daemon; this is the quick
estimate for a box that starts without one. The whole measure stays under ``budget_s`` (a few seconds); a budget
that runs out leaves the largest batch that held so far (a lower bound, said in the log).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from streamer.asr.clocks import SAMPLE_RATE_HZ
from streamer.engine.buffered import AnyRecognizer
from streamer.engine.channel import Channel
from streamer.engine.endpoint import EndpointConfig

if TYPE_CHECKING:
    from streamer.settings import Settings

logger = logging.getLogger(__name__)

LAG_MARGIN_S = 0.300  # streamer loadtest's default --max-lag-p95-ms
TIMED_ROUNDS = 3  # timed rounds per batch size, after one untimed (first-call costs at a new batch shape)
DEFAULT_BUDGET_S = 5.0


@dataclass(frozen=True, slots=True)
class CapacityMeasure:
    """What the measure found.

    Attributes:
        streams: the largest batch that held (at least 1: a box that cannot hold one stream still takes one).
        round_s: the median round time at that batch, seconds (None when even one stream did not hold).
        limit_s: the longest round that holds, seconds.
        tried: each batch size timed, with its median round time in seconds.
        complete: False when the budget ran out before the search ended (``streams`` is then a lower bound).
    """

    streams: int
    round_s: float | None
    limit_s: float
    tried: tuple[tuple[int, float], ...]
    complete: bool

    def describe(self) -> str:
        """One line for the log."""
        rounds = ", ".join(f"{n}: {s * 1000:.0f} ms" for n, s in self.tried)
        bound = "" if self.complete else " (the time budget ran out: a lower bound)"
        return (f"{self.streams} stream(s){bound}; a round may take {self.limit_s * 1000:.0f} ms; "
                f"median rounds by streams: {rounds}")


def round_limit_s(chunk_s: float, max_wait_s: float) -> float:
    """The longest round that keeps real time and the lag margin (see the module docstring)."""
    return max(0.0, min(chunk_s, (LAG_MARGIN_S - max_wait_s) / 2))


def measure_capacity(
    recognizer: AnyRecognizer, most: int, max_batch: int, max_wait_s: float, budget_s: float = DEFAULT_BUDGET_S
) -> CapacityMeasure:
    """Time rounds of growing batches and return the largest that holds (blocking; call before serving).

    Args:
        recognizer: the loaded, warmed-up recognizer (nothing else may step it meanwhile).
        most: the largest batch worth trying (``server.max_sessions``).
        max_batch: ``engine.max_batch``: a larger batch is timed as the scheduler runs it, in several steps.
        max_wait_s: ``engine.max_wait_ms`` in seconds.
        budget_s: the measure's wall-time bound.
    """
    limit_s = round_limit_s(recognizer.chunk_seconds, max_wait_s)
    deadline = time.monotonic() + budget_s
    tried: dict[int, float] = {}
    held, failed = 0, None
    n = 1
    while n is not None and time.monotonic() + _expected_s(tried, n) < deadline:
        tried[n] = _median_round_s(recognizer, n, max_batch, limit_s, deadline)
        if tried[n] <= limit_s:
            held = n
        else:
            failed = n
        n = _next_batch(held, failed, most)
    complete = n is None
    streams = max(1, held)
    measure = CapacityMeasure(streams, tried.get(held), limit_s, tuple(sorted(tried.items())), complete)
    if held == 0 and 1 in tried:
        logger.warning("capacity: even one stream's round takes %.0f ms, more than %.0f ms: this box does not keep "
                       "real time; admitting one session", tried[1] * 1000, limit_s * 1000)
    return measure


def _next_batch(held: int, failed: int | None, most: int) -> int | None:
    """Double until a batch fails (or ``most``), then bisect; None when the answer is known."""
    if failed is None:
        return None if held >= most else min(most, max(1, 2 * held))
    middle = (held + failed) // 2
    return None if middle <= held else middle


def _expected_s(tried: dict[int, float], n: int) -> float:
    """How long timing ``n`` streams should take, from the closest smaller batch timed (rounds grow about
    linearly with the batch); 0 before any."""
    smaller = [k for k in tried if k < n]
    if not smaller:
        return 0.0
    k = max(smaller)
    return (TIMED_ROUNDS + 1) * min(tried[k], 10.0) * n / k


def _median_round_s(recognizer: AnyRecognizer, n: int, max_batch: int, limit_s: float, deadline: float) -> float:
    """The median of :data:`TIMED_ROUNDS` rounds of ``n`` streams; stops early once most rounds are over
    ``limit_s`` or the deadline passes."""
    chunk_samples = round(recognizer.chunk_seconds * recognizer.model.config.features.sample_rate)
    rounds = TIMED_ROUNDS + 1
    channels = [
        Channel(recognizer, f"capacity-{i}", EndpointConfig(), ring_capacity_s=(rounds + 3) * recognizer.chunk_seconds)
        for i in range(n)
    ]
    for i, channel in enumerate(channels):
        channel.write(speech_like(channel.samples_wanted + rounds * chunk_samples, seed=i))
    _round(recognizer, channels, max_batch)  # untimed: first-call costs at this batch shape
    times: list[float] = []
    while len(times) < TIMED_ROUNDS and time.monotonic() < deadline:
        started = time.perf_counter()
        _round(recognizer, channels, max_batch)
        times.append(time.perf_counter() - started)
        if sum(t > limit_s for t in times) > TIMED_ROUNDS // 2:
            break
    return statistics.median(times) if times else float("inf")


def _round(recognizer: AnyRecognizer, channels: list[Channel], max_batch: int) -> None:
    """One scheduling round as the scheduler runs it: take, absorb, batched steps of at most ``max_batch``."""
    for start in range(0, len(channels), max_batch):
        batch = channels[start:start + max_batch]
        for channel in batch:
            channel.absorb(channel.take())
        ready = [c for c in batch if c.stream.is_ready]
        if ready:
            for channel, span in zip(ready, recognizer.step([c.stream for c in ready]), strict=True):
                channel.after_step(span)
        for channel in batch:
            channel.settle()


def speech_like(samples: int, seed: int, rate_hz: int = SAMPLE_RATE_HZ) -> np.ndarray:
    """Noise shaped like speech for the engine's cost: syllables at about 4 Hz, pauses, a voice-band tilt.

    Args:
        samples: how many samples (float32, 16 kHz).
        seed: a stream's own seed (streams must not be identical).
        rate_hz: the sample rate.
    """
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(samples).astype(np.float32)
    tilted = np.convolve(noise, np.ones(8, dtype=np.float32) / 8, mode="same")  # less energy at high frequencies
    t = np.arange(samples, dtype=np.float32) / rate_hz
    syllables = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 2 * np.pi))
    phrases = (np.sin(2 * np.pi * 0.3 * t + rng.uniform(0, 2 * np.pi)) > -0.6).astype(np.float32)
    return (0.3 * tilted * syllables * phrases).astype(np.float32)


async def resolve_capacity(settings: Settings, recognizer: AnyRecognizer) -> int:
    """``admission.capacity_streams`` as a number: as configured, or measured now for ``"auto"`` (logged either
    way); 0 when none is set.

    Args:
        settings: the daemon's settings.
        recognizer: the loaded, warmed-up recognizer (not yet serving).
    """
    wanted = settings.admission.capacity_streams
    most = settings.server.max_sessions
    if wanted != "auto":
        if wanted > most:
            logger.warning("admission.capacity_streams %d is above server.max_sessions %d: the box takes %d",
                           wanted, most, most)
        if wanted:
            logger.info("capacity: %d session(s) (admission.capacity_streams)", min(wanted, most))
        return int(wanted)
    engine = settings.engine
    measure = await asyncio.to_thread(measure_capacity, recognizer, most, engine.max_batch, engine.max_wait_ms / 1000)
    logger.info("capacity: measured %s. This is the engine alone; `streamer loadtest` measures the daemon end to "
                "end: configure its capacity as admission.capacity_streams", measure.describe())
    return measure.streams
