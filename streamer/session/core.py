"""The session core: every client's recognition session, whatever protocol it came in on (sans-I/O).

Where it sits (``architecture.md`` §1-§2)::

    adapter (protocol v1 on /v1/listen; later Wyoming, Deepgram, OpenAI, Hermes, Vosk)
        │ parses its wire format, then calls:  core.connect(sink) → Session
        │   session.start(StartOptions, ResumeRequest) · session.push_audio(bytes) · finalize() (→ done event) · stop()
        │   end(reason) · lost(resumable) · wait_for_resume() · error(code, message)
        ▼
    Session (streamer.session.machine): phases, start, resume, the exactly-one-final rule (by owning the
        │ stream's one engine channel and closing it once), accounting
        ├── SessionAudio (streamer.session.audio): bytes → PcmConverter (any declared PCM encoding, rate,
        │       channels → float32 mono 16 kHz) → Channel.write (live: drop the oldest) or
        │       Scheduler.write_waiting (can wait: back-pressure)
        ▼
    engine.Scheduler → Recognizer → Segmenter: partials, one final per segment, warnings
        ▼  publish(stream, events)
    server.Hub ──► captions subscribers, MQTT
        └──► ResultLog (streamer.session.results): the stream's source; keeps the last finals for a resume
                └──► the attached client's ClientSink (the adapter) → its own wire messages

Inputs are method calls; outputs are events offered to the adapter's :class:`~streamer.session.events.ClientSink`
(the engine's ``Partial``/``Final``/``Warning`` records plus ``Opened``, ``Problem``, ``Ended`` with the
accounting, and ``Superseded``). No adapter re-implements resampling, endpointing, caps, resume, metrics or
the exactly-one-final rule: they live here and below.

Why this is still sans-I/O with ``async`` methods: the core opens no socket and reads or writes no bytes of
any transport. Its awaitables wait only for the engine and for time: ``push_audio`` waits for room in the
channel's ring (``Scheduler.write_waiting``: a client that can wait is slowed down by the adapter not
reading its transport meanwhile), ``stop``/``end``/``lost`` wait for the scheduler to flush the last final,
``wait_for_resume`` and ``start_deadline`` wait out a window. Everything else (``offer`` to a sink,
``error``, ``finalize``) is synchronous, and everything runs on the event loop thread. Tests drive it with
method calls and a list for a sink, no socket at all (``tests/test_session_core.py``).

Who owns what:

- :class:`SessionCore` (one per daemon, shared by every adapter): the collaborators (scheduler, results
  hub, metrics, session journal, the default endpointing rules, the model's description), the limits, the
  set of sessions, readiness (and draining), the load, and the caps: ``max_sessions`` started sessions (or fewer,
  the box's capacity, ``admission.capacity_streams``; held ones count), at most
  ``max_pending_connections`` links that have not started one, ``start_timeout_s`` to start.
- :class:`~streamer.session.machine.Session` (one per client link, from ``connect`` until the adapter's
  ``release``): the phase (awaiting start, streaming, held, moved, ending), and, once started, the session
  a resume carries to a new link: id, stream, options, engine channel, audio path, result log, tokens.
- The adapter: its transport, its wire format, its send queue, its idle rule, and what a break means
  (``lost(resumable=...)``: a client that hung up is not held; one whose connection dropped is).

What an adapter does (``streamer.server.listen`` is the example), and nothing more:

1. ``core.connect(sink, protocol=..., name_prefix=...)``; a :class:`~streamer.session.events.Problem` back means
   refused: say so in its own shape and close. Otherwise run ``session.start_deadline()`` as a task.
2. Map its start onto :class:`~streamer.session.events.StartOptions` (and a resume onto
   :class:`~streamer.session.events.ResumeRequest`) and call ``start``; its audio (while ``is_open`` and
   ``is_started``) onto ``await push_audio(bytes)``, reading nothing more from its transport meanwhile; its
   end-of-utterance request onto ``finalize()`` (which returns an event set once the cut is done, for a protocol
   that answers every flush), its end of audio onto ``await stop()``. ``StartOptions.pause_s`` asks for ``Pause``
   events (the speaker paused), for a protocol that reports them.
3. Report its own parse errors with ``session.error(code, message)`` (logged and counted like the core's).
4. Turn each event its sink is offered into its wire messages: ``Opened``, the engine's partials, finals and
   warnings, ``Problem``; ``Ended``: send the accounting if any, then close; ``Superseded``: drop the transport.
5. When its transport ends: ``await lost(resumable)`` if ``is_open``, then ``await wait_for_resume()``, and
   finally ``core.release(session)`` and cancel the deadline task.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from streamer.session.events import ClientSink, ModelInfo, Problem, ResultRouter, ResumeRequest
from streamer.session.limits import SessionLimits
from streamer.session.machine import Phase, Session
from streamer.session.results import tokens_match

if TYPE_CHECKING:
    from streamer.engine.endpoint import EndpointConfig
    from streamer.engine.scheduler import Scheduler
    from streamer.server.metrics import Metrics
    from streamer.server.session_journal import SessionStore
    from streamer.server.stream_leases import StreamLeases
    from streamer.session.failover import Failover

logger = logging.getLogger("streamer.session")


class SessionCore:
    """Every session of the daemon and what they share; see the module docstring.

    Args:
        limits: caps and windows.
        scheduler: opens, feeds and closes engine channels.
        hub: result fan-out; a session registers its result log as its stream's source.
        metrics: the metrics registry.
        endpoint: the default endpointing rules (a start may override some).
        model: the model, as ``Opened`` tells clients.
        journal: what a resume may replay after a restart (and the previous run's orphans).
        leases: the cluster's stream-name leases ([cluster]); None: names are unique on this daemon only.
        failover: resumes across replicas ([cluster] with ``resume_secret``); None: resume on this daemon only.
    """

    def __init__(
        self,
        limits: SessionLimits,
        scheduler: Scheduler,
        hub: ResultRouter,
        metrics: Metrics,
        endpoint: EndpointConfig,
        model: ModelInfo,
        journal: SessionStore,
        leases: StreamLeases | None = None,
        failover: Failover | None = None,
    ) -> None:
        self.limits, self.scheduler, self.hub, self.metrics = limits, scheduler, hub, metrics
        self.endpoint, self.model, self.journal = endpoint, model, journal
        self.leases, self.failover = leases, failover
        self.sessions: set[Session] = set()  # every link from connect to release
        self.is_ready = False  # model warm, not shutting down: links are let in
        self.is_draining = False  # stopping: no new links, the open ones go on (or are flushed) until exit
        self._emptied: asyncio.Event | None = None  # set when the last link is released while draining
        metrics.sessions_active.source = self.counted_sessions
        metrics.capacity_sessions.source = lambda: limits.session_cap
        metrics.load_ratio.source = self.load_ratio

    def connect(self, sink: ClientSink, protocol: str = "listen", name_prefix: str = "ws") -> Session | Problem:
        """A new client link, or the refusal to send it (then close it): not ready, or a cap is reached.

        Args:
            sink: where the link's events go.
            protocol: the adapter's name (the ``endpoint`` label of ``streamer_sessions_refused_total``).
            name_prefix: an unnamed stream is called ``<name_prefix>-<session id>``.
        """
        limits = self.limits
        if not self.is_ready:
            return Problem("not_ready", "the server is starting or stopping and takes no audio now; try again later")
        # Held sessions count against the cap too, but a link may come in to resume one of them (its start is
        # refused a new session while the cap is reached).
        if self.live_count() >= limits.session_cap:
            return self._refuse(protocol, limits.session_cap, "sessions", limits.cap_setting)
        # A link takes a place under max_sessions only with its start; until then it waits among these.
        if self.pending_count() >= limits.max_pending_connections:
            return self._refuse(protocol, limits.max_pending_connections, "connections waiting for their 'start'",
                                "server.max_pending_connections")
        session = Session(self, sink, protocol, name_prefix)
        self.sessions.add(session)
        return session

    def release(self, session: Session) -> None:
        """The adapter is done with ``session``'s link (its handler returns); it no longer counts."""
        self.sessions.discard(session)
        if not self.sessions and self._emptied is not None:
            self._emptied.set()

    def _refuse(self, protocol: str, cap: int, what: str, setting: str) -> Problem:
        self.metrics.sessions_refused_total.inc(label_value=protocol)
        self.metrics.protocol_errors_total.inc(label_value="server_busy")
        logger.warning("refused a %s connection: %d %s open (the maximum, %s)", protocol, cap, what, setting)
        return Problem("server_busy", f"the server has {cap} {what} open, its maximum; try again later")

    def find_resumable(self, resume: ResumeRequest) -> tuple[Session | None, str | None]:
        """The live or held session that ``resume`` names and may take over, or None and why not."""
        window_s = self.limits.resume_window_s
        if window_s <= 0:
            return None, "this server does not keep sessions for a resume (server.resume_window_s is 0)"
        for session in self.sessions:
            if session.id != resume.session or session.phase not in (Phase.STREAMING, Phase.HELD):
                continue
            if tokens_match(resume.token, session.resume_token):
                return session, None
            if resume.token in session.spent_tokens:
                return None, "this resume token was used already; each 'ready' carries a new one"
            return None, "the resume token does not match the session's"
        return None, f"no such session: it ended, or its resume window of {window_s:g} s passed"

    def live_count(self) -> int:
        """Started sessions on a link of their own (not held ones, not links still awaiting start)."""
        return sum(s.channel is not None and s.phase is not Phase.HELD for s in self.sessions)

    def pending_count(self) -> int:
        """Links that have not started (or resumed) a session yet."""
        return sum(s.phase is Phase.AWAITING_START for s in self.sessions)

    def held_count(self) -> int:
        """Sessions waiting for their client to come back."""
        return sum(s.phase is Phase.HELD for s in self.sessions)

    def counted_sessions(self) -> int:
        """The sessions that count against the cap: started ones, held ones too (not links awaiting start)."""
        return sum(s.channel is not None for s in self.sessions)

    def is_full_for_new_session(self) -> bool:
        """True when a new session would exceed the cap (:attr:`SessionLimits.session_cap`): started sessions
        count, held ones too, while links that have not started one do not (the asker has not)."""
        return self.counted_sessions() >= self.limits.session_cap

    def load_ratio(self) -> float:
        """Counted sessions over the cap: 0 idle, 1 full (``streamer_load_ratio``)."""
        return self.counted_sessions() / self.limits.session_cap

    def refusal_reason(self) -> str | None:
        """Why a new session would be refused now (``/readyz``, the agent check), or None when it would not.

        ``starting``, ``draining``, or, only with a capacity set (``admission.capacity_streams``: a box behind a
        load balancer), ``at capacity N/N sessions``; without one a full box stays ready, as it always was.
        """
        if self.is_draining:
            return "draining"
        if not self.is_ready:
            return "starting"
        if self.limits.capacity > 0 and self.is_full_for_new_session():
            return f"at capacity {self.counted_sessions()}/{self.limits.session_cap} sessions"
        return None

    async def drain(self, timeout_s: float) -> int:
        """Refuse new links and wait up to ``timeout_s`` for the open ones to end; returns how many are left.

        The sessions go on meanwhile; whatever is left is flushed by :meth:`shutdown`.
        """
        self.is_ready, self.is_draining = False, True
        if self.sessions and timeout_s > 0:
            logger.info("draining: waiting up to %g s for %d session(s) to end", timeout_s, len(self.sessions))
            self._emptied = asyncio.Event()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._emptied.wait()
            except TimeoutError:
                logger.info("drain time is up with %d session(s) open; flushing them", len(self.sessions))
        return len(self.sessions)

    async def shutdown(self) -> None:
        """Flush every session's segment to every sink; each client gets its ``Ended``."""
        self.is_ready, self.is_draining = False, True
        await asyncio.gather(*(s.end("shutdown") for s in list(self.sessions)))
