"""A graceful drain at SIGTERM ([cluster] with ``resume_secret``): every live ``/v1/listen`` session moves to
another replica instead of being cut (``README.md`` "Scaling out", "Sessions that survive a replica").

Called by the daemon's shutdown (``streamer.service``) after it stopped taking new connections and before it
ends the sessions that are left: each streaming v1 session is finalized at a clean point, its facts are stored,
its client is told ``moved`` and the connection closes with 1012 (:func:`streamer.session.handoff.move`);
the client reconnects through the load balancer and resumes on a replica that stays. Sessions of the other
protocols, and held ones, end as on a single daemon.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from streamer.session import Phase
from streamer.session.handoff import move

if TYPE_CHECKING:
    from streamer.session import SessionCore
    from streamer.session.failover import Failover

logger = logging.getLogger(__name__)

DRAINED_PROTOCOLS = ("listen",)  # adapters whose clients understand ``moved``


async def drain(core: SessionCore, failover: Failover, timeout_s: float) -> int:
    """Move every streaming v1 session to another replica; returns how many were moved."""
    movable = [s for s in core.sessions if s.protocol in DRAINED_PROTOCOLS and s.phase is Phase.STREAMING]
    if not movable:
        return 0
    logger.info("draining: moving %d session(s) to other replicas", len(movable))
    results = await asyncio.gather(*(move(failover, s, timeout_s) for s in movable), return_exceptions=True)
    for session, result in zip(movable, results, strict=True):
        if isinstance(result, BaseException):
            logger.error("session %s: moving it failed: %r; it ends with the shutdown", session.id, result,
                         exc_info=result)
    moved = sum(result is True for result in results)
    logger.info("draining: %d of %d session(s) moved", moved, len(movable))
    return moved
