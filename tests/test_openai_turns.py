"""The realtime API's items from the core's segments (``streamer.adapters.openai_turns``), without a socket: the
orders of events that the daemon produces only by chance of timing, made on purpose here."""

from __future__ import annotations

from typing import Any

from streamer.adapters.openai_turns import Turns
from streamer.protocol import Final, Partial


def partial(segment: int, stable: str, start: float) -> Partial:
    return Partial("s", segment, stable + " x", stable, start, start + 1)


def final(segment: int, text: str, start: float, end: float, reason: str = "finalize") -> Final:
    return Final("s", segment, text, start, end, (), (), 0.9, False, reason)


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"].rsplit(".", 1)[-1] for e in events]


def test_a_commit_before_its_turns_first_partial_still_names_that_turn() -> None:
    """The client commits 2 s of audio before any partial of it arrived: the partial (speech from 0.3 s) and the
    final belong to the committed item, with no VAD events (turn detection off)."""
    turns = Turns(vad=False)
    committed = turns.commit(2.0, request=1)
    item = committed[0]["item_id"]
    events = turns.partial(partial(0, "turn off", 0.3)) + turns.final(final(0, "turn off the lights", 0.3, 1.8))
    assert kinds(events) == ["delta", "delta", "completed"] and {e["item_id"] for e in events} == {item}
    assert "".join(e["delta"] for e in events[:2]) == "turn off the lights" == events[-1]["transcript"]
    assert turns.carried_out(1) == []  # answered already: no second completed


def test_a_commit_of_silence_completes_empty_and_the_next_turn_is_new() -> None:
    turns = Turns(vad=True)
    item = turns.commit(1.0, request=1)[0]["item_id"]
    assert turns.carried_out(1) == [{"type": "conversation.item.input_audio_transcription.completed",
                                     "item_id": item, "content_index": 0, "transcript": "",
                                     "usage": {"type": "duration", "seconds": 0.0}}]
    later = turns.partial(partial(0, "set", 1.4)) + turns.final(final(0, "set a timer", 1.4, 2.5, "silence"))
    assert kinds(later) == ["speech_started", "delta", "speech_stopped", "committed", "delta", "completed"]
    assert later[0]["item_id"] != item and later[3]["previous_item_id"] == item
    assert later[0]["audio_start_ms"] == 1400 and later[2]["audio_end_ms"] == 2500


def test_a_turn_vad_ended_before_a_commit_took_effect_answers_the_commit() -> None:
    """Server VAD: the client commits while a turn is open, but the core ends it by silence first; the commit's
    item is that turn (its committed already went out), and the finalize then finds nothing."""
    turns = Turns(vad=True)
    started = turns.partial(partial(0, "hello", 0.2))
    committed = turns.commit(1.5, request=1)
    assert committed[0]["item_id"] == started[0]["item_id"]
    events = turns.final(final(0, "hello there", 0.2, 1.2, "silence")) + turns.carried_out(1)
    assert kinds(events) == ["delta", "completed"] and events[-1]["item_id"] == started[0]["item_id"]


def test_a_cleared_turn_sends_nothing_more_and_the_next_one_carries_on() -> None:
    turns = Turns(vad=False)
    before = turns.partial(partial(0, "wrong", 0.1))
    assert kinds(turns.commit(1.0, request=1, cleared=True)) == ["cleared"]
    assert turns.partial(partial(0, "wrong words", 0.1)) == [] and turns.final(final(0, "wrong words", 0.1, 0.9)) == []
    assert turns.carried_out(1) == []
    item = turns.commit(3.0, request=2)[0]["item_id"]
    events = turns.partial(partial(1, "right", 1.5)) + turns.final(final(1, "right words", 1.5, 2.8))
    assert item != before[0]["item_id"] and {e["item_id"] for e in events} == {item}
    assert events[-1]["transcript"] == "right words"
