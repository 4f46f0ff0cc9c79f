"""Reading a client's text message within the limits of "Errors and limits" (see :mod:`streamer.protocol`).

The size and nesting depth are checked before the text is parsed, and numbers and strings while and after it is,
so a hostile document never reaches the recursive parser or the big-integer conversion. Standard library only.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any

from streamer.protocol.messages import LONE_SURROGATE, MessageError

# Limits on a client's text message (see "Errors and limits"): checked before and while it is parsed, so a
# hostile document never reaches the recursive parser or the big-integer conversion.
MAX_TEXT_BYTES = 64 * 1024
MAX_JSON_DEPTH = 16
MAX_INT_DIGITS = 32
MAX_NUMBER_CHARS = 64
MAX_ID_CHARS = 256  # resume.session and resume.token (the server's are 12 and 43 characters)
# Hotwords (``start.hotwords`` and every other protocol's list): at most this many phrases, whatever
# ``engine.max_hotwords`` allows, each of at most MAX_HOTWORD_CHARS characters; a weight in [0, MAX_HOTWORD_WEIGHT].
MAX_HOTWORDS = 1000
MAX_HOTWORD_CHARS = 100
MAX_HOTWORD_WEIGHT = 10.0
# The weight of a session that names none, unless engine.hotword_weight says otherwise: NeMo's boosting_tree_alpha
# (see streamer.asr.boosting). At 1.0 the bundled model hears names it misses without them, and everyday sentences
# that hold none of the listed phrases stay as they were (tests/test_hotwords_model.py); at 2.0 more names come
# out right but more unrelated words turn into listed ones.
DEFAULT_HOTWORD_WEIGHT = 1.0
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc


def load_client_object(text: str | bytes) -> dict[str, Any]:
    """A client message's object, parsed only after the size and depth limits held, with number hooks."""
    if isinstance(text, bytes | bytearray):
        _check_size(len(text))
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MessageError("bad_json", f"text message is not valid JSON: not UTF-8 ({exc})") from exc
    _check_size(len(text))  # a character is at least one byte: a long text is refused without encoding it
    _check_size(len(text.encode("utf-8", "surrogatepass")))
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise MessageError(
            "bad_message", f"arrays and objects nested {depth} deep; the limit is {MAX_JSON_DEPTH}"
        )
    try:
        obj = json.loads(text, parse_int=_parse_int, parse_float=_parse_float)  # NaN: see _parse_float
    except (ValueError, RecursionError) as exc:  # RecursionError cannot happen within the depth limit
        raise MessageError("bad_json", f"text message is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise MessageError("bad_message", f"a message must be a JSON object, got {type(obj).__name__}")
    _check_strings(obj)
    return obj


def _check_size(size: int) -> None:
    if size > MAX_TEXT_BYTES:
        raise MessageError(
            "bad_message", f"text message of at least {size} bytes is over the limit of {MAX_TEXT_BYTES} bytes; "
            "send audio as binary frames and keep control messages small"
        )


# A JSON string from its opening quote: escapes included, up to its closing quote or, unterminated, to the end
# of the text. It cannot fail to match once a quote is found (``\\.?`` takes even a trailing backslash), so a
# search never starts again inside a string: linear in the text, whatever the quotes and backslashes.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.?[^"\\]*)*(?:"|$)', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _json_depth(text: str) -> int:
    """How deep arrays and objects nest in ``text``, without parsing it (brackets inside strings ignored).

    Linear in the text; for text that is not JSON the count is approximate, and the parser refuses it.
    """
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:  # nearly every message: no need to look closer
        return 0
    outside = _JSON_STRING.sub("", text)
    return max(itertools.accumulate(map(_DEPTH_STEP.__getitem__, _BRACKETS.findall(outside))), default=0)


def _parse_int(literal: str) -> int:
    digits = len(literal) - literal.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise MessageError(
            "bad_message", f"an integer of {digits} digits is over the limit of {MAX_INT_DIGITS} digits"
        )
    return int(literal)


def _parse_float(literal: str) -> float:
    """A JSON number with a fraction or exponent, finite. (``NaN``, ``Infinity`` and ``-Infinity``, which are
    not JSON, parse to floats as before: every field that takes a number refuses a non-finite one by name.)"""
    if len(literal) > MAX_NUMBER_CHARS:
        raise MessageError(
            "bad_message", f"a number of {len(literal)} characters is over the limit of {MAX_NUMBER_CHARS}"
        )
    value = float(literal)
    if not math.isfinite(value):
        raise MessageError("bad_message", f"the number {literal} is out of range (it is not a finite float)")
    return value


def _check_strings(value: Any) -> None:
    """Refuse a string or key that is not made of Unicode scalar values (a lone surrogate escape)."""
    if isinstance(value, str):
        if not value.isascii() and LONE_SURROGATE.search(value) is not None:
            raise MessageError(
                "bad_message", f"the string {show(value)} holds a lone surrogate (not a Unicode character); "
                "send valid UTF-8 text"
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key)
            _check_strings(item)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item)


def check_hotwords(value: Any, max_count: int = MAX_HOTWORDS, where: str = "hotwords") -> tuple[str, ...]:
    """A list of hotword phrases, checked and tidied: whitespace runs become one space, the ends are stripped, and
    a repeated phrase counts once. Case is kept (the engine spells a phrase the way the model writes).

    Args:
        value: what the client sent.
        max_count: the most phrases allowed (the server's ``engine.max_hotwords``, at most :data:`MAX_HOTWORDS`).
        where: the field's name, for the error message.

    Raises:
        MessageError: ``bad_message`` naming the field: not a list of strings, too many phrases, an empty one, one
            over :data:`MAX_HOTWORD_CHARS` characters or with a control character.
    """
    if not isinstance(value, list | tuple) or not all(isinstance(p, str) for p in value):
        raise MessageError("bad_message", f"{where!r} must be a list of strings (words or phrases), got {show(value)}")
    phrases = list(dict.fromkeys(" ".join(p.split()) for p in value))
    limit = min(max_count, MAX_HOTWORDS)
    if phrases and limit <= 0:
        raise MessageError("bad_message", f"this server takes no hotwords (engine.max_hotwords is 0); leave out "
                           f"{where!r}")
    if len(phrases) > limit:
        raise MessageError("bad_message", f"{where!r} has {len(phrases)} phrases; this server takes at most {limit} "
                           "(engine.max_hotwords); send the ones that matter most")
    for phrase in phrases:
        if not phrase:
            raise MessageError("bad_message", f"{where!r} holds an empty phrase; send words")
        if len(phrase) > MAX_HOTWORD_CHARS:
            raise MessageError("bad_message", f"the phrase {show(phrase, 40)} in {where!r} has {len(phrase)} "
                               f"characters, over the limit of {MAX_HOTWORD_CHARS}")
        if _CONTROL.search(phrase) is not None:
            raise MessageError("bad_message", f"the phrase {show(phrase, 40)} in {where!r} holds a control character")
    return tuple(phrases)


def check_hotword_weight(value: Any, where: str = "hotword_weight") -> float:
    """A hotword weight: a finite number in ``[0, MAX_HOTWORD_WEIGHT]`` (0 boosts nothing).

    Raises:
        MessageError: ``bad_message`` naming the field.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not 0 <= value <= MAX_HOTWORD_WEIGHT:
        raise MessageError("bad_message", f"{where!r} must be a number from 0 to {MAX_HOTWORD_WEIGHT:g}, got "
                           f"{show(value)}")
    return float(value)


def show(value: Any, max_chars: int = 100) -> str:
    """``repr(value)`` cut to ``max_chars`` (an error message never echoes a whole hostile input)."""
    text = repr(value)
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


