"""`streamer transcribe` end to end on a real .nemo file and real audio files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from streamer.cli import main


def transcribe_json(capsys, *args: str) -> list[dict]:
    assert main(["transcribe", "--format", "json", *args]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_streaming_equals_offline_through_the_cli(capsys, tiny_nemo: Path, speech_wav: Path) -> None:
    """For every look-ahead and decoder, --mode streaming prints exactly the offline tokens and frames."""
    for ctx in ("70,13", "70,6", "70,1", "70,0"):
        for dec in ("tdt", "ctc"):
            common = ["--model", str(tiny_nemo), "--att-context-size", ctx, "--decoder", dec, str(speech_wav)]
            (off,) = transcribe_json(capsys, *common, "--mode", "offline")
            (st,) = transcribe_json(capsys, *common, "--mode", "streaming")
            assert off["token_ids"], "the tiny model should emit tokens"
            assert st["token_ids"] == off["token_ids"] and st["token_frames"] == off["token_frames"]
            assert st["token_durations"] == off["token_durations"]
            assert st["text"] == off["text"]


def test_json_fields_and_word_times(capsys, tiny_nemo: Path, speech_wav: Path) -> None:
    """JSON has the documented fields; words are ordered and lie inside the audio."""
    (obj,) = transcribe_json(capsys, "--model", str(tiny_nemo), str(speech_wav))
    for key in ("file", "text", "token_ids", "token_frames", "words", "duration_s", "decoder", "att_context_size"):
        assert key in obj
    assert obj["decoder"] == "tdt" and obj["att_context_size"] == [70, 13]
    assert all(isinstance(t, int) for t in obj["token_ids"])
    assert obj["token_frames"] == sorted(obj["token_frames"])
    starts = [w["start_s"] for w in obj["words"]]
    assert starts == sorted(starts)
    assert all(w["start_s"] <= w["end_s"] <= obj["duration_s"] + 0.5 for w in obj["words"])


@pytest.mark.parametrize("fmt,subtype", [("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")])
def test_other_formats_and_rates_give_same_tokens_as_wav(capsys, tmp_path, tiny_nemo, speech_wav, fmt, subtype):
    """A 48 kHz stereo FLAC of the same audio decodes to the same tokens as the WAV (lossy: most of them)."""
    data, sr = sf.read(speech_wav, dtype="float32")
    import soxr

    stereo = np.stack([soxr.resample(data, sr, 48000)] * 2, axis=1)
    path = tmp_path / f"speech.{fmt.lower()}"
    sf.write(path, stereo, 48000, format=fmt, subtype=subtype)
    (ref,) = transcribe_json(capsys, "--model", str(tiny_nemo), str(speech_wav))
    (got,) = transcribe_json(capsys, "--model", str(tiny_nemo), str(path))
    if fmt == "FLAC":
        # Same content, different resampling path: nearly identical tokens.
        same = sum(a == b for a, b in zip(got["token_ids"], ref["token_ids"], strict=False))
        assert same >= 0.8 * len(ref["token_ids"])
    assert abs(got["duration_s"] - ref["duration_s"]) < 0.08


def test_missing_file_is_one_clear_line(capsys, tiny_nemo: Path) -> None:
    """A missing file exits 2 with one line naming it."""
    assert main(["transcribe", "--model", str(tiny_nemo), "nope.wav"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["streamer: error: nope.wav: no such file"]


def test_unreadable_audio_and_bad_model(capsys, tmp_path: Path, tiny_nemo: Path, speech_wav: Path) -> None:
    """Garbage audio and a model file that is not a model each give one error line and exit 2."""
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio at all" * 10)
    assert main(["transcribe", "--model", str(tiny_nemo), str(junk)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "junk.wav" in err[0]
    fake = tmp_path / "fake.nemo"
    fake.write_bytes(b"not a tar archive")
    assert main(["transcribe", "--model", str(fake), str(speech_wav)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fake.nemo" in err[0]


def test_wrong_decoder_and_context_are_refused(capsys, tiny_nemo: Path, speech_wav: Path) -> None:
    """Asking for a head or a look-ahead the model lacks names what it has."""
    assert main(["transcribe", "--model", str(tiny_nemo), "--decoder", "rnnt", str(speech_wav)]) == 2
    assert "tdt, ctc" in capsys.readouterr().err
    assert main(["transcribe", "--model", str(tiny_nemo), "--att-context-size", "70,3", str(speech_wav)]) == 2
    assert "[70,13]" in capsys.readouterr().err


def test_console_script_runs(tiny_nemo: Path, speech_wav: Path) -> None:
    """The installed `streamer` command works as a separate process."""
    exe = Path(sys.executable).with_name("streamer")
    proc = subprocess.run([str(exe), "transcribe", "--model", str(tiny_nemo), str(speech_wav)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
