"""Letting a session go to another replica ([cluster] with ``resume_secret``; ``README.md`` "Sessions that survive
a replica"): at a graceful drain, and when another replica asks for a session this one holds.

Both cut the session at a clean point: no more audio is taken from its link, a write under way lands, the open
segment is finalized (its final goes to the client, or, for a held session, into the store, from which the next
replica replays it), the facts are stored, the channel is closed and the stream's lease released, so the replica
that resumes the session takes the lease at once.

- Drain (:func:`move`, from ``streamer.server.drain`` at SIGTERM): a streaming session's client is told ``moved``
  (with its token and where to re-send from) and its connection closes with 1012.
- Hand-over (:func:`serve_handovers`): a replica that is to resume a session this one holds (the client's
  connection broke, and the balancer sent its reconnect elsewhere) asks for it on the store's pub/sub
  (:meth:`~streamer.server.session_facts.SessionFacts.request_handover`), naming the nonce of the session's latest
  token; a held session is let go, and one whose old connection still looks open loses it (``Superseded``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from streamer.session.events import Moved, Superseded
from streamer.session.machine import Phase

if TYPE_CHECKING:
    from streamer.session.failover import Failover
    from streamer.session.machine import Session

logger = logging.getLogger("streamer.session")

HANDOVER_TIMEOUT_S = 5.0  # cutting a session another replica asked for
RESUBSCRIBE_S = 1.0  # after the store went away, subscribe again this much later


async def run(failover: Failover, sessions: Callable[[], Iterable[Session]]) -> None:
    """Renew the facts of ``sessions()`` and answer hand-over requests, until cancelled."""
    async with asyncio.TaskGroup() as tg:
        tg.create_task(failover.renew(sessions), name="session-facts-renewal")
        tg.create_task(serve_handovers(failover, sessions), name="hand-over-requests")


async def move(failover: Failover, session: Session, timeout_s: float) -> bool:
    """Cut a streaming session at a clean point and tell its client ``moved``; True when it was moved (one that
    is not streaming, has no token, or could not be cut within ``timeout_s`` is left to the shutdown)."""
    if session.phase is not Phase.STREAMING or session.resume_token is None:
        return False
    return await _let_go(failover, session, timeout_s, tell_client=True)


async def hand_over(failover: Failover, session: Session) -> bool:
    """Let a held session (or one whose old connection looks open) go to the replica that asked for it."""
    if session.phase is Phase.STREAMING:
        session.results.detach()  # its client is on another replica now: the cut's final goes to the store
        session.offer(Superseded(session.id))
    elif session.phase is not Phase.HELD:
        return False
    return await _let_go(failover, session, HANDOVER_TIMEOUT_S, tell_client=False)


async def _let_go(failover: Failover, session: Session, timeout_s: float, tell_client: bool) -> bool:
    channel, audio, options = session.channel, session.audio, session.options
    if channel is None or audio is None or options is None:
        return False
    was = session.phase
    session.move_away()  # its link reads no more audio; a held session stops waiting for its client
    core = session.core
    try:
        async with asyncio.timeout(timeout_s):
            await audio.settled()  # a write under way lands before the cut
            await core.scheduler.finalize(channel).wait()  # its final is offered first (and stored)
    except TimeoutError:
        logger.warning("session %s: not finalized within %g s; it ends here", session.id, timeout_s)
        if was is Phase.STREAMING and tell_client:
            session.phase = Phase.STREAMING  # the shutdown ends it as on a single daemon
            return False
    next_segment, frames = failover.progress(session.id)
    if not await failover.facts.flush(timeout_s):
        logger.warning("session %s: its facts were not stored within %g s; its resume may fail", session.id,
                       timeout_s)
    if tell_client and session.resume_token is not None:
        session.offer(Moved(session.id, session.stream, session.resume_token, frames / options.sample_rate,
                            next_segment))
    core.hub.set_source(session.stream, None)
    await core.scheduler.close(channel, "shutdown")  # nothing is left in it after the cut
    session.channel = None
    failover.leases.release(session.stream)
    failover.drop(session.id)
    core.journal.end(session.id)  # the session lives on elsewhere
    logger.info("session %s: %s (stream %s, %d final(s), %.3f s of audio)", session.id,
                "moved" if tell_client else "handed over", session.stream, next_segment, frames / options.sample_rate)
    return True


async def serve_handovers(failover: Failover, sessions: Callable[[], Iterable[Session]]) -> None:
    """Answer the hand-over requests sent to this replica, until cancelled (the store going away is logged, and
    the subscription renewed)."""
    from redis.exceptions import RedisError

    pending: set[asyncio.Task[bool]] = set()
    was_down = False
    while True:
        try:
            async for session_id, nonce in failover.facts.handover_requests(failover.node):
                if was_down:
                    logger.info("hand-over requests: subscribed again")
                    was_down = False
                session = _asked_for(failover, sessions(), session_id, nonce)
                if session is not None:
                    task = asyncio.create_task(hand_over(failover, session), name=f"hand-over-{session_id}")
                    pending.add(task)
                    task.add_done_callback(pending.discard)
        except (RedisError, OSError) as exc:
            if not was_down:
                logger.warning("hand-over requests: the store is unreachable (%s); a resume on another replica of "
                               "a session held here waits for its lease to lapse", exc or type(exc).__name__)
            was_down = True
        await asyncio.sleep(RESUBSCRIBE_S)


def _asked_for(failover: Failover, sessions: Iterable[Session], session_id: str, nonce: str) -> Session | None:
    """The session a request names, if this replica runs it and the nonce is its latest token's."""
    for session in sessions:
        if session.id == session_id and session.channel is not None and \
                session.phase in (Phase.STREAMING, Phase.HELD):
            if failover.nonces.get(session_id) == nonce:
                logger.info("session %s: another replica resumes it; handing it over", session_id)
                return session
            logger.warning("session %s: a hand-over request with a stale token was ignored", session_id)
            return None
    return None
