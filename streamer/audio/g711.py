"""G.711 companded audio (μ-law and A-law, 8 bits a sample): the decoding tables.

Telephone audio (SIP trunks, Twilio and other media streams, Deepgram's ``encoding=mulaw``/``alaw``) comes as one
byte per sample, companded: the byte holds a sign, a 3-bit segment (exponent) and a 4-bit step within it. Decoding
is a lookup of the byte in a 256-entry table; the tables here give the 16-bit linear values of ITU-T G.711
(μ-law spans ±32124, A-law ±32256) as float32 in [-1, 1), scaled like 16-bit PCM (1 / 32768).
"""

from __future__ import annotations

from typing import Final

import numpy as np

_SIGN = 0x80
_SEGMENT_SHIFT = 4
_STEP_MASK = 0x0F
_MULAW_BIAS = 0x84  # 132: μ-law adds it before the segment shift (so segment 0 has steps of 2 after the shift)


def _mulaw_linear() -> np.ndarray:
    """The 16-bit value of each μ-law byte (bytes are sent inverted: the decoder flips every bit first)."""
    code = ~np.arange(256, dtype=np.int32) & 0xFF
    segment = (code >> _SEGMENT_SHIFT) & 0x07
    magnitude = (((code & _STEP_MASK) << 3) + _MULAW_BIAS) << segment
    return np.where(code & _SIGN, _MULAW_BIAS - magnitude, magnitude - _MULAW_BIAS)


def _alaw_linear() -> np.ndarray:
    """The 16-bit value of each A-law byte (even bits are sent inverted: XOR 0x55 first; sign bit set = positive)."""
    code = np.arange(256, dtype=np.int32) ^ 0x55
    segment = (code >> _SEGMENT_SHIFT) & 0x07
    step = (code & _STEP_MASK) << 4
    # segment 0 is linear (no implicit leading one); the others add the leading one and double per segment
    magnitude = np.where(segment == 0, step + 8, (step + 0x108) << np.maximum(segment - 1, 0))
    return np.where(code & _SIGN, magnitude, -magnitude)


TABLES: Final[dict[str, np.ndarray]] = {
    name: (linear().astype(np.float32) / np.float32(32768.0))
    for name, linear in (("pcm_mulaw", _mulaw_linear), ("pcm_alaw", _alaw_linear))
}
"""Each G.711 encoding's 256 float32 samples, indexed by the byte on the wire."""
