"""Speaker and room perturbations: vocal-tract-length (formant) warping and image-method room responses.

**Formant warp (VTLP).** Each STFT frame's spectral envelope (cepstrum liftered to its first 40
coefficients, i.e. everything slower than a 400 Hz pitch) is warped along frequency with the
piecewise-linear map of vocal-tract-length perturbation (Jaitly & Hinton 2013): f -> alpha * f up to a
knee, then a straight line to Nyquist. The frame is multiplied by warped envelope / envelope, so the
harmonics (the pitch) and the timing stay where they were while the formants move by alpha; the
phase is kept. Length is unchanged. alpha > 1 sounds like a shorter vocal tract.

**Image-method room.** A shoebox room (sides 3–10 x 3–8 x 2.4–4 m) whose wall reflection follows
from the wanted RT60 by Sabine's formula; source and microphone at random places at least 0.5 m from
the walls. Reflections up to 80 ms come from the mirror images (Allen & Berkley 1979), each at its
distance's delay (split linearly between two samples) with amplitude beta^reflections / distance;
the late tail is noise decaying 60 dB per RT60, its level continuing the images' last 20 ms.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamer.asr import clocks

SAMPLE_RATE_HZ = clocks.SAMPLE_RATE_HZ
SPEED_OF_SOUND_M_S = 343.0
_N_FFT, _HOP = 512, 128
_LIFTER = 40
_EARLY_S = 0.08


def _stft(x: np.ndarray) -> np.ndarray:
    window = np.hanning(_N_FFT + 1)[:-1]
    padded = np.pad(x, (_N_FFT, _N_FFT + _HOP))
    count = (padded.size - _N_FFT) // _HOP + 1
    frames = np.lib.stride_tricks.sliding_window_view(padded, _N_FFT)[::_HOP][:count]
    return np.fft.rfft(frames * window, axis=1)


def _istft(spectrum: np.ndarray, length: int) -> np.ndarray:
    window = np.hanning(_N_FFT + 1)[:-1]
    frames = np.fft.irfft(spectrum, _N_FFT, axis=1) * window
    size = (frames.shape[0] - 1) * _HOP + _N_FFT
    out, norm = np.zeros(size), np.zeros(size)
    for i, frame in enumerate(frames):
        out[i * _HOP : i * _HOP + _N_FFT] += frame
        norm[i * _HOP : i * _HOP + _N_FFT] += window**2
    return (out / np.maximum(norm, 1e-8))[_N_FFT : _N_FFT + length]


def source_frequency(freqs_hz: np.ndarray, alpha: float, nyquist_hz: float) -> np.ndarray:
    """Inverse VTLP warp: for each output frequency, the input frequency whose envelope lands there."""
    knee_out = 0.85 * nyquist_hz * min(alpha, 1.0)  # output knee; the input knee is knee_out / alpha
    knee_in = knee_out / alpha
    upper = knee_in + (freqs_hz - knee_out) * (nyquist_hz - knee_in) / (nyquist_hz - knee_out)
    return np.where(freqs_hz <= knee_out, freqs_hz / alpha, upper)


def formant_warp(x: np.ndarray, alpha: float) -> np.ndarray:
    """Move the formants of `x` by the factor `alpha` (about 0.85–1.15) keeping pitch and length."""
    if x.size == 0 or alpha == 1.0:
        return x.astype(np.float32)
    spectrum = _stft(x.astype(np.float64))
    log_mag = np.log(np.abs(spectrum) + 1e-9)
    cepstrum = np.fft.irfft(log_mag, _N_FFT, axis=1)
    cepstrum[:, _LIFTER : _N_FFT - _LIFTER + 1] = 0.0
    envelope = np.fft.rfft(cepstrum, axis=1).real  # smooth log magnitude per frame
    bins = np.arange(spectrum.shape[1], dtype=np.float64)
    nyquist = bins[-1]
    source = np.clip(source_frequency(bins, alpha, nyquist), 0, nyquist)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, int(nyquist))
    frac = source - low
    warped = envelope[:, low] * (1 - frac) + envelope[:, high] * frac
    gain = np.exp(np.clip(warped - envelope, -6.0, 6.0))  # at most ±52 dB per bin
    y = _istft(spectrum * gain, x.size)
    return (y * np.sqrt(np.mean(x.astype(np.float64) ** 2) / max(float(np.mean(y**2)), 1e-20))).astype(np.float32)


def sample_room(rt60_s: float, rng: np.random.Generator) -> dict[str, Any]:
    """A shoebox room, a source and a microphone (metres), and the wall reflection giving rt60_s."""
    room = np.array([rng.uniform(3, 10), rng.uniform(3, 8), rng.uniform(2.4, 4)])
    source = rng.uniform(0.5, room - 0.5)
    mic = rng.uniform(0.5, room - 0.5)
    volume = float(np.prod(room))
    surface = 2 * float(room[0] * room[1] + room[0] * room[2] + room[1] * room[2])
    absorption = float(np.clip(0.161 * volume / (surface * rt60_s), 0.01, 0.99))  # Sabine
    return {
        "room_m": [round(float(v), 2) for v in room],
        "source_m": [round(float(v), 2) for v in source],
        "mic_m": [round(float(v), 2) for v in mic],
        "reflection": round(float(np.sqrt(1 - absorption)), 4),
    }


def image_rir(room: dict[str, Any], rt60_s: float, rng: np.random.Generator) -> np.ndarray:
    """Room impulse response from `sample_room`'s room; direct path at sample 0 with amplitude 1."""
    dims, src, mic = (np.array(room[k], np.float64) for k in ("room_m", "source_m", "mic_m"))
    beta = float(room["reflection"])
    length = int(min(1.2 * rt60_s, 1.0) * SAMPLE_RATE_HZ) + 1
    order = int(np.ceil(SPEED_OF_SOUND_M_S * _EARLY_S / dims.min())) + 1
    m = np.arange(-order, order + 1)
    axes = []
    for axis in range(3):  # per axis: image coordinate and reflection count for (m, q)
        q = np.array([0, 1])
        coord = (1 - 2 * q)[None, :] * src[axis] + 2 * m[:, None] * dims[axis]
        bounces = np.abs(m[:, None] - q[None, :]) + np.abs(m[:, None])
        axes.append((coord.ravel(), bounces.ravel()))
    (x, bx), (y, by), (z, bz) = axes
    dx, dy, dz = (x - mic[0]) ** 2, (y - mic[1]) ** 2, (z - mic[2]) ** 2
    dist = np.sqrt(dx[:, None, None] + dy[None, :, None] + dz[None, None, :]).ravel()
    refl = (bx[:, None, None] + by[None, :, None] + bz[None, None, :]).ravel()
    direct = float(dist.min())
    delay = (dist - direct) / SPEED_OF_SOUND_M_S * SAMPLE_RATE_HZ
    keep = delay < min(_EARLY_S * SAMPLE_RATE_HZ, length - 2)
    amp = beta ** refl[keep] * direct / dist[keep]
    rir = np.zeros(length)
    start = np.floor(delay[keep]).astype(int)
    frac = delay[keep] - start
    np.add.at(rir, start, amp * (1 - frac))
    np.add.at(rir, start + 1, amp * frac)
    return _add_tail(rir, rt60_s, rng).astype(np.float32)


def _add_tail(rir: np.ndarray, rt60_s: float, rng: np.random.Generator) -> np.ndarray:
    """Continue the early reflections with exponentially decaying noise past 80 ms."""
    early = int(_EARLY_S * SAMPLE_RATE_HZ)
    if rir.size <= early:
        return rir
    window = rir[early - int(0.02 * SAMPLE_RATE_HZ) : early]
    level = np.sqrt(np.mean(window**2))
    t = np.arange(rir.size - early) / SAMPLE_RATE_HZ
    rir[early:] += level * rng.standard_normal(t.size) * np.exp(-6.908 * t / rt60_s)
    return rir
