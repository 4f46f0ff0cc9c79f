"""``streamer bench``'s onnxruntime engine: the exported steady step equals ours, carries every cache, and bench
prints its rows.

A tiny random configuration (2 layers, d_model 32) of the benchmark's encoder, exported once per module with
the TorchScript exporter (what torch 2.13's dynamo exporter falls back to; the CLI tests go through the fallback).
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch

from streamer import bench_onnx
from streamer.asr.streaming import EncoderState
from streamer.bench_model import random_encoder
from streamer.bench_onnx import CACHE_NAMES, INPUT_NAMES, OUTPUT_NAMES, TOLERANCE, SteadyStep
from streamer.cli import main

TINY = {"n_layers": 2, "d_model": 32, "n_heads": 4, "subsampling_conv_channels": 8}
TINY_ARGS = [arg for key, value in TINY.items() for arg in ("--encoder-set", f"{key}={value}")]
CTX = (70, 1)


@pytest.fixture(scope="module")
def step() -> SteadyStep:
    encoder = random_encoder(TINY)
    return SteadyStep(encoder, encoder.streaming(CTX)).eval()


@pytest.fixture(scope="module")
def exported(step: SteadyStep, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "step.onnx"
    assert bench_onnx.export_step(step, path, exporter="torchscript").exporter == "torchscript"
    return path


@pytest.fixture(scope="module")
def session(exported: Path):
    return bench_onnx.open_session(exported, threads=1)


def test_export_has_a_dynamic_batch_axis_on_every_input_and_output(exported: Path) -> None:
    graph = onnx.load(str(exported)).graph
    assert [i.name for i in graph.input] == list(INPUT_NAMES)
    assert [o.name for o in graph.output] == list(OUTPUT_NAMES)
    axes = {**bench_onnx.BATCH_AXIS,
            **{o: bench_onnx.BATCH_AXIS[i] for i, o in zip(INPUT_NAMES, OUTPUT_NAMES, strict=True)}}
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        assert dims[axes[value.name]].dim_param, f"{value.name}: batch axis is fixed at {dims[axes[value.name]]}"
    for value in graph.input:  # every other input axis is fixed: one chunk size, one cache size
        dims = value.type.tensor_type.shape.dim
        assert all(d.dim_value > 0 for i, d in enumerate(dims) if i != axes[value.name]), value.name


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_equals_our_step(session, step: SteadyStep, batch: int) -> None:
    assert bench_onnx.max_abs_diff(session, step, batch) < TOLERANCE


def test_rollout_matches_the_stateful_step(session, step: SteadyStep) -> None:
    """Four steps, each fed the caches the last one returned: onnxruntime against ``StreamingEncoder.step`` with a
    real :class:`EncoderState`. A cache the wrapper drops (or returns unchanged) makes later steps diverge."""
    streaming = step.streaming
    feeds = bench_onnx.random_inputs(streaming, 2, seed=11)
    state = EncoderState(mel_seen=torch.full((2,), 10_000), attn_len=torch.full((2,), streaming.cache_frames),
                         **{n: feeds[n] for n in CACHE_NAMES})
    ort_feeds = {n: t.numpy() for n, t in feeds.items()}
    chunk = streaming.chunk_mel_frames
    for i in range(4):
        mel = torch.randn(2, streaming.cfg.feat_in, chunk, generator=torch.Generator().manual_seed(20 + i))
        with torch.inference_mode():
            ours, _, state = streaming.step(mel, torch.full((2,), chunk), state)
        outs = session.run(list(OUTPUT_NAMES), {**ort_feeds, "mel": mel.numpy()})
        assert float((torch.from_numpy(outs[0]) - ours).abs().max()) < TOLERANCE, f"step {i}"
        for name, new in zip(CACHE_NAMES, outs[1:], strict=True):
            assert float((torch.from_numpy(new) - getattr(state, name)).abs().max()) < TOLERANCE, f"{name} step {i}"
        ort_feeds = dict(zip(CACHE_NAMES, outs[1:], strict=True))


@pytest.mark.parametrize("name", CACHE_NAMES)
def test_every_cache_input_reaches_the_output(session, step: SteadyStep, name: str) -> None:
    feeds = {n: t.numpy() for n, t in bench_onnx.random_inputs(step.streaming, 2, seed=5).items()}
    before = session.run(["out"], feeds)[0]
    after = session.run(["out"], {**feeds, name: feeds[name] + 1.0})[0]
    assert abs(after - before).max() > 1e-3, f"the exported step ignores {name}"


class DropsAttnV(SteadyStep):
    """A wrong wrapper: it hands the step zeros instead of the value cache it was given."""

    def forward(self, mel, mel_tail, attn_k, attn_v, conv_tail):
        return super().forward(mel, mel_tail, attn_k, torch.zeros_like(attn_v), conv_tail)


def test_the_check_catches_a_wrapper_that_drops_a_cache(step: SteadyStep, tmp_path: Path) -> None:
    broken = DropsAttnV(step.encoder, step.streaming).eval()
    path = tmp_path / "broken.onnx"
    bench_onnx.export_step(broken, path, exporter="torchscript")
    session = bench_onnx.open_session(path, threads=1)
    assert bench_onnx.max_abs_diff(session, step, 3) > TOLERANCE


def test_dynamic_int8_replaces_the_weight_matmuls(exported: Path, step: SteadyStep, tmp_path: Path) -> None:
    quantized = tmp_path / "step.int8.onnx"
    bench_onnx.quantize_int8(exported, quantized)
    ops = {node.op_type for node in onnx.load(str(quantized)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    session = bench_onnx.open_session(quantized, threads=1)
    deviation = bench_onnx.max_abs_diff(session, step, 3)
    assert 0 < deviation < float("inf")  # int8 is near, not equal: bench reports it, never asserts a bound


def run_bench(capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    threads = torch.get_num_threads()
    argv = ["bench", *TINY_ARGS, "--att-context-sizes", "70,1", "--streams", "1,3", "--steps", "2",
            "--warmup", "1", "--dtypes", "float32", "--no-decoder", "--nemo", "off", "--onnx", "auto",
            "--threads", "1", *extra]
    try:
        status = main(argv)
    finally:
        torch.set_num_threads(threads)  # bench sets them for the whole process
    return status, capsys.readouterr().out


@pytest.mark.slow
def test_bench_prints_onnxruntime_rows_beside_ours(capsys: pytest.CaptureFixture[str]) -> None:
    status, out = run_bench(capsys)
    assert status == 0
    table = [[cell.strip() for cell in line.split("|")] for line in out.splitlines() if line.count("|") > 5]
    rows = {(r[0], r[2], r[6]) for r in table[2:]}  # impl, dtype, streams
    for streams in ("1", "3"):
        assert {("streamer", "float32", streams), ("onnxruntime", "float32", streams),
                ("onnxruntime", "int8", streams)} <= rows
    (note,) = [line for line in out.splitlines() if line.startswith("onnxruntime [70,1]: exported with")]
    assert f"float32 equals our step within {TOLERANCE:g}" in note
    assert "streamer vs onnxruntime (float32 encoder step" in out


@pytest.mark.slow
def test_bench_json_rows_and_kept_onnx_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out = run_bench(capsys, "--format", "json", "--onnx-dir", str(tmp_path / "exported"))
    assert status == 0
    rows = [json.loads(line) for line in out.splitlines()]
    onnx_rows = [r for r in rows if r["impl"] == "onnxruntime"]
    assert sorted((r["dtype"], r["streams"]) for r in onnx_rows) == [
        ("float32", 1), ("float32", 3), ("int8", 1), ("int8", 3)]
    assert all(r["max_abs_diff"] < TOLERANCE for r in onnx_rows if r["dtype"] == "float32")
    assert all(r["max_abs_diff"] is None for r in rows if r["impl"] == "streamer")
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == [
        "encoder_step_70_1.int8.onnx", "encoder_step_70_1.onnx"]


def test_bench_rejects_an_unknown_encoder_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--encoder-set", "n_layer=2", "--onnx", "off", "--nemo", "off"]) == 2
    err = capsys.readouterr().err
    assert "--encoder-set 'n_layer=2'" in err and "n_layers" in err
