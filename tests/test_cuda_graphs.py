"""The GPU path's code that runs without a GPU: the fixed-shape encoder step, batch buckets, padding and slicing.

CUDA graphs replay :func:`fixed_shape_step` at fixed batch buckets; here the same "pad to the bucket, run,
slice" path runs on the CPU without capture (``use_graphs=False``), against the plain
:meth:`StreamingEncoder.step`. The ``gpu`` tests at the end repeat the comparison with graphs on CUDA.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from streamer.asr.fixed_step import fixed_shape_step
from streamer.asr.model import AsrModel
from streamer.asr.state import stack, unstack
from streamer.asr.streaming import EncoderState, StreamingEncoder
from streamer.engine.cuda_graphs import BucketedEncoder, bucket_for, bucket_sizes
from streamer.engine.recognizer import Recognizer

CTX = (70, 1)  # 2 encoder frames (16 mel frames) a step; a first chunk takes 1 + 8 = 9
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def model() -> AsrModel:
    from tests.tiny import tiny_model

    return tiny_model()


@pytest.fixture(scope="module")
def streaming(model: AsrModel) -> StreamingEncoder:
    return model.encoder.streaming(CTX)


def chunk(streaming: StreamingEncoder, n_new: torch.Tensor, seed: int) -> torch.Tensor:
    """(B, F, M) random mel frames, zero past each stream's ``n_new`` (as the recognizer lays them out)."""
    mel = torch.randn(len(n_new), streaming.cfg.feat_in, streaming.chunk_mel_frames,
                      generator=torch.Generator().manual_seed(seed))
    for i, n in enumerate(n_new.tolist()):
        mel[i, :, n:] = 0.0
    return mel


def mixed_state(streaming: StreamingEncoder, batch: int, steps: int) -> EncoderState:
    """``batch`` streams after ``steps`` full steps, except stream 1, which is fresh (its next chunk is a first)."""
    state = streaming.init_state(batch)
    with torch.inference_mode():
        for k in range(steps):
            need = streaming.chunk_frames(state)
            _, _, state = streaming.step(chunk(streaming, need, 100 + k).to(streaming.device), need, state)
    rows = unstack(state)
    rows[1] = streaming.init_state(1)
    return stack(rows)


def assert_states_close(a: EncoderState, b: EncoderState) -> None:
    for name in EncoderState.BATCH_DIM:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), **TOL, msg=name)


# ---------------------------------------------------------------- buckets


def test_bucket_sizes_are_powers_of_two_up_to_the_first_that_holds_max_batch() -> None:
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(5) == (1, 2, 4, 8)  # 4 < 5 <= 8
    assert bucket_sizes(8) == (1, 2, 4, 8)
    assert bucket_sizes(1000)[-1] == 1024 and len(bucket_sizes(1000)) == 11
    with pytest.raises(ValueError):
        bucket_sizes(0)


def test_bucket_for_picks_the_smallest_bucket_that_holds_the_batch() -> None:
    buckets = bucket_sizes(16)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 4, 5, 9, 16)] == [1, 2, 4, 4, 8, 16, 16]
    for bad in (0, 17):
        with pytest.raises(ValueError, match="no bucket"):
            bucket_for(bad, buckets)


# ---------------------------------------------------------------- the fixed-shape step


def test_fixed_shape_step_equals_the_plain_step_for_first_later_and_flushing_chunks(
    streaming: StreamingEncoder,
) -> None:
    """One batch holding a continuing stream, a fresh one (first chunk), and one flushing a short last chunk."""
    state = mixed_state(streaming, 4, steps=3)
    n_new = streaming.chunk_frames(state).clone()
    assert n_new.tolist() == [16, 9, 16, 16]
    n_new[2] = 5  # stream 2 flushes its last 5 mel frames
    mel = chunk(streaming, n_new, 7)
    with torch.inference_mode():
        want = streaming.step(mel[:, :, : int(n_new.max())], n_new, state)
        got = fixed_shape_step(streaming, mel, n_new, state)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], **TOL)
    assert_states_close(got[2], want[2])


def test_fixed_shape_step_never_reads_a_tensor_on_the_host(model: AsrModel) -> None:
    """A CUDA graph capture refuses host syncs. On the meta device (shapes, no data) any ``bool(t)`` or
    ``t.item()`` raises; the plain step has such reads (its shortcuts), the fixed-shape step has none."""
    meta = copy.deepcopy(model.encoder).to("meta").streaming(CTX)
    state = meta.init_state(4)
    mel = torch.zeros(4, meta.cfg.feat_in, meta.chunk_mel_frames, device="meta")
    n_new = torch.zeros(4, dtype=torch.long, device="meta")
    with torch.inference_mode():
        out, out_len, new_state = fixed_shape_step(meta, mel, n_new, state)
        assert out.shape == (4, CTX[1] + 1, model.config.encoder.d_model) and out_len.shape == (4,)
        assert new_state.attn_k.shape == state.attn_k.shape
        with pytest.raises(RuntimeError, match="meta"):
            meta.step(mel, n_new, state)


# ---------------------------------------------------------------- padding to a bucket, slicing back


def test_a_padded_bucket_gives_the_unpadded_results_step_after_step(streaming: StreamingEncoder) -> None:
    """3 streams run in the 4-row bucket for several steps (state carried) equal 3 streams run unpadded."""
    runner = BucketedEncoder(streaming, max_batch=8, use_graphs=False)
    plain = padded = mixed_state(streaming, 3, steps=2)
    with torch.inference_mode():
        for k in range(4):
            n_new = streaming.chunk_frames(plain)
            mel = chunk(streaming, n_new, 20 + k)
            want = streaming.step(mel[:, :, : int(n_new.max())], n_new, plain)
            got = runner.step(mel, n_new, unstack(padded))
            assert got[0].shape == want[0].shape and got[0].dtype == torch.float32
            assert torch.equal(got[1], want[1])
            torch.testing.assert_close(got[0], want[0], **TOL)
            assert_states_close(got[2], want[2])
            plain, padded = want[2], got[2]
    assert set(runner._buckets) == {4}


def test_padding_rows_never_leak_into_real_rows(streaming: StreamingEncoder) -> None:
    """Whatever the bucket's spare rows hold, NaN included, the real rows' outputs and states are the same."""
    state = mixed_state(streaming, 3, steps=2)
    n_new = streaming.chunk_frames(state)
    mel = chunk(streaming, n_new, 5)
    runs = []
    for poison in (None, float("nan"), 1e4):
        runner = BucketedEncoder(streaming, max_batch=4, use_graphs=False)
        bucket = runner._bucket(4)
        if poison is not None:
            bucket.mel[3].fill_(poison)
            bucket.n_new[3] = streaming.chunk_mel_frames
            for name in ("mel_tail", "attn_k", "attn_v", "conv_tail"):
                select_row = getattr(bucket.state, name).narrow(EncoderState.BATCH_DIM[name], 3, 1)
                select_row.fill_(poison)
            bucket.state.attn_len[3] = streaming.cache_frames
            bucket.state.mel_seen[3] = 1000
        with torch.inference_mode():
            runs.append(runner.step(mel, n_new, [state]))
    clean = runs[0]
    assert all(torch.isfinite(getattr(clean[2], n)).all() for n in ("attn_k", "attn_v", "conv_tail", "mel_tail"))
    for out, out_len, new_state in runs[1:]:
        assert torch.equal(out, clean[0]) and torch.equal(out_len, clean[1])
        for name in EncoderState.BATCH_DIM:
            assert torch.equal(getattr(new_state, name), getattr(clean[2], name)), name


def test_a_batch_above_the_largest_bucket_runs_in_pieces(streaming: StreamingEncoder) -> None:
    runner = BucketedEncoder(streaming, max_batch=2, use_graphs=False)
    state = mixed_state(streaming, 5, steps=1)
    n_new = streaming.chunk_frames(state)
    mel = chunk(streaming, n_new, 9)
    with torch.inference_mode():
        want = streaming.step(mel, n_new, state)
        got = runner.step(mel, n_new, [state])
    assert got[0].shape[0] == 5 and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], **TOL)
    assert_states_close(got[2], want[2])
    assert set(runner._buckets) == {1, 2}  # pieces of 2, 2 and 1


def test_bad_input_is_refused_with_a_reason(streaming: StreamingEncoder) -> None:
    runner = BucketedEncoder(streaming, max_batch=4, use_graphs=False)
    state = streaming.init_state(2)
    wide = torch.zeros(2, streaming.cfg.feat_in, streaming.chunk_mel_frames + 1)
    with pytest.raises(ValueError, match="mel frames"):
        runner.step(wide, torch.tensor([9, 9]), [state])
    with pytest.raises(ValueError, match="mel frames"):
        runner.step(wide[:, :, :9], torch.tensor([9, 12]), [state])
    with pytest.raises(ValueError, match="CUDA"):
        BucketedEncoder(streaming, max_batch=4, use_graphs=True)


def test_the_recognizer_with_the_bucketed_runner_gives_the_same_tokens(model: AsrModel, speech_wav) -> None:
    """The Recognizer's hook (``runner``, set on CUDA) fed streams of different lengths that start at different
    steps: the same tokens and frames as the plain step, stream by stream."""
    from streamer.audio.io import load_audio

    audio = load_audio(speech_wav)
    results = []
    for use_runner in (False, True):
        rec = Recognizer(model, CTX, "tdt")
        if use_runner:
            rec.runner = BucketedEncoder(rec.streaming, max_batch=4, use_graphs=False)
        streams = [rec.create_stream(f"s{i}") for i in range(3)]
        pieces = [audio, audio[: len(audio) * 2 // 3], np.concatenate([audio[::-1], audio])]
        for k in range(0, max(len(p) for p in pieces) + 3200, 1600):
            for i, (stream, samples) in enumerate(zip(streams, pieces, strict=True)):
                start = k - 3200 * i  # stream i starts two steps after stream i - 1
                if 0 <= start < len(samples):
                    stream.accept_waveform(samples[start : start + 1600])
                elif start >= len(samples):
                    stream.input_finished()
            rec.step(streams)
        rec.run_to_end(streams)
        results.append([(s.tokens.token_ids, s.tokens.token_frames) for s in streams])
    assert results[0] == results[1]
    assert all(ids for ids, _ in results[0])  # the tiny model emits something for every stream


# ---------------------------------------------------------------- on a GPU (skipped without one)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replay_equals_the_plain_step_on_cuda(model: AsrModel) -> None:
    from streamer.asr.precision import exact_float32_on_cuda

    exact_float32_on_cuda()
    gpu = copy.deepcopy(model).to_device("cuda").encoder.streaming(CTX)
    runner = BucketedEncoder(gpu, max_batch=8)
    assert runner.use_graphs
    plain = graphed = mixed_state(gpu, 3, steps=2)
    with torch.inference_mode():
        for k in range(3):
            n_new = gpu.chunk_frames(plain).cpu()
            mel = chunk(gpu, n_new, 30 + k)
            want = gpu.step(mel.cuda(), n_new.cuda(), plain)
            got = runner.step(mel, n_new, unstack(graphed))
            assert runner._buckets[4].graph is not None
            torch.testing.assert_close(got[0], want[0], **TOL)
            assert_states_close(got[2], want[2])
            plain, graphed = want[2], got[2]
