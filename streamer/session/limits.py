"""The caps and windows every session obeys, whatever protocol it came in on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from streamer.protocol.limits import DEFAULT_HOTWORD_WEIGHT

if TYPE_CHECKING:
    from streamer.settings import EngineSettings, ServerSettings


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """The caps and windows every session obeys, whatever its protocol (``[server]`` settings, and the hotword
    rules of ``[engine]``)."""

    max_sessions: int = 16  # started sessions, held ones included
    max_pending_connections: int = 64  # links that have not started (or resumed) a session yet
    start_timeout_s: float = 10.0  # a link must start a session this soon
    resume_window_s: float = 10.0  # a session outlives a broken link this long; 0: not at all
    max_kept_results: int = 100  # finals a session keeps for a resume (and warnings while held)
    max_hotwords: int = 100  # hotword phrases one session may list (engine.max_hotwords)
    hotword_weight: float = DEFAULT_HOTWORD_WEIGHT  # a session's weight when its start names none
    capacity: int = 0  # sessions the box serves in real time (admission.capacity_streams, resolved); 0: none

    @property
    def session_cap(self) -> int:
        """The started sessions a new one must stay under: the capacity when there is one (never above
        ``max_sessions``), else ``max_sessions``."""
        return min(self.max_sessions, self.capacity) if self.capacity > 0 else self.max_sessions

    @property
    def cap_setting(self) -> str:
        """The setting that decides :attr:`session_cap`, as an operator writes it."""
        return "admission.capacity_streams" if 0 < self.capacity < self.max_sessions else "server.max_sessions"

    @classmethod
    def from_settings(
        cls, server: ServerSettings, engine: EngineSettings | None = None, capacity: int = 0
    ) -> SessionLimits:
        """The limits of ``[server]`` and ``[engine]``, with ``capacity`` (``admission.capacity_streams`` once
        "auto" is measured)."""
        hotwords = (engine.max_hotwords, engine.hotword_weight) if engine is not None else ()
        return cls(server.max_sessions, server.max_pending_connections, server.start_timeout_s,
                   server.resume_window_s, server.max_pending_messages, *hotwords, capacity=capacity)
