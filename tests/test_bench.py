"""``streamer bench``: the random-weight decoder is biased to a speech-like emission rate before it is timed."""

from __future__ import annotations

import pytest
import torch

from streamer.asr.config import TransducerConfig
from streamer.asr.transducer import GreedyTransducerDecoder, RNNTDecoder, RNNTJoint
from streamer.bench_model import calibrate_emission

ENC_DIM = 16


def random_greedy(vocab: int = 64) -> GreedyTransducerDecoder:
    cfg = TransducerConfig(vocab_size=vocab, pred_hidden=16, pred_rnn_layers=1, joint_hidden=24,
                           joint_dropout_layer=True, durations=(0, 1, 2, 3, 4))
    torch.manual_seed(3)
    return GreedyTransducerDecoder(RNNTDecoder(cfg).eval(), RNNTJoint(cfg, ENC_DIM).eval())


def labels_per_frame(greedy: GreedyTransducerDecoder, enc: torch.Tensor, lengths: torch.Tensor):
    spans, _ = greedy.step(enc, lengths, greedy.init_state(enc.shape[0]))
    return sum(len(s.token_ids) for s in spans) / float(lengths.sum()), spans


@pytest.mark.parametrize("target", [0.1, 0.32])
def test_calibration_brings_a_random_joint_to_the_asked_rate(target):
    greedy = random_greedy()
    enc = torch.randn(3, 40, ENC_DIM, generator=torch.Generator().manual_seed(5)) * 3.0
    lengths = torch.tensor([40, 33, 40])
    before, _ = labels_per_frame(greedy, enc, lengths)
    reached = calibrate_emission(greedy, enc, lengths, target)
    after, spans = labels_per_frame(greedy, enc, lengths)
    assert before > 2 * target  # random weights emit a label on most decisions
    assert after == pytest.approx(reached)
    assert after == pytest.approx(target, abs=0.04)
    # Every decision takes one frame: each frame is visited once and holds at most one label.
    for span in spans:
        assert set(span.token_durations) <= {1}
        assert len(set(span.token_frames)) == len(span.token_frames)
