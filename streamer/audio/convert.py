"""Turn client PCM frames and microphone blocks into float32 mono samples at the model rate.

Linear PCM (:data:`ENCODINGS`, protocol v1's) and G.711 companded audio (:data:`COMPANDED_ENCODINGS`: μ-law and
A-law, one byte a sample, decoded by :mod:`streamer.audio.g711`; adapters such as Deepgram's accept it). Channels are
averaged, then soxr's streaming resampler (quality "HQ") changes the rate. The stream keeps
its filter state between frames, so audio cut into frames anywhere resamples to exactly the samples of
one pass over the whole (checked in the tests). Client audio is a byte stream: a frame may end in the
middle of a sample (or of a sample frame of several channels), and the bytes left over are carried to the
next frame. A bad frame raises `AudioError` and changes nothing: the converter can take the next frame as
if the bad one never came. Float samples outside [-1, 1] are clipped to it (and counted).
"""

from __future__ import annotations

from typing import Final

import numpy as np
import soxr

from streamer import protocol
from streamer.asr import clocks
from streamer.audio import g711
from streamer.errors import AudioError

TARGET_RATE_HZ: Final = clocks.SAMPLE_RATE_HZ
# The wire protocol owns what a client may send; this module only adds numpy's name for each encoding.
MIN_RATE_HZ: Final = protocol.MIN_SAMPLE_RATE_HZ
MAX_RATE_HZ: Final = protocol.MAX_SAMPLE_RATE_HZ
MAX_CHANNELS: Final = protocol.MAX_CHANNELS
_NUMPY_KIND = {"s": "i", "f": "f"}  # pcm_s16le: signed integers; pcm_f32le: IEEE floats (all little-endian)
# Sample formats other protocols' clients declare beyond protocol v1's (Wyoming's sample widths 1 and 4, as in
# WAV files: 8-bit samples are unsigned, wider ones signed); protocol v1 still accepts only its own.
OTHER_ENCODINGS: Final[dict[str, np.dtype]] = {"pcm_u8": np.dtype("u1"), "pcm_s32le": np.dtype("<i4")}
ENCODINGS: Final[dict[str, np.dtype]] = {
    **{name: np.dtype(f"<{_NUMPY_KIND[name.removeprefix('pcm_')[0]]}{size}")
       for name, size in protocol.BYTES_PER_SAMPLE.items()},
    **OTHER_ENCODINGS,
}
COMPANDED_ENCODINGS: Final[tuple[str, ...]] = tuple(g711.TABLES)  # pcm_mulaw, pcm_alaw: one byte a sample


class StreamResampler:
    """soxr's streaming resampler for mono float32, or a pass-through when the rates are equal.

    Args:
        in_rate_hz: rate of the samples given to `process`.
        out_rate_hz: rate of the samples returned.
    """

    def __init__(self, in_rate_hz: int, out_rate_hz: int) -> None:
        self.in_rate_hz, self.out_rate_hz = in_rate_hz, out_rate_hz
        self._stream = self._new_stream()

    def _new_stream(self) -> soxr.ResampleStream | None:
        if self.in_rate_hz == self.out_rate_hz:
            return None
        return soxr.ResampleStream(self.in_rate_hz, self.out_rate_hz, 1, dtype="float32", quality="HQ")

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Resample the next (S,) float32 samples; soxr holds back a short tail until more arrive."""
        if self._stream is None:
            return samples
        return self._stream.resample_chunk(samples)

    def flush(self) -> np.ndarray:
        """Return the held-back tail and start over, ready for a new, unrelated signal."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        tail = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._stream = self._new_stream()
        return tail


def to_mono_float32(block: np.ndarray, channels: int) -> np.ndarray:
    """Average interleaved channels into one float32 channel; integer input (signed, or unsigned around its
    midpoint) is scaled to [-1, 1).

    Args:
        block: (S, channels) or interleaved (S * channels,) samples, float or signed integer.
        channels: channels per sample frame.

    Returns:
        (S,) float32 samples (a new array, never a view of ``block``).
    """
    frames = block.astype(np.float32)  # always a new array
    if block.dtype.kind == "u":  # unsigned PCM: silence is the middle of the range (128 for 8 bits)
        frames -= np.float32(2.0 ** (8 * block.dtype.itemsize - 1))
    if block.dtype.kind in "iu":
        frames *= np.float32(2.0 ** -(8 * block.dtype.itemsize - 1))  # int16: 1 / 32768
    if channels == 1:
        return frames.reshape(-1)
    # (S, channels) -> (S,), summed in float64: float32 channels near its maximum overflow a float32 sum
    return frames.reshape(-1, channels).mean(axis=1, dtype=np.float64).astype(np.float32)


class PcmConverter:
    """Decode one client's binary audio frames to float32 mono at ``target_rate`` (default 16 kHz).

    Args:
        sample_rate: the client's rate in Hz, 8000 to 48000.
        encoding: a key of :data:`ENCODINGS` (``"pcm_s16le"``, ``"pcm_f32le"``, ``"pcm_s32le"``, little-endian,
            or ``"pcm_u8"``) or of :data:`COMPANDED_ENCODINGS` (G.711 ``"pcm_mulaw"``, ``"pcm_alaw"``); channels
            interleaved.
        channels: 1 to 8; they are averaged.
        target_rate: the output rate in Hz.

    Raises:
        AudioError: the encoding, rate or channel count is not supported.
    """

    def __init__(self, sample_rate: int, encoding: str, channels: int, target_rate: int = TARGET_RATE_HZ) -> None:
        if encoding not in ENCODINGS and encoding not in COMPANDED_ENCODINGS:
            known = ", ".join(repr(name) for name in (*ENCODINGS, *COMPANDED_ENCODINGS))
            raise AudioError(f"unsupported encoding {encoding!r}; use one of {known}")
        if not isinstance(sample_rate, int) or not MIN_RATE_HZ <= sample_rate <= MAX_RATE_HZ:
            raise AudioError(
                f"unsupported sample rate {sample_rate!r} Hz; use an integer from {MIN_RATE_HZ} to {MAX_RATE_HZ}"
            )
        if not isinstance(channels, int) or not 1 <= channels <= MAX_CHANNELS:
            raise AudioError(f"unsupported channel count {channels!r}; use 1 to {MAX_CHANNELS}")
        self.sample_rate, self.encoding, self.channels = sample_rate, encoding, channels
        self._table = g711.TABLES.get(encoding)  # G.711: each byte is looked up
        self._dtype = ENCODINGS[encoding] if self._table is None else np.dtype("u1")
        self.frame_bytes = self._dtype.itemsize * channels  # bytes per sample frame, all channels
        self._resampler = StreamResampler(sample_rate, target_rate)
        self._carry = b""  # the start of an incomplete sample frame, completed by the next frame
        self.clipped_samples = 0  # float samples outside [-1, 1], clipped

    def convert(self, frame: bytes | bytearray | memoryview) -> np.ndarray:
        """Decode a binary frame and resample it.

        The frame may end mid-sample: those bytes wait for the next frame (see :attr:`incomplete_bytes`). An
        empty frame gives an empty array and leaves the state alone. A rejected frame leaves no trace.

        Args:
            frame: raw PCM bytes that continue the stream.

        Returns:
            (S,) float32 samples at the target rate; may be empty while the resampler fills.

        Raises:
            AudioError: a float sample is NaN or infinite (the frame is dropped whole).
        """
        data = self._carry + bytes(frame) if self._carry else frame
        usable = len(data) - len(data) % self.frame_bytes
        if usable == 0:
            self._carry = bytes(data)
            return np.zeros(0, dtype=np.float32)
        raw = np.frombuffer(data, dtype=self._dtype, count=usable // self._dtype.itemsize)
        if self._dtype.kind == "f":
            if not np.isfinite(raw).all():
                bad = int(np.count_nonzero(~np.isfinite(raw)))
                raise AudioError(f"audio frame holds {bad} NaN or infinite sample(s); the frame was dropped")
            loud = int(np.count_nonzero(np.abs(raw) > 1.0))
            if loud:
                self.clipped_samples += loud
                raw = np.clip(raw, -1.0, 1.0)
        self._carry = bytes(data[usable:])
        if self._table is not None:
            raw = self._table[raw]
        mono = to_mono_float32(raw, self.channels)
        return self._resampler.process(mono)

    @property
    def incomplete_bytes(self) -> int:
        """Bytes of an incomplete sample frame waiting for the rest of it in the next frame."""
        return len(self._carry)

    def drop_incomplete(self) -> int:
        """Forget the bytes of an incomplete sample frame (a resumed client re-sends whole frames); returns them."""
        n, self._carry = len(self._carry), b""
        return n

    def flush(self) -> np.ndarray:
        """Return the resampler's held-back tail at the end of the audio; the converter can then start anew.

        An incomplete sample frame left over cannot be decoded: :attr:`incomplete_bytes` says how many bytes
        it had (read it before flushing), and they are forgotten.
        """
        self._carry = b""
        return self._resampler.flush()
