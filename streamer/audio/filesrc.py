"""An audio file as a stream of 16 kHz float32 blocks: ``--source file:PATH`` for replay and tests.

Decoding runs in a worker thread (it is numpy and libsndfile work, not for the event loop). Paced in real
time on request: block ``i`` is released when its last sample would have left a microphone, computed from
one start time, so sleep overshoot never accumulates into drift.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import numpy as np

from streamer.audio.io import SAMPLE_RATE_HZ, load_audio


class FileSource:
    """Async-iterate over an audio file's samples in blocks of ``block_ms``.

    Each ``async for`` reads the file again from the start.

    Args:
        path: any file `streamer.audio.io.load_audio` reads (WAV, FLAC, MP3, Ogg, ...).
        realtime: release blocks no faster than real time, as a microphone would.
        block_ms: block length; the last block may be shorter.
        sample_rate: output rate in Hz.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        realtime: bool = False,
        block_ms: int = 100,
        sample_rate: int = SAMPLE_RATE_HZ,
    ) -> None:
        if block_ms <= 0:
            raise ValueError(f"block_ms must be positive, got {block_ms}")
        self.path, self.realtime, self.block_ms, self.sample_rate = path, realtime, block_ms, sample_rate

    def __aiter__(self) -> AsyncIterator[np.ndarray]:
        return self._blocks()

    async def _blocks(self) -> AsyncIterator[np.ndarray]:
        """Yield (S,) float32 views of the decoded file. Cancelling between blocks is safe.

        Raises:
            AudioError: the file is missing or cannot be decoded.
        """
        audio = await asyncio.to_thread(load_audio, self.path, self.sample_rate)
        block = max(1, self.sample_rate * self.block_ms // 1000)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for begin in range(0, audio.size, block):
            end = min(begin + block, audio.size)
            if self.realtime:
                delay = started + end / self.sample_rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            yield audio[begin:end]
