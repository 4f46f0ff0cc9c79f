"""What the OpenAI API tests share: ``streamer serve`` as a subprocess with the bundled model, espeak-ng speech.

The daemon runs with an access token (the ``openai`` SDK's API key), so every test also exercises the
``Authorization: Bearer`` check. Sentences are ones the bundled default model is known to get right
(``tests/test_default_model.py``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from streamer.training.evaluate import word_error_rate

MODEL = Path(__file__).resolve().parents[1] / "models" / "streamer-tdt-small" / "model.nemo"
TIMEOUT = float(os.environ.get("STREAMER_TEST_TIMEOUT_FACTOR", "1"))
KEY = "openai-test-key"
FIRST, SECOND = "please turn off the lights in the kitchen", "set a timer for ten minutes"
MAX_WER = 0.35  # as tests/test_default_model.py: recognition broke, not a point of accuracy

needs_model = pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} is missing from this checkout")


@dataclass
class Served:
    """A running ``streamer serve``: its port, process and log."""

    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def terminate(self) -> int:
        """SIGTERM, then the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60 * TIMEOUT)


@contextlib.contextmanager
def serve(folder: Path, *settings: str) -> Iterator[Served]:
    """``streamer serve`` (the bundled model) on a free loopback port with token :data:`KEY` and ``--set``s."""
    port_file, log = folder / "port", folder / "serve.log"
    env = {**os.environ, "STREAMER_SERVER__AUTH_TOKENS": f'["{KEY}"]', "STREAMER_STATE__DIR": ""}
    sets = [arg for s in settings for arg in ("--set", s)]
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamer", "--log-level", "INFO", "serve", "--port-file", str(port_file),
             "--set", "server.port=0", *sets], env=env, stdout=subprocess.DEVNULL, stderr=log_file,
        )
    try:
        deadline = time.monotonic() + 180 * TIMEOUT
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamer serve did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
        yield Served(int(port_file.read_text()), proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def speak(text: str, folder: Path, voice: str = "en-us") -> Path:
    """``text`` spoken by espeak-ng into a WAV file (22.05 kHz)."""
    path = folder / f"{voice}-{'-'.join(text.split())}.wav"
    if not path.exists():
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True)
    return path


def pcm16(path: Path, rate: int, silence_after_s: float = 0.0) -> bytes:
    """A WAV file as mono 16-bit little-endian PCM at ``rate``, with ``silence_after_s`` of silence after it."""
    data, source_rate = sf.read(path, dtype="float32")
    samples = soxr.resample(data, source_rate, rate) if source_rate != rate else data
    samples = np.concatenate([samples, np.zeros(round(silence_after_s * rate), dtype=np.float32)])
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def two_sentences(folder: Path) -> Path:
    """:data:`FIRST`, 1.5 s of silence, :data:`SECOND`: one WAV file of two segments."""
    path = folder / "two.wav"
    rate = 22050
    first, second = (np.frombuffer(pcm16(speak(t, folder), rate), dtype="<i2") for t in (FIRST, SECOND))
    sf.write(path, np.concatenate([first, np.zeros(round(1.5 * rate), dtype="<i2"), second]), rate, subtype="PCM_16")
    return path


def check_words(spoken: list[str], heard: list[str]) -> None:
    wer, errors, words = word_error_rate(spoken, heard)
    assert wer <= MAX_WER, f"{errors}/{words} word errors: heard {heard!r}"
