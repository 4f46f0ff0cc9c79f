"""``multipart/form-data`` bodies (RFC 7578), as HTML forms, curl ``-F`` and the OpenAI SDK send files.

The whole body is in memory already (its size is bounded by ``server.max_upload_bytes``); this finds the parts
by their boundary, reads each part's ``Content-Disposition`` name and filename, and keeps files as bytes and
other fields as text. Stdlib only. Malformed input is a :class:`FormError` naming what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote

from streamer.errors import ProtocolError

MAX_PARTS = 256
MAX_PART_HEAD_BYTES = 16 * 1024
MAX_FIELD_CHARS = 64 * 1024


class FormError(ProtocolError):
    """The body is not a well-formed ``multipart/form-data`` form."""


@dataclass(frozen=True, slots=True)
class FilePart:
    """An uploaded file: the name the client gave it (may be empty), its declared type, its bytes."""

    filename: str
    content_type: str
    data: bytes


@dataclass(slots=True)
class Form:
    """A parsed form: text fields by name (a name may repeat, e.g. ``timestamp_granularities[]``), files by name."""

    fields: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, FilePart] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        """The field's last value, or None when it is absent."""
        values = self.fields.get(name)
        return values[-1] if values else None


def header_params(value: str) -> tuple[str, dict[str, str]]:
    """``'form-data; name="file"; filename="a b.wav"'`` -> ``("form-data", {"name": "file", "filename": "a b.wav"})``.

    Parameter names are lower-cased; quoted values may hold ``;`` and backslash escapes.
    """
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t;":
            i += 1
        eq = rest.find("=", i)
        if eq < 0:
            break
        name = rest[i:eq].strip().lower()
        i = eq + 1
        if i < n and rest[i] == '"':
            i += 1
            chars = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(rest[i])
                i += 1
            i += 1  # the closing quote
            params[name] = "".join(chars)
        else:
            end = rest.find(";", i)
            end = n if end < 0 else end
            params[name] = rest[i:end].strip()
            i = end
    return main.strip().lower(), params


def parse_form(body: bytes, content_type: str | None) -> Form:
    """Parse a ``multipart/form-data`` body whose ``Content-Type`` header is ``content_type``.

    Raises:
        FormError: not multipart/form-data, no boundary, a part without a name, an unterminated body, text
            that is not UTF-8, or more than :data:`MAX_PARTS` parts.
    """
    kind, params = header_params(content_type or "")
    if kind != "multipart/form-data":
        raise FormError(f"the request body must be multipart/form-data (a form with the audio as 'file'), "
                        f"not {kind or 'an untyped body'!r}")
    boundary = params.get("boundary", "")
    if not 1 <= len(boundary) <= 200:
        raise FormError("the multipart/form-data Content-Type names no boundary (or one over 200 characters)")
    delimiter = b"--" + boundary.encode("latin-1")
    first = body.find(delimiter)
    if first < 0:
        raise FormError("the form's boundary does not occur in the body: the body is not the form it declares")
    form = Form()
    pos = first + len(delimiter)
    for _ in range(MAX_PARTS + 1):
        if body.startswith(b"--", pos):
            return form  # the closing delimiter
        line_end = body.find(b"\r\n", pos)
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise FormError("a multipart boundary line is not followed by a line break")
        start = line_end + 2
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise FormError("the form ends without its closing boundary (the upload was cut short?)")
        _add_part(form, memoryview(body)[start:end])
        pos = end + 2 + len(delimiter)
    raise FormError(f"the form has more than {MAX_PARTS} parts")


def _add_part(form: Form, part: memoryview) -> None:
    raw = bytes(part[: MAX_PART_HEAD_BYTES + 4])
    if raw.startswith(b"\r\n"):  # no headers at all (then the part has no name: refused below)
        head, data = b"", part[2:]
    else:
        head_end = raw.find(b"\r\n\r\n")
        if head_end < 0:
            raise FormError("a form part's headers are missing or larger than 16 KiB")
        head, data = raw[:head_end], part[head_end + 4 :]
    try:
        head_text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise FormError("a form part's headers are not UTF-8") from None
    headers: dict[str, str] = {}
    for line in head_text.split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    disposition, params = header_params(headers.get("content-disposition", ""))
    name = params.get("name")
    if disposition != "form-data" or not name:
        raise FormError("a form part has no 'Content-Disposition: form-data; name=...' header")
    filename = params.get("filename*", params.get("filename"))
    if filename is not None:
        if filename.lower().startswith("utf-8''"):
            filename = unquote(filename[7:])
        form.files[name] = FilePart(filename, headers.get("content-type", "application/octet-stream"), bytes(data))
        return
    if len(data) > MAX_FIELD_CHARS * 4:
        raise FormError(f"form field {name!r} is longer than {MAX_FIELD_CHARS} characters")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise FormError(f"form field {name!r} is not UTF-8 text") from None
    form.fields.setdefault(name, []).append(text)
