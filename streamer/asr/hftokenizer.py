"""A SentencePiece model rebuilt from a Hugging Face ``tokenizer.json`` (for directories without ``tokenizer.model``).

transformers' fast tokenizers keep the vocabulary in ``tokenizer.json``; streamer's tokenizer is
SentencePiece. This module writes the SentencePiece ``ModelProto`` (the fields of
``sentencepiece_model.proto``) from it, by hand, so no protobuf dependency is needed.

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
"""

from __future__ import annotations

import base64
import re
import struct
from collections.abc import Mapping
from typing import Any

from streamer.errors import CheckpointError, UnsupportedCheckpointError


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 fields are sign-extended to 64 bits
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value: bytes | str | int | float | bool) -> bytes:
    """One protobuf field: bytes/str length-delimited, float fixed32, int/bool varint."""
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3) + _varint(int(value))


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
    order. Written by hand (fields of ``sentencepiece_model.proto``) to avoid a protobuf dependency.

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
    types = {piece: 1 for piece in scores}  # NORMAL
    for added in data.get("added_tokens") or []:
        if added["content"] == "<blank>" and int(added["id"]) >= len(scores):
            continue  # Parakeet's blank is an added token one past the vocabulary; it is not a piece
        scores.setdefault(added["content"], (int(added["id"]), 0.0))
        types[added["content"]] = 3 if added.get("special") else 4  # CONTROL / USER_DEFINED
    if unk_piece not in scores:
        raise CheckpointError("tokenizer.json has no unknown-token piece, which SentencePiece requires")
    types[unk_piece] = 2  # UNKNOWN
    # transformers' converter sets byte_fallback even when the model has no byte pieces, which
    # SentencePiece rejects: keep it only with all 256 of them.
    byte_pieces = [p for p in types if re.fullmatch(r"<0x[0-9A-F]{2}>", p)]
    byte_fallback = bool(model.get("byte_fallback")) and len(byte_pieces) == 256
    if byte_fallback:
        types |= dict.fromkeys(byte_pieces, 6)  # BYTE
    by_id = sorted((i, piece) for piece, (i, _) in scores.items())
    if [i for i, _ in by_id] != list(range(len(by_id))):
        raise CheckpointError("tokenizer.json ids are not contiguous from 0")
    pieces = b"".join(
        _field(
            1,
            _field(1, piece)
            + _field(2, scores[piece][1] if types[piece] == 1 else 0.0)
            + _field(3, types[piece]),
        )
        for _, piece in by_id
    )
    ids = {
        name: next((i for i, p in by_id if p == name and types[p] == 3), -1)
        for name in ("<s>", "</s>", "<pad>")
    }
    trainer = (
        _field(3, 2 if kind == "BPE" else 1)
        + _field(4, len(by_id))
        + _field(35, byte_fallback)
        + _field(40, scores[unk_piece][0])
        + _field(41, ids["<s>"])
        + _field(42, ids["</s>"])
        + _field(43, ids["<pad>"])
        + _field(45, unk_piece)
    )
    charsmaps = [n.get("precompiled_charsmap") for n in _find(data.get("normalizer"), "Precompiled")]
    metaspace = _find(data.get("pre_tokenizer"), "Metaspace")
    prefix = not metaspace or metaspace[0].get("prepend_scheme", "always") != "never"
    squeeze = bool(_find(data.get("normalizer"), "Replace"))
    normalizer = (
        _field(1, "nmt_nfkc" if charsmaps and charsmaps[0] else "identity")
        + (_field(2, base64.b64decode(charsmaps[0])) if charsmaps and charsmaps[0] else b"")
        + _field(3, prefix)
        + _field(4, squeeze)
        + _field(5, True)
    )
    return pieces + _field(2, trainer) + _field(3, normalizer)
