"""SentencePiece tokenizer with NeMo's conventions, and words with timestamps."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import sentencepiece as spm

from streamer.asr.tokenizer import Tokenizer
from streamer.asr.words import Word, words_from_tokens
from streamer.errors import CheckpointError

CORPUS = [
    "hello world, how are you?",
    "the quick brown fox jumps over the lazy dog.",
    "i am fine, thanks!",
    "what is your name?",
    "my name is streamer.",
    "it's a test; really: yes.",
]


def _train(corpus: list[str], user_symbols: list[str], vocab_size: int) -> bytes:
    """A tiny BPE SentencePiece model, trained in memory."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 20), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        user_defined_symbols=user_symbols, character_coverage=1.0, minloglevel=2,
    )
    return model.getvalue()


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return _train(CORPUS, ["<EOU>", "<EOB>", "[noise]"], vocab_size=90)


@pytest.fixture(scope="module")
def tok(model_bytes: bytes) -> Tokenizer:
    return Tokenizer.from_bytes(model_bytes)


def _ids(tok: Tokenizer, *pieces: str) -> list[int]:
    """Ids of the given pieces (each must be in the vocabulary)."""
    ids = [tok.piece_to_id(p) for p in pieces]
    assert None not in ids, f"test vocabulary lacks one of {pieces}"
    return ids  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Vocabulary


def test_vocabulary_matches_sentencepiece(tok: Tokenizer, model_bytes: bytes) -> None:
    """V is the piece count, ids are SentencePiece ids, and blank is V."""
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    assert tok.vocab_size == sp.get_piece_size() == 90
    assert tok.blank_id == tok.vocab_size
    assert [tok.id_to_piece(i) for i in range(tok.vocab_size)] == [sp.id_to_piece(i) for i in range(90)]
    assert tok.encode("what is your name?") == sp.encode("what is your name?")
    assert tok.piece_to_id("<EOU>") == sp.piece_to_id("<EOU>") and tok.piece_to_id("no such piece") is None
    with pytest.raises(IndexError):
        tok.id_to_piece(tok.vocab_size)


def test_from_file(tmp_path: Path, model_bytes: bytes, tok: Tokenizer) -> None:
    """Loading from a file gives the same tokenizer; missing or corrupt files are CheckpointErrors."""
    path = tmp_path / "tokenizer.model"
    path.write_bytes(model_bytes)
    assert Tokenizer.from_file(path).pieces == tok.pieces
    with pytest.raises(CheckpointError, match="absent.model"):
        Tokenizer.from_file(tmp_path / "absent.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="not a SentencePiece model"):
        Tokenizer.from_file(tmp_path / "bad.model")


def test_special_and_eou_ids(tok: Tokenizer) -> None:
    """Tags and control pieces are special, <unk> and text are not; eou_ids are <EOU> then <EOB>."""
    eou, eob, noise = _ids(tok, "<EOU>", "<EOB>", "[noise]")
    assert tok.eou_ids == (eou, eob)
    assert {eou, eob, noise, _ids(tok, "<s>")[0], _ids(tok, "</s>")[0]} <= tok.special_ids
    assert _ids(tok, "<unk>")[0] not in tok.special_ids
    assert not any(tok.id_to_piece(i).isalpha() for i in tok.special_ids)


def test_eou_ids_absent_without_tags() -> None:
    """A vocabulary without <EOU>/<EOB> has no eou_ids."""
    plain = Tokenizer.from_bytes(_train(CORPUS, [], vocab_size=60))
    assert plain.eou_ids == ()


def test_supported_punctuation_from_text_pieces(tok: Tokenizer) -> None:
    """Punctuation is the P* characters of text pieces; '[' of the [noise] tag and '<' do not count."""
    assert tok.supported_punctuation == frozenset(",?.!';:")


def test_word_start_and_punctuation_flags(tok: Tokenizer) -> None:
    """'▁'-pieces start words; punctuation pieces are punctuation; out-of-range ids are neither."""
    word, inner, comma = _ids(tok, "▁the", "he", ",")
    assert tok.is_word_start(word) and not tok.is_word_start(inner)
    assert tok.is_punctuation(comma) and not tok.is_punctuation(word)
    assert not tok.is_word_start(tok.blank_id) and not tok.is_punctuation(tok.blank_id)


# --------------------------------------------------------------------------------------------------
# Decoding


def test_decode_round_trip_and_drops_blank(tok: Tokenizer) -> None:
    """Decoding encoded text gives the text back; blank and duration ids (>= V) are dropped."""
    text = "hello world, how are you?"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    with_blanks = [tok.blank_id] + ids[:3] + [tok.blank_id, tok.blank_id + 2] + ids[3:]
    assert tok.decode(with_blanks) == text


def test_decode_removes_one_space_before_punctuation(tok: Tokenizer) -> None:
    """NeMo removes exactly one whitespace before a supported punctuation character."""
    hello, space, comma, dot = _ids(tok, "▁h", "▁", ",", ".")
    ids = tok.encode("hello") + [space, comma] + tok.encode("world") + [space, dot]
    # SentencePiece alone writes "hello , world ."; NeMo's post-processing joins the punctuation.
    pieces = [tok.id_to_piece(i) for i in ids]
    assert tok.decode(ids) == "hello, world."
    assert "," in pieces and "▁" in pieces and hello not in tok.special_ids
    # Two spaces lose only one.
    assert tok.decode(tok.encode("hello") + [space, space, dot]) == "hello ."


def test_decode_keeps_or_strips_special_tags(tok: Tokenizer) -> None:
    """NeMo keeps <EOU> literally; strip_special drops the tags."""
    eou, noise = _ids(tok, "<EOU>", "[noise]")
    ids = tok.encode("what is your name?") + [eou]
    assert tok.decode(ids) == "what is your name?<EOU>"
    assert tok.decode(ids, strip_special=True) == "what is your name?"
    assert tok.decode([noise] + tok.encode("my name"), strip_special=True) == "my name"


def test_decode_without_punctuation_in_vocab_leaves_spaces() -> None:
    """With no punctuation in the vocabulary, nothing is stripped (NeMo applies the rule only then)."""
    corpus = ["hello world how are you", "my name is streamer"]
    plain = Tokenizer.from_bytes(_train(corpus, [], vocab_size=40))
    assert plain.supported_punctuation == frozenset()
    assert plain.decode(plain.encode("how are you")) == "how are you"


def test_duplicate_pieces_are_rejected() -> None:
    """A processor reporting the same piece twice cannot give NeMo's ids: CheckpointError."""

    class Duplicates(spm.SentencePieceProcessor):  # type: ignore[misc]
        def get_piece_size(self) -> int:
            return 3

        def id_to_piece(self, i: int) -> str:  # type: ignore[override]
            return ["<unk>", "a", "a"][i]

    with pytest.raises(CheckpointError, match="duplicate"):
        Tokenizer(Duplicates())


# --------------------------------------------------------------------------------------------------
# Words


def test_words_tdt_times_and_confidence(tok: Tokenizer) -> None:
    """TDT: word = first start to last (frame + max(duration, 1)); confidence = min over its tokens."""
    ids = _ids(tok, "▁h", "ow", "▁a", "re", "▁you", "?")
    frames = [2, 3, 6, 6, 9, 9]
    durations = [1, 2, 0, 0, 3, 0]
    confidences = [0.9, 0.8, 0.95, 0.7, 0.6, 0.99]
    words = words_from_tokens(tok, ids, frames, durations, confidences, frame_shift_s=0.08)
    assert [w.word for w in words] == ["how", "are", "you?"]
    # how: frames 2 .. 3+2 = 5; are: 6 .. 6+max(0,1) = 7; you?: 9 .. 9+3 = 12 ('?' takes the previous end).
    assert [(round(w.start_s / 0.08), round(w.end_s / 0.08)) for w in words] == [(2, 5), (6, 7), (9, 12)]
    assert [w.confidence for w in words] == [0.8, 0.7, 0.6]
    assert words[0] == Word("how", 2 * 0.08, 5 * 0.08, 0.8)


def test_words_rnnt_without_durations(tok: Tokenizer) -> None:
    """Without durations a token spans one frame; no confidences means 1.0."""
    ids = _ids(tok, "▁the", "▁name", "▁is")
    words = words_from_tokens(tok, ids, [0, 4, 10], None, None, frame_shift_s=0.1)
    assert [(w.word, w.start_s, w.end_s, w.confidence) for w in words] == [
        ("the", 0.0, 0.1, 1.0), ("name", 0.4, 0.5, 1.0), ("is", 1.0, 1.1, 1.0)
    ]


def test_words_skip_specials_and_attach_punctuation(tok: Tokenizer) -> None:
    """EOU/EOB and blank are no words; "▁ ," joins the previous word; a trailing lone "▁" is dropped."""
    eou, space, comma = _ids(tok, "<EOU>", "▁", ",")
    name = _ids(tok, "▁name")
    ids = name + [space, comma, eou, tok.blank_id] + name + [space]
    frames, durations = [1, 3, 3, 4, 5, 7, 9], [2, 1, 1, 1, 1, 1, 1]
    words = words_from_tokens(tok, ids, frames, durations, [0.9, 0.5, 0.8, 0, 0, 1, 1])
    assert [w.word for w in words] == ["name,", "name"]
    # "name" ends at 1 + 2 = 3; the space and the comma do not move it, but count for the confidence.
    assert round(words[0].end_s / 0.08) == 3 and words[0].confidence == 0.5


def test_words_first_token_starts_a_word(tok: Tokenizer) -> None:
    """A hypothesis that begins mid-word (no '▁') still yields a first word."""
    ids = _ids(tok, "he", "ll", "o")
    words = words_from_tokens(tok, ids, [0, 1, 2], [1, 1, 1], [0.5, 0.4, 0.3])
    assert [(w.word, w.confidence) for w in words] == [("hello", 0.3)]
    assert words_from_tokens(tok, [], [], [], []) == []


def test_words_reject_mismatched_lengths(tok: Tokenizer) -> None:
    """Token lists of different lengths are an error."""
    with pytest.raises(ValueError, match="differ in length"):
        words_from_tokens(tok, [1, 2], [0], None, None)
