"""The sentences a corpus is read from: extracted text split by word frequency, plus everyday templates.

Dictionary text is full of rare words heard once, which a small model spends its capacity
misspelling (training-notes.md). So extracted sentences are split into `common` (every word among
the most frequent) and `rare` (the rest), and a corpus draws from everyday templates, common and
rare text in the proportions of a `TextMix`, with rare text a minority.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .everyday import everyday_sentences
from .sources import SOURCES, is_blocked, read_source
from .text import normalise

EXTRACTED_SOURCES = ("fortunes", "wordnet", "gcide", "devil")


@dataclass(frozen=True, slots=True)
class Sentence:
    """One transcript and the source it came from (a key of `streamer.training.sources.SOURCES`)."""

    text: str
    source: str
    category: str  # "everyday", "common" or "rare"


@dataclass(frozen=True, slots=True)
class TextMix:
    """Share of each sentence category in a corpus split; the shares are normalised to sum to 1."""

    everyday: float = 0.35
    common: float = 0.45
    rare: float = 0.20

    def counts(self, total: int) -> dict[str, int]:
        """Split `total` sentences into whole counts per category (the largest share takes the rounding)."""
        weights = {"everyday": self.everyday, "common": self.common, "rare": self.rare}
        norm = sum(weights.values())
        counts = {k: int(total * w / norm) for k, w in weights.items()}
        counts[max(weights, key=weights.__getitem__)] += total - sum(counts.values())
        return counts


@dataclass(frozen=True, slots=True)
class TextPool:
    """Deduplicated extracted sentences, shuffled, by frequency category."""

    common: tuple[Sentence, ...]
    rare: tuple[Sentence, ...]
    common_vocab_size: int

    def stats(self) -> dict[str, int]:
        """Sentence counts per category and source, for the corpus summary."""
        counts = Counter(f"{s.category}/{s.source}" for s in itertools.chain(self.common, self.rare))
        return dict(sorted(counts.items()))


def word_frequencies(per_source: dict[str, list[str]]) -> Counter[str]:
    """Relative word frequency averaged over sources, so the large dictionaries do not drown the rest."""
    freq: Counter[str] = Counter()
    for sentences in per_source.values():
        counts = Counter(w for s in sentences for w in s.split())
        total = sum(counts.values())
        for word, count in counts.items():
            freq[word] += count / total / len(per_source)
    return freq


def extract_sentences(roots: dict[str, Path] | None = None) -> dict[str, list[str]]:
    """Normalised, deduplicated, sorted sentences of every extracted source.

    Args:
        roots: per-source paths to read instead of the installed Debian files (for tests); sources
            missing from a given dict are skipped.
    """
    names = EXTRACTED_SOURCES if roots is None else tuple(n for n in EXTRACTED_SOURCES if n in roots)
    per_source = {}
    for name in names:
        root = None if roots is None else roots[name]
        kept = {t for t in map(normalise, read_source(name, root)) if t is not None and not is_blocked(t)}
        per_source[name] = sorted(kept)
    return per_source


def build_text_pool(seed: int, common_vocab_size: int = 5000, roots: dict[str, Path] | None = None) -> TextPool:
    """Extract all sources and split their sentences into common and rare.

    Args:
        seed: shuffles each category.
        common_vocab_size: a sentence is common if every word is among this many most frequent words.
        roots: see `extract_sentences`.
    """
    per_source = extract_sentences(roots)
    ranked = [w for w, _ in word_frequencies(per_source).most_common(common_vocab_size)]
    vocab = set(ranked)
    seen: set[str] = set()
    common, rare = [], []
    for source, sentences in per_source.items():
        for text in sentences:
            if text in seen:
                continue  # the same sentence in two sources counts once, for the first
            seen.add(text)
            is_common = all(w in vocab for w in text.split())
            target = common if is_common else rare
            target.append(Sentence(text, source, "common" if is_common else "rare"))
    rng = random.Random(seed)
    rng.shuffle(common)
    rng.shuffle(rare)
    return TextPool(tuple(common), tuple(rare), common_vocab_size)


def everyday_stream(seed: int, exclude: Iterable[str] = ()) -> Iterator[Sentence]:
    """Unique normalised everyday sentences, skipping `exclude` (held-out sentences)."""
    seen = set(exclude)
    for raw in everyday_sentences(seed):
        text = normalise(raw, min_words=1)
        if text is not None and text not in seen:
            seen.add(text)
            yield Sentence(text, "everyday", "everyday")


def licences() -> dict[str, str]:
    """Source name -> licence, for the model card."""
    return {name: f"{src.licence} [Debian: {src.debian_package}]" for name, src in SOURCES.items()}
