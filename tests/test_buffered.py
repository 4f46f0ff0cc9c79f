"""Buffered streaming of full-context models (issue 19 item 3): NeMo parity, batching, the daemon path.

NeMo's numbers come from tests/fixtures/nemo/make_buffered_goldens.py (NeMo 3.0.0's stateful buffered
RNNT/TDT loop on the committed fixture models).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from streamer.asr.model import AsrModel
from streamer.audio.io import load_audio
from streamer.engine.buffered import BufferedRecognizer, BufferSizes, transcribe_buffered
from streamer.engine.recognizer import transcribe_offline
from streamer.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures" / "nemo"
MODELS = ("tdt_offline_sym", "local_global_shared")


@pytest.mark.checkpoint
@pytest.mark.parametrize("name", MODELS)
def test_tokens_and_frames_match_nemo_buffered(name: str) -> None:
    """Every setting (left, chunk, right) and clip: NeMo's buffered token ids and their frames."""
    golden = torch.load(FIXTURES / name / "golden_buffered.pt", weights_only=True)
    model = AsrModel.load(str(FIXTURES / name / "model.nemo"))
    assert len(golden["results"]) >= 4
    for key, per_clip in golden["results"].items():
        left, chunk, right = (float(v) for v in key.split(","))
        for clip, want in per_clip.items():
            audio = load_audio(FIXTURES / name / f"{clip}.wav", 16000)
            got = transcribe_buffered(model, audio, None, left, chunk, right)
            assert list(got.token_ids) == list(want["token_ids"]), (key, clip)
            assert list(got.token_frames) == list(want["token_frames"]), (key, clip)


def test_settings_change_the_result_and_a_whole_file_buffer_is_offline() -> None:
    """A buffer as long as the file gives the offline tokens; a short one gives others (the goldens test that)."""
    model = AsrModel.load(str(FIXTURES / "tdt_offline_sym" / "model.nemo"))
    audio = load_audio(FIXTURES / "tdt_offline_sym" / "audio_0.wav", 16000)
    offline = transcribe_offline(model, audio).token_ids
    assert transcribe_buffered(model, audio, None, 0.0, 10.0, 0.0).token_ids == offline
    assert transcribe_buffered(model, audio, None, 0.4, 0.16, 0.16).token_ids != offline


def test_batched_streams_equal_one_at_a_time() -> None:
    """Streams of different lengths pushed in odd pieces and stepped together give each one's own tokens."""
    model = AsrModel.load(str(FIXTURES / "tdt_offline_sym" / "model.nemo"))
    audios = [load_audio(FIXTURES / "tdt_offline_sym" / f"{c}.wav", 16000) for c in ("audio_0", "audio_1")]
    audios.append(audios[0][: 16000 + 777])
    alone = [transcribe_buffered(model, a, None, 0.64, 0.48, 0.32).token_ids for a in audios]
    rec = BufferedRecognizer(model, None, 0.64, 0.48, 0.32)
    streams = [rec.create_stream() for _ in audios]
    pos = [0] * len(audios)
    rng = np.random.default_rng(1)
    while any(p < a.size for p, a in zip(pos, audios, strict=True)):
        for i, (s, a) in enumerate(zip(streams, audios, strict=True)):
            if s.input_done:
                continue
            n = int(rng.integers(100, 5000))
            s.accept_waveform(a[pos[i] : pos[i] + n])
            pos[i] = min(a.size, pos[i] + n)
            if pos[i] >= a.size and not s.input_done:
                s.input_finished()
        rec.step(streams)
    rec.run_to_end(streams)
    for s, want in zip(streams, alone, strict=True):
        assert s.flushed and s.tokens.token_ids == want


def test_buffer_sizes_round_to_frames_and_refuse_nonsense() -> None:
    sizes = BufferSizes.from_seconds(10.0, 1.6, 1.6, 1280, 16000)
    assert (sizes.left, sizes.chunk, sizes.right) == (125 * 1280, 20 * 1280, 20 * 1280)
    assert BufferSizes.from_seconds(0.1, 0.1, 0.0, 1280, 16000).chunk == 1280
    with pytest.raises(ConfigError, match="at least one encoder frame"):
        BufferSizes.from_seconds(1.0, 0.05, 0.0, 1280, 16000)
    with pytest.raises(ConfigError, match=">= 0"):
        BufferSizes.from_seconds(-1.0, 1.0, 0.0, 1280, 16000)
