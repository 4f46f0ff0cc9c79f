"""RNNT / TDT heads and the greedy decoder: keys, teacher forcing, reference parity, chunk invariance.

The reference decoders below are written straight from nemo-reference.md §7.4 (frame loop) and §7.5
(label loop) for one utterance at a time, independent of the batched implementation.
"""

from __future__ import annotations

import random
from dataclasses import fields

import pytest
import torch
from torch import Tensor

from streamer.asr.config import TransducerConfig
from streamer.asr.hypothesis import TokenSpan
from streamer.asr.state import select, stack, unstack
from streamer.asr.transducer import (
    GreedyTransducerDecoder,
    RNNTDecoder,
    RNNTJoint,
    TransducerState,
)

TDT_DURATIONS = (0, 1, 2, 3, 4)
ENC_DIM = 8
Token = tuple[int, int, int, float, float]  # id, frame, duration, logprob, confidence


def make_greedy(
    durations: tuple[int, ...] = TDT_DURATIONS,
    seed: int = 0,
    vocab: int = 6,
    max_symbols: int = 10,
    blank_bias: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> GreedyTransducerDecoder:
    """Tiny seeded heads whose joint output is scaled up so that decisions vary from frame to frame."""
    cfg = TransducerConfig(
        vocab_size=vocab,
        pred_hidden=8,
        pred_rnn_layers=2,
        joint_hidden=12,
        joint_dropout_layer=True,
        durations=durations,
        max_symbols=max_symbols,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        decoder, joint = RNNTDecoder(cfg), RNNTJoint(cfg, ENC_DIM)
    with torch.no_grad():
        out = joint.joint_net[-1]
        out.weight.mul_(4.0)
        # RNNT labels do not advance, so it needs more blank to get about one label per frame.
        out.bias[cfg.blank_id] += blank_bias if blank_bias is not None else (1.5 if durations else 4.0)
    return GreedyTransducerDecoder(decoder.to(dtype).eval(), joint.to(dtype).eval())


def random_enc(batch: int, frames: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, ENC_DIM, generator=gen, dtype=dtype) * 2.0  # (B, T, D)


@torch.no_grad()
def reference_decode(greedy: GreedyTransducerDecoder, enc: Tensor) -> tuple[list[Token], int]:
    """Decode one utterance ``enc (T, D)`` by the §7.4 / §7.5 pseudo-code; returns tokens and time jump."""
    cfg, decoder, joint = greedy.cfg, greedy.decoder, greedy.joint
    blank, frames = cfg.blank_id, enc.shape[0]
    h, c = decoder.zero_state(1)
    y, h, c = decoder.predict(torch.tensor([blank]), h, c)  # SOS

    def decide(t: int) -> tuple[int, int, float, float]:
        logits = joint.joint_net(joint.enc(enc[t]) + joint.pred(y[0]))
        logp = logits.log_softmax(-1)
        k = int(logp[: blank + 1].argmax())
        d = cfg.durations[int(logp[blank + 1 :].argmax())] if cfg.is_tdt else 1
        if k == blank and d == 0:
            d = 1
        return k, d, float(logp[k]), float(logits[: blank + 1].softmax(-1)[k])

    tokens: list[Token] = []
    if not cfg.is_tdt:  # §7.4 frame loop
        for t in range(frames):
            for _ in range(cfg.max_symbols):
                k, _d, lp, conf = decide(t)
                if k == blank:
                    break
                tokens.append((k, t, 1, lp, conf))
                y, h, c = decoder.predict(torch.tensor([k]), h, c)
        return tokens, 0
    t = 0  # §7.5 label loop
    while t < frames:
        k, d, lp, conf = decide(t)
        t_label, t = t, t + d
        while k == blank and t < frames:
            k, d, lp, conf = decide(t)
            t_label, t = t, t + d
        if k != blank:
            tokens.append((k, t_label, d, lp, conf))
            y, h, c = decoder.predict(torch.tensor([k]), h, c)
            if d == 0 and sum(tok[1] == t_label for tok in tokens) >= cfg.max_symbols:
                t += 1
    return tokens, t - frames


def as_tokens(span: TokenSpan) -> list[Token]:
    return list(
        zip(
            span.token_ids,
            span.token_frames,
            span.token_durations,
            span.token_logprobs,
            span.token_confidences,
            strict=True,
        )
    )


def assert_same_tokens(got: list[Token], want: list[Token], tol: float = 1e-9) -> None:
    assert [tok[:3] for tok in got] == [tok[:3] for tok in want]
    for g, w in zip(got, want, strict=True):
        assert g[3] == pytest.approx(w[3], abs=tol) and g[4] == pytest.approx(w[4], abs=tol)


def decode_in_chunks(
    greedy: GreedyTransducerDecoder, enc: Tensor, lengths: list[int], rng: random.Random, sizes: list[int]
) -> tuple[list[TokenSpan], TransducerState]:
    """Feed every stream in chunks whose size is drawn from ``sizes`` per stream and per call.

    Each call batches all streams; a stream may get fewer frames than the others (ragged) or none, and
    the padding is filled with noise, which must be ignored.
    """
    batch = enc.shape[0]
    state = greedy.init_state(batch)
    pos = [0] * batch
    spans = [TokenSpan() for _ in range(batch)]
    while any(p < n for p, n in zip(pos, lengths, strict=True)):
        take = [min(rng.choice(sizes), n - p) for p, n in zip(pos, lengths, strict=True)]
        width = max(take)
        chunk = torch.randn(batch, width, ENC_DIM, dtype=enc.dtype) * 50.0  # padding noise
        for b in range(batch):
            chunk[b, : take[b]] = enc[b, pos[b] : pos[b] + take[b]]
        new, state = greedy.step(chunk, torch.tensor(take), state)
        spans = [s + n for s, n in zip(spans, new, strict=True)]
        pos = [p + k for p, k in zip(pos, take, strict=True)]
    return spans, state


# --- modules -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [True, False])
def test_state_dict_keys_match_nemo(dropout: bool) -> None:
    """Parameter names and shapes are NeMo's, with the joint output layer at joint_net.2 or .1."""
    cfg = TransducerConfig(vocab_size=6, pred_hidden=8, pred_rnn_layers=2, joint_hidden=12,
                           joint_dropout_layer=dropout, durations=TDT_DURATIONS)  # fmt: skip
    dec = {k: tuple(v.shape) for k, v in RNNTDecoder(cfg).state_dict().items()}
    lstm = {f"prediction.dec_rnn.lstm.{w}_{kind}_l{k}": (32, 8) if w == "weight" else (32,)
            for k in range(2) for w in ("weight", "bias") for kind in ("ih", "hh")}  # fmt: skip
    assert dec == {"prediction.embed.weight": (7, 8), **lstm}
    out = "joint_net.2" if dropout else "joint_net.1"
    joint = {k: tuple(v.shape) for k, v in RNNTJoint(cfg, ENC_DIM).state_dict().items()}
    assert joint == {
        "enc.weight": (12, ENC_DIM), "enc.bias": (12,), "pred.weight": (12, 8), "pred.bias": (12,),
        f"{out}.weight": (12, 12), f"{out}.bias": (12,),
    }  # fmt: skip


def test_blank_embeds_to_zero_and_sos_state() -> None:
    """Blank is the zero SOS vector; a fresh state is the prediction network's answer to it."""
    greedy = make_greedy()
    assert torch.count_nonzero(greedy.decoder.prediction.embed.weight[greedy.cfg.blank_id]) == 0
    state = greedy.init_state(3)
    h, c = greedy.decoder.zero_state(3)
    y, h, c = greedy.decoder.predict(torch.full((3,), greedy.cfg.blank_id), h, c)
    torch.testing.assert_close(state.h, h)
    torch.testing.assert_close(state.g, greedy.joint.project_prednet(y))
    assert state.last_label.tolist() == [6, 6, 6] and state.time_jump.tolist() == [0, 0, 0]


def test_teacher_forced_paths_match_step_by_step() -> None:
    """forward(targets) prepends SOS and equals predict() step by step; joint() equals the pointwise joint."""
    greedy = make_greedy()
    dec, joint = greedy.decoder, greedy.joint
    targets = torch.tensor([[1, 4, 0, 2], [3, 3, 5, 6]])  # second row padded with blank
    pred = dec(targets)  # (B, U+1, P)
    assert pred.shape == (2, 5, 8)
    h, c = dec.zero_state(2)
    y, h, c = dec.predict(torch.full((2,), 6), h, c)
    steps = [y]
    for u in range(4):
        y, h, c = dec.predict(targets[:, u], h, c)
        steps.append(y)
    torch.testing.assert_close(pred, torch.stack(steps, dim=1))
    enc = random_enc(2, 3, seed=1)
    logits = joint(enc, pred)
    assert logits.shape == (2, 3, 5, 12)
    want = joint.joint_after_projection(joint.project_encoder(enc[1, 2]), joint.project_prednet(pred[1, 4]))
    torch.testing.assert_close(logits[1, 2, 4], want)


def test_state_stack_unstack_roundtrip() -> None:
    """unstack(stack(xs)) == xs for decoder states, including after decoding."""
    greedy = make_greedy()
    _, state = greedy.step(random_enc(3, 5, seed=2), torch.tensor([5, 3, 0]), greedy.init_state(3))
    parts = unstack(state)
    assert len(parts) == 3 and parts[1].h.shape == (2, 1, 8)
    for f in fields(state):
        torch.testing.assert_close(getattr(stack(parts), f.name), getattr(state, f.name))


# --- parity with the reference -------------------------------------------------------------------------


@pytest.mark.parametrize("durations", [TDT_DURATIONS, ()], ids=["tdt", "rnnt"])
def test_batched_decoder_matches_reference(durations: tuple[int, ...]) -> None:
    """One batched call equals the per-utterance reference on many random models and inputs."""
    for seed in range(12):
        greedy = make_greedy(durations, seed=seed, max_symbols=3 if seed % 3 == 0 else 10)
        lengths = [17, 1, 9, 0, 23]
        enc = random_enc(len(lengths), max(lengths), seed=100 + seed)
        spans, state = greedy.step(enc, torch.tensor(lengths), greedy.init_state(len(lengths)))
        for b, n in enumerate(lengths):
            want, jump = reference_decode(greedy, enc[b, :n])
            assert_same_tokens(as_tokens(spans[b]), want)
            assert int(state.time_jump[b]) == jump
            assert float(state.score[b]) == pytest.approx(sum(tok[3] for tok in want), abs=1e-9)
        assert state.frames_done.tolist() == lengths


def test_tdt_random_cases_exercise_corner_cases() -> None:
    """The random TDT models produce multi-token frames (d = 0), overshoots and hit max_symbols."""
    multi, zero, overshoot, capped = 0, 0, 0, 0
    for seed in range(12):
        greedy = make_greedy(seed=seed, max_symbols=3 if seed % 3 == 0 else 10)
        enc = random_enc(1, 40, seed=100 + seed)[0]
        tokens, jump = reference_decode(greedy, enc)
        frames = [tok[1] for tok in tokens]
        multi += sum(frames.count(f) > 1 for f in set(frames))
        zero += sum(tok[2] == 0 for tok in tokens)
        capped += sum(frames.count(f) == greedy.cfg.max_symbols for f in set(frames))
        overshoot += jump > 0
    assert multi > 5 and zero > 10 and capped > 0 and overshoot > 0


# --- chunking and batching -----------------------------------------------------------------------------


@pytest.mark.parametrize("durations", [TDT_DURATIONS, ()], ids=["tdt", "rnnt"])
@pytest.mark.parametrize("sizes", [[1], [2], [7], [1, 2, 3, 5], [0, 1, 4, 9]], ids=str)
def test_chunked_decoding_equals_one_call(durations: tuple[int, ...], sizes: list[int]) -> None:
    """Any chunk split (uniform or ragged per stream, with empty chunks) gives the one-call result."""
    lengths = [31, 12, 1, 25]
    for seed in range(3):
        greedy = make_greedy(durations, seed=seed, max_symbols=2 if seed == 2 else 10)
        enc = random_enc(len(lengths), max(lengths), seed=200 + seed)
        whole, whole_state = greedy.step(enc, torch.tensor(lengths), greedy.init_state(len(lengths)))
        rng = random.Random(seed)
        chunked, state = decode_in_chunks(greedy, enc, lengths, rng, sizes)
        for got, want in zip(chunked, whole, strict=True):
            assert_same_tokens(as_tokens(got), as_tokens(want))
        for f in fields(state):
            torch.testing.assert_close(getattr(state, f.name), getattr(whole_state, f.name))


def test_tdt_time_jump_crosses_chunk_boundaries() -> None:
    """With 1-frame chunks the TDT state carries a positive time jump at some point."""
    greedy = make_greedy(seed=1)
    enc = random_enc(1, 30, seed=3)
    state, jumps = greedy.init_state(1), []
    for t in range(30):
        _, state = greedy.step(enc[:, t : t + 1], torch.tensor([1]), state)
        jumps.append(int(state.time_jump[0]))
    assert max(jumps) > 0


@pytest.mark.parametrize("durations", [TDT_DURATIONS, ()], ids=["tdt", "rnnt"])
def test_streams_joining_and_leaving_batches(durations: tuple[int, ...]) -> None:
    """Streams decoded in changing batch compositions (stack/select/unstack) match solo one-call decoding."""
    greedy = make_greedy(durations, seed=4)
    lengths = [20, 33, 7, 26, 14]
    enc = random_enc(len(lengths), max(lengths), seed=5)
    states = unstack(greedy.init_state(len(lengths)))
    pos, spans = [0] * len(lengths), [TokenSpan() for _ in lengths]
    rng = random.Random(7)
    while any(p < n for p, n in zip(pos, lengths, strict=True)):
        members = [b for b in range(len(lengths)) if pos[b] < lengths[b] and rng.random() < 0.7]
        if not members:
            continue
        take = [min(rng.choice([1, 2, 3, 7]), lengths[b] - pos[b]) for b in members]
        chunk = torch.zeros(len(members), max(take), ENC_DIM, dtype=enc.dtype)
        for i, b in enumerate(members):
            chunk[i, : take[i]] = enc[b, pos[b] : pos[b] + take[i]]
        batched = stack([states[b] for b in members])
        if len(members) > 1:  # exercise select() too: reverse the rows and undo it
            order = list(range(len(members)))[::-1]
            batched = select(select(batched, order), order)
        new, batched = greedy.step(chunk, torch.tensor(take), batched)
        for i, b in enumerate(members):
            states[b] = unstack(batched)[i]
            spans[b] = spans[b] + new[i]
            pos[b] += take[i]
    for b, n in enumerate(lengths):
        want, _ = reference_decode(greedy, enc[b, :n])
        assert_same_tokens(as_tokens(spans[b]), want)


def test_float32_chunked_equals_one_call() -> None:
    """The production dtype gives the same tokens chunked and in one call."""
    greedy = make_greedy(seed=6, dtype=torch.float32)
    lengths = [40, 29]
    enc = random_enc(2, 40, seed=8, dtype=torch.float32)
    whole, _ = greedy.step(enc, torch.tensor(lengths), greedy.init_state(2))
    chunked, _ = decode_in_chunks(greedy, enc, lengths, random.Random(0), [1, 2, 7])
    for got, want in zip(chunked, whole, strict=True):
        assert_same_tokens(as_tokens(got), as_tokens(want), tol=1e-5)


def test_empty_chunk_keeps_state() -> None:
    """A (B, 0, D) chunk emits nothing and leaves the state as it was."""
    greedy = make_greedy()
    state = greedy.init_state(2)
    spans, new = greedy.step(torch.zeros(2, 0, ENC_DIM, dtype=torch.float64), torch.tensor([0, 0]), state)
    assert spans == [TokenSpan(), TokenSpan()]
    for f in fields(state):
        torch.testing.assert_close(getattr(new, f.name), getattr(state, f.name))


# --- scripted joints: exact corner cases ---------------------------------------------------------------

# Frame codes for the scripted joint: "b"/"t" = blank / token 0, then the duration *index*.
_CODES = {"b": 0, "t": 1}


def scripted_greedy(durations: tuple[int, ...], max_symbols: int) -> GreedyTransducerDecoder:
    """Heads whose decisions depend only on the frame: feature 0 -> blank, 1 -> token 0, 2+i -> duration i.

    The prediction network is ignored (pred projection zero), so a label with duration 0 repeats on the
    same frame until max_symbols forces a move.
    """
    n = 2 + len(durations)
    cfg = TransducerConfig(vocab_size=3, pred_hidden=4, pred_rnn_layers=1, joint_hidden=n,
                           durations=durations, max_symbols=max_symbols)  # fmt: skip
    decoder, joint = RNNTDecoder(cfg), RNNTJoint(cfg, n)
    with torch.no_grad():
        joint.enc.weight.copy_(torch.eye(n))
        joint.enc.bias.zero_()
        joint.pred.weight.zero_()
        joint.pred.bias.zero_()
        out = joint.joint_net[-1]
        out.weight.zero_()
        out.bias.zero_()
        out.weight[cfg.blank_id, 0] = 10.0
        out.weight[0, 1] = 10.0
        for i in range(len(durations)):
            out.weight[cfg.blank_id + 1 + i, 2 + i] = 10.0
    return GreedyTransducerDecoder(decoder.eval(), joint.eval())


def scripted_enc(codes: str, durations: tuple[int, ...]) -> Tensor:
    """``"b1 t0 t4"`` -> ``(1, T, 2 + N)``: blank with duration index 1, token with index 0, token index 4."""
    rows = []
    for code in codes.split():
        row = torch.zeros(2 + len(durations))
        row[_CODES[code[0]]] = 1.0
        if durations:
            row[2 + int(code[1:])] = 1.0
        rows.append(row)
    return torch.stack(rows)[None]


def decode_scripted(greedy: GreedyTransducerDecoder, enc: Tensor, step: int) -> tuple[TokenSpan, Tensor]:
    state, span = greedy.init_state(1), TokenSpan()
    for start in range(0, enc.shape[1], step):
        chunk = enc[:, start : start + step]
        new, state = greedy.step(chunk, torch.tensor([chunk.shape[1]]), state)
        span = span + new[0]
    return span, state.time_jump


@pytest.mark.parametrize("step", [1, 2, 3, 100])
def test_tdt_max_symbols_then_advance(step: int) -> None:
    """A token that always comes with duration 0 is emitted exactly max_symbols times per frame."""
    greedy = scripted_greedy(TDT_DURATIONS, max_symbols=4)
    span, jump = decode_scripted(greedy, scripted_enc("t0 t0 t0", TDT_DURATIONS), step)
    assert span.token_ids == (0,) * 12
    assert span.token_frames == (0,) * 4 + (1,) * 4 + (2,) * 4
    assert span.token_durations == (0,) * 12 and int(jump) == 0


@pytest.mark.parametrize("step", [1, 2, 3, 100])
def test_rnnt_max_symbols_then_advance(step: int) -> None:
    """RNNT: a token that always wins is emitted max_symbols times per frame, then the frame is left."""
    greedy = scripted_greedy((), max_symbols=3)
    span, jump = decode_scripted(greedy, scripted_enc("t t b t", ()), step)
    assert span.token_frames == (0, 0, 0, 1, 1, 1, 3, 3, 3)
    assert span.token_durations == (1,) * 9 and int(jump) == 0


@pytest.mark.parametrize("step", [1, 2, 3, 100])
def test_tdt_blank_with_duration_zero_advances_one_frame(step: int) -> None:
    """Blank + duration 0 moves exactly one frame, so a token on the next frame is not skipped."""
    greedy = scripted_greedy(TDT_DURATIONS, max_symbols=10)
    span, jump = decode_scripted(greedy, scripted_enc("b0 b0 t1 b0 t1 b0", TDT_DURATIONS), step)
    assert span.token_frames == (2, 4) and span.token_durations == (1, 1) and int(jump) == 0


@pytest.mark.parametrize("step", [1, 2, 3, 100])
def test_tdt_durations_skip_frames_across_chunks(step: int) -> None:
    """A duration jumps over frames (their tokens are never seen) and overshoots into the next chunk."""
    greedy = scripted_greedy(TDT_DURATIONS, max_symbols=10)
    #                    0  1  2  3  4  5  6  7  8   frame 0 jumps to 4, frame 4 (blank, 3) to 7, 7 to 11
    codes = "t4 t1 t1 t1 b3 t1 t1 t4 t1"
    span, jump = decode_scripted(greedy, scripted_enc(codes, TDT_DURATIONS), step)
    assert span.token_frames == (0, 7) and span.token_durations == (4, 4)
    assert int(jump) == 11 - 9
