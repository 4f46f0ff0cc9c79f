"""model.device and model.dtype: what is refused (with what message) before a model loads, and what half
precision changes. The CUDA cases run only where torch sees a GPU (``-m gpu``); the rest run everywhere."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from streamer.asr.model import AsrModel
from streamer.asr.precision import check_device, check_dtype, encoder_dtype, to_precision
from streamer.cli import main
from streamer.engine.cuda_graphs import BucketedEncoder
from streamer.engine.factory import load_model, load_recognizer
from streamer.engine.recognizer import Recognizer, transcribe_offline, transcribe_streaming
from streamer.errors import ConfigError
from streamer.settings import EngineSettings, ModelSettings, load_settings

has_cuda = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not has_cuda, reason="needs a CUDA GPU")
cpu_only = pytest.mark.skipif(has_cuda, reason="checks the refusal on a machine without CUDA")


@pytest.fixture(scope="module")
def model() -> AsrModel:
    from tests.tiny import tiny_model

    return tiny_model()


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("bad", ["gpu", "cuda0", "cuda:", "cuda:x", "mps", "cpu:0", ""])
def test_a_malformed_device_is_refused_by_the_settings(bad: str) -> None:
    with pytest.raises(ConfigError, match="model.device.*use cpu, cuda or cuda:N"):
        load_settings(None, {"model": {"device": bad}})


def test_the_settings_take_cpu_cuda_and_an_index_and_the_three_dtypes() -> None:
    for device in ("cpu", "cuda", "cuda:1"):
        assert load_settings(None, {"model": {"device": device}}).model.device == device
    for dtype in ("float32", "float16", "bfloat16"):
        assert load_settings(None, {"model": {"dtype": dtype}}).model.dtype == dtype
    with pytest.raises(ConfigError, match="model.dtype"):
        load_settings(None, {"model": {"dtype": "int8"}})
    defaults = load_settings(None, {})
    assert (defaults.model.device, defaults.model.dtype, defaults.engine.cuda_graphs) == ("cpu", "float32", True)


@cpu_only
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_says_what_to_do(device: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_device(device)
    message = str(info.value)
    assert f"model.device={device}" in message and torch.__version__ in message
    assert "CUDA build of torch" in message and "model.device=cpu" in message


def test_half_precision_on_the_cpu_is_refused() -> None:
    for name in ("float16", "bfloat16"):
        with pytest.raises(ConfigError, match=f"model.dtype={name} runs on CUDA GPUs only"):
            check_dtype(name, torch.device("cpu"))
    assert check_dtype("float32", torch.device("cpu")) is torch.float32
    with pytest.raises(ConfigError, match="not one of"):
        check_dtype("float64", torch.device("cpu"))


def test_the_checks_run_before_the_model_loads(tmp_path: Path) -> None:
    """A spec that names nothing would fail to load; the dtype refusal comes first, so no minute is wasted."""
    missing = str(tmp_path / "no-such-model.nemo")
    with pytest.raises(ConfigError, match="model.dtype=float16"):
        load_model(ModelSettings(spec=missing, dtype="float16"))
    if not has_cuda:
        with pytest.raises(ConfigError, match="model.device=cuda"):
            load_recognizer(ModelSettings(spec=missing, device="cuda"))


@cpu_only
def test_transcribe_refuses_cuda_in_one_line(capsys, tiny_nemo: Path, speech_wav: Path) -> None:
    assert main(["transcribe", "--model", str(tiny_nemo), "--device", "cuda", str(speech_wav)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "built without CUDA" in err[0] and "Traceback" not in err[0]
    assert main(["transcribe", "--model", str(tiny_nemo), "--dtype", "bfloat16", str(speech_wav)]) == 2
    assert "model.dtype=bfloat16 runs on CUDA GPUs only" in capsys.readouterr().err


def test_cpu_recognizers_have_no_graph_runner(tiny_nemo: Path) -> None:
    """engine.cuda_graphs is ignored on the CPU: the plain step runs, as before."""
    rec = load_recognizer(ModelSettings(spec=str(tiny_nemo)), EngineSettings(cuda_graphs=True, max_batch=64))
    assert rec.runner is None and rec.device.type == "cpu"


# ---------------------------------------------------------------- half precision (bfloat16 runs on any CPU, slowly)


def test_to_precision_casts_the_encoder_only_and_keeps_float32_at_its_edges(model: AsrModel, speech_wav) -> None:
    """The hooks let every caller pass and get float32; the decoders keep float32 weights. bfloat16 stands in
    for the GPU dtypes here (the CPU computes it, slowly; the settings refuse it on the CPU)."""
    from streamer.audio.io import load_audio

    half = to_precision(copy.deepcopy(model), torch.bfloat16)
    assert encoder_dtype(half) is torch.bfloat16
    assert all(p.dtype is torch.float32 for name, p in half.named_parameters() if not name.startswith("encoder."))
    mel = torch.randn(1, 80, 200, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, want_len = model.encoder(mel, torch.tensor([200]), (70, 1))
        got, got_len = half.encoder(mel, torch.tensor([200]), (70, 1))
    assert got.dtype is torch.float32 and torch.equal(got_len, want_len)
    assert not torch.equal(got, want)  # it did compute in bfloat16 ...
    torch.testing.assert_close(got, want, rtol=0.1, atol=0.1)  # ... and stays close to float32
    audio = load_audio(speech_wav)
    offline = transcribe_offline(half, audio, "tdt", (70, 1))
    streaming = transcribe_streaming(half, audio, "tdt", (70, 1))
    assert offline.token_ids and streaming.token_ids  # both paths run end to end in bfloat16


def test_the_bucketed_runner_runs_a_half_precision_encoder(model: AsrModel) -> None:
    """float32 mel in, the encoder's dtype inside, float32 out, states in the encoder's dtype."""
    half = to_precision(copy.deepcopy(model), torch.bfloat16)
    streaming = half.encoder.streaming((70, 1))
    runner = BucketedEncoder(streaming, max_batch=4, use_graphs=False)
    state = streaming.init_state(3)
    n_new = streaming.chunk_frames(state)
    mel = torch.randn(3, 80, streaming.chunk_mel_frames, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out, out_len, new_state = runner.step(mel, n_new, [state])
        plain = Recognizer(half, (70, 1))
        assert plain.runner is None
    assert out.dtype is torch.float32 and new_state.attn_k.dtype is torch.bfloat16 and out_len.tolist() == [2, 2, 2]


# ---------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("graphs", [True, False])
def test_streaming_on_cuda_gives_the_cpu_tokens(model: AsrModel, speech_wav, graphs: bool) -> None:
    from streamer.audio.io import load_audio

    audio = load_audio(speech_wav)
    want = transcribe_streaming(model, audio, "tdt", (70, 1))
    gpu = to_precision(copy.deepcopy(model).to_device("cuda"), torch.float32)  # float32 without TF32
    rec = Recognizer(gpu, (70, 1), "tdt", cuda_graphs=graphs, max_batch=4)  # type: ignore[arg-type]
    assert (rec.runner is not None) == graphs
    stream = rec.create_stream()
    for i in range(0, len(audio), 1600):
        stream.accept_waveform(audio[i : i + 1600])
        while stream.is_ready:
            rec.step([stream])
    stream.input_finished()
    rec.run_to_end([stream])
    assert stream.tokens.token_ids == want.token_ids and stream.tokens.token_frames == want.token_frames


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_cuda_loads_and_recognizes(tiny_nemo: Path, speech_wav: Path, dtype: str) -> None:
    from streamer.audio.io import load_audio

    rec = load_recognizer(ModelSettings(spec=str(tiny_nemo), device="cuda", dtype=dtype))
    assert rec.runner is not None and rec.streaming.dtype is getattr(torch, dtype)
    stream = rec.create_stream()
    stream.accept_waveform(load_audio(speech_wav))
    stream.input_finished()
    rec.run_to_end([stream])
    assert stream.tokens.token_ids


# ---------------------------------------------------------------- streamer bench's device rows, run on the CPU


@pytest.mark.parametrize("graphs", [True, False])
def test_bench_device_rows_time_the_bucketed_and_the_plain_step(model: AsrModel, graphs: bool) -> None:
    """The measurement behind ``streamer bench --device cuda``, on the CPU: with graphs asked for it runs the
    bucketed step without capture, and the decoder row calibrates the joint and decodes every step."""
    from streamer.bench_gpu import measure_device

    enc = copy.deepcopy(model.encoder)
    greedy = copy.deepcopy(model).greedy_decoder("tdt")
    for dec in (None, greedy):
        r = measure_device(enc, dec, 123, (70, 1), 3, steps=2, warmup=1, dtype_name="float32", graphs=graphs)
        assert r["impl"] == ("streamer/buckets" if graphs else "streamer/eager")
        assert r["scope"] == ("encoder" if dec is None else "encoder+tdt")
        assert len(r["times"]) == 2 and all(t > 0 for t in r["times"]) and r["streams"] == 3


def test_bench_device_loop_emits_rows_with_their_device() -> None:
    """``cuda_rows`` (what ``streamer bench --device cuda`` runs) driven on the CPU for one tiny row; the table
    gains a device column as soon as a row is not on the CPU."""
    import argparse

    from streamer.bench import format_table, row_of
    from streamer.bench_gpu import cuda_rows

    args = argparse.Namespace(device="cpu", no_decoder=True, steps=1, warmup=1, tokens_per_s=4.0)
    rows = [row_of(r) for r in cuda_rows(args, [(70, 1)], [1], ["float32"], [True])]
    (row,) = rows
    assert (row.device, row.impl, row.streams, row.dtype) == ("cpu", "streamer/buckets", 1, "float32")
    assert row.p50_ms > 0 and row.params_m > 100  # the 114M configuration's encoder
    assert "device" not in format_table(rows).splitlines()[0]
    row.device = "cuda:0"
    assert format_table(rows).splitlines()[0].split(" | ")[1].strip() == "device"
    with pytest.raises(ConfigError, match="--dtypes int8"):
        next(cuda_rows(args, [(70, 1)], [1], ["int8"], [True]))
