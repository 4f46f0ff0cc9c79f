"""HTTP/1.1 requests with a body on the WebSocket port (``POST /v1/audio/transcriptions``): the side door.

websockets serves the port's WebSocket handshakes and small GET pages, and refuses any request with a body
(its ``Request.parse`` raises on a ``Content-Length`` above 0 or any ``Transfer-Encoding``). Its
``process_request`` hook could answer a POST, but only with one ``Response`` built while its handshake timeout
runs (``server.start_timeout_s``): a long upload, a transcription that takes minutes, and a streamed
(server-sent events) answer do not fit. So the port's connection class (:class:`~streamer.server.gate.
GuardedConnection`) reads each request head first and offers it to :class:`BodyRoutes`, which takes a request
that has a body or names one of its routes: the connection's transport is handed to an :class:`HttpExchange`
(``transport.set_protocol``) and websockets never hears of it. Everything else goes to websockets as before.

Why not aiohttp or a second port: one more server stack for one endpoint, and clients that are given one base
URL (``OpenAI(base_url="http://host:8765/v1")``) expect the WebSocket and the file API on the same port. The
layer here is small because it serves one request per connection (``Connection: close``, as the rest of the
port does): a body by ``Content-Length`` or ``chunked`` coding, ``Expect: 100-continue``, a bound on its size
(413 before a byte of it is read when the length is declared), an idle timeout (408), and answers as one body
or as a ``chunked`` stream with write flow control. A refused body is read and dropped for a moment before the
connection closes, so that the client, still sending, reads the answer rather than a reset.

The Host, Origin and token checks are the port's own (``check_access``, the same as for every other request).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response, parse_headers
from websockets.streams import StreamReader

from streamer.errors import ProtocolError

if TYPE_CHECKING:
    from streamer.server.gate import GuardedConnection

logger = logging.getLogger(__name__)

READ_HIGH_WATER_BYTES = 1 << 20  # buffered and unread: stop reading the socket until the handler takes some
MAX_CHUNK_LINE_BYTES = 4096

Handler = Callable[["HttpExchange"], Awaitable[None]]
AccessCheck = Callable[["GuardedConnection", Request], "Response | None"]


class BodyError(ProtocolError):
    """The request's body cannot be read: ``status`` is the HTTP answer (400, 408, 413, 501)."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_head(head: bytes) -> Request | None:
    """The request line and headers as websockets' :class:`Request` (its header parser and limits); None when the
    head is not a well-formed HTTP/1.x request (websockets then answers it as it always did)."""
    line, _, rest = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        return None
    reader = StreamReader()
    reader.feed_data(rest)
    reader.feed_eof()
    parser = parse_headers(reader.read_line)
    try:
        next(parser)
    except StopIteration as done:
        headers: Headers = done.value
    except Exception:  # EOFError, ValueError, websockets' SecurityError: malformed or over a limit
        return None
    else:
        return None  # unreachable: all the data is there, the parser never waits
    try:
        method, path = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None
    return Request(path, headers, method, parts[2].decode("ascii"))


def declares_body(request: Request) -> bool:
    """True when the request says a body follows (websockets refuses such requests)."""
    lengths = request.headers.get_all("Content-Length")
    return "Transfer-Encoding" in request.headers or any(v.strip() != "0" for v in lengths)


class HttpExchange(asyncio.Protocol):
    """One request with a body and its answer, on a transport taken from websockets (see the module docstring).

    Args:
        transport: the connection (already connected: ``connection_made`` is not called again).
        request: its parsed head.
        rest: bytes that came after the head with it.
        idle_timeout_s: most seconds to wait for more of the body (then 408).
        linger_s: most seconds to read and drop an unread body after answering, before closing.
    """

    def __init__(
        self, transport: asyncio.Transport, request: Request, rest: bytes, idle_timeout_s: float, linger_s: float
    ) -> None:
        self.transport, self.request = transport, request
        self.idle_timeout_s, self.linger_s = idle_timeout_s, linger_s
        self.path = urlsplit(request.path).path
        self.gone = asyncio.Event()  # the connection was lost
        self.response_started = False
        self._buffer = bytearray(rest)
        self._eof = False
        self._wakeup: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._body_read = False
        self._discarding = False
        self._discard_left: int | None = None  # bytes of a declared body still to drop; None: until the client closes
        self._chunked = request.protocol == "HTTP/1.1"  # an HTTP/1.0 client gets a stream that ends at the close

    # ------------------------------------------------------------------ asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        if self._discarding or self._body_read:
            if self._discard_left is not None:
                self._discard_left -= len(data)
                if self._discard_left <= 0:
                    self._wake()
            return
        self._buffer += data
        if len(self._buffer) > READ_HIGH_WATER_BYTES and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        # Keep the transport open: the answer may still be to write (TLS cannot half-close: asyncio closes it).
        return self.transport.get_extra_info("ssl_object") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone.set()
        self._can_write.set()
        self._wake()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _wait(self) -> None:
        """Wait for more bytes, the end of the stream or the loss of the connection (at most idle_timeout_s)."""
        self._wakeup = asyncio.get_running_loop().create_future()
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        try:
            async with asyncio.timeout(self.idle_timeout_s):
                await self._wakeup
        except TimeoutError:
            raise BodyError(HTTPStatus.REQUEST_TIMEOUT, f"no more of the request body came within "
                            f"{self.idle_timeout_s:g} s (server.idle_timeout_s)") from None
        finally:
            self._wakeup = None

    # ------------------------------------------------------------------ the body

    async def read_body(self, max_bytes: int) -> bytes:
        """The whole body, at most ``max_bytes`` of it (else 413 before reading it, when its length is declared).

        Raises:
            BodyError: the body is too large, malformed, incomplete, or too slow to come.
        """
        headers = self.request.headers
        codings = [c.strip().lower() for v in headers.get_all("Transfer-Encoding") for c in v.split(",")]
        lengths = {v.strip() for v in headers.get_all("Content-Length")}
        if codings and lengths:
            raise BodyError(HTTPStatus.BAD_REQUEST, "the request has both Content-Length and Transfer-Encoding; "
                            "send one of them")
        if codings:
            if codings != ["chunked"]:
                raise BodyError(HTTPStatus.NOT_IMPLEMENTED, f"Transfer-Encoding {', '.join(codings)!r} is not "
                                "supported; send the body with Content-Length or 'chunked'")
            self._send_continue()
            body = await self._read_chunked(max_bytes)
        elif lengths:
            length = lengths.pop()
            if lengths or not length.isdigit() or len(length) > 18:
                raise BodyError(HTTPStatus.BAD_REQUEST, "Content-Length is not one whole number of bytes")
            if int(length) > max_bytes:
                self._discard_left = int(length) - len(self._buffer)
                raise BodyError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, _too_large(f"{length} bytes", max_bytes))
            self._send_continue()
            body = await self._read_exact(int(length))
        else:
            body = b""
        self._body_read = True
        return body

    def _send_continue(self) -> None:
        if self.request.headers.get("Expect", "").strip().lower() == "100-continue" and not self._buffer:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def _read_exact(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._check_open(f"after {len(self._buffer)} of its {size} bytes")
            await self._wait()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def _read_line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            if len(self._buffer) > MAX_CHUNK_LINE_BYTES:
                raise BodyError(HTTPStatus.BAD_REQUEST, "a chunk-size line of the chunked body is too long")
            self._check_open("in the middle of its chunked coding")
            await self._wait()
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    async def _read_chunked(self, max_bytes: int) -> bytes:
        body = bytearray()
        while True:
            size_text = (await self._read_line()).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BodyError(HTTPStatus.BAD_REQUEST, f"bad chunk size {size_text[:20]!r} in the chunked "
                                "body") from None
            if size == 0:
                while await self._read_line():  # trailer fields, ignored, up to the blank line
                    pass
                return bytes(body)
            if size < 0 or len(body) + size > max_bytes:
                raise BodyError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                _too_large(f"over {len(body) + size - 1} bytes", max_bytes))
            body += await self._read_exact(size)
            if await self._read_exact(2) != b"\r\n":
                raise BodyError(HTTPStatus.BAD_REQUEST, "a chunk of the chunked body does not end in CRLF")

    def _check_open(self, where: str) -> None:
        if self._eof or self.gone.is_set():
            raise BodyError(HTTPStatus.BAD_REQUEST, f"the request body ended early, {where}")

    # ------------------------------------------------------------------ the answer

    def respond(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        """The whole answer at once (``Connection: close``)."""
        head = self._head(status, content_type, headers)
        head["Content-Length"] = str(len(body))
        self._write_head(status, head)
        self.transport.write(body)

    def respond_with(self, response: Response) -> None:
        """A response made by websockets' helpers (the port's refusals: 400, 401, 403)."""
        self.response_started = True
        if not self.gone.is_set():
            self.transport.write(response.serialize())

    def start_stream(self, status: int, content_type: str, headers: dict[str, str] | None = None) -> None:
        """Start an answer whose body follows in :meth:`send_chunk` calls, ended by :meth:`end_stream`."""
        head = self._head(status, content_type, headers)
        if self._chunked:
            head["Transfer-Encoding"] = "chunked"
        self._write_head(status, head)

    def send_chunk(self, data: bytes) -> None:
        """More of a streamed answer (nothing when the client is gone); see :meth:`drain` for flow control."""
        if data and not self.gone.is_set():
            self.transport.write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)

    def end_stream(self) -> None:
        if self._chunked and not self.gone.is_set():
            self.transport.write(b"0\r\n\r\n")

    async def drain(self) -> None:
        """Wait while the client reads slower than the answer is written."""
        await self._can_write.wait()

    def _head(self, status: int, content_type: str, headers: dict[str, str] | None) -> dict[str, str]:
        return {"Date": email.utils.formatdate(usegmt=True), "Connection": "close", "Content-Type": content_type,
                "Cache-Control": "no-store", **(headers or {})}

    def _write_head(self, status: int, head: dict[str, str]) -> None:
        self.response_started = True
        if self.gone.is_set():
            return
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"] + [f"{k}: {v}" for k, v in head.items()]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def close(self) -> None:
        """End the connection after the answer. A body the client may still be sending is read and dropped first
        (for at most ``linger_s``), so that it gets to read the answer."""
        if not self._body_read and not self.gone.is_set() and not self._eof:
            self._discarding = True
            self._buffer.clear()
            if self._reading_paused:
                self._reading_paused = False
                self.transport.resume_reading()
            try:
                async with asyncio.timeout(self.linger_s):
                    while not (self.gone.is_set() or self._eof or (self._discard_left is not None
                                                                    and self._discard_left <= 0)):
                        self._wakeup = asyncio.get_running_loop().create_future()
                        await self._wakeup
            except TimeoutError:
                pass
        self.transport.close()


def _too_large(size: str, max_bytes: int) -> str:
    return f"the request body is {size}; this server takes at most {max_bytes} bytes (server.max_upload_bytes)"


class BodyRoutes:
    """The port's side door (:class:`~streamer.server.gate.SideDoor`): takes requests that carry a body or name one
    of its routes, checks them as the port checks every request, and runs the route's handler.

    Args:
        check_access: the port's Host, Origin and token check (a response refuses the request).
        idle_timeout_s: most seconds to wait for more of a body.
        linger_s: most seconds to drop an unread body after answering.
    """

    def __init__(self, check_access: AccessCheck, idle_timeout_s: float, linger_s: float) -> None:
        self.check_access, self.idle_timeout_s, self.linger_s = check_access, idle_timeout_s, linger_s
        self.routes: dict[str, Handler] = {}  # path -> the handler of its POST requests
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, path: str, handler: Handler) -> None:
        """Serve ``POST path`` with ``handler``."""
        self.routes[path] = handler

    def take(self, connection: GuardedConnection, transport: asyncio.Transport, head: bytes, rest: bytes) -> bool:
        request = parse_head(head)
        if request is None:
            return False
        path = urlsplit(request.path).path
        if path not in self.routes and not declares_body(request):
            return False
        exchange = HttpExchange(transport, request, rest, self.idle_timeout_s, self.linger_s)
        transport.set_protocol(exchange)
        task = asyncio.get_running_loop().create_task(self._serve(connection, exchange), name=f"http-{path}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _serve(self, connection: GuardedConnection, exchange: HttpExchange) -> None:
        request = exchange.request
        try:
            refused = self.check_access(connection, request)
            handler = self.routes.get(exchange.path)
            if refused is not None:
                exchange.respond_with(refused)
            elif handler is None:
                exchange.respond(HTTPStatus.METHOD_NOT_ALLOWED, b"only GET and HEAD are supported here\n",
                                 "text/plain; charset=utf-8")
            elif request.method != "POST":
                exchange.respond(HTTPStatus.METHOD_NOT_ALLOWED, f"{exchange.path} takes POST requests\n".encode(),
                                 "text/plain; charset=utf-8", {"Allow": "POST"})
            else:
                await handler(exchange)
        except Exception:
            logger.exception("%s %s failed", request.method, exchange.path)
            if not exchange.response_started:
                exchange.respond(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error (logged)\n",
                                 "text/plain; charset=utf-8")
        finally:
            await exchange.close()

    async def close(self, timeout_s: float) -> None:
        """Wait for the requests in progress (their sessions were ended by the core's shutdown); cancel those
        still running after ``timeout_s``."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)
