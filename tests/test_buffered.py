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


async def _listen(port: int, pcm: bytes, rate: int) -> tuple[dict, list[dict]]:
    import asyncio
    import json

    from websockets.asyncio.client import connect

    async def recv(ws) -> dict:
        async with asyncio.timeout(60):
            return json.loads(await ws.recv())

    async with connect(f"ws://127.0.0.1:{port}/v1/listen") as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": rate, "encoding": "pcm_s16le", "stream": "talk"}))
        ready = await recv(ws)
        for i in range(0, len(pcm), 4410):
            await ws.send(pcm[i : i + 4410])
        await ws.send(json.dumps({"type": "stop"}))
        out = [await recv(ws)]
        while out[-1]["type"] != "end":
            out.append(await recv(ws))
    return ready, out


@pytest.mark.slow
async def test_serve_streams_a_full_context_model_by_buffering(tmp_path: Path) -> None:
    """`streamer serve` with a full-context checkpoint (auto picks buffered streaming) gives partials and finals
    over /v1/listen, and `ready` states the latency; the bundled model forced to buffered streaming recognizes
    espeak-ng speech with the words a cache-aware pass gets."""
    from tests.serve_process import serve
    from tests.speech import espeak_sentences

    text = "the weather will be cold tomorrow"
    ((samples, rate),) = espeak_sentences(tmp_path, [text], dtype="int16").values()
    pcm = np.concatenate([np.zeros(rate // 2, np.int16), samples, np.zeros(rate, np.int16)]).tobytes()
    env = {"STREAMER_STATE__DIR": "", "STREAMER_ENGINE__BUFFER_LEFT_S": "2.0",
           "STREAMER_ENGINE__BUFFER_CHUNK_S": "0.48", "STREAMER_ENGINE__BUFFER_RIGHT_S": "0.32"}
    model = str(FIXTURES / "tdt_offline_sym" / "model.nemo")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with serve(tmp_path / "a", env, "--model", model) as served:
        ready, out = await _listen(served.port, pcm, rate)
    assert ready["type"] == "ready" and ready["latency_s"] == pytest.approx(0.8)
    assert ready["chunk_s"] == pytest.approx(0.48)
    kinds = [m["type"] for m in out]
    assert "partial" in kinds and "final" in kinds and kinds[-1] == "end"
    async with serve(tmp_path / "b", {**env, "STREAMER_ENGINE__STREAMING": "buffered"}) as served:
        ready, out = await _listen(served.port, pcm, rate)
    assert "latency_s" in ready
    finals = " ".join(m["text"] for m in out if m["type"] == "final")
    assert sum(word in finals.split() for word in text.split()) >= 4, finals
