"""Train the SentencePiece BPE tokenizer, and measure whether its pieces fit the encoder's frames.

The model file is what NeMo's ``SentencePieceTokenizer`` loads (BPE, ``<unk>`` = 0, no BOS/EOS or
pad pieces, as NeMo's ``create_spt_model`` writes it); the transducer's blank goes after the last
piece. With 8x subsampling an encoder frame lasts 80 ms, and an utterance with more tokens than
frames cannot be aligned by CTC (TDT can still emit several tokens on one frame), so
`token_overflow` reports that fraction for a candidate vocabulary size.

Run ``python -m streamer.training.tokenizer --help``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from streamer.asr import clocks

logger = logging.getLogger(__name__)


def train_tokenizer(texts: Iterable[str], model_path: Path, vocab_size: int) -> Path:
    """Train a BPE model on transcripts and write ``model_path`` (plus the ``.vocab`` beside it).

    Args:
        texts: training transcripts (lowercase words, apostrophes).
        model_path: where the model goes; must end in ``.model``.
        vocab_size: number of pieces, ``<unk>`` included. SentencePiece may stop short on tiny text.

    Returns:
        model_path.
    """
    if model_path.suffix != ".model":
        raise ValueError(f"tokenizer path must end in .model, not {model_path.name!r}")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="streamer-spm-") as tmp:
        text_file = Path(tmp) / "text.txt"
        text_file.write_text("\n".join(texts) + "\n")
        spm.SentencePieceTrainer.train(
            input=str(text_file),
            model_prefix=str(model_path.with_suffix("")),
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=1.0,
            hard_vocab_limit=False,  # tiny texts (tests) yield fewer pieces instead of failing
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            input_sentence_size=2_000_000,  # above any corpus here, so BPE sees all text: deterministic
            num_threads=1,
            minloglevel=2,
        )
    logger.info("wrote %s", model_path)
    return model_path


def encoder_frames(num_samples: int) -> int:
    """Encoder frames of a causal dw_striding 8x FastConformer for an utterance of `num_samples`."""
    return int(clocks.num_encoder_frames(clocks.num_mel_frames(num_samples), is_causal=True))


def token_overflow(model_path: Path, entries: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Fraction of utterances with more tokens than encoder frames, and token statistics.

    ``fraction_ctc_infeasible`` also counts the blank CTC needs between two equal tokens. Frames are
    counted over the whole utterance, edge silence included.

    Args:
        model_path: a SentencePiece model.
        entries: manifest entries with ``text`` and ``num_samples``.
    """
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    over, ctc_infeasible, ratios, tokens_total = 0, 0, [], 0
    for entry in entries:
        ids = sp.encode(entry["text"])
        frames = encoder_frames(entry["num_samples"])
        repeats = sum(a == b for a, b in zip(ids, ids[1:], strict=False))  # CTC needs a blank between repeats
        over += len(ids) > frames
        ctc_infeasible += len(ids) + repeats > frames
        ratios.append(len(ids) / frames)
        tokens_total += len(ids)
    ratios.sort()
    n = max(len(entries), 1)
    return {
        "vocab_size": sp.get_piece_size(),
        "utterances": len(entries),
        "fraction_tokens_exceed_frames": over / n,
        "fraction_ctc_infeasible": ctc_infeasible / n,
        "mean_tokens_per_utterance": tokens_total / n,
        "mean_tokens_per_frame": sum(ratios) / n,
        "p99_tokens_per_frame": ratios[min(int(0.99 * len(ratios)), len(ratios) - 1)] if ratios else 0.0,
    }


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """All entries of a JSONL manifest."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    """Train tokenizers of several sizes on a corpus's train text and report how they fit the frames."""
    parser = argparse.ArgumentParser(
        prog="python -m streamer.training.tokenizer",
        description="Train SentencePiece BPE tokenizers on a corpus's train.jsonl transcripts and report, "
        "per vocabulary size, the fraction of utterances with more tokens than 80 ms encoder frames.",
    )
    parser.add_argument("--corpus", type=Path, required=True, help="corpus directory with train.jsonl")
    parser.add_argument("--vocab-sizes", default="128,256,512", help="comma-separated sizes [%(default)s]")
    parser.add_argument("--out", type=Path, help="write tokenizer-<size>.model here (default: a temp dir)")
    parser.add_argument("--eval", default="train,dev,everyday", help="splits to measure [%(default)s]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    train = read_manifest(args.corpus / "train.jsonl")
    with tempfile.TemporaryDirectory(prefix="streamer-spm-") as tmp:
        out = args.out or Path(tmp)
        for size in (int(s) for s in args.vocab_sizes.split(",")):
            model = train_tokenizer((e["text"] for e in train), out / f"tokenizer-{size}.model", size)
            for split in args.eval.split(","):
                stats = token_overflow(model, read_manifest(args.corpus / f"{split}.jsonl"))
                print(json.dumps({"split": split, **{k: round(v, 4) for k, v in stats.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
