"""Test speech: sentences spoken by espeak-ng (en-us), read back as samples. One helper for the protocol tests."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import soundfile as sf


def espeak_sentences(folder: Path, texts: Iterable[str], dtype: str = "float32") -> dict[str, tuple[np.ndarray, int]]:
    """Each text spoken into ``folder`` and read back: ``{text: (samples of dtype, rate)}`` (espeak-ng's 22.05 kHz)."""
    out = {}
    for i, text in enumerate(texts):
        path = folder / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), text], check=True)
        out[text] = sf.read(path, dtype=dtype)
    return out
