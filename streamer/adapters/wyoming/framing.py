"""Wyoming's framing: events on a byte stream, read within limits and written as one block each.

An event is a JSON header line ``{"type", "data"?, "data_length"?, "payload_length"?, "version"?}\\n``, then
``data_length`` bytes of a JSON object merged over the header's ``data``, then ``payload_length`` bytes of payload
(PCM audio for ``audio-chunk``). This module reads events from an :class:`asyncio.StreamReader` and encodes them;
it knows no event's meaning.

Reading never trusts the client: the header line and the data block are held to protocol v1's limits on a text
message (:func:`streamer.protocol.limits.load_client_object`: 64 KiB, nesting, numbers), a payload to
``max_payload_bytes``. A bad event raises :class:`FramingError` (the ``wyoming`` package returns None, which looks
like the end of the stream) saying whether the reader still knows where the next event starts (``in_sync``): after a
header that is not JSON it does not (a payload may follow, of unknown length), after a refused data block or an
oversized payload it does (those bytes are read and dropped, never held). What a lying ``payload_length`` costs: a
longer one swallows the events after it until its bytes came (or the idle timeout ends the connection); a shorter one
leaves audio bytes where the next header should be, which fail to parse.

We write ``data`` inline in the header line (no ``data_length``): every Wyoming reader merges both forms, and
readers older than the ``data_length`` field read only this one.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from streamer.errors import ProtocolError
from streamer.protocol import MessageError
from streamer.protocol.limits import MAX_TEXT_BYTES, load_client_object

WYOMING_VERSION = "1.10.2"  # the protocol release this adapter follows (the ``wyoming`` package's version)
MAX_HEADER_BYTES = MAX_TEXT_BYTES  # a header line, newline included (the StreamReader's limit)
MAX_DATA_BYTES = MAX_TEXT_BYTES
_DISCARD_BYTES = 1 << 16  # bytes read at a time while dropping a refused block


@dataclass(frozen=True, slots=True)
class WyomingEvent:
    """One event: its type, its data (header ``data`` and data block merged), its payload."""

    type: str
    data: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""


class FramingError(ProtocolError):
    """An event that cannot be read as one.

    Args:
        code: the error code for the client.
        message: what was wrong, for the client.
        in_sync: True when the event's bytes were consumed whole, so the next event starts where reading goes on.
        event_type: the event's type when the header said it.
    """

    def __init__(self, code: str, message: str, in_sync: bool, event_type: str | None = None) -> None:
        super().__init__(message)
        self.code, self.in_sync, self.event_type = code, in_sync, event_type


def _detail(exc: MessageError) -> str:
    """A JSON error in words that fit here (the shared reader speaks of protocol v1's text messages)."""
    return str(exc).removeprefix("text message is not valid JSON: ").replace("text message", "header")


def encode_event(event: WyomingEvent) -> bytes:
    """The event's bytes: its header line (data inline) and payload. Strict JSON: a NaN here is a bug (ValueError)."""
    header: dict[str, Any] = {"type": event.type, "version": WYOMING_VERSION}
    if event.data:
        header["data"] = event.data
    if event.payload:
        header["payload_length"] = len(event.payload)
    line = json.dumps(header, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    return line + b"\n" + event.payload


class EventReader:
    """Reads events from one client's stream (one reader at a time; cancelling loses the event being read).

    Args:
        reader: the connection's stream; its ``limit`` must be at least :data:`MAX_HEADER_BYTES`.
        max_payload_bytes: the largest payload accepted; a larger one is dropped as it arrives.
    """

    def __init__(self, reader: asyncio.StreamReader, max_payload_bytes: int) -> None:
        self._reader, self.max_payload_bytes = reader, max_payload_bytes
        self.waiting_for = ""  # what the reader waits for in the middle of an event ("" between events)

    async def read(self) -> WyomingEvent | None:
        """The next event; None at the end of the stream (an event cut off by it is dropped).

        Raises:
            FramingError: the event is malformed or over a limit (see the module docstring).
        """
        self.waiting_for = ""
        line = b"\n"
        while not line.strip():  # a blank line carries nothing (a client typing by hand)
            try:
                line = await self._reader.readline()
            except ValueError as exc:  # over the StreamReader's limit: the line's start is dropped with its buffer
                raise FramingError("bad_event", f"an event header line is longer than {MAX_HEADER_BYTES} bytes; a "
                                   "header is one line of JSON ending in a newline", in_sync=False) from exc
            if not line.endswith(b"\n"):
                return None  # the end of the stream (a partial line is no event)
        header = self._header(line)
        kind = header["type"]
        data_length, payload_length = (self._length(header, key) for key in ("data_length", "payload_length"))
        try:
            data = await self._data(header, data_length)
            payload = await self._payload(kind, payload_length)
        except FramingError as exc:
            if not exc.in_sync:
                raise
            try:  # whatever was refused, the payload is dropped too
                await self._discard(payload_length)
            except asyncio.IncompleteReadError:
                return None
            raise
        except asyncio.IncompleteReadError:
            return None  # the stream ended in the middle of the event
        return WyomingEvent(kind, data, payload)

    def _header(self, line: bytes) -> dict[str, Any]:
        try:
            header = load_client_object(line)
        except MessageError as exc:
            raise FramingError("bad_event", f"an event header must be one line of JSON: {_detail(exc)}",
                               in_sync=False) from exc
        kind = header.get("type")
        if not isinstance(kind, str) or not kind:
            raise FramingError("bad_event", "an event header needs 'type', a non-empty string", in_sync=False)
        return header

    @staticmethod
    def _length(header: dict[str, Any], key: str) -> int:
        value = header.get(key)
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise FramingError("bad_event", f"{key!r} of event {header['type']!r} must be a whole number of bytes, "
                               f"got {value!r}", in_sync=False, event_type=header["type"])
        return value

    async def _data(self, header: dict[str, Any], data_length: int) -> dict[str, Any]:
        """The header's ``data`` with the data block merged over it; the block is consumed whatever is wrong."""
        kind = header["type"]
        block: dict[str, Any] = {}
        if data_length > MAX_DATA_BYTES:
            await self._discard(data_length)
            raise FramingError("too_large", f"the data block of event {kind!r} ({data_length} bytes) is over the "
                               f"limit of {MAX_DATA_BYTES} bytes; the event was dropped", in_sync=True, event_type=kind)
        if data_length:
            raw = await self._exactly(data_length, f"the data block (data_length) of event {kind!r}")
            try:
                block = load_client_object(raw)
            except MessageError as exc:
                raise FramingError("bad_event", f"the data block of event {kind!r} is not a JSON object: "
                                   f"{_detail(exc)}", in_sync=True, event_type=kind) from exc
        data = header.get("data")
        if data is None:
            return block
        if not isinstance(data, dict):
            raise FramingError("bad_event", f"'data' of event {kind!r} must be a JSON object, got "
                               f"{type(data).__name__}", in_sync=True, event_type=kind)
        return {**data, **block}

    async def _payload(self, kind: str, payload_length: int) -> bytes:
        if payload_length > self.max_payload_bytes:
            raise FramingError("too_large", f"the payload of event {kind!r} ({payload_length} bytes) is over the "
                               f"limit of {self.max_payload_bytes} bytes (server.max_frame_bytes); send audio in "
                               "smaller chunks. The event was dropped", in_sync=True, event_type=kind)
        return await self._exactly(payload_length, f"the payload (payload_length) of event {kind!r}")

    async def _exactly(self, n: int, what: str) -> bytes:
        """``n`` bytes; :attr:`waiting_for` says how far they came meanwhile."""
        parts: list[bytes] = []
        got = 0
        while got < n:
            self.waiting_for = f"{what} ({got} of {n} bytes came)"
            chunk = await self._reader.read(n - got)
            if not chunk:
                raise asyncio.IncompleteReadError(b"".join(parts), n)
            parts.append(chunk)
            got += len(chunk)
        self.waiting_for = ""
        return b"".join(parts)

    async def _discard(self, n: int) -> None:
        """Read and drop ``n`` bytes (a refused block), never holding more than 64 KiB of them."""
        left = n
        while left > 0:
            self.waiting_for = f"the rest of a refused event ({n - left} of {n} bytes came)"
            chunk = await self._reader.read(min(left, _DISCARD_BYTES))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(chunk)
        self.waiting_for = ""
