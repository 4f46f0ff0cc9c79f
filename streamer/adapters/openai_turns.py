"""The realtime API's turns (conversation items) made from the core's segments, commits and clears (sans-I/O).

OpenAI's realtime transcription speaks of items: a turn of the input audio, with an ``item_id``, started and
stopped by the server's VAD or ended by the client's ``input_audio_buffer.commit``; its text arrives as
``conversation.item.input_audio_transcription.delta`` events and once whole as ``.completed``. The core speaks
of segments: partials with a stable prefix, one final per segment, ended by endpointing or by ``finalize``.

:class:`Turns` maps one onto the other. A segment is an item. With server VAD on, its first partial says
``speech_started``, and a final the core ended by itself (silence, maximum length, the model's end of utterance)
says ``speech_stopped`` and ``committed`` before its ``completed``. A commit (or a clear) ends the open segment
through ``finalize`` and is answered at once with ``committed`` (``cleared``); it belongs to the segment whose
speech began before the commit's point in the audio (times on the stream's clock, so a partial that arrives
after the commit still finds it), and when the core reports the finalize carried out without a final (the
committed audio held no speech) the commit's item completes with an empty transcript. A cleared item's text
is not sent to this client (captions and MQTT still get the final). Deltas are append-only: the stable prefix
of each partial as it grows, the rest with the final.
"""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from streamer.adapters.openai_formats import SegmentText
from streamer.protocol import Final, Partial

Event = dict[str, Any]


def new_id(prefix: str) -> str:
    """An id in OpenAI's style (``item_...``, ``event_...``, ``sess_...``)."""
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


@dataclass(slots=True)
class Commit:
    """A commit or clear the client sent: the item it names, where it fell in the audio, its finalize request."""

    item_id: str
    at_s: float  # seconds of audio received when it came
    request: int
    cleared: bool = False
    is_bound: bool = False  # a segment was found for it
    is_done: bool = False


@dataclass(slots=True)
class Item:
    """A segment as an item."""

    item_id: str
    start_s: float
    commit: Commit | None = None
    text: SegmentText = field(default_factory=SegmentText)


class Turns:
    """See the module docstring. Each method returns the server events to send, in order.

    Args:
        vad: True when server VAD is on (``speech_started``/``speech_stopped`` are sent).
    """

    def __init__(self, vad: bool) -> None:
        self.vad = vad
        self._items: dict[int, Item] = {}  # open segments by number
        self._commits: deque[Commit] = deque()  # not yet answered with completed (or dropped, for a clear)
        self._previous: str | None = None  # the last committed item
        self.boundary_s = 0.0  # where the audio not yet committed begins

    def partial(self, p: Partial) -> list[Event]:
        out: list[Event] = []
        item = self._items.get(p.segment)
        if item is None:
            item = self._items[p.segment] = self._new_item(p.start)
            if self.vad and item.commit is None:
                out.append({"type": "input_audio_buffer.speech_started", "audio_start_ms": round(p.start * 1000),
                            "item_id": item.item_id})
        return out + self._delta(item, p.stable)

    def final(self, f: Final) -> list[Event]:
        out: list[Event] = []
        item = self._items.pop(f.segment, None)
        if item is None:
            item = self._new_item(f.start)
            if self.vad and item.commit is None:
                out.append({"type": "input_audio_buffer.speech_started", "audio_start_ms": round(f.start * 1000),
                            "item_id": item.item_id})
        commit = item.commit
        if commit is None:  # the core ended the turn by itself
            if self.vad:
                out.append({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": round(f.end * 1000),
                            "item_id": item.item_id})
            out.append(self._committed(item.item_id))
            self.boundary_s = max(self.boundary_s, f.end)
        else:
            commit.is_done = True
            self._drop_done()
            if commit.cleared:
                return out
        return out + self._delta(item, f.text) + [_completed(item.item_id, f.text, f.end - f.start)]

    def commit(self, at_s: float, request: int, cleared: bool = False) -> list[Event]:
        """The client committed (or cleared) the audio up to ``at_s``; ``request`` is the finalize's number."""
        open_item = next((i for i in self._items.values() if i.commit is None and i.start_s < at_s), None)
        commit = Commit(open_item.item_id if open_item else new_id("item"), at_s, request, cleared,
                        is_bound=open_item is not None)
        if open_item is not None:
            open_item.commit = commit
        self._commits.append(commit)
        self.boundary_s = at_s
        if cleared:
            return [{"type": "input_audio_buffer.cleared"}]
        return [self._committed(commit.item_id)]

    def carried_out(self, request: int) -> list[Event]:
        """The core carried out finalize requests up to ``request``: commits still waiting got no final."""
        out: list[Event] = []
        for commit in self._commits:
            if commit.request <= request and not commit.is_done:
                commit.is_done = True
                for number, item in list(self._items.items()):
                    if item.commit is commit:
                        del self._items[number]
                if not commit.cleared:
                    out.append(_completed(commit.item_id, "", 0.0))
        self._drop_done()
        return out

    def _new_item(self, start_s: float) -> Item:
        """An item for a segment whose speech began at ``start_s``: the commit it fell before, if any."""
        for commit in self._commits:
            if not commit.is_done and not commit.is_bound and start_s < commit.at_s:
                commit.is_bound = True
                return Item(commit.item_id, start_s, commit)
        return Item(new_id("item"), start_s)

    def _committed(self, item_id: str) -> Event:
        event = {"type": "input_audio_buffer.committed", "previous_item_id": self._previous, "item_id": item_id}
        self._previous = item_id
        return event

    def _delta(self, item: Item, text: str) -> list[Event]:
        if item.commit is not None and item.commit.cleared:
            return []
        delta = item.text.grow(text)
        if not delta:
            return []
        return [{"type": "conversation.item.input_audio_transcription.delta", "item_id": item.item_id,
                 "content_index": 0, "delta": delta}]

    def _drop_done(self) -> None:
        while self._commits and self._commits[0].is_done:
            self._commits.popleft()


def _completed(item_id: str, text: str, seconds: float) -> Event:
    return {"type": "conversation.item.input_audio_transcription.completed", "item_id": item_id,
            "content_index": 0, "transcript": text, "usage": {"type": "duration", "seconds": round(max(0.0,
                                                                                                         seconds), 3)}}
