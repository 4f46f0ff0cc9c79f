"""Keeping a session's results for its client across a reconnect, and the rules of a resume.

A :class:`ResultLog` is the hub's source for a session's stream. While a client is attached it passes
every message straight on to that client's sink (the session, then its adapter: for protocol v1 the
connection's :class:`~streamer.server.fanout.Outbox`); it also keeps the session's last finals, because a final
written to a socket that then broke may never have arrived. While the session is held (no connection), it
keeps warnings too and remembers the latest partial. When a new connection resumes the session,
:meth:`ResultLog.attach` replays what the client asks for, in order. Everything runs on the event loop.

The log lives in memory only, as does the session it belongs to (recognizer state, open segment): a crash
or ``kill -9`` ends every session, and a client resuming after the restart gets ``resume_failed`` and a
new session. Its finals were also offered to MQTT, whose journal keeps them across the crash.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from streamer.protocol import Final, Partial, ServerMessage
from streamer.protocol import Warning as WarningMessage

if TYPE_CHECKING:
    from streamer.server.session_journal import Orphan
    from streamer.session.events import ClientSink, StartOptions

TOKEN_BYTES = 32  # 256 random bits, URL-safe base64: unguessable, and safe in a URL or a header


def new_token() -> str:
    """A fresh resume token."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def tokens_match(given: str, expected: str | None) -> bool:
    """Constant-time comparison (a token from the wire may be any string)."""
    return expected is not None and secrets.compare_digest(given.encode(), expected.encode())


def start_mismatch(session: StartOptions, stream: str, resuming: StartOptions) -> str | None:
    """Why ``resuming`` cannot continue a session opened with ``session`` on ``stream``; None when it can.

    The audio format must be the same (the server's converter and clock carry on); ``stream`` and
    ``endpointing`` may be left out, but if given they must be the session's.
    """
    for key in ("sample_rate", "encoding", "channels"):
        was, now = getattr(session, key), getattr(resuming, key)
        if was != now:
            return f"the session's {key} is {was!r}, this start declares {now!r}: a resumed start must repeat it"
    if resuming.stream is not None and resuming.stream != stream:
        return f"the session's stream is {stream!r}, this start names {resuming.stream!r}"
    if resuming.endpointing and resuming.endpointing != session.endpointing:
        return "this start's endpointing differs from the session's (leave it out to keep the session's rules)"
    return None


def orphan_replay(orphan: Orphan, next_segment: int) -> tuple[str, list[ServerMessage]]:
    """What resuming a session of the daemon's previous run gets (the daemon restarted since): the reason of its
    ``resume_failed``, and the messages to replay: ``results_lost`` when finals from ``next_segment`` on are no
    longer kept, then the kept finals from ``next_segment`` on."""
    finals = [f for f in orphan.finals if f.segment >= next_segment]
    reason = (f"cannot resume session {orphan.session!r}: the server restarted since, and the session's open segment "
              f"(the audio after its last final) was lost; the finals you lack follow ({len(finals)}), then a new "
              "session starts")
    oldest = orphan.finals[0].segment if orphan.finals else next_segment
    lost: list[ServerMessage] = []
    if oldest > next_segment:
        lost.append(WarningMessage(
            "results_lost", f"the finals of segments {next_segment}-{oldest - 1} are no longer kept and are not "
            f"replayed ({oldest - next_segment} final(s))", orphan.stream))
    return reason, [*lost, *finals]


class ResultLog:
    """One session's results for its client, across connections; see the module docstring.

    Args:
        max_kept: most finals kept for a replay (and most warnings kept while held); the oldest go first.
        on_final: called with each final after it went to the client (the session journal keeps a copy).
    """

    def __init__(self, max_kept: int, on_final: Callable[[Final], None] | None = None) -> None:
        self._on_final = on_final
        self._kept: deque[ServerMessage] = deque(maxlen=max(1, max_kept))  # finals; warnings while held
        self._partial: Partial | None = None  # the open segment's latest partial
        self._sink: ClientSink | None = None
        self.skip_below = 0  # results of segments before this one are the client's already (see preload)

    def preload(self, finals: Sequence[Final], skip_below: int) -> None:
        """Keep ``finals`` (a session continued from another replica) and withhold the session's own results
        of segments before ``skip_below``: the client has their finals already (its old replica died between
        sending a final and storing it, so this replica recognizes that segment again)."""
        self._kept.extend(finals)
        self.skip_below = skip_below

    def offer(self, msg: ServerMessage) -> None:
        """Called by the hub on the loop for each of the stream's messages; never awaits."""
        if isinstance(msg, Partial | Final) and msg.segment < self.skip_below:
            return
        if isinstance(msg, Partial):
            self._partial = msg
        else:
            if isinstance(msg, Final):
                self._partial = None
            if isinstance(msg, Final) or self._sink is None:
                self._kept.append(msg)
        if self._sink is not None:
            self._sink.offer(msg)
        if isinstance(msg, Final) and self._on_final is not None:
            self._on_final(msg)  # after it went out: a journal write never delays a result

    def detach(self) -> None:
        """The connection broke: keep results until :meth:`attach`."""
        self._sink = None

    def attach(self, sink: ClientSink, next_segment: int) -> int:
        """Send ``sink`` the finals from ``next_segment`` on, warnings kept while held, the latest partial,
        then everything live. Returns how many messages were replayed."""
        replay = [m for m in self._kept if not isinstance(m, Final) or m.segment >= next_segment]
        finals = [m.segment for m in self._kept if isinstance(m, Final)]
        oldest = finals[0] if finals else None
        if oldest is not None and oldest > next_segment:  # the bound let some go: say so, never silently
            missing = oldest - next_segment
            sink.offer(WarningMessage(
                "results_lost", f"the finals of segments {next_segment}-{oldest - 1} are no longer kept and are "
                f"not replayed ({missing} final(s))", replay[0].stream if replay else None,
            ), replay=True)
        for msg in replay:  # a burst on top of the sink's bound: the log alone may hold that many
            sink.offer(msg, replay=True)
        if self._partial is not None:
            sink.offer(self._partial)
        self._kept = deque((m for m in self._kept if isinstance(m, Final)), maxlen=self._kept.maxlen)
        self._sink = sink
        return len(replay)
