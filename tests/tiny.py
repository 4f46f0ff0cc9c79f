"""Tiny random-weight models with a real SentencePiece tokenizer, for tests that need a whole model."""

from __future__ import annotations

import io
from pathlib import Path

import sentencepiece as spm
import torch

from streamer.asr.config import CTCConfig, EncoderConfig, FeatureConfig, ModelConfig, TransducerConfig
from streamer.asr.model import AsrModel
from streamer.asr.tokenizer import Tokenizer

SENTENCES = [
    "hello world this is a test",
    "turn on the kitchen lights please",
    "set a timer for ten minutes",
    "what is the weather like today",
    "streaming speech recognition in python",
    "the quick brown fox jumps over the lazy dog",
    "one two three four five six seven eight nine ten",
    "good morning how are you doing",
]


def train_tokenizer(vocab: int = 40) -> bytes:
    """A BPE SentencePiece model trained in memory on a few sentences."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4), model_writer=out, vocab_size=vocab, model_type="bpe",
        character_coverage=1.0, bos_id=-1, eos_id=-1, unk_id=0, minloglevel=2,
    )
    return out.getvalue()


def tiny_model(tdt: bool = True, ctc: bool = True, seed: int = 0, n_mels: int = 80) -> AsrModel:
    """A seeded random FastConformer-TDT(+CTC) whose joint is scaled so it emits varied tokens."""
    tok = Tokenizer.from_bytes(train_tokenizer())
    v = tok.vocab_size
    enc = EncoderConfig(
        feat_in=n_mels, n_layers=2, d_model=32, n_heads=4, subsampling_conv_channels=8,
        att_context_sizes=((70, 13), (70, 6), (70, 1), (70, 0)), conv_context_size=(8, 0),
    )
    cfg = ModelConfig(
        features=FeatureConfig(n_mels=n_mels),
        encoder=enc,
        transducer=TransducerConfig(vocab_size=v, pred_hidden=32, joint_hidden=32,
                                    durations=(0, 1, 2, 3, 4) if tdt else ()),
        ctc=CTCConfig(vocab_size=v, feat_in=32) if ctc else None,
        model_class="EncDecHybridRNNTCTCBPEModel" if ctc else "EncDecRNNTBPEModel",
    )
    torch.manual_seed(seed)
    model = AsrModel(cfg, tok)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("joint.", "ctc_decoder.")) and name.endswith("weight"):
                p.mul_(8.0)
    return model.eval()


def save_tiny(path: Path, **kwargs) -> Path:
    tiny_model(**kwargs).save(str(path))
    return path
