"""The session core without any socket: method calls in, events out, on the bundled default model.

A real :class:`Recognizer` on ``models/streamer-tdt-small`` and a real :class:`Scheduler` (its inference thread
and rounds as in the daemon), the real hub with a list for its MQTT sink; the client is a list that records
what the core offers it. espeak-ng speaks sentences the model is known to get right.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamer.asr.model import AsrModel
from streamer.engine.endpoint import EndpointConfig
from streamer.engine.recognizer import Recognizer
from streamer.engine.scheduler import Scheduler
from streamer.protocol import Final, Partial, Warning
from streamer.server.fanout import Hub
from streamer.server.metrics import Metrics
from streamer.server.session_journal import SessionStore
from streamer.session import (
    Ended,
    Event,
    ModelInfo,
    Opened,
    Phase,
    Problem,
    ResumeRequest,
    Session,
    SessionCore,
    SessionLimits,
    StartOptions,
)
from streamer.training.evaluate import word_error_rate
from tests.speech import espeak_sentences

MODEL = Path(__file__).resolve().parents[1] / "models" / "streamer-tdt-small" / "model.nemo"
TIMEOUT = float(os.environ.get("STREAMER_TEST_TIMEOUT_FACTOR", "1"))
FIRST, SECOND = "please turn off the lights in the kitchen", "set a timer for ten minutes"
RATE = 22050  # espeak-ng's rate: the core resamples
FRAME_BYTES = 4410

pytestmark = pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} is missing from this checkout")


@pytest.fixture(scope="module")
def recognizer() -> Recognizer:
    return Recognizer(AsrModel.load(str(MODEL)))


@pytest.fixture(scope="module")
def spoken(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Each sentence as s16le bytes at 22.05 kHz."""
    spoken = espeak_sentences(tmp_path_factory.mktemp("spoken"), (FIRST, SECOND), dtype="int16")
    assert all(rate == RATE for _, rate in spoken.values())
    return {text: data.tobytes() for text, (data, _) in spoken.items()}


def silence(seconds: float) -> bytes:
    return bytes(2 * round(seconds * RATE))


class Client:
    """A client link's sink: every event in order, which of them were replays, and a way to wait for one."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.replayed: list[Event] = []
        self._changed = asyncio.Event()

    def offer(self, event: Event, replay: bool = False) -> None:
        self.events.append(event)
        if replay:
            self.replayed.append(event)
        self._changed.set()

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    async def wait_for(self, done: Callable[[list[Event]], bool], timeout_s: float = 30.0) -> None:
        async with asyncio.timeout(timeout_s * TIMEOUT):
            while not done(self.events):
                self._changed.clear()
                await self._changed.wait()


class Published:
    """The hub's MQTT sink: what every other sink of a stream (captions, MQTT) gets."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def offer(self, event: dict[str, Any]) -> None:
        self.events.append(event)


@contextlib.asynccontextmanager
async def running(
    recognizer: Recognizer, limits: SessionLimits | None = None, ring_capacity_s: float = 10.0
) -> AsyncIterator[tuple[SessionCore, Published]]:
    """A core on a running scheduler, as the daemon composes it; the scheduler is cancelled at the end."""
    limits = limits or SessionLimits()
    metrics, published = Metrics(), Published()
    hub = Hub(published, on_event=metrics.count_result)
    scheduler = Scheduler(recognizer, hub.publish, max_channels=limits.max_sessions + 2,
                          ring_capacity_s=ring_capacity_s)
    model = ModelInfo("streamer-tdt-small", tuple(recognizer.att_context_size), round(recognizer.chunk_seconds, 3))
    core = SessionCore(limits, scheduler, hub, metrics, EndpointConfig(), model, SessionStore(None))
    core.is_ready = True
    task = asyncio.create_task(scheduler.run())
    try:
        yield core, published
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def connect(core: SessionCore) -> tuple[Session, Client]:
    client = Client()
    session = core.connect(client)
    assert isinstance(session, Session), session
    return session, client


async def push(session: Session, data: bytes) -> None:
    for i in range(0, len(data), FRAME_BYTES):
        await session.push_audio(data[i : i + FRAME_BYTES])


def check_segments(events: list[Event]) -> list[Final]:
    """Exactly one final per segment, numbered from 0; partials only for the open segment, growing a stable prefix."""
    finals = [e for e in events if isinstance(e, Final)]
    assert [f.segment for f in finals] == list(range(len(finals)))
    done = -1
    for e in events:
        if isinstance(e, Final):
            done = e.segment
        elif isinstance(e, Partial):
            assert e.segment == done + 1 and e.text.startswith(e.stable)
    return finals


def check_words(finals: list[Final], spoken: str) -> None:
    wer, errors, words = word_error_rate([spoken], [" ".join(f.text for f in finals)])
    assert wer <= 0.35, f"{errors}/{words} word errors: {[f.text for f in finals]}"


async def test_a_session_gives_opened_partials_one_final_per_segment_and_ended(
    recognizer: Recognizer, spoken: dict[str, bytes]
) -> None:
    """Two sentences with a pause between: Opened first, partials, a final per sentence (the pause, then stop ends
    them), the spoken words, and Ended with the exact audio received and nothing dropped."""
    audio = spoken[FIRST] + silence(2.0) + spoken[SECOND]
    async with running(recognizer) as (core, published):
        session, client = connect(core)
        session.start(StartOptions(RATE, "pcm_s16le", stream="kitchen"))
        await push(session, audio)
        await session.stop()
    opened, *results, ended = client.events
    assert isinstance(opened, Opened) and not opened.resumed and opened.received_s == 0.0
    assert opened.stream == "kitchen" and opened.resume_token and opened.sample_rate == RATE
    finals = check_segments(results)
    assert [f.reason for f in finals] == ["silence", "stop"]
    assert client.of(Partial) and not client.of(Problem) and not client.of(Warning)
    check_words(finals[:1], FIRST)
    check_words(finals[1:], SECOND)
    assert isinstance(ended, Ended) and ended.reason == "stop" and ended.accounting is not None
    assert ended.accounting.segments == 2 and ended.accounting.received_s == len(audio) / 2 / RATE
    assert ended.accounting.dropped_s == 0 and ended.accounting.incomplete_bytes == 0
    assert [e["segment"] for e in published.events if e["type"] == "final"] == [0, 1]  # the other sinks too
    assert session.phase is Phase.ENDING and core.scheduler.channels == {}


async def test_finalize_ends_the_segment_at_once_and_stop_flushes_the_open_one(
    recognizer: Recognizer, spoken: dict[str, bytes]
) -> None:
    """With a long silence rule nothing ends a segment by itself: finalize gives the first sentence's final with
    reason finalize while the session goes on; stop flushes the second one. The override is in Opened."""
    async with running(recognizer) as (core, _):
        session, client = connect(core)
        session.start(StartOptions(RATE, "pcm_s16le", endpointing={"trailing_silence_after_speech_s": 30}))
        await push(session, spoken[FIRST])
        session.finalize()
        await client.wait_for(lambda events: any(isinstance(e, Final) for e in events))
        assert session.is_open
        await push(session, silence(1.5) + spoken[SECOND])
        await session.stop()
    opened = client.events[0]
    assert isinstance(opened, Opened) and opened.endpointing["trailing_silence_after_speech_s"] == 30
    finals = check_segments(client.events)
    assert [f.reason for f in finals] == ["finalize", "stop"]
    check_words(finals[:1], FIRST)
    check_words(finals[1:], SECOND)
    assert finals[1].start > finals[0].end  # one clock across the cut
    assert isinstance(client.events[-1], Ended) and client.events[-1].accounting.segments == 2


async def test_finalize_done_is_set_once_the_cut_was_made_final_or_none(
    recognizer: Recognizer, spoken: dict[str, bytes]
) -> None:
    """A protocol that answers every commit: once finalize's event is set, the segment's final is there if it had
    speech, and a finalize of silence alone is carried out too, with no final."""
    async with running(recognizer) as (core, _):
        session, client = connect(core)
        session.start(StartOptions(RATE, "pcm_s16le", endpointing={"trailing_silence_after_speech_s": 30}))
        await push(session, spoken[FIRST])
        await session.finalize().wait()
        assert [f.reason for f in client.of(Final)] == ["finalize"]
        await push(session, silence(1.0))
        second = session.finalize()
        assert not second.is_set()
        await second.wait()
        assert len(client.of(Final)) == 1
        await session.stop()
    check_words(client.of(Final), FIRST)


async def test_a_held_session_resumes_and_replays_the_finals_the_client_lacks(
    recognizer: Recognizer, spoken: dict[str, bytes]
) -> None:
    """The link breaks after the first final: the session is held, its finals go on to the other sinks; a new link
    resumes it with next_segment 0 and gets Opened(resumed) with the audio received, the first final replayed,
    then live results; each final reaches the client once, and the spent token no longer works."""
    async with running(recognizer) as (core, published):
        first, first_client = connect(core)
        first.start(StartOptions(RATE, "pcm_s16le", stream="hall"))
        opened = first_client.events[0]
        assert isinstance(opened, Opened) and opened.resume_token is not None
        await push(first, spoken[FIRST] + silence(2.0))
        await first_client.wait_for(lambda events: any(isinstance(e, Final) for e in events))
        received_s = first.received_s
        await first.lost(resumable=True)
        assert first.phase is Phase.HELD
        window = asyncio.create_task(first.wait_for_resume())
        seen_by_first = len(first_client.events)

        second, second_client = connect(core)
        second.start(StartOptions(RATE, "pcm_s16le"), ResumeRequest(opened.session, opened.resume_token, 0))
        await asyncio.wait_for(window, 5 * TIMEOUT)  # the held link's wait ends: its session moved
        assert first.phase is Phase.MOVED and len(first_client.events) == seen_by_first
        reopened = second_client.events[0]
        assert isinstance(reopened, Opened) and reopened.resumed and reopened.session == opened.session
        assert reopened.stream == "hall" and reopened.received_s == received_s
        assert reopened.resume_token not in (None, opened.resume_token)
        assert [type(e) for e in second_client.replayed] == [Final] and second_client.replayed[0].segment == 0

        third, third_client = connect(core)  # the first token is spent: a new session instead
        third.start(StartOptions(RATE, "pcm_s16le"), ResumeRequest(opened.session, opened.resume_token, 0))
        problem, fresh = third_client.events[:2]
        assert isinstance(problem, Problem) and problem.code == "resume_failed" and "used already" in problem.message
        assert isinstance(fresh, Opened) and not fresh.resumed and fresh.session != opened.session
        await third.stop()

        await push(second, spoken[SECOND])
        await second.stop()
    finals = check_segments(second_client.events)
    assert [f.reason for f in finals] == ["silence", "stop"]
    check_words(finals[1:], SECOND)
    assert [f.segment for f in first_client.of(Final)] == [0]
    ended = second_client.events[-1]
    assert isinstance(ended, Ended) and ended.accounting.segments == 2
    assert ended.accounting.received_s == (len(spoken[FIRST]) + len(silence(2.0)) + len(spoken[SECOND])) / 2 / RATE
    assert [e["segment"] for e in published.events if e["type"] == "final" and e["stream"] == "hall"] == [0, 1]


async def test_a_session_held_past_its_window_ends_as_a_disconnect(
    recognizer: Recognizer, spoken: dict[str, bytes]
) -> None:
    """Nobody resumes: after the window the open segment's final goes to the other sinks with reason disconnect,
    and the client link hears nothing more."""
    async with running(recognizer, SessionLimits(resume_window_s=0.2)) as (core, published):
        session, client = connect(core)
        session.start(StartOptions(RATE, "pcm_s16le", stream="gone"))
        await push(session, spoken[FIRST])
        await session.lost(resumable=True)
        heard = len(client.events)
        await asyncio.wait_for(session.wait_for_resume(), 30 * TIMEOUT)
        assert session.phase is Phase.ENDING and core.scheduler.channels == {}
    finals = [e for e in published.events if e["type"] == "final"]
    assert [f["reason"] for f in finals] == ["disconnect"] and len(client.events) == heard


async def test_caps_refuse_with_server_busy_and_held_sessions_count(
    recognizer: Recognizer, spoken: dict[str, bytes]
) -> None:
    """One session, one waiting link at most: a second waiting link and a link beyond the started session are
    refused; a held session still takes its place, so a new start is refused with Ended, while a resume is let in;
    a core that is not ready refuses everyone."""
    async with running(recognizer, SessionLimits(max_sessions=1, max_pending_connections=1)) as (core, _):
        first, first_client = connect(core)
        waiting = core.connect(Client())
        assert isinstance(waiting, Problem) and waiting.code == "server_busy"
        assert "1 connections waiting for their 'start'" in waiting.message
        first.start(StartOptions(RATE, "pcm_s16le"))
        beyond = core.connect(Client())
        assert isinstance(beyond, Problem) and beyond.message == "the server has 1 sessions open, its maximum; try " \
            "again later"
        await push(first, spoken[FIRST][:FRAME_BYTES * 4])
        await first.lost(resumable=True)

        second, second_client = connect(core)  # a held session leaves room for a link, not for a new session
        second.start(StartOptions(RATE, "pcm_s16le"))
        problem, ended = second_client.events
        assert isinstance(problem, Problem) and problem.code == "server_busy" and "counting sessions kept" in \
            problem.message
        assert ended == Ended("server_busy", None) and not second.is_open
        core.release(second)

        third, third_client = connect(core)
        opened = first_client.events[0]
        assert isinstance(opened, Opened) and opened.resume_token is not None
        third.start(StartOptions(RATE, "pcm_s16le"), ResumeRequest(opened.session, opened.resume_token, 0))
        assert isinstance(third_client.events[0], Opened) and third_client.events[0].resumed
        await third.stop()
        assert core.metrics.sessions_refused_total.value("listen") == 3

        core.is_ready = False
        refused = core.connect(Client())
        assert isinstance(refused, Problem) and refused.code == "not_ready"


async def test_bad_starts_and_bad_audio_get_problems_and_the_session_goes_on(
    recognizer: Recognizer, spoken: dict[str, bytes]
) -> None:
    """An unknown encoding, an unknown endpointing rule and a stream name in use are refused without a session;
    NaN audio and an empty frame are refused and the session goes on; a second start is refused."""
    async with running(recognizer) as (core, _):
        owner, _ = connect(core)
        owner.start(StartOptions(RATE, "pcm_s16le", stream="taken"))
        session, client = connect(core)
        session.start(StartOptions(RATE, "pcm_s24le"))
        session.start(StartOptions(RATE, "pcm_s16le", endpointing={"no_such_rule": 1.0}))
        session.start(StartOptions(RATE, "pcm_s16le", stream="taken"))
        assert [e.code for e in client.events] == ["unsupported_audio", "bad_message", "stream_in_use"]
        assert not session.is_started and session.phase is Phase.AWAITING_START
        session.start(StartOptions(RATE, "pcm_f32le"))
        await session.push_audio(np.full(64, np.nan, dtype="<f4").tobytes())
        await session.push_audio(b"")
        session.start(StartOptions(RATE, "pcm_f32le"))
        codes = [getattr(e, "code", None) for e in client.events[3:]]
        assert codes == [None, "bad_audio", "empty_frame", "already_started"]
        speech = np.frombuffer(spoken[FIRST], dtype="<i2").astype("<f4") / 32768
        await session.push_audio(speech.tobytes())
        await session.stop()
        await owner.stop()
    check_words(check_segments(client.events), FIRST)
    ended = client.events[-1]
    assert isinstance(ended, Ended) and ended.accounting.received_s == speech.size / RATE


@pytest.mark.parametrize("live", [True, False])
async def test_a_live_session_fed_faster_than_real_time_drops_and_counts_one_that_can_wait_does_not(
    recognizer: Recognizer, spoken: dict[str, bytes], live: bool
) -> None:
    """Ten sentences at once through a ring of about two seconds: a live session drops the oldest audio, is told
    (audio_dropped) and Ended counts it; a session that can wait is slowed down instead and loses nothing. Both
    count every second received."""
    audio = (spoken[FIRST] + silence(1.5)) * 10
    async with running(recognizer, ring_capacity_s=0.5) as (core, _):
        session, client = connect(core)
        session.start(StartOptions(RATE, "pcm_s16le", live=live))
        await push(session, audio)
        await session.stop()
    ended = client.events[-1]
    assert isinstance(ended, Ended) and ended.accounting is not None
    assert ended.accounting.received_s == len(audio) / 2 / RATE
    check_segments(client.events)
    dropped = [e for e in client.events if isinstance(e, Warning) and e.code == "audio_dropped"]
    if live:
        assert ended.accounting.dropped_s > 5.0
        assert sum(w.seconds for w in dropped) == pytest.approx(ended.accounting.dropped_s, abs=0.001 * len(dropped))
        assert max(f.end for f in client.of(Final)) <= ended.accounting.received_s
    else:
        assert ended.accounting.dropped_s == 0 and not dropped
        assert len(client.of(Final)) >= 9  # every sentence recognized


def test_the_core_imports_no_transport_and_no_torch() -> None:
    """streamer.session is sans-I/O: no module of it imports websockets, aiomqtt, sockets or the server's transport
    modules (not even for type checking), and importing it loads neither torch nor websockets."""
    import ast
    import sys

    package = Path(__file__).resolve().parents[1] / "streamer" / "session"
    forbidden = ("websockets", "aiomqtt", "socket", "ssl", "http", "streamer.server.fanout",
                 "streamer.server.websocket", "streamer.server.listen", "streamer.server.mqtt")
    found = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [(path.name, n) for n in names if any(n == f or n.startswith(f + ".") for f in forbidden)]
    assert found == []
    code = "import sys, streamer.session; print(sorted({'torch', 'websockets', 'aiomqtt'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


async def test_hotwords_are_checked_reported_and_kept_by_a_resume(recognizer: Recognizer) -> None:
    """More than max_hotwords or a bad weight is refused without a session; a start's hotwords are tidied, reported in
    Opened with the server's weight, the unspellable ones named in a warning; a resume keeps them."""
    async with running(recognizer, SessionLimits(max_hotwords=2, hotword_weight=1.5)) as (core, _):
        session, client = connect(core)
        session.start(StartOptions(RATE, "pcm_s16le", hotwords=["a", "b", "c"]))
        session.start(StartOptions(RATE, "pcm_s16le", hotwords=["a"], hotword_weight=float("nan")))
        problems = client.of(Problem)
        assert [p.code for p in problems] == ["bad_message"] * 2 and not session.is_started
        assert "at most 2 (engine.max_hotwords)" in problems[0].message and "hotword_weight" in problems[1].message
        session.start(StartOptions(RATE, "pcm_s16le", hotwords=[" Kitchen   lights", "ΩΩ"]))
        (opened,) = client.of(Opened)
        assert opened.hotwords == ("Kitchen lights",) and opened.hotword_weight == 1.5
        (warning,) = client.of(Warning)
        assert warning.code == "hotwords_ignored" and "'ΩΩ'" in warning.message
        await session.lost(resumable=True)
        again, resumed = connect(core)
        assert opened.resume_token is not None
        again.start(StartOptions(RATE, "pcm_s16le"), ResumeRequest(opened.session, opened.resume_token))
        (reopened,) = resumed.of(Opened)
        assert reopened.resumed and reopened.hotwords == ("Kitchen lights",) and reopened.hotword_weight == 1.5
        plain, plain_client = connect(core)
        plain.start(StartOptions(RATE, "pcm_s16le"))
        assert plain_client.of(Opened)[0].hotwords is None
        await again.stop()
        await plain.stop()
