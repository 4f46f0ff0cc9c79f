"""Read English sentences out of Debian text packages, offline.

Each reader yields raw written sentences; `streamer.training.text.normalise` turns them into
transcripts. The packages and their licences (for the model card) are in `SOURCES`.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .text import split_sentences


@dataclass(frozen=True, slots=True)
class TextSource:
    """One Debian package we read text from, and the terms it comes under."""

    name: str
    debian_package: str
    path: str
    licence: str


SOURCES: dict[str, TextSource] = {
    "fortunes": TextSource(
        "fortunes",
        "fortunes, fortunes-min",
        "/usr/share/games/fortunes",
        "mixed: quotations collected from many authors, redistributable as part of Debian main "
        "(see /usr/share/doc/fortunes/copyright)",
    ),
    "wordnet": TextSource(
        "wordnet",
        "wordnet-base",
        "/usr/share/wordnet",
        "WordNet 3.0 licence (Princeton University; permissive, BSD-like, keep the copyright notice)",
    ),
    "gcide": TextSource(
        "gcide",
        "dict-gcide",
        "/usr/share/dictd/gcide.dict.dz",
        "GPL-2.0-or-later (GNU Collaborative International Dictionary of English, from Webster's 1913)",
    ),
    "devil": TextSource(
        "devil",
        "dict-devil",
        "/usr/share/dictd/devil.dict.dz",
        "public domain (Ambrose Bierce, The Devil's Dictionary, 1911)",
    ),
    "everyday": TextSource(
        "everyday",
        "-",
        "streamer/training/everyday.py",
        "Apache-2.0 (templates written for this project)",
    ),
}

# Fortune files that are pictures, not prose, or not in English.
_SKIPPED_FORTUNES = {"ascii-art", "translate-me"}
# Slurs and the like: a sentence holding one of these is not read aloud into the corpus.
_BLOCKED_WORDS = re.compile(
    r"\b(?:nigger|niggers|nigga|kike|kikes|chink|chinks|spic|spics|wetback|faggot|"
    r"faggots|fag|fags|tranny|retard|retards|coon|coons|gook|gooks|dago|dagoes)\b",
    re.IGNORECASE,
)


def is_blocked(sentence: str) -> bool:
    """True if the sentence holds a slur we keep out of the corpus."""
    return _BLOCKED_WORDS.search(sentence) is not None


def read_fortunes(directory: Path) -> Iterator[str]:
    """Sentences of every fortune file (one fortune per ``%`` block), attributions dropped."""
    for path in sorted(directory.iterdir()):
        if path.suffix or not path.is_file() or path.name in _SKIPPED_FORTUNES:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for block in text.split("\n%\n"):
            lines = [ln for ln in block.splitlines() if not re.match(r"^\s*(--|—)", ln)]
            prose = " ".join(ln for ln in lines if _is_prose(ln))
            yield from split_sentences(prose)


def _is_prose(line: str) -> bool:
    letters = sum(ch.isalpha() or ch.isspace() for ch in line)
    return bool(line.strip()) and letters >= 0.85 * len(line)


def read_wordnet(directory: Path) -> Iterator[str]:
    """WordNet glosses: each definition, then its quoted usage examples (the examples are everyday prose)."""
    for pos in ("noun", "verb", "adj", "adv"):
        with open(directory / f"data.{pos}", encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if line.startswith(" ") or "|" not in line:
                    continue  # licence header
                gloss = line.split("|", 1)[1].strip()
                for part in re.split(r";\s*", gloss):
                    part = part.strip().strip('"').strip()
                    if part:
                        yield part[0].upper() + part[1:]


def read_gcide(path: Path) -> Iterator[str]:
    """Definitions and quotations of the GCIDE dictionary, with headwords and markup removed."""
    yield from _dict_paragraphs(path, _clean_gcide)


def read_devil(path: Path) -> Iterator[str]:
    """The Devil's Dictionary: definitions and verses, headwords removed."""
    yield from _dict_paragraphs(path, _clean_devil)


def _dict_paragraphs(path: Path, clean: Callable[[str], str]) -> Iterator[str]:
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:  # dictzip is gzip
        text = f.read()
    for paragraph in re.split(r"\n\s*\n", text):
        if paragraph.startswith("00-database") or "*" * 5 in paragraph:
            continue
        yield from split_sentences(clean(paragraph))


def _clean_gcide(paragraph: str) -> str:
    paragraph = re.sub(r"^\S[^\\\n]*\\[^\\]*\\,?[^\n\[]*", "", paragraph)  # headword \pro*nun"ci*a`tion\, n.
    paragraph = re.sub(r"--\s?[A-Z][^\n]*", "", paragraph)  # --Shak., --Bp. Hall.
    paragraph = _strip_nested(paragraph, "[", "]")  # etymologies, [1913 Webster], [R.]
    paragraph = re.sub(r"\([A-Z][a-z]*\.(?:\s?[A-Z][a-z]*\.)*\)", "", paragraph)  # (Bot.), (Zool.)
    paragraph = re.sub(r"\{([^}]*)\}", r"\1", paragraph)  # {cross references}
    paragraph = re.sub(r"^\s*\d+\.\s", "", paragraph, flags=re.MULTILINE)  # numbered senses
    paragraph = re.sub(r"\b(?:Syn|Note|See also|See|Cf)\.?:?[^\n]*", "", paragraph)
    return paragraph.replace("?", " ") if re.search(r"\?\s*\w", paragraph) else paragraph


def _clean_devil(paragraph: str) -> str:
    paragraph = re.sub(r"^[A-Z][A-Z' -]+,\s*(?:[a-z]+\.\s*)+", "", paragraph)  # "AFFLICTION, n."
    return "\n".join(ln for ln in paragraph.splitlines() if not re.match(r"^\s{20,}\S", ln))  # signatures


def _strip_nested(text: str, open_char: str, close_char: str) -> str:
    depth, kept = 0, []
    for ch in text:
        if ch == open_char:
            depth += 1
        elif ch == close_char and depth:
            depth -= 1
        elif depth == 0:
            kept.append(ch)
    return "".join(kept)


def read_source(name: str, root: Path | None = None) -> Iterator[str]:
    """Raw sentences of one source in `SOURCES` (not "everyday", which is generated).

    Args:
        name: a key of `SOURCES`.
        root: where to read instead of the Debian path (for tests); a directory or a file like the original.
    """
    path = Path(root) if root is not None else Path(SOURCES[name].path)
    readers = {"fortunes": read_fortunes, "wordnet": read_wordnet, "gcide": read_gcide, "devil": read_devil}
    return readers[name](path)
