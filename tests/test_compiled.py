"""The compiled offline encoder (``model.compile``, :mod:`streamer.asr.compiled`): padded buckets give the eager
encoder's frames and tokens; the settings, the bench rows and the refusals.

Tolerance: padding and inductor's fused kernels change only float rounding (see the module docstring), so valid
frames agree to about 1e-6 relative; 1e-4 absolute on outputs of scale 1-5 leaves room for other CPUs' vector
widths while any masking mistake (a padded frame leaking into a valid one) moves outputs by 1e-2 or more.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from streamer.asr.compiled import CompiledOffline, bucket_mel_frames, compile_offline
from streamer.asr.model import AsrModel
from streamer.audio.io import load_audio
from streamer.bench_offline import compile_modes
from streamer.engine.factory import load_model
from streamer.engine.recognizer import transcribe_offline
from streamer.errors import ConfigError
from streamer.settings import ModelSettings

FIXTURE = Path(__file__).parent / "fixtures" / "nemo" / "tdt_offline_sym"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model() -> AsrModel:
    return AsrModel.load(str(FIXTURE / "model.nemo")).eval()


def features(model: AsrModel, clips: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of clips of different lengths (zero-padded to the longest), as the offline path featurizes."""
    n = max(len(c) for c in clips)
    audio = torch.stack([torch.from_numpy(np.pad(c, (0, n - len(c)))) for c in clips])
    with torch.inference_mode():
        return model.preprocessor(audio, torch.tensor([len(c) for c in clips]))


def clips() -> list[np.ndarray]:
    return [load_audio(str(FIXTURE / f"audio_{i}.wav"), 16000) for i in (0, 1)]


def assert_valid_frames_close(a: tuple, b: tuple) -> None:
    (out_a, len_a), (out_b, len_b) = a, b
    assert out_a.shape == out_b.shape and torch.equal(len_a, len_b)
    for row, n in enumerate(len_a.tolist()):
        diff = (out_a[row, :n] - out_b[row, :n]).abs().max().item()
        assert diff < TOLERANCE, f"row {row}: valid frames differ by {diff}"


def test_masked_padded_encode_equals_forward_without_compiling(model: AsrModel) -> None:
    """The arithmetic the compiled graph runs (``encode(always_mask=True)`` on mel padded to a bucket) gives the
    eager forward's valid frames, for a batch whose rows have different lengths."""
    mel, lens = features(model, clips())
    with torch.inference_mode():
        eager = model.encoder(mel, lens)
        padded = model.encoder.encode(F.pad(mel, (0, 333)), lens, (-1, -1), always_mask=True)
    t = eager[0].size(1)
    assert padded[0].size(1) > t
    assert_valid_frames_close(eager, (padded[0][:, :t], padded[1]))


def test_buckets_and_refusals(model: AsrModel) -> None:
    assert bucket_mel_frames([20, 5, 5.0]) == [501, 2001]
    with pytest.raises(ConfigError, match="positive"):
        bucket_mel_frames([0])
    runner = CompiledOffline(model.encoder, "offline", (5.0, 10.0))  # nothing compiles before the first call
    assert [runner.bucket_for(m) for m in (1, 501, 502, 1001, 1002)] == [501, 501, 1001, 1001, None]
    dynamic = CompiledOffline(model.encoder, "offline-dynamic", (5.0,))
    assert [dynamic.bucket_for(m) for m in (7, 501, 502)] == [7, 501, None]
    with pytest.raises(ConfigError, match="needs model.device=cuda"):
        CompiledOffline(model.encoder, "offline-graphs")
    with pytest.raises(ConfigError, match="not one of"):
        compile_offline(model.encoder, "everything")
    assert compile_offline(model.encoder, "off") is None and model.encoder.compiled_offline is None


def test_local_attention_runs_eagerly_without_compiling(caplog) -> None:
    """torch.compile cannot trace the banded local attention: a switched model under ``model.compile=offline``
    gives the eager result, compiles nothing and says so once."""
    local = AsrModel.load(str(FIXTURE.parent / "local_switch" / "model.nemo")).eval()
    local.change_attention("rel_pos_local_attn", (8, 8))
    mel, lens = features(local, clips())
    with torch.inference_mode():
        eager = local.encoder(mel, lens)
        runner = compile_offline(local.encoder, "offline", (5.0,))
        assert runner is not None
        for _ in range(2):
            got = local.encoder(mel, lens)
            assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1])
    assert runner.shapes_seen == set()
    assert [r.message for r in caplog.records].count(
        "model.compile=offline: local attention runs eagerly (its banded attention writes through strided views, "
        "which torch.compile cannot trace)") == 1


def test_settings_and_bench_modes() -> None:
    assert ModelSettings().compile == "off"
    with pytest.raises(ValueError, match="compile"):
        ModelSettings(compile="always")
    with pytest.raises(ConfigError, match="needs model.device=cuda"):
        load_model(ModelSettings(spec=str(FIXTURE / "model.nemo"), compile="offline-graphs"))
    cpu = torch.device("cpu")
    assert compile_modes("off", cpu) == ["off"]
    assert compile_modes("offline,off,offline", cpu) == ["off", "offline"]
    assert compile_modes("all", cpu) == ["off", "offline", "offline-dynamic"]
    assert compile_modes("all", torch.device("cuda"))[-1] == "offline-graphs"
    with pytest.raises(ConfigError, match="needs --device cuda"):
        compile_modes("offline-graphs", cpu)
    with pytest.raises(ConfigError, match="'fast' is not one of"):
        compile_modes("offline,fast", cpu)


@pytest.mark.slow  # compiling takes about 40 s on 2 cores with a cold inductor cache (3 s warm)
def test_compiled_bucket_gives_eager_frames_and_tokens() -> None:
    """``model.compile=offline`` through :func:`load_model`: one 5 s bucket; a batch of the two clips (padded in
    the batch and to the bucket) gives eager's valid frames, each clip alone eager's tokens and word times,
    and an input over the largest bucket runs eagerly (same result, no new compile)."""
    model = load_model(ModelSettings(spec=str(FIXTURE / "model.nemo"), threads=2))
    audio = clips()
    eager_tokens = [transcribe_offline(model, a) for a in audio]
    mel, lens = features(model, audio)
    with torch.inference_mode():
        eager = model.encoder(mel, lens)
    runner = compile_offline(model.encoder, "offline", (5.0,))
    assert runner is not None and mel.size(2) < 501
    with torch.inference_mode():
        compiled = model.encoder(mel, lens)
    assert runner.shapes_seen == {(2, mel.size(1), 501)}
    assert_valid_frames_close(eager, compiled)
    long_mel = F.pad(mel, (0, 600))
    with torch.inference_mode():
        assert_valid_frames_close(model.encoder.encode(long_mel, lens, (-1, -1)), model.encoder(long_mel, lens))
    assert runner.shapes_seen == {(2, mel.size(1), 501)}  # over the bucket: not compiled
    for a, want in zip(audio, eager_tokens, strict=True):
        got = transcribe_offline(model, a)
        assert got.token_ids == want.token_ids and got.text == want.text
        assert [w.start_s for w in got.words] == [w.start_s for w in want.words]
    assert {s[0] for s in runner.shapes_seen} == {1, 2}


@pytest.mark.slow  # compiles a one-layer parakeet-shaped encoder (d_model 1024): about a minute cold
def test_bench_offline_rows_time_compiled_next_to_eager() -> None:
    """``streamer bench --offline --offline-compile offline``: a compiled row right after the eager one, same
    model and inputs, with its first call (the compile) apart from the timed steps."""
    from streamer.bench_offline import offline_rows
    from streamer.bench_table import format_table, row_of

    args = argparse.Namespace(offline_layers=1, offline_batch=1, utterance_s=2.0, steps=1, warmup=0,
                              no_decoder=True, tokens_per_s=4.0, offline_compile="offline")
    rows = [row_of(r) for r in offline_rows(args, "cpu", ["float32"])]
    assert [r.impl for r in rows] == ["streamer", "streamer/compiled"]
    assert all(r.first_call_s is not None and r.first_call_s > 0 and r.p50_ms > 0 for r in rows)
    assert rows[0].params_m == rows[1].params_m and rows[0].streams == rows[1].streams == 1
    header = format_table(rows).splitlines()[0].split(" | ")
    assert header[header.index("rtfx_total") + 1].strip() == "first_call_s"
