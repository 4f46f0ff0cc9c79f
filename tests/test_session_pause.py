"""Two things the session core gives protocols beyond protocol v1 (Deepgram's adapter uses both): a ``Pause`` when no
word came for ``pause_s`` after the last one (``UtteranceEnd``), and a finalize that says when it is done, even when it
ended no segment (the answer to every ``Finalize``). Driven by method calls on the bundled model, espeak-ng speech."""
# ruff: noqa: F811  (pytest fixtures imported from test_session_core are redefined as test parameters)

from __future__ import annotations

import asyncio

from streamer.engine.pause import Pause
from streamer.engine.recognizer import Recognizer
from streamer.protocol import Final, Partial
from streamer.session import StartOptions
from tests.test_session_core import (  # noqa: F401  (fixtures)
    FIRST,
    RATE,
    SECOND,
    TIMEOUT,
    check_words,
    connect,
    push,
    recognizer,
    running,
    silence,
    spoken,
)


async def test_a_pause_comes_once_per_gap_after_the_last_word_without_ending_the_segment(
    recognizer: Recognizer, spoken: dict[str, bytes]
) -> None:
    """With a silence rule too long to end a segment, pause_s=0.8 still says "paused" once in a 2 s gap, after the
    first sentence's last word and before the second sentence's words; the one segment keeps both sentences."""
    audio = spoken[FIRST] + silence(2.0) + spoken[SECOND]
    async with running(recognizer) as (core, published):
        session, client = connect(core)
        session.start(StartOptions(RATE, "pcm_s16le", endpointing={"trailing_silence_after_speech_s": 30},
                                   pause_s=0.8))
        await push(session, audio)
        await session.stop()
    results = [e for e in client.events if isinstance(e, Partial | Final | Pause)]
    pauses = [i for i, e in enumerate(results) if isinstance(e, Pause)]
    assert len(pauses) == 1, results
    pause = results[pauses[0]]
    first_end = len(spoken[FIRST]) / 2 / RATE
    assert first_end - 1.0 < pause.last_word_end <= first_end  # the last word of the first sentence
    before, after = results[: pauses[0]], results[pauses[0] + 1 :]
    assert all(isinstance(e, Partial) for e in before)  # no final yet: the gap did not end the segment
    assert any(isinstance(e, Partial) and SECOND.split()[0] in e.text.split()[-6:] for e in after)
    (final,) = [e for e in results if isinstance(e, Final)]
    assert final.reason == "stop"
    check_words([final], f"{FIRST} {SECOND}")
    assert not [e for e in published.events if e["type"] == "pause"]  # captions and MQTT never get it


async def test_without_pause_s_no_pause_comes_and_padding_never_counts_as_silence(
    recognizer: Recognizer, spoken: dict[str, bytes]
) -> None:
    """A session without pause_s hears none; with pause_s=1.0, a finalize right after the words pads silence up to the
    chunk boundary, which is no pause (the stream's clock stands still), while a real 1.5 s of silence is."""
    async with running(recognizer) as (core, _):
        plain, plain_client = connect(core)
        plain.start(StartOptions(RATE, "pcm_s16le", stream="plain"))
        timed, timed_client = connect(core)
        timed.start(StartOptions(RATE, "pcm_s16le", stream="timed", pause_s=1.0,
                                 endpointing={"trailing_silence_after_speech_s": 30}))
        await asyncio.gather(push(plain, spoken[FIRST] + silence(2.0)), push(timed, spoken[FIRST]))
        done = timed.finalize()
        async with asyncio.timeout(30 * TIMEOUT):
            await done.wait()
        assert [e.reason for e in timed_client.of(Final)] == ["finalize"] and not timed_client.of(Pause)
        await push(timed, silence(1.5))
        await timed_client.wait_for(lambda events: any(isinstance(e, Pause) for e in events))
        await plain.stop()
        await timed.stop()
    assert not plain_client.of(Pause) and plain_client.of(Final)
    (pause,) = timed_client.of(Pause)
    assert abs(pause.last_word_end - timed_client.of(Final)[0].end) <= 0.2  # measured from the last word


async def test_a_finalize_says_when_it_is_done_with_its_final_first_or_without_one(
    recognizer: Recognizer, spoken: dict[str, bytes]
) -> None:
    """finalize() returns an event set once the cut was carried out: after its final was offered when words were
    pending, and with nothing offered when none were (a protocol answers that with an empty result)."""
    async with running(recognizer) as (core, _):
        session, client = connect(core)
        session.start(StartOptions(RATE, "pcm_s16le", endpointing={"trailing_silence_after_speech_s": 30}))
        await push(session, spoken[FIRST])
        done = session.finalize()
        assert not done.is_set()
        async with asyncio.timeout(30 * TIMEOUT):
            await done.wait()
        finals = client.of(Final)
        assert [f.reason for f in finals] == ["finalize"]
        check_words(finals, FIRST)
        offered = len(client.events)
        again = session.finalize()  # nothing said since: done, and nothing offered
        async with asyncio.timeout(30 * TIMEOUT):
            await again.wait()
        assert len(client.events) == offered
        await session.stop()
        assert session.finalize().is_set()  # a channel that is closing has nothing to cut: done at once
