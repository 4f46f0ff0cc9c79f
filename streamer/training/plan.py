"""Which sentence goes to which split and shard, decided once, up front, from the seed.

Held-out splits take their sentences first; the training split then draws from what is left and
skips every held-out transcript, so no evaluation sentence is ever trained on. One TTS engine
(festival by default) speaks only the `test_heldout_engine` split.

Held-out engine decision: **festival** (diphone kal/ked and HTS slt). The neural voices (piper's joe,
Kokoro's style mixtures) train: they are the closest to real speech we have, and each is one family
of one package, so holding one out would leave training a single neural voice. Pass
``--held-out-engine piper`` to measure transfer to an unseen neural voice instead.
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from .augment import AugmentConfig
from .synth import ENGINES
from .textpool import Sentence, TextMix, TextPool, everyday_stream

HELD_OUT_ENGINE = "festival"
# Share of utterances per engine, before the held-out engine is removed. The neural engines are slow on
# a CPU (one core: piper ~6x, kokoro ~1x real time against espeak-ng's ~240x), so their defaults are
# small; raise them with --engine-weights where there are cores to spare.
DEFAULT_ENGINE_WEIGHTS = {"espeak": 0.5, "flite": 0.37, "festival": 0.45, "piper": 0.1, "kokoro": 0.03}
# Voices that share recordings with a held-out engine's voice, and so stay out of the other splits:
# flite's kal16 and festival's kal_diphone are built from the same diphone database (speaker "kal").
SAME_SPEAKER_AS_HELD_OUT: dict[str, tuple[str, ...]] = {
    "festival": ("flite:kal16",),
    "flite": ("festival:kal_diphone",),
    "espeak": (),
    "piper": (),
    "kokoro": (),
}
_EVERYDAY_ONLY = TextMix(everyday=1.0, common=0.0, rare=0.0)


@dataclass(frozen=True, slots=True)
class SplitSpec:
    """One split: how much, spoken by which engines, from which text, augmented how.

    Exactly one of `hours` (estimated from the text, training) or `num_utterances` (evaluation) is set.
    """

    name: str
    engines: dict[str, float]  # engine -> share of utterances
    mix: TextMix = field(default_factory=TextMix)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    hours: float | None = None
    num_utterances: int | None = None
    excluded_voices: tuple[str, ...] = ()  # voice ids (``Voice.id``) never used in this split


@dataclass(frozen=True, slots=True)
class Utterance:
    """One planned utterance: its id, its transcript and where the transcript came from."""

    id: str
    index: int  # position within the split; seeds the utterance's voice and augmentation
    sentence: Sentence


@dataclass(frozen=True, slots=True)
class ShardTask:
    """Everything a worker needs to write one shard."""

    split: str
    shard: int
    seed: int
    spec: SplitSpec
    utterances: tuple[Utterance, ...]

    @property
    def stem(self) -> str:
        """File name stem inside the split's folder."""
        return f"shard-{self.shard:05d}"


def default_splits(
    train_hours: float,
    eval_utterances: int,
    held_out_engine: str = HELD_OUT_ENGINE,
    engine_weights: dict[str, float] | None = None,
    augment: AugmentConfig | None = None,
) -> list[SplitSpec]:
    """The five standard splits.

    train and dev are augmented alike (``augment``, default the full chain); test_seen_voices,
    test_heldout_engine and everyday are clean.

    Args:
        train_hours: hours of training audio.
        eval_utterances: utterances in each evaluation split.
        held_out_engine: the engine that speaks only ``test_heldout_engine``.
        engine_weights: share of utterances per engine (default `DEFAULT_ENGINE_WEIGHTS`); an engine
            left out or at 0 is not used; the held-out engine's weight is ignored.
        augment: the augmentation of train and dev (default ``AugmentConfig()``).
    """
    shares = DEFAULT_ENGINE_WEIGHTS if engine_weights is None else engine_weights
    seen = {e: w for e, w in shares.items() if e != held_out_engine and w > 0}
    if not seen:
        raise ValueError("no training engine left: give a positive weight to an engine that is not held out")
    x = SAME_SPEAKER_AS_HELD_OUT[held_out_engine]
    clean = AugmentConfig.clean()
    noisy = AugmentConfig() if augment is None else augment
    return [
        SplitSpec("train", seen, augment=noisy, hours=train_hours, excluded_voices=x),
        SplitSpec("dev", seen, augment=noisy, num_utterances=eval_utterances, excluded_voices=x),
        SplitSpec("test_seen_voices", seen, augment=clean, num_utterances=eval_utterances, excluded_voices=x),
        SplitSpec("test_heldout_engine", {held_out_engine: 1.0}, augment=clean, num_utterances=eval_utterances),
        SplitSpec(
            "everyday",
            seen,
            mix=_EVERYDAY_ONLY,
            augment=clean,
            num_utterances=eval_utterances,
            excluded_voices=x,
        ),
    ]


def parse_engine_weights(text: str) -> dict[str, float]:
    """Parse ``espeak=0.5,flite=0.35,piper=0.1`` into a dict (argparse type).

    Raises:
        argparse.ArgumentTypeError: unknown engine, bad number, negative weight, or none positive.
    """
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in ENGINES:
            raise argparse.ArgumentTypeError(f"{item!r}: write ENGINE=WEIGHT with ENGINE one of {', '.join(ENGINES)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: {value!r} is not a number") from None
        if not weights[name] >= 0:
            raise argparse.ArgumentTypeError(f"{item!r}: a weight must be 0 or more")
    if not any(w > 0 for w in weights.values()):
        raise argparse.ArgumentTypeError("give at least one engine a positive weight")
    return weights


def estimated_seconds(text: str) -> float:
    """Rough spoken length for planning hours: 60 ms per character plus edge silence (espeak and flite)."""
    return 0.06 * len(text) + 0.35


class _Draw:
    """Takes sentences from each category in turn; once a category runs out it starts over (repeats)."""

    def __init__(self, pool: TextPool, seed: int) -> None:
        self.taken: set[str] = set()
        self._lists = {"common": pool.common, "rare": pool.rare}
        self._positions = {"common": 0, "rare": 0}
        self._everyday = everyday_stream(seed)

    def next(self, category: str, heldout: set[str]) -> Sentence:
        """The next sentence of a category that is not held out (and not yet taken, on the first pass)."""
        if category == "everyday":
            return next(s for s in self._everyday if s.text not in heldout and s.text not in self.taken)
        sentences = self._lists[category]
        for _ in range(2 * len(sentences) + 1):
            position = self._positions[category]
            self._positions[category] += 1
            sentence = sentences[position % len(sentences)]
            if sentence.text in heldout or (position < len(sentences) and sentence.text in self.taken):
                continue
            self.taken.add(sentence.text)
            return sentence
        raise ValueError(
            f"the text pool has no usable {category!r} sentences left; give a smaller corpus "
            "or a mix without this category"
        )


def _interleave(mix: TextMix, total: int | None) -> Iterator[str]:
    """Categories in proportion to the mix, spread evenly (largest-remainder order)."""
    weights = {"everyday": mix.everyday, "common": mix.common, "rare": mix.rare}
    norm = sum(weights.values())
    credit = dict.fromkeys(weights, 0.0)
    for _ in range(total) if total is not None else itertools.count():
        for k in credit:
            credit[k] += weights[k] / norm
        best = max(credit, key=credit.__getitem__)
        credit[best] -= 1.0
        yield best


def plan_corpus(specs: list[SplitSpec], pool: TextPool, seed: int, shard_utterances: int) -> list[ShardTask]:
    """Assign sentences to splits and shards. Evaluation splits are planned first, then training.

    Args:
        specs: the splits.
        pool: extracted sentences (see `build_text_pool`).
        seed: corpus seed.
        shard_utterances: utterances per shard file.
    """
    draw = _Draw(pool, seed)
    heldout: set[str] = set()
    planned: dict[str, list[Sentence]] = {}
    for spec in sorted(specs, key=lambda s: s.hours is not None):  # evaluation splits first
        sentences: list[Sentence] = []
        if spec.num_utterances is not None:
            for category in _interleave(spec.mix, spec.num_utterances):
                sentences.append(draw.next(category, heldout))
            heldout.update(s.text for s in sentences)
        else:
            budget_s = (spec.hours or 0.0) * 3600
            for category in _interleave(spec.mix, None):
                if budget_s <= 0:
                    break
                sentences.append(draw.next(category, heldout))
                budget_s -= estimated_seconds(sentences[-1].text)
        planned[spec.name] = sentences
    return [task for spec in specs for task in _shards(spec, planned[spec.name], seed, shard_utterances)]


def _shards(spec: SplitSpec, sentences: list[Sentence], seed: int, shard_utterances: int) -> Iterator[ShardTask]:
    utterances = [Utterance(f"{spec.name}-{i:07d}", i, s) for i, s in enumerate(sentences)]
    for shard in range(math.ceil(len(utterances) / shard_utterances)):
        chunk = utterances[shard * shard_utterances : (shard + 1) * shard_utterances]
        yield ShardTask(spec.name, shard, seed, spec, tuple(chunk))
