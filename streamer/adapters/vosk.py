"""The Vosk server's WebSocket protocol on a port of its own (``[vosk]``, 2700): an adapter on the session core.

Messages are :mod:`streamer.adapters.vosk_messages`'. A connection is one core session (stream ``vosk-<id>``, on
``/v1/captions`` and MQTT like any other), which starts with the first audio frame or with a config that names
``sample_rate`` (else at ``vosk.sample_rate``, vosk-server's 8000 by default). Frames in, core calls out: audio →
``push_audio`` (s16le mono; a frame may end mid-sample, the byte waits for the next frame, so odd byte counts lose
nothing), ``{"reset" : 1}`` → ``finalize``, ``{"eof" : 1}`` → ``stop``. The config's ``phrase_list`` is the session's
hotwords (a list the core refuses, too long say, is a bad config); like vosk-server, a config that comes after the
session started changes nothing for it. Core events in, Vosk replies out: each
audio frame or command gets one reply, built from what the core offered so far: the oldest final not yet sent, else
the open utterance's latest partial. After ``eof`` the reply is every final not yet sent, as one, and the connection
closes with 1000. A client that can wait is never thinned (back-pressure, as protocol v1 without ``live``).

Errors, which vosk-server answers by closing the connection (an exception in its handler, 1011): a config that is
not JSON or has a field of the wrong type, a sample rate the core does not take, or a refusal (server busy, not
ready) get ``{"error": "..."}`` and a close with a reason: 1007 for bad input, 1013 for busy, 1008 for a timeout.
Another text message gets ``{"error": "..."}`` as its reply and the session goes on. A session cut by shutdown
gets its last final, then 1001. The port takes the daemon's tokens (``?token=`` or ``Authorization: Bearer``), its
TLS, its Host and Origin checks and the session caps of ``[server]``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from streamer.adapters import vosk_messages as vosk
from streamer.protocol import Final, MessageError, Partial
from streamer.server import address
from streamer.server.address import bound_port
from streamer.server.auth import TokenAuth, exposure_warnings
from streamer.server.listen import CLOSE_CODES
from streamer.server.origin import OriginPolicy
from streamer.session import Ended, Event, Problem, Session, SessionCore, StartOptions

if TYPE_CHECKING:
    from streamer.settings import ServerSettings, VoskSettings

logger = logging.getLogger("streamer.adapters.vosk")

RESET_WAIT_S = 10.0  # how long a reset waits for the engine to cut the segment (its final, if any, comes first)
BAD_INPUT, BUSY = 1007, 1013


class VoskServer:
    """The Vosk port.

    Args:
        settings: ``[vosk]``.
        server: ``[server]`` (frame size, timeouts, allowed hosts and origins).
        core: the session core.
        auth: the daemon's tokens.
        ssl_context: the daemon's TLS, or None.
    """

    def __init__(self, settings: VoskSettings, server: ServerSettings, core: SessionCore,
                 auth: TokenAuth | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.settings, self.server_settings, self.core = settings, server, core
        self.auth, self.ssl_context = auth or TokenAuth(), ssl_context
        self._server: Server | None = None
        self._policy: OriginPolicy | None = None

    @property
    def port(self) -> int:
        return bound_port(self._server)

    @property
    def url(self) -> str:
        return address.url("wss" if self.ssl_context is not None else "ws", self.settings.host, self.port)

    async def start(self) -> None:
        """Bind the port (0: a free one, see :attr:`port`)."""
        s, v = self.server_settings, self.settings
        self._server = await serve(
            self._handle, v.host, v.port, process_request=self._process_request, max_size=s.max_frame_bytes,
            compression=None, ping_interval=s.ping_interval_s, ping_timeout=s.ping_timeout_s,
            close_timeout=s.close_timeout_s, ssl=self.ssl_context, open_timeout=s.start_timeout_s,
        )
        self._policy = OriginPolicy(v.host, self.port, s.allowed_hosts, s.allowed_origins)
        scheme = "wss" if self.ssl_context else "ws"
        logger.info("Vosk protocol on %s://%s:%d", scheme, v.host, self.port)
        for warning in exposure_warnings(v.host, self.auth, self.ssl_context is not None):
            logger.warning("vosk: %s", warning)

    async def close(self) -> None:
        """Stop accepting and wait for the connections (the core's shutdown has ended their sessions)."""
        if self._server is None:
            return
        self._server.close(close_connections=False)
        try:
            async with asyncio.timeout(self.server_settings.close_timeout_s * 2):
                await self._server.wait_closed()
        except TimeoutError:
            self._server.close(close_connections=True)
            await self._server.wait_closed()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Host and Origin (HTTP 403), then the token (400 or 401), as on the main port; any path is the protocol."""
        assert self._policy is not None
        hosts, origins = request.headers.get_all("Host"), request.headers.get_all("Origin")
        metrics = self.core.metrics
        for reason, body in (
            ("host", self._policy.host_problem(hosts)),
            ("origin", "several Origin headers in one request; a browser sends one\n" if len(origins) > 1 else
             self._policy.origin_problem(origins[0] if origins else None, hosts[0] if hosts else None)),
        ):
            if body is not None:
                metrics.connections_refused_total.inc(label_value=reason)
                return connection.respond(HTTPStatus.FORBIDDEN, body)
        refusal = self.auth.check(request, every_path=True)
        if refusal is not None:
            metrics.auth_failures_total.inc(label_value=refusal.value)
            logger.warning("vosk: refused a connection: %s token", refusal.value)
            status = HTTPStatus.BAD_REQUEST if refusal.value == "ambiguous" else HTTPStatus.UNAUTHORIZED
            return connection.respond(status, f"{refusal.value} token: add ?token=<token> to the URL\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        connection = VoskConnection(ws, vosk.VoskConfig(self.settings.sample_rate), self.server_settings.idle_timeout_s)
        session = self.core.connect(connection, protocol="vosk", name_prefix="vosk")
        if isinstance(session, Problem):
            await connection.refuse(session)
            return
        deadline = asyncio.create_task(session.start_deadline(), name=f"vosk-start-deadline-{session.id}")
        try:
            await connection.run(session)
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("vosk connection %s failed", ws.id)
            await ws.close(1011, "internal error")
        finally:
            deadline.cancel()
            if session.is_open:
                await session.lost(resumable=False)
            self.core.release(session)


class VoskConnection:
    """One Vosk client: frames to core calls, the core's events to Vosk replies (the session's sink).

    Args:
        ws: the connection.
        config: the connection's settings (defaults until the client's config).
        idle_timeout_s: a connection that sends nothing this long is ended.
    """

    def __init__(self, ws: ServerConnection, config: vosk.VoskConfig, idle_timeout_s: float) -> None:
        self.ws, self.config, self.idle_timeout_s = ws, config, idle_timeout_s
        self.finals: deque[Final] = deque()  # offered, not yet replied
        self.partial = ""  # the open utterance's latest text
        self.problems: list[Problem] = []
        self._ending = False  # this handler ends the session and sends the last reply itself
        self._closer: asyncio.Task[None] | None = None

    def offer(self, event: Event, replay: bool = False) -> None:
        """The core's events, kept for the next reply (loop thread; never awaits)."""
        if isinstance(event, Partial):
            self.partial = event.text
        elif isinstance(event, Final):
            self.finals.append(event)
            self.partial = ""
        elif isinstance(event, Problem):
            self.problems.append(event)
        elif isinstance(event, Ended) and not self._ending:  # shutdown or start_timeout: not this handler's doing
            self._ending = True
            self._closer = asyncio.create_task(self._close_after(event), name=f"vosk-close-{self.ws.id}")

    async def refuse(self, problem: Problem) -> None:
        """Not ready or busy: say so and close."""
        await self.ws.send(vosk.error(problem.message))
        await self.ws.close(BUSY, _reason(problem.message))

    async def _close_after(self, ended: Ended) -> None:
        code, reason = CLOSE_CODES.get(ended.reason, (1000, ended.reason))
        problems = [p for p in self.problems if p.code == ended.reason]
        try:
            if problems:  # start_timeout: the core's words are protocol v1's
                await self.ws.send(vosk.error("no audio and no config with a sample_rate came within "
                                              "server.start_timeout_s of connecting"))
            else:
                await self.ws.send(self._last_reply())
            await self.ws.close(code, reason)
        except ConnectionClosed:
            pass

    async def run(self, session: Session) -> None:
        """Receive until the client's eof, a fatal error, the connection's end or the session's."""
        try:
            while session.is_open and not self._ending:
                try:
                    async with asyncio.timeout(self.idle_timeout_s):
                        message = await self.ws.recv()
                except TimeoutError:
                    session.error("idle_timeout", f"nothing received for {self.idle_timeout_s:g} s; the session "
                                  "is closed")
                    await self._end(session, "idle")
                    return
                if isinstance(message, str):
                    await self._on_text(session, message)
                else:
                    await self._on_audio(session, message)
        except ConnectionClosed:
            pass
        finally:
            if self._closer is not None:
                await asyncio.gather(self._closer, return_exceptions=True)

    async def _on_text(self, session: Session, text: str) -> None:
        if vosk.is_config(text):
            phrases = self.config.phrase_list
            try:
                for note in vosk.apply_config(self.config, text):
                    logger.info("vosk session %s: %s", session.id, note)
                if session.is_started and self.config.phrase_list != phrases:  # vosk-server does the same
                    logger.info("vosk session %s: a phrase_list after the session started is not applied", session.id)
            except MessageError as exc:
                session.error(exc.code, str(exc))
                await self._fatal(session, f"bad config: {exc}")
                return
            if self.config.has_rate and not session.is_started:
                await self._start(session)
            return  # vosk-server answers no config
        command = vosk.parse_command(text)
        if command.kind == "eof":
            await self._end(session, "stop")
        elif command.kind == "reset":
            await self._reset(session)
        else:
            session.error("bad_message", command.problem)
            await self.ws.send(vosk.error(command.problem))

    async def _start(self, session: Session) -> bool:
        """Start the core session at the configured rate; False (after an error and the close) when it refused."""
        await session.begin(StartOptions(self.config.sample_rate, "pcm_s16le", 1, hotwords=self.config.phrase_list))
        if session.is_started:
            return True
        problem = self.problems[-1] if self.problems else Problem("unsupported_audio", "the session did not start")
        await self._fatal(session, problem.message, BUSY if problem.code == "server_busy" else BAD_INPUT)
        return False

    async def _fatal(self, session: Session, message: str, code: int = BAD_INPUT) -> None:
        """An error the session cannot go on after: the error, then the close (what vosk-server does is close)."""
        self._ending = True
        await session.end("stop")
        await self.ws.send(vosk.error(message))
        await self.ws.close(code, _reason(message))

    async def _on_audio(self, session: Session, frame: bytes) -> None:
        if not session.is_started and not await self._start(session):
            return
        await session.push_audio(frame)
        await self.ws.send(self._reply())

    async def _reset(self, session: Session) -> None:
        """Vosk's reset: the utterance's final now, once the engine has cut the segment (none without words)."""
        if session.is_started:
            done = session.finalize()
            try:
                async with asyncio.timeout(RESET_WAIT_S):
                    await done.wait()
            except TimeoutError:
                logger.warning("vosk session %s: the reset was not carried out within %g s", session.id, RESET_WAIT_S)
        await self.ws.send(self._last_reply())

    async def _end(self, session: Session, reason: str) -> None:
        """eof (``stop``) or idle: flush, send every final not yet sent as one reply, close."""
        self._ending = True
        await session.end(reason)
        await self.ws.send(self._last_reply())
        await self.ws.close(*CLOSE_CODES.get(reason, (1000, reason)))

    def _reply(self) -> str:
        """The reply to an audio frame: the oldest final not yet sent, else the partial."""
        if self.finals:
            return vosk.result([self.finals.popleft()], self.config)
        return vosk.partial(self.partial)

    def _last_reply(self) -> str:
        finals = list(self.finals)
        self.finals.clear()
        return vosk.result(finals, self.config)


def _reason(message: str) -> str:
    """A close reason: at most 123 bytes of UTF-8."""
    data = message.encode()
    return message if len(data) <= 123 else data[:120].decode(errors="ignore") + "..."
