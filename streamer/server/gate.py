"""What a connection may hold before its request is read: the handshake cap, the request head, pipelining, EMFILE.

websockets' ``serve`` reads one HTTP request per connection, with no cap on connections that are still
sending theirs. :class:`GuardedConnection` (``serve``'s ``create_connection``) adds one:

- at most ``server.max_handshakes`` connections may be sending their request head at once; one more is
  closed as soon as it is accepted (it has sent nothing yet);
- a request head (request line and headers) is at most :data:`MAX_REQUEST_HEAD_BYTES`, else HTTP 431;
- bytes after the head that arrive before the answer (a pipelined second request) are dropped: the
  first request gets its answer with ``Connection: close`` and the connection ends cleanly (a client
  retries the rest on a new connection, as HTTP/1.1 allows);
- a request websockets cannot take, one with a body (``POST /v1/audio/transcriptions``), goes to the
  :class:`SideDoor` instead. So that websockets never sees such a connection (no handshake task, no
  handshake timeout on a long upload), websockets' ``connection_made`` is called only once the head is
  complete and the side door has passed on it; until then this class keeps the handshake timeout
  (``server.start_timeout_s``) itself.

:class:`AcceptErrors` turns asyncio's traceback for each ``accept()`` that fails for want of file
descriptors (hundreds a second under load) into one warning per episode.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from streamer.server.metrics import Metrics

logger = logging.getLogger(__name__)

MAX_REQUEST_HEAD_BYTES = 32 * 1024
HEAD_END = b"\r\n\r\n"
ACCEPT_FAILED = "socket.accept() out of system resource"  # asyncio's message for EMFILE, ENFILE, ENOBUFS, ENOMEM
EPISODE_QUIET_S = 5.0  # an EMFILE episode ends at the first connection accepted this long after the last failure


class HandshakeGate:
    """Counts connections whose request head is still coming in; shared by every connection of one server.

    Args:
        max_handshakes: ``server.max_handshakes``.
        metrics: counts refusals (``streamer_connections_refused_total``).
        accept_errors: told of each accepted connection (it ends an out-of-descriptors episode).
        head_timeout_s: how long a connection may take to send its request head.
    """

    def __init__(
        self, max_handshakes: int, metrics: Metrics, accept_errors: AcceptErrors, head_timeout_s: float = 10.0
    ) -> None:
        self.max_handshakes, self.metrics, self.accept_errors = max_handshakes, metrics, accept_errors
        self.head_timeout_s = head_timeout_s  # to send the request head (server.start_timeout_s)
        self.in_handshake = 0
        self._full_logged = False

    def enter(self) -> bool:
        """A connection was accepted: True when it may send its request, False when it must be closed."""
        self.accept_errors.accepted()
        if self.in_handshake >= self.max_handshakes:
            self.metrics.connections_refused_total.inc(label_value="handshakes")
            if not self._full_logged:
                self._full_logged = True
                logger.warning("%d connections are still sending their request (server.max_handshakes); new "
                               "connections are closed until some finish (logged once until it eases)",
                               self.max_handshakes)
            return False
        self.in_handshake += 1
        return True

    def leave(self) -> None:
        self.in_handshake -= 1
        if self.in_handshake < self.max_handshakes // 2:
            self._full_logged = False


class SideDoor(Protocol):
    """Takes the requests websockets cannot (those with a body) off a connection: see ``streamer.server.http_body``."""

    def take(self, connection: GuardedConnection, transport: asyncio.Transport, head: bytes, rest: bytes) -> bool:
        """True when it took the request (it owns ``transport`` from now on); False leaves it to websockets.

        Args:
            connection: the connection (its ``respond`` and ``remote_address`` work before websockets starts).
            transport: the connection's transport.
            head: the request line and headers, up to and including the blank line.
            rest: what came after the head so far (the start of a body).
        """
        ...


class GuardedConnection(ServerConnection):
    """A :class:`ServerConnection` that bounds its request head, counts itself in the gate, drops pipelining, and
    hands requests with a body to the side door.

    Made by :func:`connection_factory` (the gate and the side door are passed first; the rest are websockets'
    arguments).
    """

    def __init__(self, gate: HandshakeGate, side_door: SideDoor | None, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate, self.side_door = gate, side_door
        self.pipelined = False  # bytes came after the request head before the answer: they were dropped
        self._head = bytearray()
        self._in_gate = False
        self._head_done = False
        self._raw: asyncio.Transport | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._started = False  # websockets' connection_made was called: the connection is websockets'

    @property
    def remote_address(self) -> Any:
        """The peer's address, also before websockets has the connection."""
        return self._raw.get_extra_info("peername") if self._raw is not None else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._raw = transport
        if not self.gate.enter():
            self._head_done = True
            transport.abort()  # websockets never hears of it
            return
        self._in_gate = True
        self._head_timer = asyncio.get_running_loop().call_later(self.gate.head_timeout_s, transport.abort)

    def data_received(self, data: bytes) -> None:
        if self._head_done:
            if not self._started:
                return  # refused, or answered 431: nothing more is read
            if self.protocol.state is State.CONNECTING:  # more than one request, or frames before our answer
                self.pipelined = True
                return
            super().data_received(data)
            return
        seen = len(self._head)
        self._head += data
        end = self._head.find(HEAD_END, max(0, seen - len(HEAD_END) + 1))
        if end < 0:
            if len(self._head) > MAX_REQUEST_HEAD_BYTES:
                self._refuse_large_head()
            return
        cut = end + len(HEAD_END)
        head, rest = bytes(self._head[:cut]), bytes(self._head[cut:])
        self._finish_head()
        assert self._raw is not None
        if self.side_door is not None and self.side_door.take(self, self._raw, head, rest):
            return
        self._started = True
        super().connection_made(self._raw)
        if rest:
            self.pipelined = True
        super().data_received(head)

    def eof_received(self) -> bool | None:
        if self._started:
            return super().eof_received()
        return None  # closes the transport: the client gave up before finishing its request head

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish_head()
        if self._started:
            super().connection_lost(exc)

    def _finish_head(self) -> None:
        self._head_done = True
        self._head = bytearray()
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._in_gate:
            self._in_gate = False
            self.gate.leave()

    def _refuse_large_head(self) -> None:
        self._finish_head()
        self.gate.metrics.connections_refused_total.inc(label_value="request_too_large")
        body = f"the request line and headers are larger than {MAX_REQUEST_HEAD_BYTES} bytes\n".encode()
        assert self._raw is not None
        self._raw.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
                        b"Content-Type: text/plain; charset=utf-8\r\n"
                        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        self._raw.close()


def connection_factory(gate: HandshakeGate, side_door: SideDoor | None = None) -> Any:
    """``create_connection`` for websockets' ``serve``: a :class:`GuardedConnection` counted in ``gate``, handing
    requests with a body to ``side_door`` (None: websockets answers them, with 400)."""

    def create(*args: Any, **kwargs: Any) -> GuardedConnection:
        return GuardedConnection(gate, side_door, *args, **kwargs)

    return create


class AcceptErrors:
    """The event loop's exception handler while the server runs: ``accept()`` failures logged once per episode.

    Every other exception goes to the handler that was there before (or the loop's default).

    Args:
        metrics: counts every failed ``accept()`` (``streamer_accept_errors_total``).
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: Any = None
        self._episode_failures = 0
        self._last_failure = 0.0

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop, self._previous = loop, loop.get_exception_handler()
        loop.set_exception_handler(self._handle)

    def accepted(self) -> None:
        """A connection was accepted: ends an episode that has been quiet for a while."""
        if self._episode_failures and self._loop is not None and \
                self._loop.time() - self._last_failure >= EPISODE_QUIET_S:
            logger.info("accepting connections again (%d accept() calls failed for want of file descriptors)",
                        self._episode_failures)
            self._episode_failures = 0

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, ValueError) and "_start_serving" in repr(context.get("handle")):
            # asyncio retries accept() a second after running out of descriptors; when the port was closed in
            # between (a shutdown during an episode), that retry finds fd -1. Nothing is wrong: nothing to accept.
            logger.debug("a pending accept() retry found the listening socket closed: %s", exc)
            return
        if context.get("message") != ACCEPT_FAILED:
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self.metrics.accept_errors_total.inc()
        self._last_failure = loop.time()
        self._episode_failures += 1
        if self._episode_failures == 1:
            logger.warning("cannot accept connections: %s; new connections wait in the kernel's queue until some "
                           "close. Raise the file-descriptor limit (LimitNOFILE= in the systemd unit) or lower "
                           "server.max_sessions, max_subscribers, max_pending_connections or max_handshakes "
                           "(logged once until it eases)", context.get("exception", "out of file descriptors"))
