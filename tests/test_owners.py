"""Every shared number has one owner; where a layer rule forbids the import, these tests say the copies agree.

Owners: ``streamer.asr.clocks`` (rates, periods, frame and length formulas), ``streamer.protocol`` (the
PCM encodings, rates and channels a client may send), ``streamer.engine.endpoint`` (the endpointing rules
and their defaults).
"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np

from streamer import protocol
from streamer.asr import clocks
from streamer.asr.config import EncoderConfig, FeatureConfig, ModelConfig
from streamer.audio import convert
from streamer.engine.endpoint import EndpointConfig
from streamer.settings import EndpointingSettings

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "streamer"


def test_endpointing_rules_are_the_same_everywhere() -> None:
    """The protocol (stdlib only, so it keeps its own list), the settings and the engine name the same rules."""
    names = tuple(f.name for f in dataclasses.fields(EndpointConfig))
    assert protocol.ENDPOINT_KEYS == names
    assert tuple(EndpointingSettings.model_fields) == names
    assert EndpointingSettings().model_dump() == EndpointConfig().to_dict()


def test_pcm_encodings_come_from_the_protocol() -> None:
    """The converter decodes the encodings protocol v1 accepts, with the protocol's sample sizes, and besides them
    only those other protocols' clients declare (Wyoming's 8- and 32-bit samples)."""
    v1 = {name: convert.ENCODINGS[name] for name in protocol.ENCODINGS}
    assert protocol.ENCODINGS == tuple(protocol.BYTES_PER_SAMPLE)
    assert {name: dtype.itemsize for name, dtype in v1.items()} == protocol.BYTES_PER_SAMPLE
    assert v1 == {"pcm_s16le": np.dtype("<i2"), "pcm_f32le": np.dtype("<f4")}
    assert convert.ENCODINGS == {**v1, **convert.OTHER_ENCODINGS}
    assert convert.OTHER_ENCODINGS == {"pcm_u8": np.dtype("u1"), "pcm_s32le": np.dtype("<i4")}
    assert (convert.MIN_RATE_HZ, convert.MAX_RATE_HZ, convert.MAX_CHANNELS) == (
        protocol.MIN_SAMPLE_RATE_HZ, protocol.MAX_SAMPLE_RATE_HZ, protocol.MAX_CHANNELS
    )


def test_the_model_defaults_are_the_clocks() -> None:
    """A default model config has the clocks' hop, window, FFT size and 80 ms encoder frames."""
    features = FeatureConfig()
    assert (features.sample_rate, features.hop_length, features.win_length, features.n_fft) == (
        clocks.SAMPLE_RATE_HZ, clocks.HOP_LENGTH, clocks.WIN_LENGTH, clocks.N_FFT
    )
    assert ModelConfig(features, EncoderConfig()).frame_shift_s == clocks.ENCODER_FRAME_S == 0.08
    assert convert.TARGET_RATE_HZ == clocks.SAMPLE_RATE_HZ == 16000


def test_strided_conv_length_is_nemo_calc_length() -> None:
    """One stride-2 kernel-3 conv: causal pads (2, 1), symmetric (1, 1); 8x is three of them."""
    assert [clocks.strided_conv_length(n, is_causal=True) for n in (1, 2, 3, 80)] == [1, 2, 2, 41]  # n // 2 + 1
    assert [clocks.strided_conv_length(n, is_causal=False) for n in (1, 2, 3, 80)] == [1, 1, 2, 40]  # (n - 1) // 2 + 1
    assert clocks.num_encoder_frames(100, is_causal=True) == 14  # 100 -> 51 -> 26 -> 14


def test_the_clocks_import_without_torch() -> None:
    """The audio layer and clients read the rates from clocks, so importing it must not pull in torch."""
    code = "import sys, streamer.asr.clocks; sys.exit('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE_DIR.parent, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()


def test_16_khz_is_written_once() -> None:
    """No module but clocks spells the model's sample rate as a number."""
    spelled = [
        f"{path.relative_to(PACKAGE_DIR.parent)}:{node.lineno}"
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
        if path.name != "clocks.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and type(node.value) in (int, float) and node.value == 16000
    ]
    assert not spelled, f"use streamer.asr.clocks.SAMPLE_RATE_HZ instead: {spelled}"
