"""Endpointing: when does a segment end? Three named rules in the style of Kaldi and sherpa-onnx.

The rules look only at what the decoder emitted, on the encoder clock (80 ms frames): a frame in
which no token was emitted counts as silence, so no separate voice-activity detector is needed.
"Speech" means at least one token other than an end-of-utterance marker.

``trailing_silence_after_speech_s`` (default 1.0 s)
    The segment has speech and no token was emitted for this long after its last token: the speaker
    paused, so the segment ends with a final (``reason = "silence"``). sherpa-onnx uses 1.2 s, NeMo's
    EOU pipeline 0.8 s; lower it for snappy voice commands, raise it for dictation.
``silence_without_speech_s`` (default 5.0 s)
    The segment has no speech at all after this long: it is discarded (no final, no segment number)
    and a new one starts, so leading silence never stretches a segment.
``max_segment_s`` (default 20.0 s)
    The segment has had speech for this long (from its first token): it ends with a final
    (``reason = "max_length"``) even without a pause, so captions of a non-stop talker still arrive.

Decisions are taken after each recognizer step, so an endpoint is detected up to one step period
(the model's chunk, 80 ms to 1.12 s) after the rule is met. Models with an ``<EOU>`` token end a
segment as soon as they emit it, whatever the rules say. Every rule can be overridden per session
(the ``endpointing`` object of the protocol's ``start`` message) or in the ``[endpointing]`` section
of the configuration.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from streamer.errors import ConfigError


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    """The endpointing rules, in seconds (see the module docstring)."""

    trailing_silence_after_speech_s: float = 1.0
    silence_without_speech_s: float = 5.0
    max_segment_s: float = 20.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"endpointing.{f.name} must be a positive number of seconds, got {value!r}")

    def with_overrides(self, overrides: Mapping[str, float]) -> EndpointConfig:
        """A copy with some rules replaced (unknown names are a :class:`ConfigError`)."""
        names = {f.name for f in fields(self)}
        for key in overrides:
            if key not in names:
                raise ConfigError(f"unknown endpointing rule {key!r}; known: {', '.join(sorted(names))}")
        return replace(self, **{k: float(v) for k, v in overrides.items()})

    def to_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Decision(enum.Enum):
    """What the rules say after a step."""

    CONTINUE = "continue"
    END_SILENCE = "silence"  # trailing_silence_after_speech_s
    END_MAX_LENGTH = "max_length"  # max_segment_s
    DISCARD = "discard"  # silence_without_speech_s: drop the empty segment, start a new one


def decide(
    cfg: EndpointConfig,
    frame_shift_s: float,
    frames_done: int,
    segment_start_frame: int,
    first_speech_frame: int | None,
    speech_end_frame: int | None,
) -> Decision:
    """Apply the rules to one segment.

    Args:
        cfg: the rules.
        frame_shift_s: seconds per encoder frame.
        frames_done: encoder frames decoded so far (the stream's current position).
        segment_start_frame: the frame the segment started at (the end of the previous one).
        first_speech_frame: frame of the segment's first speech token, or None when it has none.
        speech_end_frame: frame after the segment's last speech token (its start plus its duration).
    """

    def lasted(since_frame: int, seconds: float) -> bool:
        return (frames_done - since_frame) * frame_shift_s >= seconds - 1e-9  # 10 * 0.08 is 0.8, not less

    if first_speech_frame is None or speech_end_frame is None:
        return Decision.DISCARD if lasted(segment_start_frame, cfg.silence_without_speech_s) else Decision.CONTINUE
    if lasted(speech_end_frame, cfg.trailing_silence_after_speech_s):
        return Decision.END_SILENCE
    if lasted(first_speech_frame, cfg.max_segment_s):
        return Decision.END_MAX_LENGTH
    return Decision.CONTINUE
