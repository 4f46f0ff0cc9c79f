"""Sessions that survive their replica: resume on another replica, and a graceful drain that moves sessions
([cluster] with ``resume_secret``; ``README.md`` "Scaling out", "Sessions that survive a replica").

While a session runs, its replica keeps what a resume needs in the cluster's store
(:class:`~streamer.server.session_facts.SessionFacts`): at every ``ready`` the nonce of its new signed token
(:mod:`streamer.session.resume_token`), at every final that final, the number of the next one and its end in the
client's audio (the stream clock, in the client's sample frames).

A v1 ``start`` whose ``resume`` names a session this replica does not have, with a token signed by the cluster's
secret, is continued here (:meth:`Failover.resume`): the token is verified (signature, expiry, session), the
facts are read (the token must be the session's latest; the format must match), the stream's lease is taken once
the old replica's lapsed (killed: after at most ``lease_ttl_s``) or was released (drained, or handed over on
request: its client's connection broke while the replica lives), the facts are read again and taken over (one
resume wins), and :meth:`Session.continue_from <streamer.session.machine.Session.continue_from>` opens a
fresh recognizer at the end of the last final: ``ready`` says ``resumed: true`` and ``audio_s`` there, the
client re-sends its buffered audio from that point, finals are numbered on, the kept finals the client lacks are
replayed, and none it has is sent again.

A graceful drain, and a hand-over to a replica that resumes a session this one holds, are
:mod:`streamer.session.handoff`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from streamer.session.events import Carried, Outcome, ResumeRequest, StartOptions
from streamer.session.machine import Phase
from streamer.session.results import start_mismatch
from streamer.session.resume_token import ResumeTokenError, TokenClaims, TokenSigner, is_signed

if TYPE_CHECKING:
    from streamer.protocol import Final
    from streamer.server.session_facts import Facts, SessionFacts
    from streamer.server.stream_leases import StreamLeases
    from streamer.session.machine import Session

logger = logging.getLogger("streamer.session")

LEASE_POLL_S = 0.1  # how often a resume asks for the stream lease while the old replica's runs out


class ResumeRefused(Exception):
    """Why a resume on this replica cannot go on (becomes the ``resume_failed`` message); internal."""


class Failover:
    """This replica's part in cross-replica resume and drain; see the module docstring.

    Args:
        signer: signs and verifies resume tokens with the cluster's secret.
        facts: the sessions' facts in the store.
        leases: the stream-name leases.
        node: this replica's node id.
        lease_wait_s: how long a resume waits for the old replica's stream lease to lapse.
    """

    def __init__(self, signer: TokenSigner, facts: SessionFacts, leases: StreamLeases, node: str,
                 lease_wait_s: float) -> None:
        self.signer, self.facts, self.leases, self.node = signer, facts, leases, node
        self.lease_wait_s = lease_wait_s
        self._progress: dict[str, tuple[int, int]] = {}  # session -> (next final's segment, audio frames before)
        self.nonces: dict[str, str] = {}  # session -> the nonce of its latest token (hand-over requests name it)

    # ------------------------------------------------------------------ a session's facts as it runs

    def issue(self, session: Session) -> str:
        """A new signed token for ``session`` (at its ``ready``); its facts in the store name the token's nonce."""
        from streamer.server.session_facts import Facts

        token, nonce = self.signer.issue(session.id, session.stream, self.node)
        self.nonces[session.id] = nonce
        next_segment, frames = self._progress.setdefault(session.id, (0, 0))
        assert session.options is not None
        self.facts.put(session.id, Facts(session.stream, self.node, nonce, session.options, next_segment,
                                         frames).to_fields())
        return token

    def on_final(self, session: Session, final: Final) -> None:
        """A final of ``session`` went out: store it, its number and its end (where a resume re-sends from)."""
        if session.options is None:
            return
        progress = (final.segment + 1, round(final.end * session.options.sample_rate))
        self._progress[session.id] = progress
        self.facts.put(session.id, {"next_segment": str(progress[0]), "audio_frames": str(progress[1])}, final)

    def forget(self, session_id: str) -> None:
        """The session is over: its facts go."""
        self._progress.pop(session_id, None)
        self.nonces.pop(session_id, None)
        self.facts.forget(session_id)

    def drop(self, session_id: str) -> None:
        """The session went on on another replica: forget it here (its facts stay in the store)."""
        self._progress.pop(session_id, None)
        self.nonces.pop(session_id, None)

    def progress(self, session_id: str) -> tuple[int, int]:
        """The number of the session's next final, and the end of its last one in client sample frames."""
        return self._progress.get(session_id, (0, 0))

    async def renew(self, sessions: Callable[[], Iterable[Session]]) -> None:
        """Renew the facts of every session this replica runs (or holds) every ttl/3, until cancelled."""
        while True:
            await asyncio.sleep(self.facts.ttl_s / 3)
            self.facts.refresh([s.id for s in sessions() if s.channel is not None and s.phase in
                                (Phase.STREAMING, Phase.HELD)])

    # ------------------------------------------------------------------ resume here

    async def resume(self, session: Session, options: StartOptions, resume: ResumeRequest) -> Outcome:
        """Continue the session ``resume`` names, which another replica ran; see the module docstring."""
        if not is_signed(resume.token):
            return Outcome.NOT_SIGNED
        session.is_taking_over = True  # the start deadline waits for this
        try:
            return await self._take_over(session, options, resume)
        finally:
            session.is_taking_over = False

    async def _take_over(self, session: Session, options: StartOptions, resume: ResumeRequest) -> Outcome:
        from streamer.server.stream_leases import LeaseStoreError

        try:
            claims, facts, _ = await self._check(session, options, resume)
            await self._lease(facts.stream, facts.node, resume.session, claims.nonce)
        except ResumeRefused as exc:
            return self._refuse(session, resume, str(exc))
        stream = facts.stream
        moving = "moving:" + secrets.token_urlsafe(8)
        try:  # read again: a replica that handed the session over stored its last final meanwhile
            claims, facts, finals = await self._check(session, options, resume)
            if not session.is_open:  # the link ended while waiting: leave the session to the client's next try
                self.leases.release(stream)
                return Outcome.FAILED
            taken = await self.facts.take_over(resume.session, claims.nonce, moving, self.node)
        except (ResumeRefused, LeaseStoreError) as exc:
            self.leases.release(stream)
            return self._refuse(session, resume, str(exc))
        except BaseException:
            self.leases.release(stream)
            raise
        if not taken:
            self.leases.release(stream)
            return self._refuse(session, resume, "another connection resumed it meanwhile")
        self._progress[resume.session] = (facts.next_segment, facts.audio_frames)
        carried = Carried(resume.session, facts.stream, facts.options, facts.next_segment, facts.audio_frames,
                          finals, resume.token)
        logger.info("session %s: taken over from server %s (%d final(s) there)", resume.session, facts.node,
                    facts.next_segment)
        if session.is_open and not session.is_started and \
                session.continue_from(carried, options.interim_results, resume.next_segment):
            return Outcome.RESUMED
        self.leases.release(facts.stream)  # not continued (said why): the client's token works again
        self._progress.pop(resume.session, None)
        with contextlib.suppress(LeaseStoreError):
            await self.facts.take_over(resume.session, moving, claims.nonce, facts.node)
        return Outcome.FAILED

    @staticmethod
    def _refuse(session: Session, resume: ResumeRequest, why: str) -> Outcome:
        session.error("resume_failed", f"cannot resume session {resume.session!r}: {why}; starting a new session "
                      "instead")
        return Outcome.FAILED

    async def _check(self, session: Session, options: StartOptions,
                     resume: ResumeRequest) -> tuple[TokenClaims, Facts, list[Final]]:
        """The token's claims and the session's facts, if ``resume`` may continue it here.

        Raises:
            ResumeRefused: saying why not.
        """
        from streamer.server.stream_leases import LeaseStoreError

        try:
            claims = self.signer.verify(resume.token)
        except ResumeTokenError as exc:
            raise ResumeRefused(str(exc)) from exc
        if claims.session != resume.session:
            raise ResumeRefused("the resume token belongs to another session")
        try:
            found = await self.facts.get(resume.session)
        except (LeaseStoreError, ValueError) as exc:
            raise ResumeRefused(str(exc)) from exc
        if found is None:
            raise ResumeRefused("no such session in the cluster: it ended, or its replica went away longer ago "
                                "than the resume window")
        facts, finals = found
        if not hmac.compare_digest(facts.nonce.encode(), claims.nonce.encode()):
            raise ResumeRefused("this resume token was used already; each 'ready' carries a new one")
        if (problem := start_mismatch(facts.options, facts.stream, options)) is not None:
            raise ResumeRefused(problem)
        if facts.stream in session.core.scheduler.channels:
            raise ResumeRefused(f"stream {facts.stream!r} is already sent by another source on this server")
        if session.core.is_full_for_new_session():
            raise ResumeRefused(f"this server has {session.core.limits.max_sessions} sessions open, its maximum")
        return claims, facts, finals

    async def _lease(self, stream: str, node: str, session: str, nonce: str) -> None:
        """Lease ``stream``, waiting up to ``lease_wait_s`` for the lease of the session's replica ``node`` to lapse
        (it died) or be released (it drains, or hands the session over: it is asked to once).

        Raises:
            ResumeRefused: the store is unreachable, or the lease is still held when the wait is over.
        """
        from streamer.server.stream_leases import LeaseStoreError

        loop = asyncio.get_running_loop()
        deadline, asked = loop.time() + self.lease_wait_s, False
        while True:
            try:
                claim = await self.leases.claim(stream)
                if not claim.granted and not asked:
                    logger.info("stream %s: leased by server %s; asking it to hand session %s over, waiting up to "
                                "%g s", stream, claim.holder, session, self.lease_wait_s)
                    if claim.holder == node:
                        await self.facts.request_handover(node, session, nonce)
                    asked = True
            except LeaseStoreError as exc:
                raise ResumeRefused(str(exc)) from exc
            if claim.granted:
                return
            if loop.time() >= deadline:
                raise ResumeRefused(f"its stream {stream!r} is still leased by server {claim.holder!r}, which is "
                                    f"alive and did not let it go within {self.lease_wait_s:g} s")
            await asyncio.sleep(LEASE_POLL_S)
