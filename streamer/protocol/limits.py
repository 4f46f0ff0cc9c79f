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


def show(value: Any, max_chars: int = 100) -> str:
    """``repr(value)`` cut to ``max_chars`` (an error message never echoes a whole hostile input)."""
    text = repr(value)
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


