"""Endpointing rules: each named rule at its boundary, validation and per-session overrides."""

from __future__ import annotations

import pytest

from streamer.engine.endpoint import Decision, EndpointConfig, decide
from streamer.errors import ConfigError

FS = 0.08  # seconds per encoder frame
CFG = EndpointConfig(trailing_silence_after_speech_s=0.8, silence_without_speech_s=2.0, max_segment_s=4.0)


def test_defaults_are_documented_values() -> None:
    """Defaults: 1.0 s trailing silence, 5 s without speech, 20 s maximum segment."""
    assert EndpointConfig().to_dict() == {
        "trailing_silence_after_speech_s": 1.0, "silence_without_speech_s": 5.0, "max_segment_s": 20.0,
    }


def test_trailing_silence_after_speech_ends_the_segment_at_exactly_the_threshold() -> None:
    """0.8 s is 10 frames: 9 frames after the last token continue, 10 end the segment."""
    assert decide(CFG, FS, frames_done=29, segment_start_frame=0, first_speech_frame=5,
                  speech_end_frame=20) is Decision.CONTINUE
    assert decide(CFG, FS, frames_done=30, segment_start_frame=0, first_speech_frame=5,
                  speech_end_frame=20) is Decision.END_SILENCE


def test_silence_without_speech_discards_the_empty_segment() -> None:
    """2 s with no token (25 frames) from the segment start: discard, not a final."""
    assert decide(CFG, FS, 124, 100, None, None) is Decision.CONTINUE
    assert decide(CFG, FS, 125, 100, None, None) is Decision.DISCARD


def test_max_segment_counts_from_the_first_word() -> None:
    """4 s (50 frames) after the first speech token the segment ends even while tokens keep coming."""
    assert decide(CFG, FS, 159, 0, 110, 159) is Decision.CONTINUE
    assert decide(CFG, FS, 160, 0, 110, 160) is Decision.END_MAX_LENGTH


def test_trailing_silence_wins_over_max_length() -> None:
    """When both rules hold, the pause is the reason."""
    assert decide(CFG, FS, 200, 0, 0, 100) is Decision.END_SILENCE


def test_overrides_replace_single_rules() -> None:
    """A session overrides one rule and keeps the others."""
    cfg = CFG.with_overrides({"max_segment_s": 7})
    assert cfg.max_segment_s == 7.0 and cfg.trailing_silence_after_speech_s == 0.8


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), True, "1"])
def test_invalid_values_are_config_errors(bad: object) -> None:
    """Zero, negative, non-finite and non-numeric seconds are rejected with the rule's name."""
    with pytest.raises(ConfigError, match="endpointing.max_segment_s"):
        EndpointConfig(max_segment_s=bad)  # type: ignore[arg-type]


def test_unknown_override_is_a_config_error() -> None:
    """A misspelt rule name is named in the error."""
    with pytest.raises(ConfigError, match="unknown endpointing rule 'max_segment'"):
        CFG.with_overrides({"max_segment": 3})
