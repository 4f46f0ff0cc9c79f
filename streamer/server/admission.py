"""Admission on the main port: ``/readyz`` says whether a new session would be taken, and why not, and with a capacity
set a WebSocket handshake that would open a session the box cannot take is refused with HTTP 503 before the upgrade.

The decision is the session core's (:meth:`~streamer.session.core.SessionCore.refusal_reason`,
:meth:`~streamer.session.core.SessionCore.live_count`); this module only answers HTTP. Why 503 at the handshake:
a load balancer can retry a refused handshake on another box (HAProxy's ``retry-on 503``), which it cannot do once
the connection was upgraded. Without a capacity (``admission.capacity_streams`` 0, one box on its own) nothing
changes: the handshake goes on and the protocol says ``server_busy`` or ``not_ready`` in its own way, and
``/readyz`` is 503 only while starting or stopping. The other protocols (Wyoming, Vosk, Hermes, the OpenAI upload)
refuse through the core in their own way (an error event, HTTP 503 with Retry-After for the upload).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection
    from websockets.http11 import Response

    from streamer.server.metrics import Metrics
    from streamer.session import SessionCore

logger = logging.getLogger(__name__)


class Admission:
    """The main port's answers about taking sessions.

    Args:
        core: the session core (readiness, caps, counts).
        metrics: counts handshake refusals (``streamer_sessions_refused_total``, ``streamer_protocol_errors_total``).
        retry_after_s: the ``Retry-After`` of a 503 (``admission.retry_after_s``).
    """

    def __init__(self, core: SessionCore, metrics: Metrics, retry_after_s: int = 2) -> None:
        self.core, self.metrics, self.retry_after_s = core, metrics, retry_after_s

    def readyz(self, connection: ServerConnection) -> Response:
        """``/readyz``: 200 ``ready``, or 503 ``not ready: starting|draining|at capacity N/N sessions``."""
        reason = self.core.refusal_reason()
        if reason is None:
            return connection.respond(HTTPStatus.OK, "ready\n")
        return self._unavailable(connection, f"not ready: {reason}\n")

    def refuse_handshake(self, connection: ServerConnection, protocol: str) -> Response | None:
        """HTTP 503 for a handshake that would open a session the box cannot take now; None lets it go on.

        Only with a capacity set; the check is the core's own at ``connect`` (held sessions leave room for their
        resume, a new session among them is refused at its start, as before).

        Args:
            connection: the connection.
            protocol: the adapter's name, for ``streamer_sessions_refused_total``.
        """
        core = self.core
        if core.limits.capacity <= 0:
            return None
        if core.is_ready and core.live_count() < core.limits.session_cap:
            return None
        reason = core.refusal_reason() or f"at capacity {core.live_count()}/{core.limits.session_cap} sessions"
        self.metrics.sessions_refused_total.inc(label_value=protocol)
        self.metrics.protocol_errors_total.inc(label_value="server_busy" if core.is_ready else "not_ready")
        logger.info("refused a %s handshake with 503: %s", protocol, reason)
        return self._unavailable(connection, f"this server takes no new session now ({reason}); try again later\n")

    def _unavailable(self, connection: ServerConnection, body: str) -> Response:
        response = connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, body)
        response.headers["Retry-After"] = str(self.retry_after_s)
        return response
