"""Hermes' audio frames: small WAV files in any sample format, read into PCM the session core takes.

The files are written by soundfile (libsndfile), an independent writer, in each format a satellite may send.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import soundfile as sf

from streamer.adapters.wavframe import read_wav, write_wav
from streamer.errors import AudioError

RATE = 22050


def tone(channels: int) -> np.ndarray:
    """0.1 s of a 440 Hz tone at half scale, the same in every channel."""
    t = np.arange(RATE // 10) / RATE
    mono = 0.5 * np.sin(2 * np.pi * 440 * t)
    return np.repeat(mono[:, None], channels, axis=1)


def wav_bytes(samples: np.ndarray, subtype: str, container: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, RATE, subtype=subtype, format=container)
    return buffer.getvalue()


def decoded(frame_pcm: bytes, encoding: str, channels: int) -> np.ndarray:
    dtype = "<i2" if encoding == "pcm_s16le" else "<f4"
    data = np.frombuffer(frame_pcm, dtype=dtype).astype(np.float64)
    if encoding == "pcm_s16le":
        data /= 32768.0
    return data.reshape(-1, channels)


@pytest.mark.parametrize(("subtype", "encoding", "tolerance"), [
    ("PCM_16", "pcm_s16le", 1e-4), ("PCM_U8", "pcm_f32le", 1e-2), ("PCM_24", "pcm_f32le", 1e-6),
    ("PCM_32", "pcm_f32le", 1e-6), ("FLOAT", "pcm_f32le", 1e-6), ("DOUBLE", "pcm_f32le", 1e-6),
])
@pytest.mark.parametrize("channels", [1, 2])
def test_every_sample_format_reads_to_the_same_samples(subtype: str, encoding: str, tolerance: float,
                                                       channels: int) -> None:
    samples = tone(channels)
    frame = read_wav(wav_bytes(samples, subtype))
    assert (frame.sample_rate, frame.channels, frame.encoding) == (RATE, channels, encoding)
    got = decoded(frame.pcm, encoding, channels)
    assert got.shape == samples.shape
    assert np.abs(got - samples).max() < tolerance


def test_an_extensible_header_is_read_by_its_sub_format() -> None:
    """WAVE_FORMAT_EXTENSIBLE (libsndfile's WAVEX) holds the real format inside."""
    samples = tone(4)
    payload = wav_bytes(samples, "PCM_16", "WAVEX")
    assert struct.unpack_from("<H", payload, 20)[0] == 0xFFFE  # the file really is extensible
    frame = read_wav(payload)
    assert (frame.channels, frame.encoding) == (4, "pcm_s16le")
    assert np.abs(decoded(frame.pcm, frame.encoding, 4) - samples).max() < 1e-4


def test_a_data_size_that_overstates_the_bytes_takes_what_is_there() -> None:
    """Streaming writers put 0xFFFFFFFF in the data chunk's size; a cut last sample frame is left out."""
    payload = bytearray(wav_bytes(tone(2), "PCM_16"))
    data_at = payload.index(b"data")
    payload[data_at + 4 : data_at + 8] = struct.pack("<I", 0xFFFFFFFF)
    frame = read_wav(bytes(payload[:-1]))  # one byte short of the last sample frame
    assert len(frame.pcm) == (RATE // 10 - 1) * 4


def test_write_wav_gives_a_file_soundfile_reads() -> None:
    pcm = (tone(2) * 32767).astype("<i2").tobytes()
    data, rate = sf.read(io.BytesIO(write_wav(pcm, RATE, 2, "pcm_s16le")), dtype="int16")
    assert rate == RATE and data.shape == (RATE // 10, 2)
    assert data.tobytes() == pcm


@pytest.mark.parametrize(("payload", "words"), [
    (b"", "not a WAV file"),
    (b'{"siteId": "kitchen"}', "not a WAV file"),
    (b"RIFF\x04\x00\x00\x00WAVE", "without a 'fmt ' chunk"),
    (b"RIFF\x10\x00\x00\x00WAVEfmt \x02\x00\x00\x00\x01\x00", "needs at least 16"),
])
def test_what_is_no_wav_is_said(payload: bytes, words: str) -> None:
    with pytest.raises(AudioError, match=words):
        read_wav(payload)


def test_an_unsupported_sample_format_is_named() -> None:
    payload = wav_bytes(tone(1), "ULAW")
    with pytest.raises(AudioError, match="format tag 0x0007"):
        read_wav(payload)
