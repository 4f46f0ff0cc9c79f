"""Read an audio file as 16 kHz mono float32 samples, the recognizer's input.

Decoding is libsndfile's (through soundfile: WAV, FLAC, Ogg Vorbis/Opus, MP3 and the rest of its
formats), resampling soxr's high-quality filter. No torch here: ``streamer.audio`` stays light.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

from streamer.asr import clocks
from streamer.errors import AudioError

SAMPLE_RATE_HZ = clocks.SAMPLE_RATE_HZ  # the recognizer's rate


def load_audio(source: str | os.PathLike[str] | BinaryIO, sample_rate: int = SAMPLE_RATE_HZ) -> np.ndarray:
    """Decode an audio file, average its channels and resample it to ``sample_rate``.

    Args:
        source: a path, or a binary file object (e.g. ``io.BytesIO`` of an upload).
        sample_rate: output rate in Hz.

    Returns:
        (S,) float32 samples, nominally in [-1, 1].

    Raises:
        AudioError: the file is missing or cannot be decoded, or holds non-finite samples.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    name = _describe(source)
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.exists():
            raise AudioError(f"cannot read audio {name}: no such file")
        if path.is_dir():
            raise AudioError(f"cannot read audio {name}: it is a directory")
    try:
        data, source_rate = sf.read(source, dtype="float32", always_2d=True)  # (S, channels)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as exc:
        raise AudioError(f"cannot read audio {name}: {_reason(exc)}") from exc
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(mono).all():
        raise AudioError(f"cannot use audio {name}: it contains NaN or infinite samples")
    if source_rate != sample_rate and mono.size > 0:
        mono = soxr.resample(mono, source_rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _describe(source: str | os.PathLike[str] | BinaryIO) -> str:
    """The file's name for messages: its path, or the file object's ``name`` if it has one."""
    if isinstance(source, str | os.PathLike):
        return f"'{os.fspath(source)}'"
    name = getattr(source, "name", None)
    return f"'{name}'" if isinstance(name, str) else "from a file object"


def _reason(exc: Exception) -> str:
    """The reason in libsndfile's own words, on one line, without soundfile's "Error opening ..." preamble."""
    message = getattr(exc, "error_string", None) or str(exc) or type(exc).__name__
    return " ".join(str(message).split())
