"""Audio file loading: formats, rates, channel mixing, errors, and no torch import."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from streamer.audio.io import load_audio
from streamer.errors import AudioError

DURATION_S = 1.0
TONE_HZ = 440.0

FORMATS = [  # (suffix, soundfile format, subtype, lossy)
    ("wav", "WAV", "PCM_16", False),
    ("flac", "FLAC", "PCM_16", False),
    ("ogg", "OGG", "VORBIS", True),
    ("mp3", "MP3", "MPEG_LAYER_III", True),
]


def _stereo_tone(rate: int) -> np.ndarray:
    """(S, 2): a 440 Hz sine at 0.5 on the left and 0.3 on the right; the mix has amplitude 0.4."""
    t = np.arange(int(DURATION_S * rate)) / rate
    tone = np.sin(2 * np.pi * TONE_HZ * t)
    return np.stack([0.5 * tone, 0.3 * tone], axis=1).astype(np.float32)


def _peak_hz(samples: np.ndarray, rate: int) -> float:
    """Frequency of the strongest FFT bin (Hann-windowed)."""
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.fft.rfftfreq(samples.size, 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
@pytest.mark.parametrize(("suffix", "fmt", "subtype", "lossy"), FORMATS)
def test_formats_and_rates_resample_to_16k_mono(
    tmp_path: Path, rate: int, suffix: str, fmt: str, subtype: str, lossy: bool
) -> None:
    """Any format/rate/stereo file comes back as 16 kHz mono float32 with the tone intact."""
    path = tmp_path / f"tone_{rate}.{suffix}"
    sf.write(path, _stereo_tone(rate), rate, format=fmt, subtype=subtype)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.size - 16000 * DURATION_S) <= 2  # soxr keeps the exact duration
    middle = audio[2000:14000]  # away from codec and resampler edges
    assert _peak_hz(middle, 16000) == pytest.approx(TONE_HZ, abs=2.0)
    rms = float(np.sqrt(np.mean(middle.astype(np.float64) ** 2)))
    # The tone of the channel mean (amplitude 0.4), not of one channel.
    assert rms == pytest.approx(0.4 / np.sqrt(2), rel=0.1 if lossy else 0.01)


def test_channels_are_averaged_exactly(tmp_path: Path) -> None:
    """A float WAV at 16 kHz is returned sample for sample: (left + right) / 2, no resampling."""
    rng = np.random.default_rng(0)
    stereo = rng.uniform(-0.5, 0.5, size=(1000, 2)).astype(np.float32)
    stereo[:500, 1] = -stereo[:500, 0]  # cancels to silence in the first half
    path = tmp_path / "mix.wav"
    sf.write(path, stereo, 16000, subtype="FLOAT")
    audio = load_audio(str(path))
    np.testing.assert_allclose(audio, stereo.mean(axis=1), rtol=0, atol=1e-7)
    assert np.all(audio[:500] == 0.0)


def test_other_target_rate_and_file_object(tmp_path: Path) -> None:
    """A file object works, and ``sample_rate`` picks the output rate."""
    buffer = io.BytesIO()
    sf.write(buffer, _stereo_tone(44100), 44100, format="FLAC")
    buffer.seek(0)
    audio = load_audio(buffer, sample_rate=8000)
    assert abs(audio.size - 8000) <= 2
    assert _peak_hz(audio[1000:7000], 8000) == pytest.approx(TONE_HZ, abs=2.0)


def test_empty_file_gives_no_samples(tmp_path: Path) -> None:
    """A valid file without samples loads as an empty array."""
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros((0, 2), dtype=np.float32), 44100)
    audio = load_audio(path)
    assert audio.shape == (0,) and audio.dtype == np.float32


def test_missing_file_is_audio_error(tmp_path: Path) -> None:
    """A missing path raises AudioError naming the file and the reason."""
    path = tmp_path / "nothing.wav"
    with pytest.raises(AudioError, match=r"nothing\.wav.*no such file"):
        load_audio(path)


def test_directory_is_audio_error(tmp_path: Path) -> None:
    """A directory raises AudioError saying so."""
    with pytest.raises(AudioError, match="directory"):
        load_audio(tmp_path)


def test_unreadable_file_is_audio_error(tmp_path: Path) -> None:
    """Text posing as audio raises a one-line AudioError with libsndfile's reason."""
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n")
    with pytest.raises(AudioError, match=r"notes\.wav.*not recogni[sz]ed") as info:
        load_audio(path)
    assert "\n" not in str(info.value)


def test_non_finite_samples_are_audio_error(tmp_path: Path) -> None:
    """A float file holding NaN is refused rather than fed to the model."""
    path = tmp_path / "nan.wav"
    data = np.zeros(100, dtype=np.float32)
    data[10] = np.nan
    sf.write(path, data, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        load_audio(path)


def test_audio_io_does_not_import_torch() -> None:
    """Layer rule: streamer.audio never imports torch."""
    code = "import sys, streamer.audio.io; sys.exit(1 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr or "torch was imported"
