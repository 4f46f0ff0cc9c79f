"""The engine's one event beside partials, finals and warnings: the speaker paused (standard library only).

:class:`~streamer.engine.segmenting.Segmenter` makes it for a stream that asked for it (``pause_s``); it lives apart
so that the session core and adapters can name it without importing the recognizer (torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class Pause:
    """No speech for the stream's ``pause_s`` since its last word ended at ``last_word_end`` (stream seconds).

    Once per pause: the next speech token starts the wait for the next one. Not a protocol v1 message: it goes
    only to the session that asked for it (its client's adapter), never to captions or MQTT.
    """

    stream: str
    last_word_end: float
    type: ClassVar[str] = "pause"
