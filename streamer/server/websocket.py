"""WebSocket and HTTP on one port: ``/v1/listen``, ``/v1/captions``, ``/``, ``/healthz``, ``/readyz``, ``/metrics``,
the Deepgram-compatible live API (:mod:`streamer.adapters.deepgram`) at ``/deepgram/v1/listen`` and, for requests
its rule claims, at ``/v1/listen``, and more protocols' routes: ``ws_routes`` (WebSocket paths, e.g. OpenAI's
``/v1/realtime``) and the side door for requests with a body (:mod:`streamer.server.http_body`, e.g.
``POST /v1/audio/transcriptions``).

The protocol is documented in :mod:`streamer.protocol`. Each ``/v1/listen`` connection is a
:class:`~streamer.server.listen.ListenConnection`, protocol v1's adapter on the session core
(:mod:`streamer.session`), which carries its session (and may resume a held one); caption subscribers get an
:class:`~streamer.server.fanout.Outbox` each. A failure of one connection closes that connection only
(1011); the server keeps running.

Before any endpoint, every request's ``Host`` and ``Origin`` are checked (:mod:`streamer.server.origin`,
HTTP 403), then its token (:mod:`streamer.server.auth`, 400 or 401); connections still sending their
request are capped (:mod:`streamer.server.gate`). The session caps are the core's
(:class:`~streamer.session.core.SessionCore`): a ``/v1/listen`` connection takes a place under
``server.max_sessions`` only once it has started a session; until then it counts under
``server.max_pending_connections`` and has ``server.start_timeout_s`` to send ``start``. ``/readyz`` and, with
a capacity set, the refusal of a session's handshake with HTTP 503 are :mod:`streamer.server.admission`'s.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from streamer.adapters.deepgram.endpoint import DeepgramEndpoint
from streamer.adapters.openai_api import mount as mount_openai
from streamer.protocol import STREAM_NAME, Error
from streamer.resources import web_root
from streamer.server import address
from streamer.server.address import bound_port
from streamer.server.admission import Admission
from streamer.server.auth import Refusal, TokenAuth, exposure_warnings
from streamer.server.fanout import Hub, Outbox
from streamer.server.gate import AcceptErrors, HandshakeGate, connection_factory
from streamer.server.http_body import BodyRoutes
from streamer.server.listen import serve_listen
from streamer.server.metrics import Metrics
from streamer.server.origin import OriginPolicy
from streamer.settings import AdmissionSettings, DeepgramSettings

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from streamer.session import Session, SessionCore
    from streamer.settings import ServerSettings

logger = logging.getLogger(__name__)

ROUTE_PROTOCOLS = {"/v1/listen": "listen", "/v1/realtime": "openai_realtime"}  # a refusal's metrics label
MAX_LOGGED_PEERS = 1024  # refusals are logged once per peer and reason; past this many peers the memory starts over

PLACEHOLDER_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>streamer</title></head>
<body><h1>streamer</h1>
<p>Speech recognition is running. Stream audio to <code>ws://HOST/v1/listen</code>, follow a stream's
captions on <code>ws://HOST/v1/captions?stream=NAME</code>; health on <a href="/healthz">/healthz</a>,
readiness on <a href="/readyz">/readyz</a>, metrics on <a href="/metrics">/metrics</a>.</p>
</body></html>
"""


class WebSocketServer:
    """The port: routes requests, hands ``/v1/listen`` connections to the session core, shuts down in order.

    Args:
        settings: the ``[server]`` settings.
        core: the session core (sessions, caps, readiness).
        hub: result fan-out (caption subscribers).
        metrics: the metrics registry.
        auth: the accepted tokens; None lets every request in.
        ssl_context: TLS for ``wss://`` and ``https://``; None serves plain ``ws://`` and ``http://``.
        deepgram: the ``[deepgram]`` settings; None: the defaults (on).
        admission: the ``[admission]`` settings; None: the defaults (no capacity: nothing refused at the handshake).
    """

    def __init__(
        self,
        settings: ServerSettings,
        core: SessionCore,
        hub: Hub,
        metrics: Metrics,
        auth: TokenAuth | None = None,
        ssl_context: ssl.SSLContext | None = None,
        deepgram: DeepgramSettings | None = None,
        admission: AdmissionSettings | None = None,
    ) -> None:
        self.settings, self.core, self.hub, self.metrics = settings, core, hub, metrics
        self.auth = auth or TokenAuth()
        self.deepgram = DeepgramEndpoint(deepgram or DeepgramSettings(), settings, core, metrics, self.auth)
        self.ssl_context = ssl_context
        self.admission = Admission(core, metrics, (admission or AdmissionSettings()).retry_after_s)
        self._server: Server | None = None
        self._policy: OriginPolicy | None = None
        self._accept_errors = AcceptErrors(metrics)
        self.gate = HandshakeGate(settings.max_handshakes, metrics, self._accept_errors, settings.start_timeout_s)
        self._logged_refusals: set[tuple[str, str]] = set()
        self._web_root = Path(settings.web_root) if settings.web_root else web_root()
        # More protocols on this port: WebSocket paths and their handlers, and requests with a body (the side door)
        self.ws_routes: dict[str, Callable[[ServerConnection], Awaitable[None]]] = {}
        self.side_door = BodyRoutes(self.check_access, settings.idle_timeout_s, settings.close_timeout_s)
        if settings.openai_api:
            mount_openai(self.side_door, self.ws_routes, core, settings)

    @property
    def is_ready(self) -> bool:
        """``/readyz`` and new sessions: model warm, sockets bound, not shutting down (the core's flag)."""
        return self.core.is_ready

    @is_ready.setter
    def is_ready(self, value: bool) -> None:
        self.core.is_ready = value

    @property
    def sessions(self) -> set[Session]:
        """Every ``/v1/listen`` link from its connection until its handler returns (held sessions too)."""
        return self.core.sessions

    @property
    def port(self) -> int:
        return bound_port(self._server)

    @property
    def url(self) -> str:
        """``http://HOST:PORT``, or ``https://`` with TLS (WebSocket clients use ``ws://``/``wss://``)."""
        return address.url("https" if self.ssl_context else "http", self.settings.host, self.port)

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
            close_timeout=s.close_timeout_s, ssl=self.ssl_context, open_timeout=s.start_timeout_s,
            create_connection=connection_factory(self.gate, self.side_door),
            select_subprotocol=lambda ws, offered: self.deepgram.select_subprotocol(ws.request, list(offered)),
        )
        self._accept_errors.install(asyncio.get_running_loop())
        policy = self.policy
        logger.debug("answering to host names %s%s", ", ".join(sorted(policy.host_names)),
                     " and any address" if policy.serves_network else "")
        if self.auth.is_enabled:
            logger.info("access needs one of %d token(s) on /v1/listen, /v1/captions and /metrics",
                        self.auth.token_count)
        for warning in exposure_warnings(s.host, self.auth, self.ssl_context is not None):
            logger.warning("%s", warning)

    @property
    def policy(self) -> OriginPolicy:
        """The Host and Origin rules (made once the port is known)."""
        if self._policy is None:
            s = self.settings
            self._policy = OriginPolicy(s.host, self.port, s.allowed_hosts, s.allowed_origins)
        return self._policy

    async def shutdown(self) -> None:
        """Stop accepting; flush every session's segment to every sink, send ``end``, close with 1001."""
        self.is_ready = False
        if self._server is None:
            return
        self._server.server.close()  # no new connections
        await self.core.shutdown()

    async def close(self) -> None:
        """Close caption subscribers (after their queued finals) and every connection left; wait for them."""
        if self._server is None:
            return
        # The accept-error handler stays installed: asyncio's accept() retries may still fire after the port is
        # closed, and they must not end up as tracebacks (see AcceptErrors._handle).
        for sub in self.hub.subscribers():
            sub.close_after_queue(1001, "server shutting down")
        await self.side_door.close(self.settings.close_timeout_s * 2)
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
        response = self._answer(connection, request)
        if response is not None and request.method == "HEAD":
            response.body = b""  # the headers (Content-Length included) are those of the GET
        return response

    def check_access(self, connection: ServerConnection, request: Request) -> Response | None:
        """Every request passes here first: its Host and Origin (403), then its token (400, 401); None lets it in."""
        path = urlsplit(request.path).path
        refused = self._refuse_host_or_origin(connection, request, path)
        if refused is not None:
            return refused
        if self.deepgram.claims(request):
            return self.deepgram.answer(connection, request)
        refusal = self.auth.check(request)
        if refusal is not None:
            return self._unauthorized(connection, path, refusal)
        return None

    def _answer(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        refused = self.check_access(connection, request)
        if refused is not None:
            return refused
        if self.deepgram.claims(request):  # checked by the Deepgram endpoint (its query and key)
            return self.admission.refuse_handshake(connection, "deepgram")  # None: on to the upgrade
        if path in ("/v1/listen", "/v1/captions") or path in self.ws_routes:
            if request.method != "GET":
                return connection.respond(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} is a WebSocket endpoint: open it "
                                          "with GET and 'Upgrade: websocket' (a WebSocket client)\n")
            if getattr(connection, "pipelined", False):
                return connection.respond(HTTPStatus.BAD_REQUEST, "data came after the WebSocket handshake request "
                                          "before its answer; wait for the answer (101) before sending frames\n")
            if path != "/v1/captions":  # a session: 503 when this box cannot take one (with a capacity set)
                return self.admission.refuse_handshake(connection, ROUTE_PROTOCOLS.get(path, path))
            return None  # the WebSocket handshake goes on
        if request.method not in ("GET", "HEAD"):
            return connection.respond(HTTPStatus.METHOD_NOT_ALLOWED, "only GET and HEAD are supported\n")
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            return self.admission.readyz(connection)
        if path == "/metrics":
            self.metrics.sessions_held.set(self.core.held_count())
            self.metrics.subscribers.set(self.hub.subscriber_count)
            self.metrics.ready.set(int(self.is_ready))
            body, content_type = self.metrics.exposition(request.headers.get("Accept"))
            return _with_type(connection.respond(HTTPStatus.OK, body), content_type)
        if path in ("/", "/index.html"):
            index = self._web_root / "index.html"
            page = index.read_text(encoding="utf-8") if index.is_file() else PLACEHOLDER_PAGE
            return _with_type(connection.respond(HTTPStatus.OK, page), "text/html; charset=utf-8")
        return connection.respond(HTTPStatus.NOT_FOUND, f"no such page: {path}\n")

    def _refuse_host_or_origin(self, connection: ServerConnection, request: Request, path: str) -> Response | None:
        """HTTP 403 for a Host that is not this server's or an Origin that may not use it; None when both pass."""
        hosts = request.headers.get_all("Host")
        body = self.policy.host_problem(hosts)
        reason = "host"
        if body is None:
            origins = request.headers.get_all("Origin")
            if len(origins) > 1:
                body = "several Origin headers in one request; a browser sends one\n"
            else:
                body = self.policy.origin_problem(origins[0] if origins else None, hosts[0] if hosts else None)
            reason = "origin"
        if body is None:
            return None
        self.metrics.connections_refused_total.inc(label_value=reason)
        self._log_once(connection, reason, f"refused {path}: {body.strip()}")
        return connection.respond(HTTPStatus.FORBIDDEN, body)

    def _log_once(self, connection: ServerConnection, reason: str, message: str) -> None:
        """Log a refusal the first time this peer gets one for this reason (a page may retry every second)."""
        peer = connection.remote_address[0] if connection.remote_address else "?"
        if (peer, reason) in self._logged_refusals:
            return
        if len(self._logged_refusals) >= MAX_LOGGED_PEERS:
            self._logged_refusals.clear()
        self._logged_refusals.add((peer, reason))
        logger.warning("%s (from %s; logged once per address)", message, peer)

    def _unauthorized(self, connection: ServerConnection, path: str, refusal: Refusal) -> Response:
        """HTTP 401 (400 for several tokens) before any upgrade; logged with the peer's address, never with what it
        sent."""
        self.metrics.auth_failures_total.inc(label_value=refusal.value)
        peer = connection.remote_address[0] if connection.remote_address else "?"
        logger.warning("refused %s from %s: %s token", path, peer, refusal.value)
        if refusal is Refusal.AMBIGUOUS:
            return connection.respond(HTTPStatus.BAD_REQUEST, "more than one token in one request (several ?token= "
                                      "values or Authorization headers, or both kinds): send exactly one\n")
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
            if self.deepgram.claims(ws.request):
                await self.deepgram.serve(ws)
            elif (route := self.ws_routes.get(url.path)) is not None:
                await route(ws)
            elif url.path == "/v1/listen":
                await self._listen(ws)
            else:
                await self._captions(ws, parse_qs(url.query).get("stream", [""])[0])
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("connection %s failed", ws.id)
            await ws.close(1011, "internal error")

    async def _refuse(self, ws: ServerConnection, endpoint: str, cap: int, what: str, setting: str) -> None:
        self.metrics.sessions_refused_total.inc(label_value=endpoint)
        self.metrics.protocol_errors_total.inc(label_value="server_busy")
        logger.warning("refused a %s connection: %d %s open (the maximum, server.%s)", endpoint, cap, what, setting)
        await ws.send(Error("server_busy", f"the server has {cap} {what} open, its maximum; try again later").to_json())
        await ws.close(1013, "server busy")

    async def _listen(self, ws: ServerConnection) -> None:
        await serve_listen(self.core, self.settings, self.metrics, ws)

    async def _captions(self, ws: ServerConnection, stream: str) -> None:
        if not STREAM_NAME.fullmatch(stream):
            self.metrics.protocol_errors_total.inc(label_value="bad_message")
            await ws.send(Error("bad_message", f"/v1/captions needs ?stream=NAME with a valid name, got {stream!r}")
                          .to_json())
            await ws.close(1008, "bad stream name")
            return
        if self.hub.subscriber_count >= self.settings.max_subscribers:
            await self._refuse(ws, "captions", self.settings.max_subscribers, "subscriptions", "max_subscribers")
            return
        outbox = Outbox(ws, self.settings.max_pending_messages, self.settings.close_timeout_s,
                        on_slow=self.metrics.slow_consumers_total.inc)
        self.hub.subscribe(stream, outbox)
        sender = asyncio.create_task(outbox.run(), name=f"ws-captions-{ws.id}")
        try:
            told = False
            async for _ in ws:  # read-only: what the client sends is dropped (pings work regardless), said once
                if not told:
                    told = True
                    self.metrics.protocol_errors_total.inc(label_value="bad_message")
                    outbox.offer(Error("bad_message", "/v1/captions is read-only: it takes no messages or audio "
                                       "(this one and any later ones are ignored); send audio to /v1/listen", stream))
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
