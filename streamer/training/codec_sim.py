"""Round trips through lossy speech codecs, in memory, with the libsndfile that ships inside `soundfile`.

- ``opus``: Ogg Opus at 16 kHz, 6–16 kbps. libsndfile maps its compression level linearly onto
  256 → 6 kbps, so level = 1 − (kbps − 6) / 250.
- ``mp3``: MPEG-2 layer III at 16 kHz, constant 8, 16, 24 or 32 kbps (libsndfile picks the table
  rate at or below 8 + (1 − level) · 152 kbps).
- ``gsm``: GSM 06.10 full rate (13 kbps) at 8 kHz, the classic mobile-phone codec.
- ``mulaw``: G.711 µ-law at 8 kHz (64 kbps), the classic landline codec.

The 8 kHz codecs resample down and back (so they also cut everything above 4 kHz). Decoders may
add a few samples of delay or padding; `round_trip` finds the delay by cross-correlation and
returns audio aligned with and as long as its input. The bit rate measured from the encoded size is
recorded beside the target.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from streamer.asr import clocks
from streamer.errors import SynthesisError

SAMPLE_RATE_HZ = clocks.SAMPLE_RATE_HZ
CODECS = ("opus", "mp3", "gsm", "mulaw")
MP3_KBPS = (8, 16, 24, 32)
OPUS_KBPS = (6.0, 16.0)
_MAX_DELAY = 2048  # samples searched for the decoder's delay


class CodecError(SynthesisError):
    """libsndfile could not encode or decode a codec round trip."""


def sample_codec(rng: np.random.Generator, codecs: tuple[str, ...] = CODECS) -> dict[str, Any]:
    """Draw a codec and its bit rate."""
    codec = str(rng.choice(codecs))
    if codec == "opus":
        return {"codec": codec, "kbps": round(float(rng.uniform(*OPUS_KBPS)), 1)}
    if codec == "mp3":
        return {"codec": codec, "kbps": int(rng.choice(MP3_KBPS))}
    return {"codec": codec, "kbps": 13 if codec == "gsm" else 64}


def _encode(x: np.ndarray, codec: str, kbps: float) -> tuple[bytes, int]:
    """Encoded bytes and the sample rate they were coded at."""
    buffer = io.BytesIO()
    if codec == "opus":
        level = float(np.clip(1 - (kbps - 6) / 250, 0, 1))
        sf.write(buffer, x, SAMPLE_RATE_HZ, format="OGG", subtype="OPUS", compression_level=level)
        return buffer.getvalue(), SAMPLE_RATE_HZ
    if codec == "mp3":
        level = float(np.clip(1 - (kbps - 7.5) / 152, 0, 0.999))
        sf.write(
            buffer,
            x,
            SAMPLE_RATE_HZ,
            format="MP3",
            subtype="MPEG_LAYER_III",
            compression_level=level,
            bitrate_mode="CONSTANT",
        )
        return buffer.getvalue(), SAMPLE_RATE_HZ
    narrow = soxr.resample(x, SAMPLE_RATE_HZ, 8000, quality="HQ").astype(np.float32)
    subtype = {"gsm": "GSM610", "mulaw": "ULAW"}[codec]
    sf.write(buffer, np.clip(narrow, -1, 1), 8000, format="WAV", subtype=subtype)
    return buffer.getvalue(), 8000


def round_trip(x: np.ndarray, codec: str, kbps: float) -> tuple[np.ndarray, dict[str, Any]]:
    """Encode and decode `x` (16 kHz float32 in [-1, 1]); same length, aligned, with what was measured.

    Raises:
        CodecError: unknown codec, or libsndfile failed.
    """
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    if x.size == 0:
        return x.astype(np.float32), {"measured_kbps": 0.0, "delay_samples": 0}
    try:
        data, _rate_hz = _encode(np.clip(x, -1, 1).astype(np.float32), codec, kbps)
        decoded, decoded_rate_hz = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        raise CodecError(f"{codec} at {kbps} kbps failed: {exc}") from exc
    y = decoded.mean(axis=1)
    if decoded_rate_hz != SAMPLE_RATE_HZ:
        y = soxr.resample(y, decoded_rate_hz, SAMPLE_RATE_HZ, quality="HQ").astype(np.float32)
    delay = _delay(x, y)
    y = y[delay:] if delay >= 0 else np.concatenate([np.zeros(-delay, np.float32), y])
    y = np.pad(y[: x.size], (0, max(0, x.size - y.size)))
    measured = len(data) * 8 / (x.size / SAMPLE_RATE_HZ) / 1000
    return y.astype(np.float32), {"measured_kbps": round(measured, 1), "delay_samples": int(delay)}


def _delay(reference: np.ndarray, decoded: np.ndarray) -> int:
    """Samples by which `decoded` lags `reference` (cross-correlation over the first 2 s)."""
    n = min(reference.size, decoded.size, 2 * SAMPLE_RATE_HZ)
    if n < 64:
        return 0
    size = 1 << (2 * n).bit_length()
    corr = np.fft.irfft(np.fft.rfft(decoded[:n], size) * np.conj(np.fft.rfft(reference[:n], size)), size)
    lags = np.concatenate([np.arange(0, _MAX_DELAY + 1), np.arange(-_MAX_DELAY, 0)])
    values = np.concatenate([corr[: _MAX_DELAY + 1], corr[-_MAX_DELAY:]])
    return int(lags[int(np.argmax(values))])
