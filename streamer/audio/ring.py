"""A bounded ring buffer of float32 mono samples that overwrites the oldest audio when full.

One per stream, between the audio source and the recognizer. Overflow policy: a stream that falls
behind real time loses its *oldest* samples (the recognizer catches up on recent speech), and every
lost sample is counted so the client can be told how much. Not thread-safe: the daemon touches it
only on the event loop (the microphone callback hands its blocks over with ``call_soon_threadsafe``).
"""

from __future__ import annotations

import numpy as np


class RingBuffer:
    """A FIFO of at most ``capacity_samples`` float32 samples; writes past the capacity drop the oldest.

    Args:
        capacity_samples: the most samples held at once (e.g. 16000 * ring_capacity_s).

    Raises:
        ValueError: ``capacity_samples`` is not positive.
    """

    def __init__(self, capacity_samples: int) -> None:
        if capacity_samples <= 0:
            raise ValueError(f"capacity_samples must be positive, got {capacity_samples}")
        self._buf = np.zeros(capacity_samples, dtype=np.float32)
        self._start = 0  # index of the oldest sample
        self._size = 0
        self._dropped_total = 0
        self._written_total = 0

    @property
    def capacity_samples(self) -> int:
        """The most samples the buffer holds."""
        return self._buf.size

    @property
    def dropped_total(self) -> int:
        """Samples overwritten before anyone read them, since the buffer was made."""
        return self._dropped_total

    @property
    def written_total(self) -> int:
        """Samples ever written, dropped ones included: the source's clock, in samples."""
        return self._written_total

    def __len__(self) -> int:
        """Samples waiting to be read."""
        return self._size

    def write(self, block: np.ndarray) -> int:
        """Append samples, overwriting the oldest ones if the buffer would overflow.

        Args:
            block: (S,) samples; converted to float32. A block longer than the capacity keeps its tail.

        Returns:
            How many samples this write dropped (old unread ones, or the head of an oversized block).
        """
        samples = np.asarray(block, dtype=np.float32).reshape(-1)
        n = samples.size
        capacity = self._buf.size
        self._written_total += n
        dropped = max(0, self._size + n - capacity)
        if n >= capacity:  # only the newest `capacity` samples survive
            self._buf[:] = samples[n - capacity :]
            self._start, self._size = 0, capacity
        else:
            end = (self._start + self._size) % capacity
            first = min(n, capacity - end)
            self._buf[end : end + first] = samples[:first]
            self._buf[: n - first] = samples[first:]
            self._size += n
            if self._size > capacity:
                self._start = (self._start + self._size - capacity) % capacity
                self._size = capacity
        self._dropped_total += dropped
        return dropped

    def read(self, n: int) -> np.ndarray:
        """Remove and return the oldest ``min(n, len(self))`` samples, as a new (S,) float32 array."""
        if n < 0:
            raise ValueError(f"cannot read a negative number of samples ({n})")
        n = min(n, self._size)
        capacity = self._buf.size
        first = min(n, capacity - self._start)
        out = np.empty(n, dtype=np.float32)
        out[:first] = self._buf[self._start : self._start + first]
        out[first:] = self._buf[: n - first]
        self._start = (self._start + n) % capacity
        self._size -= n
        return out

    def read_all(self) -> np.ndarray:
        """Remove and return every waiting sample, oldest first."""
        return self.read(self._size)

    def clear(self) -> None:
        """Forget every waiting sample without counting it as dropped."""
        self._start = self._size = 0
