"""WebSocket and HTTP on one port: ``/v1/listen``, ``/v1/captions``, ``/``, ``/healthz``, ``/readyz``, ``/metrics``.

The protocol is documented in :mod:`streamer.protocol`. One :class:`ListenSession` per ``/v1/listen``
connection turns client frames into audio for its engine channel and results (through the
:class:`~streamer.server.hub.Hub`) back into messages. A failure of one connection closes that
connection only (1011); the server keeps running.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
import uuid
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from streamer.audio.convert import PcmConverter
from streamer.engine.endpoint import EndpointConfig
from streamer.errors import AudioError, ConfigError
from streamer.protocol import (
    STREAM_NAME,
    End,
    Error,
    Finalize,
    KeepAlive,
    MessageError,
    Ready,
    Start,
    Stop,
    parse_client_message,
)
from streamer.protocol import (
    Warning as WarningMessage,
)
from streamer.server.auth import Refusal, TokenAuth, exposure_warnings
from streamer.server.hub import Hub, Outbox
from streamer.server.metrics import CONTENT_TYPE, Metrics

if TYPE_CHECKING:
    from streamer.engine.channel import Channel
    from streamer.engine.scheduler import Scheduler
    from streamer.settings import ServerSettings

logger = logging.getLogger(__name__)

PLACEHOLDER_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>streamer</title></head>
<body><h1>streamer</h1>
<p>Speech recognition is running. Stream audio to <code>ws://HOST/v1/listen</code>, follow a stream's
captions on <code>ws://HOST/v1/captions?stream=NAME</code>; health on <a href="/healthz">/healthz</a>,
readiness on <a href="/readyz">/readyz</a>, metrics on <a href="/metrics">/metrics</a>.</p>
</body></html>
"""


class Phase(enum.Enum):
    AWAITING_START = "awaiting start"
    STREAMING = "streaming"
    ENDING = "ending"


class ListenSession:
    """One ``/v1/listen`` client; see :mod:`streamer.protocol` for what it may send and receives."""

    def __init__(self, server: WebSocketServer, ws: ServerConnection) -> None:
        self.server, self.ws = server, ws
        self.id = uuid.uuid4().hex[:12]
        cfg = server.settings
        self.outbox = Outbox(
            ws, cfg.max_pending_messages, cfg.close_timeout_s, on_slow=server.metrics.slow_consumers_total.inc
        )
        self.phase = Phase.AWAITING_START
        self.channel: Channel | None = None
        self._converter: PcmConverter | None = None
        self.stream = ""
        self.received_bytes = 0  # audio bytes accepted in this session (whole sample frames)

    async def run(self) -> None:
        sender = asyncio.create_task(self.outbox.run(), name=f"ws-send-{self.id}")
        try:
            await self._receive()
        finally:
            if self.phase is not Phase.ENDING:  # the client vanished, or the connection broke
                self.phase = Phase.ENDING
                self.outbox.stop()
                await self._flush("disconnect", detach_first=True)
            if not sender.done():
                try:
                    async with asyncio.timeout(self.server.settings.close_timeout_s * 2):
                        await asyncio.shield(sender)
                except TimeoutError:
                    sender.cancel()

    async def _receive(self) -> None:
        idle_s = self.server.settings.idle_timeout_s
        while self.phase is not Phase.ENDING:
            try:
                async with asyncio.timeout(idle_s):
                    message = await self.ws.recv()
            except TimeoutError:
                self._error("idle_timeout", f"nothing received for {idle_s:g} s; the session is closed")
                await self.end("idle", 1008, "idle timeout")
                return
            except ConnectionClosed:
                return
            if isinstance(message, str):
                await self._on_text(message)
            else:
                self._on_audio(message)

    async def _on_text(self, text: str) -> None:
        if self.phase is Phase.ENDING:
            return
        try:
            msg = parse_client_message(text)
        except MessageError as exc:
            self._error(exc.code, str(exc))
            return
        if isinstance(msg, Start):
            self._on_start(msg)
        elif isinstance(msg, KeepAlive):
            pass
        elif self.channel is None:
            self._error("no_start", f"{msg.type!r} before 'start'; send a 'start' message first")
        elif isinstance(msg, Finalize):
            self.channel.finalize()
            self.server.scheduler.poke(self.channel)
        elif isinstance(msg, Stop):
            await self.end("stop", 1000, "end of stream")

    def _on_start(self, start: Start) -> None:
        if self.channel is not None:
            self._error("already_started", "this session has started already; open a new connection for a new stream")
            return
        try:
            converter = PcmConverter(start.sample_rate, start.encoding, start.channels)
            endpoint = self.server.endpoint.with_overrides(start.endpointing)
        except AudioError as exc:
            self._error("unsupported_audio", str(exc))
            return
        except ConfigError as exc:
            self._error("bad_message", str(exc))
            return
        name = start.stream or f"ws-{self.id}"
        if name in self.server.scheduler.channels:
            self._error("stream_in_use", f"stream {name!r} is already sent by another source; choose another name")
            return
        try:
            channel = self.server.scheduler.open(name, endpoint)
        except ValueError as exc:  # every channel is taken (sessions + microphone + file)
            self._error("server_busy", f"cannot open stream {name!r}: {exc}; try again later")
            return
        self.channel, self._converter, self.stream = channel, converter, name
        self.phase = Phase.STREAMING
        self.outbox.set_interim_results(start.interim_results)
        self.server.hub.set_source(name, self.outbox)
        self.server.metrics.sessions_total.inc()
        info = self.server.model_info
        self.outbox.offer(Ready(self.id, name, info["model"], info["att_context_size"], start.sample_rate,
                                info["chunk_s"], endpoint.to_dict()))
        logger.info("session %s: stream %s, %d Hz %s x%d", self.id, name, start.sample_rate, start.encoding,
                    start.channels)

    def _on_audio(self, frame: bytes) -> None:
        if self.phase is Phase.ENDING:
            return
        if self.channel is None or self._converter is None:
            self._error("no_start", "audio before 'start'; send a 'start' message first (the frame was dropped)")
            return
        if not frame:
            self.outbox.offer(WarningMessage("empty_frame", "an empty binary frame carries no audio; it was ignored",
                                      self.stream))
            return
        try:
            samples = self._converter.convert(frame)
        except AudioError as exc:
            self._error("bad_audio", str(exc))
            return
        self.received_bytes += len(frame)
        self.channel.write(samples)
        self.server.scheduler.poke(self.channel)

    def _error(self, code: str, message: str) -> None:
        logger.info("session %s: %s: %s", self.id, code, message)
        self.server.metrics.protocol_errors_total.inc(label_value=code)
        self.outbox.offer(Error(code, message, self.stream or None))

    async def end(self, reason: str, code: int, close_reason: str) -> None:
        """Flush the last segment (its final reaches the client first), send ``end``, close with ``code``."""
        if self.phase is Phase.ENDING:
            return
        self.phase = Phase.ENDING
        await self._flush(reason, detach_first=False)
        if self.channel is not None and self._converter is not None:
            c = self._converter
            received_s = self.received_bytes / c.frame_bytes / c.sample_rate
            dropped_s = self.channel.dropped_samples / self.channel.sample_rate_hz
            self.outbox.offer(End(self.stream, self.channel.segmenter.segment, round(received_s, 3),
                                  round(dropped_s, 3)))
        self.outbox.close_after_queue(code, close_reason)

    async def _flush(self, reason: str, detach_first: bool) -> None:
        channel = self.channel
        if channel is None:
            return
        if detach_first:
            self.server.hub.set_source(self.stream, None)  # nobody to send to: finals go to the other sinks
        elif self._converter is not None and not channel.is_closing:
            channel.write(self._converter.flush())
        await self.server.scheduler.close(channel, reason)
        self.server.hub.set_source(self.stream, None)


class WebSocketServer:
    """The port: routes requests, enforces the session caps, shuts down in order.

    Args:
        settings: the ``[server]`` settings.
        scheduler: opens, feeds and closes engine channels.
        hub: result fan-out.
        metrics: the metrics registry.
        endpoint: default endpointing rules.
        model_info: ``model``, ``att_context_size``, ``chunk_s`` for ``ready`` messages.
        auth: the accepted tokens; None lets every request in.
        ssl_context: TLS for ``wss://`` and ``https://``; None serves plain ``ws://`` and ``http://``.
    """

    def __init__(
        self,
        settings: ServerSettings,
        scheduler: Scheduler,
        hub: Hub,
        metrics: Metrics,
        endpoint: EndpointConfig,
        model_info: dict[str, Any],
        auth: TokenAuth | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings, self.scheduler, self.hub, self.metrics = settings, scheduler, hub, metrics
        self.endpoint, self.model_info = endpoint, model_info
        self.auth = auth or TokenAuth()
        self.ssl_context = ssl_context
        self.sessions: set[ListenSession] = set()
        self.is_ready = False  # /readyz: model warm, sockets bound, not shutting down
        self._server: Server | None = None
        self._web_root = Path(settings.web_root) if settings.web_root else Path(__file__).parents[2] / "clients" / "web"

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """``http://HOST:PORT``, or ``https://`` with TLS (WebSocket clients use ``ws://``/``wss://``)."""
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.ssl_context else 'http'}://{host}:{self.port}"

    async def start(self) -> None:
        """Bind the socket (port 0: a free one, see :attr:`port`)."""
        s = self.settings
        if self.auth.is_enabled and logging.getLogger("websockets").getEffectiveLevel() < logging.INFO:
            # At DEBUG websockets logs every request line and header (tokens) and every frame.
            logging.getLogger("websockets").setLevel(logging.INFO)
            logger.debug("websockets' own debug log stays off while tokens are in use (it shows them)")
        self._server = await serve(
            self._handle, s.host, s.port, process_request=self._process_request, max_size=s.max_frame_bytes,
            compression=None, ping_interval=s.ping_interval_s, ping_timeout=s.ping_timeout_s,
            close_timeout=s.close_timeout_s, ssl=self.ssl_context,
        )
        if self.auth.is_enabled:
            logger.info("access needs one of %d token(s) on /v1/listen, /v1/captions and /metrics",
                        self.auth.token_count)
        for warning in exposure_warnings(s.host, self.auth, self.ssl_context is not None):
            logger.warning("%s", warning)

    async def shutdown(self) -> None:
        """Stop accepting; flush every session's segment to every sink, send ``end``, close with 1001."""
        self.is_ready = False
        if self._server is None:
            return
        self._server.server.close()  # no new connections
        await asyncio.gather(*(s.end("shutdown", 1001, "server shutting down") for s in list(self.sessions)))

    async def close(self) -> None:
        """Close caption subscribers (after their queued finals) and every connection left; wait for them."""
        if self._server is None:
            return
        for sub in self.hub.subscribers():
            sub.close_after_queue(1001, "server shutting down")
        self._server.close(close_connections=False)
        try:
            async with asyncio.timeout(self.settings.close_timeout_s * 2):
                await self._server.wait_closed()
        except TimeoutError:
            logger.warning("connections still open after %.0f s; closing them", self.settings.close_timeout_s * 2)
            self._server.close(close_connections=True)
            try:
                async with asyncio.timeout(self.settings.close_timeout_s * 2):
                    await self._server.wait_closed()
            except TimeoutError:
                logger.error("connection handlers did not finish; exiting anyway")

    # ------------------------------------------------------------------ HTTP

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        refusal = self.auth.check(request)
        if refusal is not None:
            return self._unauthorized(connection, path, refusal)
        if path in ("/v1/listen", "/v1/captions"):
            return None  # the WebSocket handshake goes on
        if request.method not in ("GET", "HEAD"):
            return connection.respond(HTTPStatus.METHOD_NOT_ALLOWED, "only GET is supported\n")
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if self.is_ready:
                return connection.respond(HTTPStatus.OK, "ready\n")
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "not ready\n")
        if path == "/metrics":
            self.metrics.streams.set(len(self.scheduler.channels))
            self.metrics.subscribers.set(self.hub.subscriber_count)
            self.metrics.ready.set(int(self.is_ready))
            return _with_type(connection.respond(HTTPStatus.OK, self.metrics.render()), CONTENT_TYPE)
        if path in ("/", "/index.html"):
            index = self._web_root / "index.html"
            page = index.read_text(encoding="utf-8") if index.is_file() else PLACEHOLDER_PAGE
            return _with_type(connection.respond(HTTPStatus.OK, page), "text/html; charset=utf-8")
        return connection.respond(HTTPStatus.NOT_FOUND, f"no such page: {path}\n")

    def _unauthorized(self, connection: ServerConnection, path: str, refusal: Refusal) -> Response:
        """HTTP 401 before any upgrade; logged with the peer's address, never with what it sent."""
        self.metrics.auth_failures_total.inc(label_value=refusal.value)
        peer = connection.remote_address[0] if connection.remote_address else "?"
        logger.warning("refused %s from %s: %s token", path, peer, refusal.value)
        if refusal is Refusal.MISSING:
            body = "missing token: send 'Authorization: Bearer <token>' or add ?token=<token> to the URL\n"
            challenge = 'Bearer realm="streamer"'
        else:
            body = "invalid token\n"
            challenge = 'Bearer realm="streamer", error="invalid_token"'
        response = connection.respond(HTTPStatus.UNAUTHORIZED, body)
        response.headers["WWW-Authenticate"] = challenge
        return response

    # ------------------------------------------------------------------ WebSocket

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        url = urlsplit(ws.request.path)
        try:
            if url.path == "/v1/listen":
                await self._listen(ws)
            else:
                await self._captions(ws, parse_qs(url.query).get("stream", [""])[0])
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("connection %s failed", ws.id)
            await ws.close(1011, "internal error")

    async def _refuse(self, ws: ServerConnection, endpoint: str, cap: int, what: str) -> None:
        self.metrics.sessions_refused_total.inc(label_value=endpoint)
        self.metrics.protocol_errors_total.inc(label_value="server_busy")
        logger.warning("refused a %s connection: %d %s open (the maximum)", endpoint, cap, what)
        await ws.send(Error("server_busy", f"the server has {cap} {what} open, its maximum; try again later").to_json())
        await ws.close(1013, "server busy")

    async def _listen(self, ws: ServerConnection) -> None:
        if not self.is_ready:
            message = "the server is starting or stopping and takes no audio now; try again later"
            await ws.send(Error("not_ready", message).to_json())
            await ws.close(1013, "not ready")
            return
        if len(self.sessions) >= self.settings.max_sessions:
            await self._refuse(ws, "listen", self.settings.max_sessions, "sessions")
            return
        session = ListenSession(self, ws)
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)

    async def _captions(self, ws: ServerConnection, stream: str) -> None:
        if not STREAM_NAME.fullmatch(stream):
            self.metrics.protocol_errors_total.inc(label_value="bad_message")
            await ws.send(Error("bad_message", f"/v1/captions needs ?stream=NAME with a valid name, got {stream!r}")
                          .to_json())
            await ws.close(1008, "bad stream name")
            return
        if self.hub.subscriber_count >= self.settings.max_subscribers:
            await self._refuse(ws, "captions", self.settings.max_subscribers, "subscriptions")
            return
        outbox = Outbox(ws, self.settings.max_pending_messages, self.settings.close_timeout_s,
                        on_slow=self.metrics.slow_consumers_total.inc)
        self.hub.subscribe(stream, outbox)
        sender = asyncio.create_task(outbox.run(), name=f"ws-captions-{ws.id}")
        try:
            async for _ in ws:  # read-only: whatever the client sends is ignored (pings work regardless)
                pass
        except ConnectionClosed:
            pass
        finally:
            self.hub.unsubscribe(stream, outbox)
            outbox.stop()
            try:
                async with asyncio.timeout(self.settings.close_timeout_s * 2):
                    await asyncio.shield(sender)
            except TimeoutError:
                sender.cancel()


def _with_type(response: Response, content_type: str) -> Response:
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = content_type
    return response
