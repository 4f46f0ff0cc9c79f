"""The audio path of one session: the client's bytes converted to the model's samples, counted, and written to
the session's engine channel. A resume carries it over whole to the new connection.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import numpy as np

from streamer.audio.convert import PcmConverter

if TYPE_CHECKING:
    from streamer.engine.channel import Channel
    from streamer.engine.scheduler import Scheduler

logger = logging.getLogger("streamer.session")  # the session's log: one logger for everything it does


class SessionAudio:
    """A session's audio from its client to its engine channel.

    Args:
        converter: the session's PCM converter (the format its ``start`` declared).
        scheduler: writes to the channel and runs it.
    """

    def __init__(self, converter: PcmConverter, scheduler: Scheduler) -> None:
        self.converter, self._scheduler = converter, scheduler
        self.received_bytes = 0  # audio bytes accepted in this session (an incomplete last sample frame too)
        self.incomplete_bytes = 0  # bytes of an incomplete last sample frame, said in ``end``
        self._clipping_told = False
        self._write_lock = asyncio.Lock()  # one writer of the channel at a time, across a resume too

    @property
    def received_s(self) -> float:
        """Seconds of whole sample frames received in the session, unrounded: times the sample rate it is a
        whole number."""
        return self.received_bytes // self.converter.frame_bytes / self.converter.sample_rate

    def convert(self, frame: bytes) -> tuple[np.ndarray, bool]:
        """The samples of one frame, counted as received, and whether they are the session's first clipped ones.

        Raises:
            AudioError: the frame holds NaN or infinite samples (it is not counted).
        """
        clipped = self.converter.clipped_samples
        samples = self.converter.convert(frame)
        self.received_bytes += len(frame)
        first_clipping = self.converter.clipped_samples > clipped and not self._clipping_told
        self._clipping_told = self._clipping_told or first_clipping
        return samples, first_clipping

    async def write(self, channel: Channel, samples: np.ndarray) -> None:
        """Write to ``channel``: a live one at once, one that can wait once it has room (back-pressure)."""
        async with self._write_lock:
            if channel.is_live:
                channel.write(samples)
                self._scheduler.poke(channel)
            else:
                await self._scheduler.write_waiting(channel, samples)

    async def settled(self) -> None:
        """Wait until a write under way has landed in the channel."""
        async with self._write_lock:
            pass

    async def write_tail(self, channel: Channel, session_id: str) -> None:
        """The audio is over: write the converter's last samples and note an incomplete last sample frame."""
        self.incomplete_bytes = self.converter.incomplete_bytes
        if self.incomplete_bytes:
            logger.info("session %s: the audio ended with an incomplete sample frame (%d bytes)", session_id,
                        self.incomplete_bytes)
        tail = self.converter.flush()
        async with self._write_lock:
            if channel.is_live:
                channel.write(tail)
            else:
                await self._scheduler.write_waiting(channel, tail)

    def resume(self) -> None:
        """A resume: forget an incomplete last sample frame (the client re-sends whole frames from ``audio_s`` on)."""
        self.received_bytes -= self.converter.drop_incomplete()
