"""The session core: every client's recognition session, transport-free; protocols are adapters on it.

The design (data flow, state, who owns what) is the docstring of :mod:`streamer.session.core`. Modules:
:mod:`~streamer.session.core` (the registry: collaborators, caps, readiness), :mod:`~streamer.session.machine`
(one link's session: phases, start, resume, audio, finalize, stop, end), :mod:`~streamer.session.audio` (bytes to
the engine channel, counted), :mod:`~streamer.session.results` (the result log a resume replays, tokens),
:mod:`~streamer.session.events` (what goes in and comes out), :mod:`~streamer.session.limits`.
"""

from streamer.session.core import SessionCore
from streamer.session.events import (
    Accounting,
    ClientSink,
    Ended,
    Event,
    ModelInfo,
    Moved,
    Opened,
    Problem,
    ResumeRequest,
    StartOptions,
    Superseded,
)
from streamer.session.limits import SessionLimits
from streamer.session.machine import Phase, Session

__all__ = [
    "Accounting",
    "ClientSink",
    "Ended",
    "Event",
    "ModelInfo",
    "Moved",
    "Opened",
    "Phase",
    "Problem",
    "ResumeRequest",
    "Session",
    "SessionCore",
    "SessionLimits",
    "StartOptions",
    "Superseded",
]
