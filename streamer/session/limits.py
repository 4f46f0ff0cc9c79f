"""The caps and windows every session obeys, whatever protocol it came in on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streamer.settings import ServerSettings


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """The caps and windows every session obeys, whatever its protocol (``[server]`` settings)."""

    max_sessions: int = 16  # started sessions, held ones included
    max_pending_connections: int = 64  # links that have not started (or resumed) a session yet
    start_timeout_s: float = 10.0  # a link must start a session this soon
    resume_window_s: float = 10.0  # a session outlives a broken link this long; 0: not at all
    max_kept_results: int = 100  # finals a session keeps for a resume (and warnings while held)

    @classmethod
    def from_settings(cls, server: ServerSettings) -> SessionLimits:
        return cls(server.max_sessions, server.max_pending_connections, server.start_timeout_s,
                   server.resume_window_s, server.max_pending_messages)
