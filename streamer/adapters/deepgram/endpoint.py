"""The Deepgram API on the daemon's port: which requests are its, their handshake, their connections.

:class:`~streamer.server.websocket.WebSocketServer` asks :meth:`DeepgramEndpoint.claims` of each request, after its
``Host`` and ``Origin`` checks and before its own token check; a claimed request's handshake is answered here
(:meth:`~DeepgramEndpoint.answer`: refusals in Deepgram's HTTP shape, a JSON body with ``err_code``, ``err_msg`` and
``request_id``) and its connection served here (:meth:`~DeepgramEndpoint.serve`), as a session of the core with
protocol ``deepgram``.

Refusals at the handshake (the client sees the HTTP status; ``deepgram-sdk`` raises ``ApiError`` with it): 401 for a
missing or wrong key when the daemon has tokens, 400 for several keys in one request or a query this server cannot
serve (the body says which parameter and what to send), 405 for a method other than GET. After the handshake, a
daemon not ready or at its session cap sends ``Error`` and closes with 1013 (try again later).
"""

from __future__ import annotations

import json
import logging
import uuid
from http import HTTPStatus
from typing import TYPE_CHECKING

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from streamer.adapters.deepgram.connection import DeepgramConnection, close_reason
from streamer.adapters.deepgram.messages import ErrorMessage, ModelReport
from streamer.adapters.deepgram.request import (
    QueryError,
    credentials,
    is_deepgram,
    parse_query,
    select_subprotocol,
)
from streamer.server.auth import Refusal, TokenAuth
from streamer.session import Problem

if TYPE_CHECKING:
    from streamer.server.metrics import Metrics
    from streamer.session import SessionCore
    from streamer.settings import DeepgramSettings, ServerSettings

logger = logging.getLogger(__name__)

AUTH_ERRORS = {
    Refusal.MISSING: (HTTPStatus.UNAUTHORIZED, "missing API key: send 'Authorization: Token <key>' (a token of this "
                      "server's auth_tokens), or from a browser the subprotocols 'token' and the key"),
    Refusal.INVALID: (HTTPStatus.UNAUTHORIZED, "Invalid credentials: the key is none of this server's tokens"),
    Refusal.AMBIGUOUS: (HTTPStatus.BAD_REQUEST, "more than one key in one request (Authorization, "
                        "Sec-WebSocket-Protocol and ?token= together): send exactly one"),
}


class DeepgramEndpoint:
    """See the module docstring.

    Args:
        settings: the ``[deepgram]`` settings.
        server: the ``[server]`` settings.
        core: the session core.
        metrics: the metrics registry.
        auth: the daemon's tokens.
    """

    def __init__(
        self, settings: DeepgramSettings, server: ServerSettings, core: SessionCore, metrics: Metrics, auth: TokenAuth
    ) -> None:
        self.settings, self.server, self.core, self.metrics, self.auth = settings, server, core, metrics, auth

    def claims(self, request: Request | None) -> bool:
        """True when ``request`` is for the Deepgram API (and it is enabled)."""
        return self.settings.enabled and request is not None and is_deepgram(request)

    def select_subprotocol(self, request: Request | None, offered: list[str]) -> str | None:
        """The subprotocol a claimed browser request gets back (its auth scheme); None for every other request."""
        if not self.claims(request):
            return None
        return select_subprotocol(offered)

    def answer(self, connection: ServerConnection, request: Request) -> Response | None:
        """A claimed request's refusal (Deepgram's HTTP shape), or None: the WebSocket handshake goes on."""
        if request.method != "GET":
            return _error(connection, HTTPStatus.METHOD_NOT_ALLOWED, "Method Not Allowed",
                          "the Deepgram live API is a WebSocket endpoint: open it with GET and 'Upgrade: websocket'")
        if getattr(connection, "pipelined", False):
            return _error(connection, HTTPStatus.BAD_REQUEST, "Bad Request", "data came after the WebSocket handshake "
                          "request before its answer; wait for the answer (101) before sending frames")
        refusal = self.auth.check_credentials(credentials(request))
        if refusal is not None:
            self.metrics.auth_failures_total.inc(label_value=refusal.value)
            peer = connection.remote_address[0] if connection.remote_address else "?"
            logger.warning("refused a Deepgram request from %s: %s key", peer, refusal.value)
            status, message = AUTH_ERRORS[refusal]
            response = _error(connection, status, "INVALID_AUTH", message)
            if status is HTTPStatus.UNAUTHORIZED:
                response.headers["WWW-Authenticate"] = 'Token realm="streamer"'
            return response
        try:
            parse_query(request, self.core.limits.max_hotwords)
        except QueryError as exc:
            self.metrics.protocol_errors_total.inc(label_value="bad_request")
            logger.info("refused a Deepgram request: %s", exc)
            return _error(connection, HTTPStatus.BAD_REQUEST, "Bad Request", str(exc))
        return None

    async def serve(self, ws: ServerConnection) -> None:
        """One claimed connection, from its handshake until its session has ended."""
        assert ws.request is not None
        options = parse_query(ws.request, self.core.limits.max_hotwords)  # it passed at the handshake
        request_id = str(uuid.uuid4())
        connection = DeepgramConnection(options, self.server, self.settings.idle_timeout_s, self.metrics, ws,
                                        request_id, ModelReport(self.core.model.model))
        session = self.core.connect(connection, protocol="deepgram", name_prefix="deepgram")
        if isinstance(session, Problem):
            await ws.send(ErrorMessage(session.code, session.message).to_json())
            await ws.close(1013, "not ready" if session.code == "not_ready" else "server busy")
            return
        try:
            await session.begin(options.start_options())
            if not session.is_started:  # refused: the client has the Error (and at the cap, the close)
                connection.outbox.close_after_queue(1008, close_reason("the session could not start; see the Error"))
                await connection.outbox.run()
                return
            await connection.run(session)
        finally:
            self.core.release(session)


def _error(connection: ServerConnection, status: HTTPStatus, code: str, message: str) -> Response:
    """An HTTP refusal as Deepgram writes one: a JSON body with ``err_code``, ``err_msg`` and ``request_id``."""
    body = json.dumps({"err_code": code, "err_msg": message, "request_id": str(uuid.uuid4())})
    response = connection.respond(status, body + "\n")
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    response.headers["dg-error"] = message[:200].encode("ascii", "replace").decode()  # a header: ASCII only
    return response
