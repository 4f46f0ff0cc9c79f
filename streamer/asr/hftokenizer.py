"""A SentencePiece model rebuilt from a Hugging Face ``tokenizer.json`` (for directories without ``tokenizer.model``).

transformers' fast tokenizers keep the vocabulary in ``tokenizer.json``; streamer's tokenizer is
SentencePiece. This module fills SentencePiece's own ``ModelProto`` (``sentencepiece_model_pb2``, which
the sentencepiece wheel ships; serialized by protobuf) from it.

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any

from sentencepiece import sentencepiece_model_pb2 as sp_model

from streamer.errors import CheckpointError, UnsupportedCheckpointError

Piece = sp_model.ModelProto.SentencePiece


def _find(node: Any, kind: str) -> list[dict[str, Any]]:
    """Every dict with ``"type": kind`` inside a tokenizer.json component (Sequences included)."""
    if isinstance(node, dict):
        found = [node] if node.get("type") == kind else []
        return found + [item for value in node.values() for item in _find(value, kind)]
    if isinstance(node, list):
        return [item for value in node for item in _find(value, kind)]
    return []


def sentencepiece_from_tokenizer_json(data: Mapping[str, Any]) -> bytes:
    """A serialized SentencePiece ``ModelProto`` equivalent to a transformers ``tokenizer.json``.

    Ids, pieces and piece types are exact, so decoding matches the original. BPE scores are lost in
    the HF format; SentencePiece ranks BPE pieces by score in id order, so ``-id`` restores the merge
    order. Every field the old hand-written encoder wrote is set explicitly, defaults included.

    Raises:
        UnsupportedCheckpointError: a tokenizer model other than BPE or Unigram.
        CheckpointError: ids with gaps or no unknown piece.
    """
    model = data.get("model") or {}
    kind = model.get("type")
    if kind == "BPE":
        scores = {piece: (int(i), -float(i)) for piece, i in (model.get("vocab") or {}).items()}
        unk_piece = model.get("unk_token")
    elif kind == "Unigram":
        scores = {piece: (i, float(score)) for i, (piece, score) in enumerate(model.get("vocab") or [])}
        unk_id = model.get("unk_id")
        unk_piece = next((p for p, (i, _) in scores.items() if i == unk_id), None)
    else:
        raise UnsupportedCheckpointError(f"tokenizer.json model type {kind!r} (supported: BPE, Unigram)")
    types = dict.fromkeys(scores, Piece.NORMAL)
    for added in data.get("added_tokens") or []:
        if added["content"] == "<blank>" and int(added["id"]) >= len(scores):
            continue  # Parakeet's blank is an added token one past the vocabulary; it is not a piece
        scores.setdefault(added["content"], (int(added["id"]), 0.0))
        types[added["content"]] = Piece.CONTROL if added.get("special") else Piece.USER_DEFINED
    if unk_piece not in scores:
        raise CheckpointError("tokenizer.json has no unknown-token piece, which SentencePiece requires")
    types[unk_piece] = Piece.UNKNOWN
    # transformers' converter sets byte_fallback even when the model has no byte pieces, which
    # SentencePiece rejects: keep it only with all 256 of them.
    byte_pieces = [p for p in types if re.fullmatch(r"<0x[0-9A-F]{2}>", p)]
    byte_fallback = bool(model.get("byte_fallback")) and len(byte_pieces) == 256
    if byte_fallback:
        types |= dict.fromkeys(byte_pieces, Piece.BYTE)
    by_id = sorted((i, piece) for piece, (i, _) in scores.items())
    if [i for i, _ in by_id] != list(range(len(by_id))):
        raise CheckpointError("tokenizer.json ids are not contiguous from 0")

    proto = sp_model.ModelProto()
    for _, piece in by_id:
        score = scores[piece][1] if types[piece] == Piece.NORMAL else 0.0
        proto.pieces.add(piece=piece, score=score, type=types[piece])
    control = {p: i for i, p in by_id if types[p] == Piece.CONTROL}
    trainer = proto.trainer_spec
    trainer.model_type = sp_model.TrainerSpec.BPE if kind == "BPE" else sp_model.TrainerSpec.UNIGRAM
    trainer.vocab_size = len(by_id)
    trainer.byte_fallback = byte_fallback
    trainer.unk_id = scores[unk_piece][0]
    trainer.bos_id = control.get("<s>", -1)
    trainer.eos_id = control.get("</s>", -1)
    trainer.pad_id = control.get("<pad>", -1)
    trainer.unk_piece = unk_piece
    charsmaps = [n.get("precompiled_charsmap") for n in _find(data.get("normalizer"), "Precompiled")]
    metaspace = _find(data.get("pre_tokenizer"), "Metaspace")
    normalizer = proto.normalizer_spec
    normalizer.name = "nmt_nfkc" if charsmaps and charsmaps[0] else "identity"
    if charsmaps and charsmaps[0]:
        normalizer.precompiled_charsmap = base64.b64decode(charsmaps[0])
    normalizer.add_dummy_prefix = not metaspace or metaspace[0].get("prepend_scheme", "always") != "never"
    normalizer.remove_extra_whitespaces = bool(_find(data.get("normalizer"), "Replace"))
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()


# ---------------------------------------------------------------------------------------------------
# The other way: tokenizer.json from a SentencePiece model


def _bpe_merges(vocab: Mapping[str, int], mergeable: set[str]) -> list[list[str]]:
    """Every ``[left, right]`` pair whose concatenation is a piece, ordered by the merged piece's id.

    SentencePiece's BPE applies merges by the merged piece's score, which falls with its id; the
    tokenizers library applies them by their rank in this list, so the order carries over.
    """
    merges: list[tuple[int, int, int, str, str]] = []
    for piece in mergeable:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((vocab[piece], vocab[left], vocab[right], left, right))
    return [[left, right] for *_, left, right in sorted(merges)]


def tokenizer_json_from_sentencepiece(tokenizer_model: bytes, *, blank_token: str = "<blank>") -> dict[str, Any]:
    """A transformers ``tokenizer.json`` (tokenizers BPE) for a SentencePiece BPE model, plus the blank.

    The blank is an added special token one past the pieces, as transformers' Parakeet tokenizers
    have it; control pieces become special added tokens and user-defined pieces (``<EOU>``) plain ones.
    `sentencepiece_from_tokenizer_json` reads it back with the same ids, pieces and types.

    Raises:
        UnsupportedCheckpointError: the SentencePiece model is not BPE.
    """
    proto = sp_model.ModelProto()
    proto.ParseFromString(tokenizer_model)
    if proto.trainer_spec.model_type != sp_model.TrainerSpec.BPE:
        raise UnsupportedCheckpointError("only SentencePiece BPE tokenizers can be written as tokenizer.json")
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    unk = next((p.piece for p in proto.pieces if p.type == Piece.UNKNOWN), "<unk>")
    added = [
        {"id": i, "content": p.piece, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": p.type == Piece.CONTROL}
        for i, p in enumerate(proto.pieces)
        if p.type in (Piece.CONTROL, Piece.USER_DEFINED)
    ]
    added.append({"id": len(vocab), "content": blank_token, "single_word": False, "lstrip": False,
                  "rstrip": False, "normalized": False, "special": True})
    spec = proto.normalizer_spec
    normalizers: list[dict[str, Any]] = []
    if spec.precompiled_charsmap:
        charsmap = base64.b64encode(spec.precompiled_charsmap).decode()
        normalizers.append({"type": "Precompiled", "precompiled_charsmap": charsmap})
    if spec.remove_extra_whitespaces:
        normalizers += [
            {"type": "Strip", "strip_left": False, "strip_right": True},
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "▁"},
        ]
    metaspace = {"type": "Metaspace", "replacement": "▁",
                 "prepend_scheme": "always" if spec.add_dummy_prefix else "never", "split": True}
    mergeable = {p.piece for p in proto.pieces if p.type == Piece.NORMAL}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers} if normalizers else None,
        "pre_tokenizer": metaspace,
        "post_processor": None,
        "decoder": dict(metaspace),
        "model": {
            "type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": proto.trainer_spec.byte_fallback,
            "ignore_merges": False, "vocab": vocab, "merges": _bpe_merges(vocab, mergeable),
        },
    }
