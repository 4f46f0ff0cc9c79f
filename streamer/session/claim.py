"""A session's start in a cluster: its stream name is leased across the cluster first
(`streamer.server.stream_leases`); without [cluster] it is `Session.start` as it always was.

- Granted: the session starts as on a single daemon (which still refuses a name one of its own sources sends).
- Held by another replica: error ``stream_in_use`` (the single daemon's code for a name in use) naming that replica;
  the link stays open, so the client may send another ``start``.
- A resume of a session this replica does not have, with a token signed by the cluster's secret: the session is
  continued here (`streamer.session.failover`), or the client is told why not and a new session starts.
- The store unreachable: error ``not_ready`` saying so; no stream starts without the guarantee that its name is
  unique. A later ``start`` may succeed. A resume of a session held on this replica needs no store (its lease is
  this replica's already).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast

from streamer.protocol import STREAM_NAME
from streamer.session.events import Outcome
from streamer.session.results import start_mismatch

if TYPE_CHECKING:
    from streamer.engine.scheduler import Scheduler
    from streamer.server.stream_leases import StreamLeases
    from streamer.session.events import ResumeRequest, StartOptions


class _Failover(Protocol):
    """What a claimed start uses of `streamer.session.failover.Failover` (its type would make an import cycle)."""

    async def resume(self, session: Any, options: StartOptions, resume: ResumeRequest) -> Outcome: ...


class _Core(Protocol):
    leases: StreamLeases | None
    failover: _Failover | None
    scheduler: Scheduler

    def find_resumable(self, resume: ResumeRequest) -> tuple[Any, str | None]: ...


class Session(Protocol):
    """What a start that claims its name uses of `streamer.session.machine.Session`."""

    core: _Core
    stream: str

    @property
    def is_open(self) -> bool: ...

    @property
    def is_started(self) -> bool: ...

    def stream_name(self, options: StartOptions) -> str: ...

    def start(self, options: StartOptions, resume: ResumeRequest | None = None) -> None: ...

    def error(self, code: str, message: str) -> None: ...


async def start_claimed(session: Session, options: StartOptions, resume: ResumeRequest | None) -> None:
    """Lease the stream name (when the daemon has leases), then `Session.start`; see the module docstring."""
    leases = session.core.leases
    name = session.stream_name(options)
    if leases is None or not session.is_open or session.is_started or not STREAM_NAME.fullmatch(name) or \
            _resumes_here(session, options, resume):
        session.start(options, resume)  # says what is wrong, if anything; a resumed stream's lease is ours
        return
    failover = session.core.failover
    if resume is not None and failover is not None:  # a session another replica ran, or a bad token
        # a machine Session; importing its type here would make an import cycle
        outcome = await failover.resume(cast("Any", session), options, resume)
        if outcome is Outcome.RESUMED or not session.is_open:
            return
        if outcome is Outcome.FAILED:
            resume = None  # what failed was said: a new session follows
            name = session.stream_name(options)
    from streamer.server.stream_leases import LeaseStoreError

    try:
        claim = await leases.claim(name)
    except LeaseStoreError as exc:
        session.error("not_ready", f"{exc}: stream names cannot be kept unique across the cluster now, so no new "
                      "stream starts; try again later")
        return
    if not claim.granted:
        session.error("stream_in_use", f"stream {name!r} is already sent by another source, on server "
                      f"{claim.holder!r} of this cluster; choose another name, or wait until that stream ends")
        return
    if session.is_open and not session.is_started:  # the link may have ended while the store answered
        session.start(options, resume)
    if claim.new and name not in session.core.scheduler.channels:  # the start was refused: nothing sends it
        leases.release(name)


def _resumes_here(session: Session, options: StartOptions, resume: ResumeRequest | None) -> bool:
    """Whether ``start`` takes over a session held on this replica (whose stream this replica leases already)."""
    if resume is None:
        return False
    held, _ = session.core.find_resumable(resume)
    return held is not None and held.options is not None and start_mismatch(held.options, held.stream, options) is None
