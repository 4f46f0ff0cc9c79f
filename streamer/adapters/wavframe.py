"""Small WAV files as audio frames (Hermes' ``audioFrame`` payloads): the RIFF container read into PCM the session
core takes (``pcm_s16le`` or ``pcm_f32le``, any rate and channel count).

Our own reader rather than the stdlib ``wave``: it works on bytes in memory, takes float (format 3) and
WAVE_FORMAT_EXTENSIBLE files, which ``wave`` refuses before Python 3.12, accepts a ``data`` size that overstates the
bytes (streaming writers put 0 or 0xFFFFFFFF there) and says exactly what is wrong with a payload that is no WAV.
Sample formats the core does not take (unsigned 8-bit, 24- and 32-bit integers, 64-bit floats) are turned into
``pcm_f32le`` here; rate and channels are left to the core.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from streamer.errors import AudioError

PCM, IEEE_FLOAT, EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
MAX_CHANNELS = 64  # a bound on the header's word before numpy sizes anything by it


@dataclass(frozen=True, slots=True)
class WavFrame:
    """One WAV payload as the core takes it.

    Attributes:
        sample_rate: the file's rate in Hz.
        channels: interleaved channels.
        encoding: ``pcm_s16le`` or ``pcm_f32le``.
        pcm: the samples in ``encoding``, whole sample frames only.
        source_format: what the file held, e.g. ``"s16"``, ``"u8"``, ``"s24"``, ``"f32"`` (for messages).
    """

    sample_rate: int
    channels: int
    encoding: str
    pcm: bytes
    source_format: str

    @property
    def format_key(self) -> tuple[int, int, str]:
        """What must stay the same across a session's frames."""
        return self.sample_rate, self.channels, self.encoding


def read_wav(payload: bytes) -> WavFrame:
    """Parse a WAV payload.

    Raises:
        AudioError: it is not a RIFF/WAVE file, has no ``fmt `` or ``data`` chunk, or holds a sample format other
            than 8/16/24/32-bit integers or 32/64-bit floats.
    """
    if len(payload) < 12 or payload[:4] != b"RIFF" or payload[8:12] != b"WAVE":
        head = payload[:12]
        raise AudioError(f"not a WAV file: it starts with {head!r}, not b'RIFF....WAVE' ({len(payload)} bytes)")
    fmt: tuple[int, int, int, int] | None = None
    data: bytes | None = None
    pos = 12
    while pos + 8 <= len(payload):
        chunk_id, size = payload[pos : pos + 4], struct.unpack_from("<I", payload, pos + 4)[0]
        body = payload[pos + 8 : pos + 8 + size]  # a data chunk may claim more than there is: take what there is
        if chunk_id == b"fmt ":
            fmt = _read_fmt(body)
        elif chunk_id == b"data":
            data = body
            break
        pos += 8 + size + (size & 1)  # chunks are padded to an even length
    if fmt is None:
        raise AudioError("WAV file without a 'fmt ' chunk before its 'data' chunk")
    if data is None:
        raise AudioError("WAV file without a 'data' chunk")
    tag, channels, rate, bits = fmt
    return _to_core(tag, channels, rate, bits, data)


def _read_fmt(body: bytes) -> tuple[int, int, int, int]:
    if len(body) < 16:
        raise AudioError(f"WAV 'fmt ' chunk of {len(body)} bytes; it needs at least 16")
    tag, channels, rate, _byte_rate, _align, bits = struct.unpack_from("<HHIIHH", body)
    if tag == EXTENSIBLE:
        if len(body) < 40:
            raise AudioError("WAVE_FORMAT_EXTENSIBLE 'fmt ' chunk shorter than 40 bytes")
        tag = struct.unpack_from("<H", body, 24)[0]  # the first two bytes of the sub-format GUID
    return tag, channels, rate, bits


def _to_core(tag: int, channels: int, rate: int, bits: int, data: bytes) -> WavFrame:
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f"WAV file with {channels} channels")
    if rate <= 0:
        raise AudioError(f"WAV file with a sample rate of {rate} Hz")
    if tag == PCM and bits in (8, 16, 24, 32):
        name = "u8" if bits == 8 else f"s{bits}"
    elif tag == IEEE_FLOAT and bits in (32, 64):
        name = f"f{bits}"
    else:
        kind = {PCM: "integer", IEEE_FLOAT: "float"}.get(tag, f"format tag 0x{tag:04x}")
        raise AudioError(f"WAV sample format {kind} {bits}-bit is not supported; send 8/16/24/32-bit integer or "
                         "32/64-bit float PCM")
    frame_bytes = bits // 8 * channels
    data = data[: len(data) - len(data) % frame_bytes]
    if name == "s16":
        return WavFrame(rate, channels, "pcm_s16le", data, name)
    if name == "f32":
        samples = np.frombuffer(data, dtype="<f4")
    elif name == "f64":
        samples = np.frombuffer(data, dtype="<f8").astype(np.float32)
    elif name == "u8":
        samples = (np.frombuffer(data, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif name == "s24":
        raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3)
        wide = raw[:, 0].astype(np.int32) | (raw[:, 1].astype(np.int32) << 8) | (raw[:, 2].astype(np.int32) << 16)
        wide = np.where(wide >= 1 << 23, wide - (1 << 24), wide)  # sign-extend
        samples = wide.astype(np.float32) / float(1 << 23)
    else:  # s32
        samples = np.frombuffer(data, dtype="<i4").astype(np.float32) / float(1 << 31)
    return WavFrame(rate, channels, "pcm_f32le", samples.astype("<f4").tobytes(), name)


def write_wav(pcm: bytes, sample_rate: int, channels: int, encoding: str) -> bytes:
    """A WAV file of ``pcm`` in ``encoding`` (Rhasspy's ``audioCaptured``)."""
    tag, width = (IEEE_FLOAT, 4) if encoding == "pcm_f32le" else (PCM, 2)
    fmt = struct.pack("<HHIIHH", tag, channels, sample_rate, sample_rate * channels * width, channels * width,
                      width * 8)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(pcm)) + pcm
    return b"RIFF" + struct.pack("<I", len(body)) + body
