"""A session's hotwords, from text to the phrase tree its stream's decoder boosts (:mod:`streamer.asr.boosting`).

Each phrase is spelled the way the model writes (lower-cased for a model whose vocabulary has no capitals) and
tokenized by the model's own SentencePiece tokenizer, as NeMo's default ``bpe_mode`` does: the decoder boosts
that one spelling of it. A phrase the vocabulary cannot spell (a character it has no piece for) cannot be
boosted; it is left out and reported, the others still count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamer.asr.boosting import PhraseTree
from streamer.asr.tokenizer import Tokenizer
from streamer.protocol.limits import DEFAULT_HOTWORD_WEIGHT


@dataclass(frozen=True, slots=True)
class Hotwords:
    """What a session asked to boost: its phrases (checked by :func:`streamer.protocol.check_hotwords`) and the
    weight (NeMo's ``boosting_tree_alpha``; :data:`streamer.protocol.limits.DEFAULT_HOTWORD_WEIGHT` by default)."""

    phrases: tuple[str, ...]
    weight: float = DEFAULT_HOTWORD_WEIGHT


@dataclass(frozen=True, slots=True)
class CompiledHotwords:
    """A session's hotwords as its stream's decoder takes them.

    Attributes:
        tree: the phrase tree, None when no phrase could be boosted.
        phrases: the phrases boosted, as the client gave them.
        unspellable: the phrases left out: the model's vocabulary cannot spell them.
        weight: the weight the tree was built with.
    """

    tree: PhraseTree | None
    phrases: tuple[str, ...]
    unspellable: tuple[str, ...]
    weight: float


def compile_hotwords(tokenizer: Tokenizer | None, hotwords: Hotwords, device: torch.device | None = None
                     ) -> CompiledHotwords:
    """Tokenize ``hotwords`` and build their tree (on ``device``); see the module docstring.

    A model without a tokenizer (token ids only) cannot spell any phrase.
    """
    spelled: list[list[int]] = []
    phrases: list[str] = []
    unspellable: list[str] = []
    for phrase in hotwords.phrases:
        ids = model_spelling(tokenizer, phrase) if tokenizer is not None else None
        if ids is None:
            unspellable.append(phrase)
        else:
            spelled.append(ids)
            phrases.append(phrase)
    tree = None
    if spelled and tokenizer is not None and hotwords.weight > 0:
        tree = PhraseTree.build(spelled, tokenizer.vocab_size, hotwords.weight)
        if device is not None and device.type != "cpu":
            tree = tree.to(device)
    return CompiledHotwords(tree, tuple(phrases), tuple(unspellable), hotwords.weight)


def model_spelling(tokenizer: Tokenizer, phrase: str) -> list[int] | None:
    """The token ids of ``phrase`` as the model would write it, or None if its vocabulary cannot spell it."""
    text = " ".join(phrase.split())
    if not tokenizer.is_cased:
        text = text.lower()
    ids = tokenizer.encode(text)
    if not ids or tokenizer.unknown_id in ids or any(i in tokenizer.special_ids for i in ids):
        return None
    return ids
