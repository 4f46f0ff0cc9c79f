"""The batched engine's bookkeeping gives every stream what it would get alone.

Three speed-ups keep state across steps in shared tensors: a stream's caches stay a row of its last
step's batch (engine/residence.py), each cache grows in place in a buffer with room after it
(asr/growbuffer.py), and features of many streams are computed in one pass (asr/features_many.py).
Each would be wrong in a way a single-stream test cannot see: a row read from the wrong batch, an old
state overwritten by a later step, frames of one stream mixed with another's. These tests mix streams
in changing subsets and orders, branch states, and compare with each stream alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamer.asr.features_many import step_many
from streamer.asr.model import AsrModel
from streamer.engine.recognizer import Recognizer

CTX = (70, 1)


@pytest.fixture(scope="module")
def model() -> AsrModel:
    from tests.tiny import tiny_model

    return tiny_model()


def _audio(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    tone = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) * (1 + np.sin(2 * np.pi * 3 * t))
    return (tone + 0.05 * rng.standard_normal(n)).astype(np.float32)


def test_features_of_many_streams_equal_the_offline_features(model: AsrModel) -> None:
    """Streams at different positions with random piece sizes (0 included), featurized together."""
    feat = model.preprocessor.featurizer
    rng = np.random.default_rng(3)
    audio = [_audio(12000 + 997 * i, seed=i) for i in range(5)]
    pos = [0] * 5
    states = [feat.init_state(1) for _ in audio]
    got: list[list[torch.Tensor]] = [[] for _ in audio]
    while any(p < a.size for p, a in zip(pos, audio, strict=True)):
        chunks = []
        for i, a in enumerate(audio):
            size = int(rng.integers(0, 3000))
            chunks.append(a[pos[i] : pos[i] + size])
            pos[i] += chunks[-1].size
        frames, states = step_many(feat, chunks, states)
        for i, f in enumerate(frames):
            got[i].append(f)
    for i, a in enumerate(audio):
        tail = feat.finish(states[i])
        mine = torch.cat([*got[i], tail], dim=2)
        offline, length = feat(torch.from_numpy(a)[None], torch.tensor([a.size]))
        assert mine.shape == (1, 80, int(length[0]))
        torch.testing.assert_close(mine, offline[:, :, : int(length[0])], rtol=0, atol=1e-6)


def test_streams_in_changing_subsets_equal_each_stream_alone(model: AsrModel) -> None:
    """Rounds over random subsets in random orders, streams joining late: tokens and frames as alone."""
    rec = Recognizer(model, CTX)
    rng = np.random.default_rng(0)
    audio = [_audio(16000 * 3 + 1234 * i, seed=10 + i) for i in range(6)]
    alone = []
    for a in audio:
        s = rec.create_stream()
        s.accept_waveform(a)
        s.input_finished()
        rec.run_to_end([s])
        alone.append(s.transcript())
    streams = [rec.create_stream() for _ in audio]
    pos = [0] * len(audio)
    joined = [i < 3 for i in range(len(audio))]  # the rest join after a few rounds
    for round_ in range(400):
        if round_ == 5:
            joined = [True] * len(audio)
        live = [i for i in range(len(audio)) if joined[i] and not streams[i].flushed]
        if not live:
            break
        for i in live:
            if pos[i] < audio[i].size:
                size = int(rng.integers(800, 4000))
                streams[i].accept_waveform(audio[i][pos[i] : pos[i] + size])
                pos[i] += size
                if pos[i] >= audio[i].size:
                    streams[i].input_finished()
        subset = [streams[i] for i in live if rng.random() < 0.7]
        rng.shuffle(subset)
        rec.step(subset)
    for s in streams:
        rec.run_to_end([s])
    for s, want in zip(streams, alone, strict=True):
        got = s.transcript()
        assert (got.token_ids, got.token_frames, got.token_durations) == (
            want.token_ids, want.token_frames, want.token_durations)
    assert any(t.token_ids for t in alone), "the test model should emit tokens"
    # Every stream's row is its own, a batch's count of residents is right, and no batch is kept alive by
    # fewer residents than the compaction rule allows.
    homes = {id(s.home.batch): s.home.batch for s in streams if s.home.batch is not None}
    for batch in homes.values():
        members = [m for m in batch.members if m is not None]
        assert all(m.batch is batch and batch.members[m.row] is m for m in members)
        assert batch.resident == len(members)
    for s in streams:
        if s.home.batch is not None:
            assert s.home.batch.members[s.home.row] is s.home


def test_old_batches_are_freed_when_their_streams_move_on(model: AsrModel) -> None:
    """Streams stepped in ever-changing subsets hold at most a few batches' worth of state, not one per step."""
    import gc
    import weakref

    from streamer.engine.residence import Batch

    rec = Recognizer(model, CTX)
    rng = np.random.default_rng(5)
    streams = [rec.create_stream() for _ in range(12)]
    audio = _audio(16000 * 6, seed=3)
    seen: list[weakref.ref[Batch]] = []
    pos = 0
    for _ in range(30):
        for s in streams:
            s.accept_waveform(audio[pos : pos + 2560])
        pos += 2560
        subset = [streams[i] for i in rng.choice(len(streams), 5, replace=False)]
        rec.step(subset)
        seen += [weakref.ref(s.home.batch) for s in subset if s.home.batch is not None]
    gc.collect()
    alive = {id(b()): b() for b in seen if b() is not None}
    rows = sum(len(b.members) for b in alive.values())
    assert rows <= 4 * len(streams), f"{len(alive)} batches with {rows} rows alive for {len(streams)} streams"


def test_a_state_stepped_twice_is_not_overwritten(model: AsrModel) -> None:
    """Step a state, then step the same old state again with other audio: the first result stays valid."""
    enc = model.encoder.streaming(CTX)
    feat = model.preprocessor.featurizer
    mel, _ = feat(torch.from_numpy(_audio(16000 * 2, seed=4))[None], torch.tensor([32000]))
    other, _ = feat(torch.from_numpy(_audio(16000 * 2, seed=5))[None], torch.tensor([32000]))
    state = enc.init_state(1)
    pos = 0
    for _ in range(6):  # fill the caches
        n = int(enc.chunk_frames(state)[0])
        _, _, state = enc.step(mel[:, :, pos : pos + n], torch.tensor([n]), state)
        pos += n
    n = enc.chunk_mel_frames
    _, _, after_a = enc.step(mel[:, :, pos : pos + n], torch.tensor([n]), state)
    snapshot = [t.clone() for t in (after_a.attn_k, after_a.attn_v, after_a.conv_tail)]
    _, _, after_b = enc.step(other[:, :, pos : pos + n], torch.tensor([n]), state)  # the same old state again
    for kept, now in zip(snapshot, (after_a.attn_k, after_a.attn_v, after_a.conv_tail), strict=True):
        assert torch.equal(kept, now)
    assert not torch.equal(after_a.attn_k, after_b.attn_k)
    # and continuing from the first branch still equals a run that never branched
    out_a, _, _ = enc.step(mel[:, :, pos + n : pos + 2 * n], torch.tensor([n]), after_a)
    fresh = enc.init_state(1)
    p = 0
    for _ in range(7):
        k = int(enc.chunk_frames(fresh)[0])
        _, _, fresh = enc.step(mel[:, :, p : p + k], torch.tensor([k]), fresh)
        p += k
    out_fresh, _, _ = enc.step(mel[:, :, p : p + n], torch.tensor([n]), fresh)
    assert torch.equal(out_a, out_fresh)
