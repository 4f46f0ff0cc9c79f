"""CTC head and the stateful greedy CTC decoder: keys, log-probs, and chunked == whole-sequence decoding."""

from __future__ import annotations

import random

import pytest
import torch
from torch import Tensor

from streamer.asr.config import CTCConfig
from streamer.asr.ctc import ConvASRDecoder, CTCState, GreedyCTCDecoder
from streamer.asr.hypothesis import TokenSpan
from streamer.asr.state import stack, unstack

CFG = CTCConfig(vocab_size=5, feat_in=8)  # blank = 5
BLANK = CFG.vocab_size


def reference_greedy(labels: list[int]) -> list[tuple[int, int]]:
    """Whole-sequence greedy CTC (§7.8): emit a non-blank argmax that differs from the previous frame's."""
    out, previous = [], BLANK
    for t, label in enumerate(labels):
        if label != BLANK and label != previous:
            out.append((label, t))
        previous = label
    return out


def runs_log_probs(batch: int, frames: int, seed: int) -> Tensor:
    """``(B, T, V)`` log-probs whose argmax comes in runs of 1-5 frames, blanks included."""
    rng = random.Random(seed)
    labels = torch.empty(batch, frames, dtype=torch.long)
    for b in range(batch):
        t = 0
        while t < frames:
            run = rng.randint(1, 5)
            labels[b, t : t + run] = rng.choice([BLANK, BLANK, *range(BLANK)])
            t += run
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, frames, BLANK + 1, generator=gen)
    logits.scatter_(2, labels[..., None], 6.0)
    return logits.log_softmax(dim=-1)


def decode_in_chunks(
    greedy: GreedyCTCDecoder, log_probs: Tensor, lengths: list[int], sizes: list[int], seed: int
) -> list[TokenSpan]:
    """All streams in every call, each with its own chunk size from ``sizes``; padding is noise."""
    rng = random.Random(seed)
    batch = log_probs.shape[0]
    state, pos, spans = greedy.init_state(batch), [0] * batch, [TokenSpan() for _ in range(batch)]
    while any(p < n for p, n in zip(pos, lengths, strict=True)):
        take = [min(rng.choice(sizes), n - p) for p, n in zip(pos, lengths, strict=True)]
        chunk = torch.randn(batch, max(take), BLANK + 1).log_softmax(dim=-1)
        for b in range(batch):
            chunk[b, : take[b]] = log_probs[b, pos[b] : pos[b] + take[b]]
        new, state = greedy.step(chunk, torch.tensor(take), state)
        spans = [s + n for s, n in zip(spans, new, strict=True)]
        pos = [p + k for p, k in zip(pos, take, strict=True)]
    assert state.frames_done.tolist() == lengths
    return spans


def test_state_dict_keys_match_nemo() -> None:
    """A single 1x1 Conv1d under NeMo's key decoder_layers.0."""
    shapes = {k: tuple(v.shape) for k, v in ConvASRDecoder(CFG).state_dict().items()}
    assert shapes == {"decoder_layers.0.weight": (6, 8, 1), "decoder_layers.0.bias": (6,)}


def test_forward_is_log_softmax_of_the_projection() -> None:
    """forward() = log_softmax(W x + b) per frame, (B, T, D) -> (B, T, V)."""
    head = ConvASRDecoder(CFG)
    enc = torch.randn(2, 7, 8)
    conv = head.decoder_layers[0]
    want = torch.log_softmax(enc @ conv.weight[:, :, 0].T + conv.bias, dim=-1)
    torch.testing.assert_close(head(enc), want)


def test_whole_sequence_matches_reference() -> None:
    """One call over padded streams equals the reference collapse, with confidences of the first frame."""
    lengths = [30, 0, 17, 1]
    log_probs = runs_log_probs(len(lengths), 30, seed=0)
    greedy = GreedyCTCDecoder(CFG)
    spans, state = greedy.step(log_probs, torch.tensor(lengths), greedy.init_state(len(lengths)))
    for b, n in enumerate(lengths):
        want = reference_greedy(log_probs[b, :n].argmax(-1).tolist())
        assert list(zip(spans[b].token_ids, spans[b].token_frames, strict=True)) == want
        assert spans[b].token_durations == (1,) * len(want)
        lp = [float(log_probs[b, t].max()) for _, t in want]
        assert spans[b].token_logprobs == pytest.approx(lp)
        assert spans[b].token_confidences == pytest.approx([torch.tensor(x).exp().item() for x in lp])
    assert state.last_label[1] == BLANK  # an empty stream keeps its state


@pytest.mark.parametrize("sizes", [[1], [2], [7], [0, 1, 2, 5], [3, 11]], ids=str)
def test_chunked_equals_whole_sequence(sizes: list[int]) -> None:
    """Runs that cross chunk boundaries are emitted once, at their first frame, for any split."""
    lengths = [41, 23, 36]
    for seed in range(4):
        log_probs = runs_log_probs(len(lengths), 41, seed=seed)
        greedy = GreedyCTCDecoder(CFG)
        whole, _ = greedy.step(log_probs, torch.tensor(lengths), greedy.init_state(len(lengths)))
        assert decode_in_chunks(greedy, log_probs, lengths, sizes, seed) == whole


def one_hot_log_probs(labels: list[int]) -> Tensor:
    return torch.nn.functional.one_hot(torch.tensor(labels), BLANK + 1).float().mul(9.0).log_softmax(-1)[None]


@pytest.mark.parametrize(
    ("first", "second", "want"),
    [
        ([1, 1], [1, 2], [(1, 0), (2, 3)]),  # a run of 1 across the boundary: one token
        ([1, BLANK], [1], [(1, 0), (1, 2)]),  # blank separates equal tokens
        ([3], [3, 3, BLANK, 3], [(3, 0), (3, 4)]),
        ([BLANK, BLANK], [BLANK], []),
    ],
)
def test_boundary_cases(first: list[int], second: list[int], want: list[tuple[int, int]]) -> None:
    """Hand-made splits: repeats and blanks around the chunk boundary, absolute frames."""
    greedy = GreedyCTCDecoder(CFG)
    state = greedy.init_state(1)
    a, state = greedy.step(one_hot_log_probs(first), torch.tensor([len(first)]), state)
    b, state = greedy.step(one_hot_log_probs(second), torch.tensor([len(second)]), state)
    span = a[0] + b[0]
    assert list(zip(span.token_ids, span.token_frames, strict=True)) == want


def test_empty_chunk_and_state_batching() -> None:
    """A (B, 0, V) chunk changes nothing; states stack and unstack."""
    greedy = GreedyCTCDecoder(CFG)
    state = greedy.init_state(2)
    spans, same = greedy.step(torch.zeros(2, 0, BLANK + 1), torch.tensor([0, 0]), state)
    assert spans == [TokenSpan(), TokenSpan()] and same is state
    parts = unstack(CTCState(torch.tensor([1, BLANK]), torch.tensor([4, 9]), torch.tensor([0, 3])))
    assert [int(p.frames_done) for p in parts] == [4, 9]
    assert stack(parts).last_label.tolist() == [1, BLANK]
