"""One Deepgram live connection: Deepgram's frames to session-core calls, core events to Deepgram's messages.

Frames in: a binary frame is audio (:meth:`Session.push_audio <streamer.session.machine.Session.push_audio>`; an
empty one means CloseStream, as it did in Deepgram's older API); a text message is ``KeepAlive`` (nothing but
resetting the idle timer), ``Finalize`` (:meth:`Session.finalize <streamer.session.machine.Session.finalize>`; its
answer is the final result with ``from_finalize`` true, a final that came while it was carried out, or an empty one
when no words were pending), ``CloseStream`` (:meth:`Session.stop <streamer.session.machine.Session.stop>`: the last
final, then ``Metadata``, then close 1000), or ``Configure`` (answered ``ConfigureSuccess``, or ``ConfigureFailure``
with ``CONFIGURE_KEYTERMS_NOT_SUPPORTED`` for keyterms: a session's hotwords are fixed when it starts; pass them
as ``keyterm`` query parameters). Any other text gets ``Error``
(variant ``SchemaError``) and the session goes on; audio after ``CloseStream`` gets one ``Error`` (variant
``AudioAfterCloseStream``) and is not transcribed.

Events out: partials become interim ``Results`` (only with ``interim_results=true``), finals final ones
(``speech_final`` when the segment ended on a pause), the core's ``Pause`` an ``UtteranceEnd`` (with
``utterance_end_ms``), and with ``vad_events=true`` the first partial after a final or a pause (or a final that came
without one) is preceded by ``SpeechStarted`` at the time its segment's first word began (after a pause that did not
end the segment, the end of the word before the pause: a partial carries no later start). The engine's speech is the
recognizer's tokens, so this is when a word began, not an energy detector's onset. ``Problem`` becomes ``Error``;
``Ended`` sends ``Metadata`` and closes: 1000 after ``CloseStream``, 1001 at shutdown, 1011 ``NET-0001`` after
``idle_timeout_s`` (10 s) without audio or a text message. The core's warnings have no Deepgram message and are only
logged.

No resume: a connection that breaks ends its session (its open segment goes to captions and MQTT as ``disconnect``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from streamer.adapters.deepgram.messages import (
    ConfigureReply,
    ErrorMessage,
    FinalizeAck,
    Metadata,
    ModelReport,
    ResultsWriter,
    SpeechStarted,
    UtteranceEnd,
)
from streamer.engine.pause import Pause
from streamer.protocol import Final, MessageError, Partial
from streamer.protocol import Warning as WarningMessage
from streamer.protocol.limits import load_client_object
from streamer.server.fanout import Outbox
from streamer.session import Ended, Event, Opened, Problem, Session, Superseded

if TYPE_CHECKING:
    from streamer.adapters.deepgram.request import DeepgramOptions
    from streamer.server.metrics import Metrics
    from streamer.settings import ServerSettings

logger = logging.getLogger(__name__)

MAX_CLOSE_REASON_BYTES = 123  # what a WebSocket close frame holds
IDLE_REASON = "NET-0001: no audio or text message received for {seconds:g} s; send KeepAlive while there is no audio"
CLOSE_CODES: dict[str, tuple[int, str]] = {
    "stop": (1000, ""),
    "shutdown": (1001, "server shutting down"),
    "server_busy": (1013, "server busy"),
    "start_timeout": (1008, "session did not start"),
}


def close_reason(text: str) -> str:
    """``text`` cut to what a close frame holds (123 bytes of UTF-8), on a character boundary."""
    return text.encode()[:MAX_CLOSE_REASON_BYTES].decode(errors="ignore")


class DeepgramConnection:
    """One connection's sink for the core's events, and its receive loop; see the module docstring.

    Args:
        options: what the request's query asked for.
        server: the ``[server]`` settings (send queue bound, close timeout).
        idle_timeout_s: close with NET-0001 after this long without a frame from the client.
        metrics: the metrics registry.
        ws: the connection.
        request_id: the connection's id, in every message.
        model: the model reported.
    """

    def __init__(
        self, options: DeepgramOptions, server: ServerSettings, idle_timeout_s: float, metrics: Metrics,
        ws: ServerConnection, request_id: str, model: ModelReport,
    ) -> None:
        self.options, self.ws, self.metrics, self.request_id = options, ws, metrics, request_id
        self.model = model
        self.idle_timeout_s = idle_timeout_s
        self.writer = ResultsWriter(request_id, model)
        self.outbox = Outbox(ws, server.max_pending_messages, server.close_timeout_s,
                             on_slow=metrics.slow_consumers_total.inc, render=self.writer.render)
        self._close_timeout_s = server.close_timeout_s
        self.created = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        self._audio_hash = hashlib.sha256()
        self._is_quiet = True  # no speech since the last final or pause: the next words are a SpeechStarted
        self._pause_end_s = 0.0  # where the last pause began (a partial after it may carry an older start)
        self._finalize_finals = 0  # finals that answered a Finalize
        self._finalizing = 0  # Finalize requests not carried out yet
        self._told_late_audio = False
        self._stopping: asyncio.Task[None] | None = None
        self._waits: set[asyncio.Task[None]] = set()
        self.session: Session | None = None

    # ------------------------------------------------------------------ core events -> Deepgram messages

    def offer(self, event: Event, replay: bool = False) -> None:
        """The core's events as Deepgram messages, queued in order (loop thread; never awaits)."""
        if isinstance(event, Partial):
            self._speech_started(max(event.start, self._pause_end_s))
            if self.options.interim_results:
                self.outbox.offer(event)
        elif isinstance(event, Final):
            self._speech_started(event.start)
            self._is_quiet = True
            if event.reason == "finalize" or self._finalizing:  # it answers a Finalize (the flush may end the
                self.writer.finalized.add(event.segment)  # segment on its silence rule before the cut does)
                self._finalize_finals += 1
            self.outbox.offer(event)
        elif isinstance(event, Pause):
            self._is_quiet, self._pause_end_s = True, event.last_word_end
            self.outbox.offer(UtteranceEnd(event.last_word_end))
        elif isinstance(event, Problem):
            self.outbox.offer(ErrorMessage(event.code, event.message))
        elif isinstance(event, Ended):
            self._end(event)
        elif isinstance(event, Opened):
            logger.info("deepgram %s: session %s on stream %s (model %r asked, %s runs; language %r)", self.request_id,
                        event.session, event.stream, self.options.model, self.model.name, self.options.language)
        elif isinstance(event, Superseded):  # no resume on this protocol; kept for completeness
            self.outbox.stop()
            self.ws.transport.abort()
        elif isinstance(event, WarningMessage):
            logger.info("deepgram %s: %s: %s (no Deepgram message for it)", self.request_id, event.code, event.message)

    def _speech_started(self, at_s: float) -> None:
        if self._is_quiet:
            self._is_quiet = False
            if self.options.vad_events:
                self.outbox.offer(SpeechStarted(at_s))

    def _end(self, ended: Ended) -> None:
        accounting = ended.accounting
        if accounting is not None:
            self.outbox.offer(Metadata(
                self.request_id, self.created, accounting.received_s, self.options.channels,
                self._audio_hash.hexdigest(), self.model, self.options.model, self.options.language,
            ))
        if ended.reason == "idle":
            code, reason = 1011, IDLE_REASON.format(seconds=self.idle_timeout_s)
        else:
            code, reason = CLOSE_CODES.get(ended.reason, (1000, ended.reason))
        self.outbox.close_after_queue(code, close_reason(reason))

    # ------------------------------------------------------------------ Deepgram frames -> core calls

    async def run(self, session: Session) -> None:
        """Receive until the connection ends; a connection that broke ends its session (no resume here)."""
        self.session = session
        sender = asyncio.create_task(self.outbox.run(), name=f"deepgram-send-{session.id}")
        try:
            await self._receive(session)
        finally:
            if session.is_open:  # the client vanished, or the connection broke
                self.outbox.stop()
                await session.lost(resumable=False)
            for task in list(self._waits):
                task.cancel()
            if self._stopping is not None:
                await self._stopping  # the last final is flushed (to captions and MQTT if the client left)
            if not sender.done():
                try:
                    async with asyncio.timeout(self._close_timeout_s * 2):
                        await asyncio.shield(sender)
                except TimeoutError:
                    sender.cancel()

    async def _receive(self, session: Session) -> None:
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout_s):
                    message = await self.ws.recv()
            except TimeoutError:
                if not session.is_open:  # CloseStream came: the flush is under way, the close follows
                    continue
                logger.info("deepgram %s: nothing received for %g s; closing (NET-0001)", self.request_id,
                            self.idle_timeout_s)
                self.metrics.protocol_errors_total.inc(label_value="idle_timeout")
                await session.end("idle")
                return
            except ConnectionClosed:
                return
            if isinstance(message, str):
                self._on_text(session, message)
            elif not message:  # Deepgram's older API: an empty binary frame closes the stream
                self._close_stream(session)
            elif session.is_open and self._stopping is None:
                self._audio_hash.update(message)
                await session.push_audio(message)
            elif not self._told_late_audio:
                self._told_late_audio = True
                self.metrics.protocol_errors_total.inc(label_value="audio_after_close")
                self.outbox.offer(ErrorMessage("AudioAfterCloseStream", f"audio after CloseStream is not transcribed "
                                               f"({len(message)} bytes, and any later ones, were ignored); open a new "
                                               "connection for more audio"))

    def _on_text(self, session: Session, text: str) -> None:
        """One text message; what cannot be read gets ``Error`` (``SchemaError``) and the session goes on."""
        try:
            obj = load_client_object(text)  # the server's limits on size, depth and numbers hold here too
            kind = obj.get("type")
            if kind == "KeepAlive":
                return
            if kind == "Finalize":
                self._finalize(session)
            elif kind == "CloseStream":
                self._close_stream(session)
            elif kind == "Configure":
                self._configure(obj)
            else:
                raise MessageError("SchemaError", f"unknown message type {str(kind)[:40]!r}; this server takes "
                                   "KeepAlive, Finalize, CloseStream and Configure (audio as binary frames)")
        except MessageError as exc:
            self.metrics.protocol_errors_total.inc(label_value="bad_message")
            logger.info("deepgram %s: unreadable text message: %s", self.request_id, exc)
            self.outbox.offer(ErrorMessage("SchemaError", str(exc), text))
        except Exception:  # a bug: said and logged like one, never the end of the session (as protocol v1 does)
            logger.exception("deepgram %s: handling a text message failed", self.request_id)
            self.metrics.protocol_errors_total.inc(label_value="internal_error")
            self.outbox.offer(ErrorMessage("internal_error", f"the server failed to handle this message (a bug, logged "
                                           f"as request {self.request_id}); it was discarded and the stream goes on"))

    def _finalize(self, session: Session) -> None:
        if not session.is_open or not session.is_started or self._stopping is not None:
            return
        done, before, upto_s = session.finalize(), self._finalize_finals, session.received_s
        self._finalizing += 1

        async def answer() -> None:
            try:
                await done.wait()
            finally:
                self._finalizing -= 1
            if self._finalize_finals == before:  # no segment ended: say so, empty (dropped after the close)
                self.outbox.offer(FinalizeAck(upto_s))

        task = asyncio.create_task(answer(), name=f"deepgram-finalize-{session.id}")
        self._waits.add(task)
        task.add_done_callback(self._waits.discard)

    def _close_stream(self, session: Session) -> None:
        if self._stopping is None and session.is_open:
            self._stopping = asyncio.create_task(session.stop(), name=f"deepgram-stop-{session.id}")

    def _configure(self, obj: dict[str, object]) -> None:
        if obj.get("keyterms") is not None:
            self.outbox.offer(ConfigureReply(
                self.request_id, "CONFIGURE_KEYTERMS_NOT_SUPPORTED",
                "keyterms are fixed when a session starts (pass them as keyterm query parameters); the stream goes on "
                "unchanged"))
        else:
            self.outbox.offer(ConfigureReply(self.request_id))
