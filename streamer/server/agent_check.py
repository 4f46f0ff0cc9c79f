"""HAProxy's agent check on a TCP port of its own (``admission.agent_port``): a line about this box's load, then close.

HAProxy (``server ... agent-check agent-port P agent-inter 2s``) connects every ``agent-inter``, reads one line
and acts on its words; it sends nothing unless told to (``agent-send``), and whatever it sends is ignored here.
The line is one of:

- ``N% ready``: the box takes new sessions; N is its free capacity in percent of the server's configured weight
  (at least 1, so a nearly full box still gets a trickle under ``balance leastconn``), and ``ready`` lifts a
  ``drain`` this agent said before;
- ``drain``: no new sessions here, the open ones go on (HAProxy sends new connections elsewhere): while starting,
  while draining after SIGTERM, and at capacity.

Without a capacity (``admission.capacity_streams`` 0) the percentage is the free part of ``server.max_sessions``
and a full box says ``1% ready`` (it still takes resumes, as ``/readyz`` still says ready). A connection gets its
line at once; the server then waits briefly for HAProxy to close (closing first, with bytes unread, could reset the
connection before HAProxy read the line). At most :data:`MAX_CONNECTIONS` are open at once; more are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import TYPE_CHECKING

from streamer.server import address
from streamer.server.address import bound_port

if TYPE_CHECKING:
    from streamer.session import SessionCore
    from streamer.settings import AdmissionSettings

logger = logging.getLogger(__name__)

LINGER_S = 2.0  # after the line, how long to wait for HAProxy to close first
MAX_CONNECTIONS = 32
MAX_DISCARDED_BYTES = 4096  # of whatever a peer sends (agent-send), at most this much is read and dropped


def agent_reply(core: SessionCore) -> str:
    """The agent-check line for the core's state now (without the newline)."""
    if core.refusal_reason() is not None:
        return "drain"
    free = 1.0 - core.load_ratio()
    return f"{max(1, math.floor(100 * free))}% ready"


class AgentCheckServer:
    """Answers HAProxy's agent checks; see the module docstring.

    Args:
        core: the session core whose load is reported.
        host: the address to listen on.
        port: the TCP port; 0: a free one (see :attr:`port`).
    """

    def __init__(self, core: SessionCore, host: str, port: int) -> None:
        self.core, self.host, self.requested_port = core, host, port
        self._server: asyncio.Server | None = None
        self._open = 0
        self._last_word = ""

    @property
    def port(self) -> int:
        return bound_port(self._server)

    @property
    def address(self) -> str:
        """``HOST:PORT`` as HAProxy's ``agent-addr``/``agent-port`` would name it."""
        return address.url("tcp", self.host, self.port).removeprefix("tcp://")

    async def start(self) -> None:
        """Bind the port."""
        self._server = await asyncio.start_server(self._answer, self.host, self.requested_port)
        logger.info("HAProxy agent check on %s", self.address)

    async def close(self) -> None:
        """Stop answering (after the main port has closed: HAProxy hears ``drain`` until then)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self._open += 1
        try:
            line = agent_reply(self.core)
            self._log_change(line)
            writer.write(f"{line}\n".encode("ascii"))
            async with asyncio.timeout(LINGER_S):
                await writer.drain()
                discarded = 0
                while discarded < MAX_DISCARDED_BYTES and (chunk := await reader.read(1024)):
                    discarded += len(chunk)
        except (OSError, TimeoutError):
            pass  # the peer went away or kept the connection open: it has its line, or never will
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _log_change(self, line: str) -> None:
        word = line.split()[-1]
        if word != self._last_word:
            self._last_word = word
            reason = self.core.refusal_reason()
            logger.info("agent check now says %r%s", line, f" ({reason})" if reason else "")


async def start_agent_check(
    core: SessionCore, settings: AdmissionSettings, server_host: str
) -> AgentCheckServer | None:
    """The agent check of ``[admission]``, started; None when ``agent_port`` is unset.

    Args:
        core: the session core.
        settings: the ``[admission]`` settings.
        server_host: ``server.host``, the address when ``agent_host`` is unset.
    """
    if settings.agent_port is None:
        return None
    agent = AgentCheckServer(core, settings.agent_host or server_host, settings.agent_port)
    await agent.start()
    return agent
