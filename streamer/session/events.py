"""What goes into the session core and what comes out of it, in no protocol's shape.

Into :class:`~streamer.session.machine.Session`: a client's :class:`StartOptions` (and a
:class:`ResumeRequest`), audio bytes, and calls (finalize, stop, end, lost). Out of it, to the adapter's
:class:`ClientSink`: the events below, which the adapter turns into its own wire messages.

The results themselves are the engine's records, the same objects the hub gives ``/v1/captions`` and MQTT:
:class:`~streamer.protocol.Partial`, :class:`~streamer.protocol.Final` and
:class:`~streamer.protocol.Warning` (the scheduler makes them; they are plain dataclasses of text, times and
numbers, and protocol v1 sends them as they are), and :class:`~streamer.engine.pause.Pause` for a session that
asked for it (``StartOptions.pause_s``). The core adds :class:`Opened`, :class:`Problem`,
:class:`Ended`, :class:`Superseded` and :class:`Moved`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from streamer.engine.pause import Pause
from streamer.protocol import Final, Partial, ServerMessage
from streamer.protocol import Warning as WarningMessage


@dataclass(frozen=True, slots=True)
class StartOptions:
    """What a client asks for when it starts a session; every protocol's start maps onto these.

    Attributes:
        sample_rate: the client's sample rate (the core resamples to the model's).
        encoding: a PCM encoding of :data:`streamer.audio.convert.ENCODINGS` (``pcm_s16le``, ``pcm_f32le``,
            ``pcm_s32le``, ``pcm_u8``) or :data:`~streamer.audio.convert.COMPANDED_ENCODINGS` (``pcm_mulaw``,
            ``pcm_alaw``).
        channels: interleaved channels, mixed down to mono.
        stream: the stream name for captions and MQTT; None: the core names it ``<prefix>-<session id>``.
        interim_results: False: no partials for this client (captions and MQTT still get them).
        live: True: the source cannot wait (drop the oldest audio when the server falls behind); False: the
            core's ``push_audio`` waits for room (back-pressure).
        endpointing: overrides of the server's endpointing rules for this session.
        pause_s: the client also hears :class:`~streamer.engine.pause.Pause` once no word came for this long
            after the last one (Deepgram's ``UtteranceEnd``); None: never.
        hotwords: words and phrases to boost, as the client sent them (the core checks them against
            ``engine.max_hotwords`` and :func:`streamer.protocol.check_hotwords`).
        hotword_weight: how hard; None: the server's ``engine.hotword_weight``.
    """

    sample_rate: int
    encoding: str
    channels: int = 1
    stream: str | None = None
    interim_results: bool = True
    live: bool = False
    endpointing: Mapping[str, float] = field(default_factory=dict)
    pause_s: float | None = None
    hotwords: Sequence[str] = ()
    hotword_weight: float | None = None


@dataclass(frozen=True, slots=True)
class ResumeRequest:
    """Continue a held session: its id, its latest resume token, and how many finals the client has."""

    session: str
    token: str
    next_segment: int = 0


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The model the sessions run on, as clients are told."""

    model: str
    att_context_size: tuple[int, int]
    chunk_s: float  # seconds of audio per model step
    latency_s: float | None = None  # buffered streaming: chunk + right context a word waits for (else None)


@dataclass(frozen=True, slots=True)
class Opened:
    """A session started (or was resumed): what its client is told before any result.

    Attributes:
        session: the session id.
        stream: the stream name.
        model: the model.
        sample_rate: the client's declared rate.
        endpointing: the session's effective endpointing rules.
        live: which flow-control rule applies.
        resume_window_s: how long the session is held after a broken connection (0: never).
        resume_token: a fresh one-use token for a resume; None when the window is 0.
        resumed: True for a resume.
        received_s: seconds of whole sample frames received so far (0 for a new session): a resuming client
            re-sends its audio from here.
        hotwords: the phrases the session boosts (its start's, tidied, less those the model cannot spell);
            None when its start listed none.
        hotword_weight: their weight; None when its start listed none.
    """

    session: str
    stream: str
    model: ModelInfo
    sample_rate: int
    endpointing: dict[str, float]
    live: bool
    resume_window_s: float
    resume_token: str | None
    resumed: bool
    received_s: float
    hotwords: tuple[str, ...] | None = None
    hotword_weight: float | None = None


@dataclass(frozen=True, slots=True)
class Problem:
    """A refusal or an error: ``code`` names it (protocol v1's error codes are the core's vocabulary)."""

    code: str
    message: str
    stream: str | None = None


@dataclass(frozen=True, slots=True)
class Accounting:
    """What a session received, at its end."""

    stream: str
    segments: int  # finals sent (segments are numbered 0 to segments - 1)
    received_s: float  # seconds of whole sample frames received, unrounded
    dropped_s: float  # seconds of them dropped because the server fell behind a live source, unrounded
    incomplete_bytes: int  # bytes of an incomplete last sample frame (0: the audio ended on a whole one)


@dataclass(frozen=True, slots=True)
class Ended:
    """The core is done with this client: after what it was offered, the adapter closes.

    ``reason``: ``stop``, ``idle``, ``shutdown``, ``start_timeout`` or ``server_busy`` (what the adapter
    turns into a close code). ``accounting``: None when no session was started on this link.
    """

    reason: str
    accounting: Accounting | None


@dataclass(frozen=True, slots=True)
class Superseded:
    """Another connection resumed this session: stop sending and drop the transport at once."""

    session: str


@dataclass(frozen=True, slots=True)
class Moved:
    """The replica is going away (a graceful drain): the session was finalized at a clean point and its facts
    stored; the client is to reconnect (through the load balancer) and resume it on another replica with
    ``resume_token``, re-sending its audio from ``audio_s``. The adapter says so, then closes."""

    session: str
    stream: str
    resume_token: str
    audio_s: float
    next_segment: int


@dataclass(frozen=True, slots=True)
class Carried:
    """A session another replica ran, as the store kept it, for a replica that continues it.

    Attributes:
        session: its id (kept across replicas).
        stream: its stream name.
        options: its start options.
        next_segment: the number of its next final.
        audio_frames: client sample frames up to the end of its last final (the client re-sends from there).
        finals: its last finals, for the client's replay.
        token: the resume token the client came with (spent once the session continues).
    """

    session: str
    stream: str
    options: StartOptions
    next_segment: int
    audio_frames: int
    finals: Sequence[Final]
    token: str


Event = Partial | Final | Pause | WarningMessage | Opened | Problem | Ended | Superseded | Moved


class ClientSink(Protocol):
    """The adapter's side of one client link: takes events on the loop, never awaits.

    ``replay``: a result sent again to a resumed client (a burst the server makes, not one the client left
    unread: an adapter with a bound on unsent messages lets it in above that bound).
    """

    def offer(self, event: Event, replay: bool = False) -> None: ...


class ResultRouter(Protocol):
    """Where the scheduler's results for a stream go (``streamer.server.fanout.Hub``): the session registers
    itself as the stream's source while it runs."""

    def set_source(self, stream: str, sink: ResultSource | None) -> None: ...


class ResultSource(Protocol):
    """What the router hands a stream's results to (a session's :class:`~streamer.session.results.ResultLog`)."""

    def offer(self, msg: ServerMessage) -> None: ...


class Outcome(enum.Enum):
    """What a cross-replica resume came to (``streamer.session.failover``)."""

    RESUMED = "resumed"
    FAILED = "failed"  # said to the client (resume_failed); its start goes on as a new session
    NOT_SIGNED = "not signed"  # not a cluster token: the single daemon's rules apply
