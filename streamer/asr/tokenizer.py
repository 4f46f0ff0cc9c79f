"""SentencePiece tokenizer with NeMo 3.0.0's id conventions and detokenisation.

Token id i is SentencePiece id i; the blank is ``vocab_size``, one past the last piece. Text comes out
the way NeMo's RNNT/TDT BPE decoding writes it: pieces through SentencePiece's ``decode_pieces``, then,
if the vocabulary has punctuation, one whitespace removed before each punctuation character.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from streamer.errors import CheckpointError

WORD_START = "\u2581"  # "▁", SentencePiece's marker for a preceding space
EOU_PIECE = "<EOU>"  # end of utterance (NeMo's EOU models)
EOB_PIECE = "<EOB>"  # end of backchannel
# Pieces NeMo does not look into for punctuation (``extract_punctuation_from_vocab``), besides
# whitespace-only ones.
_NOT_TEXT_PIECE = re.compile(r"^\[.*\]$|^<.*>$|^##|^" + WORD_START)
# Tag-like pieces that are markers, not text (``<EOU>``, ``<EOB>``, ``[noise]``, ``<s>``).
_TAG_PIECE = re.compile(r"^<.+>$|^\[.+\]$")


class Tokenizer:
    """A SentencePiece model seen through NeMo's eyes. Immutable; safe to share between threads."""

    def __init__(self, processor: spm.SentencePieceProcessor, source: str = "tokenizer") -> None:
        """Wrap a loaded processor; ``source`` names it in error messages."""
        self._sp = processor
        self.model_bytes: bytes = processor.serialized_model_proto()
        self._pieces = tuple(processor.id_to_piece(i) for i in range(processor.get_piece_size()))
        if len(set(self._pieces)) != len(self._pieces):
            # NeMo's vocabulary maps piece -> id, so duplicate pieces would shift every later id.
            raise CheckpointError(f"{source}: the SentencePiece model has duplicate pieces")
        self._piece_ids = {piece: i for i, piece in enumerate(self._pieces)}
        self._special_ids = frozenset(
            i for i, piece in enumerate(self._pieces)
            if processor.is_control(i) or (not processor.is_unknown(i) and _TAG_PIECE.match(piece))
        )
        self._is_cased = any(
            char.isupper() for i, piece in enumerate(self._pieces) if i not in self._special_ids for char in piece
        )
        self._punctuation = frozenset(
            char
            for piece in self._pieces
            if not _NOT_TEXT_PIECE.match(piece) and not piece.isspace()
            for char in piece
            if unicodedata.category(char).startswith("P")
        )
        self._space_before_punctuation = (
            re.compile(r"\s([" + "".join(re.escape(c) for c in sorted(self._punctuation)) + r"])")
            if self._punctuation
            else None
        )

    @classmethod
    def from_bytes(cls, model_bytes: bytes, source: str = "tokenizer.model") -> Tokenizer:
        """Load a serialized SentencePiece model (e.g. a ``.nemo`` member's bytes)."""
        try:
            processor = spm.SentencePieceProcessor(model_proto=model_bytes)
        except RuntimeError as exc:
            reason = " ".join(str(exc).split())
            raise CheckpointError(f"{source}: not a SentencePiece model ({reason})") from exc
        return cls(processor, source)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a ``tokenizer.model`` file."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise CheckpointError(f"cannot read tokenizer '{os.fspath(path)}': {reason}") from exc
        return cls.from_bytes(data, source=f"'{os.fspath(path)}'")

    # ---------------------------------------------------------------- vocabulary

    @property
    def vocab_size(self) -> int:
        """V, the number of pieces; ids ``0 .. V-1`` are tokens."""
        return len(self._pieces)

    @property
    def blank_id(self) -> int:
        """The transducer/CTC blank: ``V``, one past the last piece (NeMo's convention)."""
        return len(self._pieces)

    @property
    def pieces(self) -> tuple[str, ...]:
        """Every piece, indexed by id."""
        return self._pieces

    def id_to_piece(self, token_id: int) -> str:
        """The piece of token ``token_id``; raises ``IndexError`` outside ``0 .. V-1``."""
        if not 0 <= token_id < len(self._pieces):
            raise IndexError(f"token id {token_id} outside the vocabulary (0..{len(self._pieces) - 1})")
        return self._pieces[token_id]

    @property
    def unknown_id(self) -> int:
        """The id SentencePiece gives text it cannot spell (``<unk>``)."""
        return int(self._sp.unk_id())

    @property
    def is_cased(self) -> bool:
        """True if some text piece has an upper-case letter (the model writes capitals)."""
        return self._is_cased

    def piece_to_id(self, piece: str) -> int | None:
        """The id of ``piece``, or None if the vocabulary lacks it."""
        return self._piece_ids.get(piece)

    @property
    def special_ids(self) -> frozenset[int]:
        """Marker pieces that are not text: control pieces and tags such as ``<EOU>``, ``<EOB>``.

        A tag is a piece of the form ``<...>`` or ``[...]``; ``<unk>`` is not counted (it decodes to text).
        """
        return self._special_ids

    @property
    def eou_ids(self) -> tuple[int, ...]:
        """Ids of the ``<EOU>`` and ``<EOB>`` pieces that the vocabulary has, in that order."""
        return tuple(i for piece in (EOU_PIECE, EOB_PIECE) if (i := self._piece_ids.get(piece)) is not None)

    @property
    def supported_punctuation(self) -> frozenset[str]:
        """Punctuation characters (Unicode category P*) found in the vocabulary's text pieces."""
        return self._punctuation

    def is_word_start(self, token_id: int) -> bool:
        """True if the token's piece starts with ``▁`` (begins a word); False outside the vocabulary."""
        return 0 <= token_id < len(self._pieces) and self._pieces[token_id].startswith(WORD_START)

    def is_punctuation(self, token_id: int) -> bool:
        """True if the token's piece, without a leading ``▁``, is nothing but supported punctuation."""
        if not 0 <= token_id < len(self._pieces) or token_id in self._special_ids:
            return False
        text = self._pieces[token_id].lstrip(WORD_START)
        return bool(text) and all(char in self._punctuation for char in text)

    # ---------------------------------------------------------------- text

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return list(self._sp.encode(text, out_type=int))

    def decode(self, token_ids: Iterable[int], strip_special: bool = False) -> str:
        """Text of a hypothesis, as NeMo 3.0.0 writes it.

        Ids outside ``0 .. V-1`` (the blank, TDT durations) are dropped; the pieces go through
        SentencePiece's ``decode_pieces``; then one whitespace before each supported punctuation
        character is removed. NeMo keeps marker pieces such as ``<EOU>`` in the text;
        ``strip_special=True`` drops them (callers report them as flags instead).

        Args:
            token_ids: (U,) token ids (ints, or anything ``int()`` accepts).
            strip_special: drop :attr:`special_ids` before decoding.
        """
        size = len(self._pieces)
        ids = [i for i in (int(t) for t in token_ids) if 0 <= i < size]
        if strip_special:
            ids = [i for i in ids if i not in self._special_ids]
        text: str = self._sp.decode_pieces([self._pieces[i] for i in ids])
        if self._space_before_punctuation is not None:
            text = self._space_before_punctuation.sub(r"\1", text)
        return text
