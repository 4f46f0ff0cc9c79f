"""The Wyoming TCP server (``[wyoming]``): accepts connections on its own port, one
:class:`~streamer.adapters.wyoming.connection.WyomingConnection` each, and announces itself over zeroconf when
asked. Sessions, caps, resampling, endpointing and metrics are the session core's.

Wyoming has no authentication (by design: a trusted network); the daemon's tokens do not apply here, so the
server warns when it listens beyond loopback. At most ``server.max_pending_connections`` + ``server.max_sessions``
connections are open at once; one more gets ``error`` ``server_busy`` and is closed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import TYPE_CHECKING

from streamer.adapters.wyoming.advertise import Advertisement
from streamer.adapters.wyoming.connection import WyomingConnection
from streamer.adapters.wyoming.framing import MAX_HEADER_BYTES, encode_event
from streamer.adapters.wyoming.info import info_event
from streamer.adapters.wyoming.utterance import error_event
from streamer.errors import ConfigError
from streamer.server import address
from streamer.server.address import bound_port

if TYPE_CHECKING:
    from streamer.session import SessionCore
    from streamer.settings import ServerSettings, WyomingSettings

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for a host only this machine reaches (``localhost``, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WyomingServer:
    """The ``[wyoming]`` port.

    Args:
        settings: the ``[wyoming]`` settings.
        server_settings: the ``[server]`` settings (timeouts, caps, frame size).
        core: the session core every utterance runs on.
    """

    def __init__(self, settings: WyomingSettings, server_settings: ServerSettings, core: SessionCore) -> None:
        self.settings, self.server_settings, self.core = settings, server_settings, core
        self.info = info_event(core.model, settings.languages)
        self.max_connections = server_settings.max_pending_connections + server_settings.max_sessions
        self.connections: dict[asyncio.Task[None], WyomingConnection] = {}
        self.advertisement: Advertisement | None = None
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        return bound_port(self._server)

    @property
    def url(self) -> str:
        return address.url("tcp", self.settings.host, self.port)

    async def start(self) -> None:
        """Bind the port (0: a free one) and, with ``zeroconf``, announce it.

        Raises:
            ConfigError: the port cannot be bound, or zeroconf cannot announce it.
        """
        s = self.settings
        try:
            self._server = await asyncio.start_server(self._accept, s.host, s.port, limit=MAX_HEADER_BYTES)
        except OSError as exc:
            raise ConfigError(f"wyoming: cannot listen on {s.host}:{s.port} ({exc}); set wyoming.host and "
                              "wyoming.port to a free address") from exc
        logger.info("wyoming: listening on %s (model %s, languages %s)", self.url, self.core.model.model,
                    ", ".join(s.languages))
        if not is_loopback(s.host):
            logger.warning("wyoming: %s is reachable from the network without authentication (Wyoming has none); "
                           "keep it on a trusted network", self.url)
        if s.zeroconf:
            if is_loopback(s.host):
                logger.warning("wyoming: zeroconf announces %s, a loopback address other machines cannot reach; "
                               "set wyoming.host to this machine's address or 0.0.0.0", s.host)
            self.advertisement = Advertisement(s.host, self.port)
            await self.advertisement.start()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None or not self._server.is_serving():
            writer.close()
            return
        if len(self.connections) >= self.max_connections:
            self.core.metrics.sessions_refused_total.inc(label_value="wyoming")
            self.core.metrics.protocol_errors_total.inc(label_value="server_busy")
            logger.warning("wyoming: refused a connection: %d open (the maximum)", self.max_connections)
            writer.write(encode_event(error_event("server_busy", f"the server has {self.max_connections} Wyoming "
                                                  "connections open, its maximum; try again later")))
            writer.close()
            return
        connection = WyomingConnection(self.core, self.server_settings, self.info, self.settings.languages, reader,
                                       writer)
        task = asyncio.create_task(connection.run(), name="wyoming-connection")
        self.connections[task] = connection
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.connections.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            logger.error("wyoming: a connection failed", exc_info=task.exception())

    def stop_accepting(self) -> None:
        """Take no new connections (shutdown begins; the core then flushes the open utterances)."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Withdraw the announcement, close every connection after its queued events, and wait for them."""
        self.stop_accepting()
        if self.advertisement is not None:
            await self.advertisement.close()
        for connection in self.connections.values():
            connection.close()
        tasks = list(self.connections)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.server_settings.close_timeout_s * 2)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
