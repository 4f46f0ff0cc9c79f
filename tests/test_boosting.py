"""Phrase boosting (hotwords): the compiled tree against NeMo's rules, and the greedy decoders with hotwords.

The rules (``streamer.asr.boosting``'s docstring) are checked twice, independently of the compiled tables: by
numbers worked out by hand for one phrase, and by :class:`NaiveTree`, which finds failure links by brute force over
suffixes and walks the back-off chain at query time. The decoders are checked against reference decoders written
here from the same rules (one stream at a time), and rows without hotwords against decoding without the feature.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import Tensor

from streamer.asr.boosting import Boost, PhraseTree
from streamer.asr.config import CTCConfig
from streamer.asr.ctc import GreedyCTCDecoder
from streamer.asr.hypothesis import TokenSpan
from streamer.asr.transducer import GreedyTransducerDecoder
from tests.test_transducer import make_greedy, random_enc

Path = tuple[int, ...]


class NaiveTree:
    """The boosting rules, walked at query time. A node is the token path from the root."""

    def __init__(self, phrases: list[list[int]], weight: float) -> None:
        self.weight = weight
        self.nodes: set[Path] = {()}
        self.ends: set[Path] = set()
        for phrase in phrases:
            self.nodes.update(tuple(phrase[:k]) for k in range(1, len(phrase) + 1))
            self.ends.add(tuple(phrase))

    def score(self, node: Path) -> float:
        return sum(1.0 if d == 0 else 2.0 + math.log(d + 1) for d in range(len(node)))

    def fail(self, node: Path) -> Path:
        return next(node[k:] for k in range(1, len(node) + 1) if node[k:] in self.nodes)

    def step(self, node: Path, token: int) -> tuple[float, Path]:
        """Bonus (weighted) of emitting ``token`` in ``node``, and the node it leads to."""
        paid = 0.0
        while node + (token,) not in self.nodes:
            if node == ():
                return self.weight * paid, ()
            if node not in self.ends:
                paid += self.score(self.fail(node)) - self.score(node)
            node = self.fail(node)
        child = node + (token,)
        return self.weight * (paid + self.score(child) - self.score(node)), child

    def bonus(self, node: Path, vocab: int) -> Tensor:
        return torch.tensor([self.step(node, v)[0] for v in range(vocab)])


def compiled_bonus(tree: PhraseTree, node: int) -> Tensor:
    boost = Boost.of([tree])
    assert boost is not None
    return boost.bonus(torch.tensor([node]))[0]


def compiled_next(tree: PhraseTree, node: int, token: int) -> int:
    boost = Boost.of([tree])
    assert boost is not None
    return int(boost.advance(torch.tensor([node]), torch.tensor([token]))[0])


def test_one_phrase_by_hand() -> None:
    """Phrase 5 6 7 at weight 2: 1, 2 + ln 2, 2 + ln 3 for its tokens; a broken match loses what it earned."""
    tree = PhraseTree.build([[5, 6, 7]], vocab_size=10, weight=2.0)
    want_root = torch.zeros(10)
    want_root[5] = 2.0
    torch.testing.assert_close(compiled_bonus(tree, 0), want_root)
    n1 = compiled_next(tree, 0, 5)
    assert compiled_next(tree, 0, 4) == 0 and n1 != 0
    want = torch.full((10,), -2.0)  # leave the phrase after 5: lose its 1 (x2)
    want[6] = 2 * (2 + math.log(2))
    want[5] = 0.0  # lose 1, start again: earn 1
    torch.testing.assert_close(compiled_bonus(tree, n1), want)
    n2 = compiled_next(tree, n1, 6)
    earned = 1 + 2 + math.log(2)
    want = torch.full((10,), -2 * earned)
    want[7] = 2 * (2 + math.log(3))
    want[5] = 2 * (1 - earned)
    torch.testing.assert_close(compiled_bonus(tree, n2), want)
    n3 = compiled_next(tree, n2, 7)
    torch.testing.assert_close(compiled_bonus(tree, n3), want_root)  # a finished phrase keeps its bonus
    assert compiled_next(tree, n3, 1) == 0 and compiled_next(tree, n2, 9) == 0


@pytest.mark.parametrize("seed", range(6))
def test_compiled_tree_walks_like_the_naive_one(seed: int) -> None:
    """Random overlapping phrases over 5 tokens (many failure links): the same bonus and next node at every step."""
    rng = random.Random(seed)
    vocab = 5
    phrases = [[rng.randrange(vocab) for _ in range(rng.randint(1, 5))] for _ in range(rng.randint(1, 6))]
    tree, naive = PhraseTree.build(phrases, vocab, 1.5), NaiveTree(phrases, 1.5)
    node, path = 0, ()
    for _ in range(300):
        torch.testing.assert_close(compiled_bonus(tree, node), naive.bonus(path, vocab), msg=f"{phrases} at {path}")
        phrase = rng.choice(phrases)  # mostly follow a phrase, so deep nodes are visited
        token = phrase[len(path)] if rng.random() < 0.7 and len(path) < len(phrase) else rng.randrange(vocab)
        node = compiled_next(tree, node, token)
        path = naive.step(path, token)[1]


def test_joined_trees_keep_each_rows_own_tree() -> None:
    """Rows with different trees (and none) in one batch: each row reads its own tree; offsets say which."""
    a = PhraseTree.build([[1, 2]], 6, 1.0)
    b = PhraseTree.build([[3, 4, 5], [3, 0]], 6, 3.0)
    assert Boost.of([None, None]) is None
    boost = Boost.of([a, None, b, a])
    assert boost is not None
    assert boost.offsets.tolist() == [0, -1, a.num_nodes, 0]
    local = torch.tensor([1, 0, 1, 0])  # row 0 after its 1, row 2 after its 3
    nodes = boost.nodes(torch.arange(4), local)
    assert nodes[1] == -1
    for row, tree in ((0, a), (2, b), (3, a)):
        torch.testing.assert_close(boost.bonus(nodes[row : row + 1])[0], compiled_bonus(tree, int(local[row])))
    assert boost.advance(nodes[[0, 2]], torch.tensor([2, 4])).tolist() == [compiled_next(a, 1, 2),
                                                                           compiled_next(b, 1, 4)]


def test_bad_phrases_are_refused() -> None:
    with pytest.raises(ValueError, match="token ids"):
        PhraseTree.build([[1, 6]], 6, 1.0)
    with pytest.raises(ValueError, match="token ids"):
        PhraseTree.build([[]], 6, 1.0)


# ---------------------------------------------------------------- transducer


Token = tuple[int, int, int, float]  # id, frame, duration, logprob


@torch.no_grad()
def reference_boosted_tdt(greedy: GreedyTransducerDecoder, enc: Tensor, naive: NaiveTree) -> list[Token]:
    """One utterance ``enc (T, D)`` by NeMo's label loop with greedy fusion: blank or not is the model's call;
    a non-blank decision takes the best token with the tree's bonus added; emitted tokens move the tree."""
    cfg, decoder, joint = greedy.cfg, greedy.decoder, greedy.joint
    blank, frames = cfg.blank_id, enc.shape[0]
    h, c = decoder.zero_state(1)
    y, h, c = decoder.predict(torch.tensor([blank]), h, c)
    node: Path = ()

    def decide(t: int) -> tuple[int, int, float]:
        logp = joint.joint_net(joint.enc(enc[t]) + joint.pred(y[0])).log_softmax(-1)
        k = int(logp[: blank + 1].argmax())
        d = cfg.durations[int(logp[blank + 1 :].argmax())]
        if k == blank:
            return k, max(d, 1), float(logp[k])
        k = int((logp[:blank] + naive.bonus(node, blank).to(logp.dtype)).argmax())
        return k, d, float(logp[k])

    tokens: list[Token] = []
    t = 0
    while t < frames:
        k, d, lp = decide(t)
        t_label, t = t, t + d
        while k == blank and t < frames:
            k, d, lp = decide(t)
            t_label, t = t, t + d
        if k != blank:
            tokens.append((k, t_label, d, lp))
            node = naive.step(node, k)[1]
            y, h, c = decoder.predict(torch.tensor([k]), h, c)
            if d == 0 and sum(tok[1] == t_label for tok in tokens) >= cfg.max_symbols:
                t += 1
    return tokens


def span_tokens(span: TokenSpan) -> list[Token]:
    return list(zip(span.token_ids, span.token_frames, span.token_durations, span.token_logprobs, strict=True))


@pytest.mark.parametrize("durations", [(0, 1, 2, 3, 4), ()], ids=["tdt", "rnnt"])
@pytest.mark.parametrize("seed", range(3))
def test_rows_without_hotwords_decode_as_without_the_feature(durations: tuple[int, ...], seed: int) -> None:
    """In a batch where other rows boost (hard), the rest get the same tokens, frames, durations and state."""
    greedy = make_greedy(durations, seed=seed, blank_bias=0.5 if durations else 1.0)
    enc, lengths = random_enc(4, 30, seed), torch.tensor([30, 25, 30, 17])
    plain, plain_state = greedy.step(enc, lengths, greedy.init_state(4))
    assert all(len(span) >= 3 for span in plain)
    tree = PhraseTree.build([[1, 2, 3], [4, 4]], greedy.cfg.blank_id, 5.0)
    spans, state = greedy.step(enc, lengths, greedy.init_state(4), Boost.of([tree, None, tree, None]))
    for row in (1, 3):  # the joint runs on other subsets of rows, so floats may differ in the last bits
        got, want = spans[row], plain[row]
        assert (got.token_ids, got.token_frames, got.token_durations) == (
            want.token_ids, want.token_frames, want.token_durations)
        assert got.token_logprobs == pytest.approx(want.token_logprobs, abs=1e-12)
        for name, dim in state.BATCH_DIM.items():
            torch.testing.assert_close(getattr(state, name).select(dim, row),
                                       getattr(plain_state, name).select(dim, row), rtol=0, atol=1e-12)
    assert spans[0] != plain[0] or spans[2] != plain[2]  # the boost did change something


@pytest.mark.parametrize("seed", range(5))
def test_boosted_rows_follow_the_reference_decoder_across_chunks(seed: int) -> None:
    """TDT with hotwords, fed in ragged chunks: each boosted row decodes as the reference does on its whole
    utterance (the tree's node is carried across chunks in the state)."""
    greedy = make_greedy(seed=seed)
    vocab = greedy.cfg.blank_id
    rng = random.Random(seed)
    phrases = [[rng.randrange(vocab) for _ in range(rng.randint(2, 4))] for _ in range(3)]
    tree, naive = PhraseTree.build(phrases, vocab, 2.0), NaiveTree(phrases, 2.0)
    lengths = [40, 33, 40]
    enc = random_enc(3, 40, seed + 100)
    boost = Boost.of([tree, None, tree])
    state, pos, spans = greedy.init_state(3), [0, 0, 0], [TokenSpan() for _ in range(3)]
    while any(p < n for p, n in zip(pos, lengths, strict=True)):
        take = [min(rng.choice([1, 2, 5, 9]), n - p) for p, n in zip(pos, lengths, strict=True)]
        chunk = torch.randn(3, max(take), enc.shape[2], dtype=enc.dtype)  # padding noise must be ignored
        for b in range(3):
            chunk[b, : take[b]] = enc[b, pos[b] : pos[b] + take[b]]
        out, state = greedy.step(chunk, torch.tensor(take), state, boost)
        spans = [s + o for s, o in zip(spans, out, strict=True)]
        pos = [p + k for p, k in zip(pos, take, strict=True)]
    for row in (0, 2):
        want = reference_boosted_tdt(greedy, enc[row, : lengths[row]], naive)
        got = span_tokens(spans[row])
        assert [tok[:3] for tok in got] == [tok[:3] for tok in want]
        assert [tok[3] for tok in got] == pytest.approx([tok[3] for tok in want], abs=1e-9)


def test_a_heavy_weight_makes_the_decoder_say_the_phrase() -> None:
    """At a huge weight, every non-blank decision from the start spells the phrase (then starts it again)."""
    greedy = make_greedy(seed=3)
    enc = random_enc(1, 40, 7)
    plain, _ = greedy.step(enc, torch.tensor([40]), greedy.init_state(1))
    phrase = [5, 0, 2]
    assert plain[0].token_ids[:3] != tuple(phrase)
    tree = PhraseTree.build([phrase], greedy.cfg.blank_id, 1000.0)
    spans, _ = greedy.step(enc, torch.tensor([40]), greedy.init_state(1), Boost.of([tree]))
    ids = spans[0].token_ids
    assert len(ids) >= 4 and list(ids) == (phrase * len(ids))[: len(ids)]


# ---------------------------------------------------------------- CTC

CTC_VOCAB = 6  # tokens 0..5, blank 6


def reference_boosted_ctc(log_probs: Tensor, naive: NaiveTree) -> list[tuple[int, int]]:
    """One utterance ``(T, V)`` by NeMo's greedy CTC fusion: blank or a repeat of the last label stands; any
    other frame emits the best non-blank token (not the last label) with the bonus added."""
    blank, last, node, out = CTC_VOCAB, CTC_VOCAB, (), []
    for t in range(log_probs.shape[0]):
        raw = int(log_probs[t].argmax())
        if raw in (blank, last):
            last = raw
            continue
        fused = log_probs[t, :blank] + naive.bonus(node, blank)
        if last != blank:
            fused[last] = -math.inf
        last = int(fused.argmax())
        out.append((last, t))
        node = naive.step(node, last)[1]
    return out


@pytest.mark.parametrize("seed", range(5))
def test_ctc_with_hotwords(seed: int) -> None:
    """Rows without hotwords are untouched; boosted rows decode as the reference, fed in ragged chunks."""
    gen = torch.Generator().manual_seed(seed)
    log_probs = (torch.randn(3, 50, CTC_VOCAB + 1, generator=gen) * 3).log_softmax(-1)
    log_probs[:, :, CTC_VOCAB] += 1.0  # some blanks
    greedy = GreedyCTCDecoder(CTCConfig(vocab_size=CTC_VOCAB, feat_in=4))
    rng = random.Random(seed)
    phrases = [[rng.randrange(CTC_VOCAB) for _ in range(rng.randint(2, 4))] for _ in range(3)]
    tree, naive = PhraseTree.build(phrases, CTC_VOCAB, 3.0), NaiveTree(phrases, 3.0)
    boost = Boost.of([None, tree, tree])
    plain, _ = greedy.step(log_probs, torch.tensor([50, 50, 50]), greedy.init_state(3))
    state, spans, pos = greedy.init_state(3), [TokenSpan() for _ in range(3)], [0, 0, 0]
    while any(p < 50 for p in pos):  # ragged chunks, padded with noise that must be ignored
        take = [min(rng.choice([0, 1, 3, 8, 14]), 50 - p) for p in pos]
        chunk = (torch.randn(3, max(max(take), 1), CTC_VOCAB + 1, generator=gen) * 3).log_softmax(-1)
        for b in range(3):
            chunk[b, : take[b]] = log_probs[b, pos[b] : pos[b] + take[b]]
        out, state = greedy.step(chunk, torch.tensor(take), state, boost)
        spans = [s + o for s, o in zip(spans, out, strict=True)]
        pos = [p + k for p, k in zip(pos, take, strict=True)]
    assert spans[0] == plain[0]
    for row in (1, 2):
        want = reference_boosted_ctc(log_probs[row], naive)
        assert list(zip(spans[row].token_ids, spans[row].token_frames, strict=True)) == want
        assert spans[row].token_logprobs == pytest.approx([float(log_probs[row, t, k]) for k, t in want])
    assert spans[1] != plain[1]
