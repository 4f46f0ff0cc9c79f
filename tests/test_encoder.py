"""FastConformer encoder: chunked cache-aware streaming equals the offline forward under the same mask."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from streamer.asr.config import EncoderConfig
from streamer.asr.encoder import FastConformerEncoder
from streamer.asr.state import stack, unstack
from streamer.asr.subsampling import subsampled_length

CONTEXTS = ((70, 13), (70, 6), (70, 1), (70, 0))


def make_encoder(**overrides) -> FastConformerEncoder:
    """A tiny seeded encoder whose norms and position biases are random too (NeMo inits them to constants)."""
    settings = dict(
        feat_in=16,
        n_layers=2,
        d_model=32,
        n_heads=4,
        subsampling_conv_channels=8,
        att_context_sizes=CONTEXTS,
        conv_context_size=(8, 0),
    )
    cfg = EncoderConfig(**(settings | overrides))
    torch.manual_seed(0)
    enc = FastConformerEncoder(cfg)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "norm" in name or "pos_bias" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.1)
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    return enc.eval()


def stream_encode(enc, mel: torch.Tensor, ctx, batch_rows=None) -> torch.Tensor:
    """Feed one utterance [F, T] chunk by chunk (flushing the tail) and concatenate the valid outputs."""
    streaming = enc.streaming(ctx)
    state = streaming.init_state(1)
    pieces, pos, total = [], 0, mel.size(1)
    while pos < total:
        need = int(streaming.chunk_frames(state)[0])
        n = min(need, total - pos)
        out, out_len, state = streaming.step(mel[None, :, pos : pos + n], torch.tensor([n]), state)
        pieces.append(out[0, : int(out_len[0])])
        pos += n
    return torch.cat(pieces)


@pytest.mark.parametrize("ctx", CONTEXTS)
@pytest.mark.parametrize("frames", [1, 8, 9, 17, 100, 201, 333])
def test_streaming_equals_offline(ctx, frames) -> None:
    """Every look-ahead, including 0, and any tail length: streamed frames equal the offline forward."""
    enc = make_encoder()
    mel = torch.randn(16, frames, generator=torch.Generator().manual_seed(frames))
    with torch.inference_mode():
        expected, length = enc(mel[None], torch.tensor([frames]), ctx)
        got = stream_encode(enc, mel, ctx)
    assert got.shape[0] == int(length[0]) == int(subsampled_length(frames, 8, True))
    torch.testing.assert_close(got, expected[0, : int(length[0])], rtol=1e-5, atol=1e-5)


def test_streaming_equals_offline_batch_norm_no_bias_no_xscaling() -> None:
    """The other layer variants stream exactly too."""
    enc = make_encoder(conv_norm_type="batch_norm", use_bias=False, xscaling=False)
    mel = torch.randn(16, 250, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        for ctx in CONTEXTS:
            expected, length = enc(mel[None], torch.tensor([250]), ctx)
            torch.testing.assert_close(
                stream_encode(enc, mel, ctx), expected[0, : int(length[0])], rtol=1e-5, atol=1e-5
            )


def test_offline_masks_padding_in_a_batch() -> None:
    """A zero-padded batch gives each utterance the same frames as running it alone."""
    enc = make_encoder()
    a = torch.randn(16, 150, generator=torch.Generator().manual_seed(1))
    b = torch.randn(16, 97, generator=torch.Generator().manual_seed(2))
    batch = torch.zeros(2, 16, 150)
    batch[0], batch[1, :, :97] = a, b
    with torch.inference_mode():
        for ctx in CONTEXTS:
            out, lens = enc(batch, torch.tensor([150, 97]), ctx)
            alone, alone_len = enc(b[None], torch.tensor([97]), ctx)
            assert int(lens[1]) == int(alone_len[0])
            torch.testing.assert_close(out[1, : int(lens[1])], alone[0, : int(alone_len[0])], rtol=1e-5, atol=1e-5)


def test_batched_streams_at_different_fill_levels() -> None:
    """Streams that started at different times, batched into one step, each equal their offline output."""
    enc = make_encoder()
    rng = random.Random(0)
    for ctx in ((70, 1), (70, 0), (70, 6)):
        streaming = enc.streaming(ctx)
        lengths = [rng.randint(30, 400) for _ in range(5)]
        mels = [torch.randn(16, n, generator=torch.Generator().manual_seed(n)) for n in lengths]
        states = [streaming.init_state(1) for _ in mels]
        pos = [0] * len(mels)
        starts = [0, 0, 2, 5, 7]  # step at which each stream joins
        outs: list[list[torch.Tensor]] = [[] for _ in mels]
        step = 0
        with torch.inference_mode():
            while any(p < m.size(1) for p, m in zip(pos, mels, strict=True)):
                active = [i for i, m in enumerate(mels) if step >= starts[i] and pos[i] < m.size(1)]
                rng.shuffle(active)
                if active:
                    needs = [int(streaming.chunk_frames(states[i])[0]) for i in active]
                    ns = [min(nd, mels[i].size(1) - pos[i]) for nd, i in zip(needs, active, strict=True)]
                    chunk = torch.zeros(len(active), 16, max(needs))
                    for row, (i, n) in enumerate(zip(active, ns, strict=True)):
                        chunk[row, :, :n] = mels[i][:, pos[i] : pos[i] + n]
                    out, out_len, st = streaming.step(chunk, torch.tensor(ns), stack([states[i] for i in active]))
                    for row, (i, n, s) in enumerate(zip(active, ns, unstack(st), strict=True)):
                        outs[i].append(out[row, : int(out_len[row])])
                        states[i] = s
                        pos[i] += n
                step += 1
            for i, mel in enumerate(mels):
                expected, length = enc(mel[None], torch.tensor([mel.size(1)]), ctx)
                torch.testing.assert_close(
                    torch.cat(outs[i]), expected[0, : int(length[0])], rtol=1e-5, atol=1e-5
                )


def test_state_stack_unstack_roundtrip() -> None:
    """unstack(stack(xs)) gives back the same tensors."""
    enc = make_encoder()
    streaming = enc.streaming((70, 1))
    states = []
    for seed in range(3):
        st = streaming.init_state(1)
        st = replace(st, attn_k=torch.randn_like(st.attn_k), mel_seen=torch.tensor([seed * 16]))
        states.append(st)
    for a, b in zip(unstack(stack(states)), states, strict=True):
        for name in type(a).BATCH_DIM:
            assert torch.equal(getattr(a, name), getattr(b, name))


def test_symmetric_model_refuses_streaming() -> None:
    """A non-causal model gets a clear error instead of wrong streaming output."""
    from streamer.errors import ConfigError

    enc = make_encoder(causal_downsampling=False, conv_context_size=None, att_context_sizes=((-1, -1),),
                       att_context_style="regular")
    with pytest.raises(ConfigError, match="not a cache-aware streaming model"):
        enc.streaming()


def test_subsampled_lengths_match_nemo_tables() -> None:
    """Output lengths follow NeMo's calc_length (nemo-reference.md §2.2)."""
    t = torch.tensor([1, 2, 7, 8, 9, 15, 16, 17, 100])
    assert subsampled_length(t, 8, False).tolist() == [1, 1, 1, 1, 2, 2, 2, 3, 13]
    assert subsampled_length(t, 8, True).tolist() == [1, 2, 2, 2, 2, 3, 3, 3, 14]


@pytest.mark.parametrize("ctx", CONTEXTS)
def test_streaming_encoder_owns_its_schedule(ctx) -> None:
    """The schedule of nemo-reference.md §5: first chunk 1+8R mel frames, then 8(R+1), R+1 frames out."""
    enc = make_encoder()
    streaming = enc.streaming(ctx)
    left, right = ctx
    assert streaming.att_context_size == ctx
    assert (streaming.first_chunk_mel_frames, streaming.chunk_mel_frames) == (1 + 8 * right, 8 * (right + 1))
    assert (streaming.chunk_encoder_frames, streaming.cache_frames) == (right + 1, left)
    state = streaming.init_state(2)
    assert streaming.chunk_frames(state).tolist() == [1 + 8 * right] * 2
    with torch.inference_mode():
        _, out_len, state = streaming.step(torch.randn(2, 16, 1 + 8 * right), torch.tensor([1 + 8 * right] * 2), state)
    assert out_len.tolist() == [right + 1] * 2
    assert streaming.chunk_frames(state).tolist() == [8 * (right + 1)] * 2
