"""Turn written English into the spoken-word transcripts the model learns.

A transcript is lowercase letters, apostrophes and single spaces: numbers, times, money and a few
symbols become words first ("$5.50" -> "five dollars fifty cents", "7:45" -> "seven forty five"),
everything else that is not a letter is dropped. `normalise` returns None for text that does not
make a usable transcript (too short, too long, or with leftover abbreviations that a TTS engine
would spell out while the transcript does not).
"""

from __future__ import annotations

import re
from collections.abc import Callable

MIN_WORDS = 3
MAX_WORDS = 30

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_ORDINAL_WORDS = {
    "one": "first",
    "two": "second",
    "three": "third",
    "five": "fifth",
    "eight": "eighth",
    "nine": "ninth",
    "twelve": "twelfth",
}
_FRACTIONS = {
    (1, 2): "one half",
    (1, 3): "one third",
    (2, 3): "two thirds",
    (1, 4): "one quarter",
    (3, 4): "three quarters",
}
_CURRENCIES = {
    "$": ("dollar", "dollars", "cent", "cents"),
    "£": ("pound", "pounds", "penny", "pence"),
    "€": ("euro", "euros", "cent", "cents"),
}
_ABBREVIATIONS = {
    "mr": "mister",
    "mrs": "missus",
    "dr": "doctor",
    "st": "saint",
    "vs": "versus",
    "etc": "et cetera",
    "e.g": "for example",
    "i.e": "that is",
    "jr": "junior",
    "sr": "senior",
    "no": "number",
}
_SYMBOLS = {"&": " and ", "%": " percent ", "+": " plus ", "=": " equals ", "@": " at ", "#": " number "}
# Dictionary abbreviations ("n.", "v. t.", "cf.") that survive markup stripping: a sentence holding one
# is dropped, because a TTS engine would read it differently from its written form.
_DICT_ABBREVIATIONS = re.compile(
    r"\b(?:adj|adv|cf|fr|obs|pl|pr|prep|conj|interj|imp|vb|esp|lat|gr|syn|pp|ibid|viz|n|v|t|p|f)\.",
    re.IGNORECASE,
)
_WORD = re.compile(r"^[a-z]+(?:'[a-z]+)*$")
_VOWEL = re.compile(r"[aeiouy]")


def number_to_words(n: int) -> str:
    """Spell a cardinal: 0 -> "zero", 1205 -> "one thousand two hundred five", -3 -> "minus three"."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return _ONES[hundreds] + " hundred" + ("" if rest == 0 else " " + number_to_words(rest))
    for scale, name in _SCALES:
        if n >= scale:
            head, rest = divmod(n, scale)
            return number_to_words(head) + " " + name + ("" if rest == 0 else " " + number_to_words(rest))
    raise ValueError(f"number too large to spell: {n}")


def ordinal_to_words(n: int) -> str:
    """Spell an ordinal: 1 -> "first", 22 -> "twenty second", 40 -> "fortieth"."""
    words = number_to_words(n).split()
    last = words[-1]
    if last in _ORDINAL_WORDS:
        words[-1] = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def year_to_words(n: int) -> str:
    """Read a year the way people say it: 1984 -> "nineteen eighty four", 1905 -> "nineteen oh five"."""
    if 2000 <= n <= 2009 or n % 1000 == 0:
        return number_to_words(n)
    head, tail = divmod(n, 100)
    if tail == 0:
        return number_to_words(head) + " hundred"
    return number_to_words(head) + " " + ("oh " + _ONES[tail] if tail < 10 else number_to_words(tail))


def digits_to_words(digits: str) -> str:
    """Read digits one by one ("0712" -> "zero seven one two"), as for phone numbers or codes."""
    return " ".join(_ONES[int(d)] for d in digits)


def time_to_words(hours: int, minutes: int) -> str:
    """Read a clock time: (7, 0) -> "seven o'clock", (7, 5) -> "seven oh five", (7, 45) -> "seven forty five".

    Hours are read as given (no 12-hour conversion); a full hour after 12 reads "nineteen hundred".
    """
    if minutes == 0:
        return number_to_words(hours) + " o'clock" if hours <= 12 else number_to_words(hours) + " hundred"
    if minutes < 10:
        return number_to_words(hours) + " oh " + _ONES[minutes]
    return number_to_words(hours) + " " + number_to_words(minutes)


def _money(match: re.Match[str]) -> str:
    one, many, cent, cents = _CURRENCIES[match["cur"]]
    whole = int(match["whole"].replace(",", ""))
    words = number_to_words(whole) + " " + (one if whole == 1 else many)
    if match["frac"]:
        small = int(match["frac"].ljust(2, "0")[:2])
        if small:
            words += " " + number_to_words(small) + " " + (cent if small == 1 else cents)
    return f" {words} "


def _decimal(match: re.Match[str]) -> str:
    whole = number_to_words(int(match["whole"].replace(",", "")))
    return f" {whole} point {digits_to_words(match['frac'])} "


def _integer(match: re.Match[str]) -> str:
    text = match[0]
    n = int(text.replace(",", ""))
    if "," not in text and len(text) == 4 and 1100 <= n <= 2099:
        return f" {year_to_words(n)} "
    if (len(text) > 1 and text.startswith("0")) or n >= 10**15:
        return f" {digits_to_words(text.replace(',', ''))} "
    return f" {number_to_words(n)} "


def _fraction(match: re.Match[str]) -> str:
    top, bottom = int(match["top"]), int(match["bottom"])
    if (top, bottom) in _FRACTIONS:
        return f" {_FRACTIONS[(top, bottom)]} "
    return f" {number_to_words(top)} over {number_to_words(bottom)} "


_NUMBER_RULES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    (re.compile(r"(?P<cur>[$£€])\s?(?P<whole>\d[\d,]*)(?:\.(?P<frac>\d{1,2}))?\b"), _money),
    (
        re.compile(r"\b(?P<h>[01]?\d|2[0-3]):(?P<m>[0-5]\d)\b"),
        lambda m: f" {time_to_words(int(m['h']), int(m['m']))} ",
    ),
    (
        re.compile(r"\b(?P<n>\d+)(?:st|nd|rd|th)\b", re.IGNORECASE),
        lambda m: f" {ordinal_to_words(int(m['n']))} ",
    ),
    (
        re.compile(r"\b(?P<a>\d{4})\s?(?:-|–)\s?(?P<b>\d{2,4})\b"),
        lambda m: f" {m['a']} to {m['b'] if len(m['b']) == 4 else m['a'][:2] + m['b']} ",
    ),
    (re.compile(r"\b(?P<top>\d{1,3})/(?P<bottom>\d{1,3})\b"), _fraction),
    (re.compile(r"\b(?P<whole>\d[\d,]*)\.(?P<frac>\d+)\b"), _decimal),
    (re.compile(r"\b\d{1,3}(?:,\d{3})+\b|\b\d+\b"), _integer),
)


def numbers_to_words(text: str) -> str:
    """Replace money, times, ordinals, year ranges, fractions, decimals and integers with words."""
    for pattern, replace in _NUMBER_RULES:
        text = pattern.sub(replace, text)
    return text


def _expand_abbreviations(text: str) -> str:
    for short, long in _ABBREVIATIONS.items():
        pattern = r"\b" + re.escape(short) + r"\.(?=\s|$)" if short != "no" else r"\bno\.(?=\s*\d)"
        text = re.sub(pattern, f" {long} ", text, flags=re.IGNORECASE)
    return text


def normalise(text: str, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> str | None:
    """Reduce written text to a spoken-word transcript, or None if it makes no usable transcript.

    Args:
        text: one sentence of written English, possibly with numbers and punctuation.
        min_words: fewest words kept.
        max_words: most words kept.

    Returns:
        Lowercase words separated by single spaces, or None.
    """
    if _DICT_ABBREVIATIONS.search(text) or re.search(r"[<>{}\\|^~_*]", text):
        return None
    text = _expand_abbreviations(text.replace("’", "'").replace("‘", "'"))
    text = numbers_to_words(text)
    for symbol, spoken in _SYMBOLS.items():
        text = text.replace(symbol, spoken)
    text = text.lower()
    text = re.sub(r"[-–—/]", " ", text)
    text = re.sub(r"[^a-z' ]+", " ", text)
    words = [w.strip("'") for w in text.split()]
    words = [w for w in words if w]
    if not min_words <= len(words) <= max_words:
        return None
    for word in words:
        if not _WORD.match(word) or (len(word) > 1 and not _VOWEL.search(word)) or len(word) > 24:
            return None
        if len(word) == 1 and word not in ("a", "i", "o"):
            return None
    return " ".join(words)


def split_sentences(paragraph: str) -> list[str]:
    """Split running text at sentence ends (. ! ?) followed by space and a capital, quote or digit."""
    paragraph = re.sub(r"\s+", " ", paragraph).strip()
    parts = re.split(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])", paragraph)
    return [p.strip() for p in parts if p.strip()]
