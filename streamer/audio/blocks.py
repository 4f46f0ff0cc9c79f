"""Decode an audio file block by block as 16 kHz mono float32: an upload of any length in bounded memory.

:func:`streamer.audio.io.load_audio` decodes a whole file at once, which suits ``streamer transcribe``; the
daemon's file API (``POST /v1/audio/transcriptions``) takes uploads whose decoded audio may be many times the
size of the upload (an hour of Opus is a few MB, its samples hundreds), so it decodes a block at a time with
the same libsndfile (every format ``streamer transcribe`` reads) and the same soxr resampler the daemon's
streams use. No torch here.
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np
import soundfile as sf

from streamer.audio.convert import StreamResampler
from streamer.audio.io import SAMPLE_RATE_HZ
from streamer.errors import AudioError


class AudioBlocks:
    """An open audio file, read as blocks of 16 kHz mono float32 samples (see the module docstring).

    Args:
        source: a binary file object (e.g. ``io.BytesIO`` of an upload) or a path.
        name: the file's name for messages.
        block_s: seconds of the file's audio per block.

    Raises:
        AudioError: libsndfile cannot open it (not audio, or a format it does not know).
    """

    def __init__(self, source: BinaryIO | str, name: str, block_s: float = 2.0) -> None:
        self.name = name
        try:
            self._file = sf.SoundFile(source)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as exc:
            raise AudioError(f"cannot read audio {name!r}: {_reason(exc)}") from exc
        self.sample_rate_hz = int(self._file.samplerate)
        self.channels = int(self._file.channels)
        self._block_frames = max(1, round(block_s * self.sample_rate_hz))
        self._resampler = StreamResampler(self.sample_rate_hz, SAMPLE_RATE_HZ)
        self._done = False
        self.decoded_s = 0.0  # seconds of the file decoded so far

    def read(self) -> np.ndarray | None:
        """The next block (its length varies a little: the resampler holds back a tail); None at the end.

        Blocking (decoding): call it in a worker thread from the event loop.

        Raises:
            AudioError: the file is corrupt past this point, or holds non-finite samples.
        """
        if self._done:
            return None
        try:
            data = self._file.read(self._block_frames, dtype="float32", always_2d=True)  # (S, channels)
        except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
            raise AudioError(f"cannot decode audio {self.name!r} after {self.decoded_s:.1f} s: "
                             f"{_reason(exc)}") from exc
        if data.shape[0] == 0:
            self._done = True
            self._file.close()
            return self._resampler.flush()
        mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
        if not np.isfinite(mono).all():
            raise AudioError(f"cannot use audio {self.name!r}: it contains NaN or infinite samples")
        self.decoded_s += data.shape[0] / self.sample_rate_hz
        return np.ascontiguousarray(self._resampler.process(np.ascontiguousarray(mono)), dtype=np.float32)

    def close(self) -> None:
        self._done = True
        self._file.close()


def _reason(exc: Exception) -> str:
    """libsndfile's own words on one line, without soundfile's "Error opening ..." preamble."""
    message = getattr(exc, "error_string", None) or str(exc) or type(exc).__name__
    return " ".join(str(message).split())
