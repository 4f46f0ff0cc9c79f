"""Seeded audio augmentation: speed, formant warp, reverberation, noise, band limits, codecs, gain, DC.

Everything is numpy (FFT filtering and convolution), soxr for resampling and the libsndfile inside
`soundfile` for codecs (`codec_sim`); formant warping and image-method rooms live in `perturb`. Every random choice
comes from the `numpy.random.Generator` passed in, and `augment` returns a JSON-able record of what
it did, which the corpus writes into the manifest. Audio is 16 kHz mono float32 throughout.

SNR here is the ratio of the mean power of the whole (reverberated) utterance to the mean power of
the added noise, in dB. Only the speed change alters the length (codec round trips are re-aligned
and cut to the input's length).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import soxr

from streamer.asr import clocks

from .codec_sim import CODECS, round_trip, sample_codec
from .perturb import formant_warp, image_rir, sample_room

SAMPLE_RATE_HZ = clocks.SAMPLE_RATE_HZ
NOISE_KINDS = ("white", "pink", "brown", "babble")
AUGMENT_PROFILES = ("full", "classic", "clean")  # of training and dev: AugmentConfig(), .classic(), .clean()
_NOISE_EXPONENT = {"white": 0.0, "pink": 0.5, "brown": 1.0}  # amplitude spectrum ~ f ** -exponent


@dataclass(frozen=True, slots=True)
class AugmentConfig:
    """Probabilities and ranges of each augmentation; ranges are drawn uniformly."""

    p_speed: float = 0.3
    speed_factor: tuple[float, float] = (0.9, 1.1)
    p_formant: float = 0.3
    formant_alpha: tuple[float, float] = (0.85, 1.15)
    p_reverb: float = 0.3
    rt60_s: tuple[float, float] = (0.15, 0.8)
    p_image_rir: float = 0.5  # of the reverberated utterances: image-method room, else a noise tail
    p_noise: float = 0.6
    snr_db: tuple[float, float] = (0.0, 30.0)
    noise_kinds: tuple[str, ...] = NOISE_KINDS
    babble_talkers: tuple[int, int] = (3, 12)
    babble_snr_db: tuple[float, float] = (0.0, 20.0)
    p_telephone: float = 0.08
    p_lowpass: float = 0.12
    lowpass_hz: tuple[float, float] = (2500.0, 6000.0)
    p_codec: float = 0.2
    codecs: tuple[str, ...] = CODECS
    peak_dbfs: tuple[float, float] = (-30.0, -1.0)
    p_dc: float = 0.1
    max_dc: float = 0.02

    @classmethod
    def classic(cls) -> AugmentConfig:
        """The chain corpus-v1 (the shipped model's corpus) was made with: speed, noise-tail rooms, white, pink
        and brown noise, telephone and low-pass bands, level and DC; no formant warp, image-method rooms,
        babble or codecs. A continued model rehearses its first corpus with it (``data.extra_train``)."""
        return cls(p_formant=0, p_image_rir=0, noise_kinds=("white", "pink", "brown"), p_codec=0)

    @classmethod
    def clean(cls) -> AugmentConfig:
        """No augmentation at all, only a fixed peak level of -3 dBFS."""
        return cls(
            p_speed=0,
            p_formant=0,
            p_reverb=0,
            p_noise=0,
            p_telephone=0,
            p_lowpass=0,
            p_codec=0,
            peak_dbfs=(-3, -3),
            p_dc=0,
        )


def power(x: np.ndarray) -> float:
    """Mean power of a signal (0 for an empty one)."""
    return float(np.mean(np.square(x, dtype=np.float64))) if x.size else 0.0


def coloured_noise(kind: str, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """White, pink or brown noise of unit power, shaped in the frequency domain."""
    spectrum = np.fft.rfft(rng.standard_normal(num_samples))
    freqs = np.fft.rfftfreq(num_samples, 1 / SAMPLE_RATE_HZ)
    spectrum *= np.maximum(freqs, 20.0) ** -_NOISE_EXPONENT[kind]  # flat below 20 Hz: no DC blow-up
    noise = np.fft.irfft(spectrum, num_samples)
    return (noise / np.sqrt(max(power(noise), 1e-20))).astype(np.float32)


def babble(sources: Sequence[np.ndarray], num_samples: int, rng: np.random.Generator, talkers: int) -> np.ndarray:
    """Several other utterances, each looped and cut at a random offset, summed; unit power."""
    mix = np.zeros(num_samples, dtype=np.float64)
    for index in rng.choice(len(sources), size=min(talkers, len(sources)), replace=False):
        source = sources[int(index)]
        looped = np.tile(source, num_samples // max(source.size, 1) + 2)
        start = int(rng.integers(0, max(source.size, 1)))
        piece = looped[start : start + num_samples]
        mix += piece / np.sqrt(max(power(piece), 1e-20))
    return (mix / np.sqrt(max(power(mix), 1e-20))).astype(np.float32)


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """speech + noise scaled so that 10 log10(P_speech / P_noise) = snr_db (same length)."""
    scale = np.sqrt(power(speech) / max(power(noise), 1e-20) / 10 ** (snr_db / 10))
    return (speech + scale * noise).astype(np.float32)


def synthetic_rir(rt60_s: float, rng: np.random.Generator) -> np.ndarray:
    """Room impulse response: a direct path, then exponentially decaying noise (60 dB down at rt60_s)."""
    length = int(min(1.2 * rt60_s, 1.0) * SAMPLE_RATE_HZ)
    t = np.arange(length) / SAMPLE_RATE_HZ
    tail = rng.standard_normal(length) * np.exp(-6.908 * t / rt60_s)  # ln(1000) = 6.908: -60 dB
    onset = int(rng.uniform(0.002, 0.010) * SAMPLE_RATE_HZ)  # first reflection after the direct sound
    tail[:onset] = 0.0
    tail *= rng.uniform(0.3, 1.5) / np.sqrt(np.sum(tail**2) + 1e-20)  # direct-to-reverberant ratio
    tail[0] = 1.0
    return tail.astype(np.float32)


def convolve_same(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Causal FFT convolution cut to the length of x (the reverberant tail past the end is dropped)."""
    n = x.size + kernel.size - 1
    size = 1 << (n - 1).bit_length()
    y = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(kernel, size), size)[: x.size]
    return y.astype(np.float32)


def band_limit(x: np.ndarray, low_hz: float, high_hz: float, transition_hz: float = 150.0) -> np.ndarray:
    """Keep low_hz..high_hz with raised-cosine edges `transition_hz` wide (zero-phase FFT filter)."""
    spectrum = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(x.size, 1 / SAMPLE_RATE_HZ)
    rise = np.clip((freqs - (low_hz - transition_hz / 2)) / transition_hz, 0, 1) if low_hz > 0 else 1.0
    fall = np.clip(((high_hz + transition_hz / 2) - freqs) / transition_hz, 0, 1)
    gain = (0.5 - 0.5 * np.cos(np.pi * rise)) * (0.5 - 0.5 * np.cos(np.pi * fall))
    return np.fft.irfft(spectrum * gain, x.size).astype(np.float32)


def change_speed(x: np.ndarray, factor: float) -> np.ndarray:
    """Play `factor` times faster (pitch and tempo together, as Kaldi's speed perturbation)."""
    return soxr.resample(x, SAMPLE_RATE_HZ * factor, SAMPLE_RATE_HZ, quality="HQ").astype(np.float32)


def augment(
    x: np.ndarray, rng: np.random.Generator, config: AugmentConfig, babble_sources: Sequence[np.ndarray] = ()
) -> tuple[np.ndarray, dict[str, Any]]:
    """Apply a random chain: speed, formant warp, reverb, noise, band limit, codec, peak gain, DC offset.

    Args:
        x: (S,) clean speech, float32.
        rng: the only source of randomness.
        config: probabilities and ranges.
        babble_sources: other clean utterances to make babble from (babble needs at least 3).

    Returns:
        The augmented audio (S,) or, after a speed change, (S / factor,), clipped to [-1, 1], and a
        record of what was applied.
    """
    record: dict[str, Any] = {}
    if rng.random() < config.p_speed:
        record["speed"] = round(float(rng.uniform(*config.speed_factor)), 3)
        x = change_speed(x, record["speed"])
    if rng.random() < config.p_formant:
        record["formant_alpha"] = round(float(rng.uniform(*config.formant_alpha)), 3)
        x = formant_warp(x, record["formant_alpha"])
    if rng.random() < config.p_reverb:
        x = _reverberate(x, rng, config, record)
    if rng.random() < config.p_noise:
        x = _add_noise(x, rng, config, babble_sources, record)
    band = rng.random()
    if band < config.p_telephone:
        record["band_hz"] = [300, 3400]
        x = band_limit(x, 300.0, 3400.0)
    elif band < config.p_telephone + config.p_lowpass:
        record["band_hz"] = [0, round(float(rng.uniform(*config.lowpass_hz)))]
        x = band_limit(x, 0.0, record["band_hz"][1])
    if rng.random() < config.p_codec and config.codecs:
        x = _codec(x, rng, config, record)
    record["peak_dbfs"] = round(float(rng.uniform(*config.peak_dbfs)), 2)
    gain = 10 ** (record["peak_dbfs"] / 20) / max(float(np.abs(x).max(initial=0.0)), 1e-10)
    record["gain_db"] = round(20 * float(np.log10(gain)), 3)
    x = x * gain
    if rng.random() < config.p_dc:
        record["dc"] = round(float(rng.uniform(-config.max_dc, config.max_dc)), 4)
        x = x + record["dc"]
    return np.clip(x, -1.0, 1.0).astype(np.float32), record


def _reverberate(x: np.ndarray, rng: np.random.Generator, config: AugmentConfig, record: dict[str, Any]) -> np.ndarray:
    record["rt60_s"] = round(float(rng.uniform(*config.rt60_s)), 3)
    if rng.random() < config.p_image_rir:
        room = sample_room(record["rt60_s"], rng)
        record["rir"], record["room"] = "image", room
        rir = image_rir(room, record["rt60_s"], rng)
    else:
        record["rir"] = "noise"
        rir = synthetic_rir(record["rt60_s"], rng)
    level = np.sqrt(power(x))
    x = convolve_same(x, rir)
    return x * (level / max(np.sqrt(power(x)), 1e-10))


def _add_noise(
    x: np.ndarray,
    rng: np.random.Generator,
    config: AugmentConfig,
    babble_sources: Sequence[np.ndarray],
    record: dict[str, Any],
) -> np.ndarray:
    kinds = [k for k in config.noise_kinds if k != "babble" or len(babble_sources) >= 3]
    kind = str(rng.choice(kinds))
    snr_range = config.babble_snr_db if kind == "babble" else config.snr_db
    record["noise"], record["snr_db"] = kind, round(float(rng.uniform(*snr_range)), 2)
    if kind == "babble":
        low, high = config.babble_talkers
        record["talkers"] = min(int(rng.integers(low, high + 1)), len(babble_sources))
        noise = babble(babble_sources, x.size, rng, talkers=record["talkers"])
    else:
        noise = coloured_noise(kind, x.size, rng)
    return mix_at_snr(x, noise, record["snr_db"])


def _codec(x: np.ndarray, rng: np.random.Generator, config: AugmentConfig, record: dict[str, Any]) -> np.ndarray:
    """Round trip through a codec at a level that cannot clip (the peak gain comes after)."""
    choice = sample_codec(rng, config.codecs)
    peak = max(float(np.abs(x).max(initial=0.0)), 1e-10)
    y, measured = round_trip(x * (0.7 / peak), choice["codec"], choice["kbps"])
    record["codec"] = {**choice, **measured}
    return y * (peak / 0.7)
