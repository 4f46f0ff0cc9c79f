"""Shared test setup and fixtures."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

# Small tensors on a busy 2-core machine run far faster on one intra-op thread; nothing in the suite
# measures speed.
torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"

# No daemon started by a test (in-process or as a subprocess, which inherits this) keeps an MQTT journal in
# the real ~/.local/state/streamer; tests of the journal set state.dir to their tmp_path.
os.environ.setdefault("STREAMER_STATE__DIR", "")

# Real peers: a mosquitto broker and a redis-server on free loopback ports, the virtual PulseAudio microphone.
pytest_plugins = ["tests.fixtures_realpeers", "tests.fixtures_redis"]


@pytest.fixture(scope="session")
def tiny_nemo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random hybrid TDT+CTC model saved as .nemo by our own writer."""
    from tests.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("model") / "tiny.nemo")


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few seconds of espeak-ng speech at 22.05 kHz (not the model rate, on purpose)."""
    path = tmp_path_factory.mktemp("audio") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "turn on the kitchen lights and set a timer"], check=True)
    data, sr = sf.read(path, dtype="float32")
    assert sr != 16000 and np.abs(data).max() > 0.01
    return path
