"""Real recognition with the bundled default model: espeak-ng speaks, `streamer` must hear the words.

Speech is made at test time with espeak-ng (sentences written here, never in the training corpus) and
scored by word error rate against what was spoken. The threshold is tolerant on purpose: this checks that
the shipped model recognizes speech end to end through the CLI and the daemon, not its exact accuracy,
which `streamer eval` measures on the corpus splits and the model card reports.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import soundfile as sf
from websockets.asyncio.client import connect

from streamer.training.evaluate import word_error_rate

MODEL = Path(__file__).resolve().parents[1] / "models" / "streamer-tdt-small" / "model.nemo"
TIMEOUT = float(os.environ.get("STREAMER_TEST_TIMEOUT_FACTOR", "1"))

# Everyday sentences in two espeak-ng voices (training used espeak-ng voices, never these sentences).
SPOKEN = [
    ("en-us", "please turn off the lights in the kitchen"),
    ("en", "what is the weather going to be like tomorrow"),
    ("en-us", "set a timer for ten minutes"),
    ("en", "i will call you back in the afternoon"),
]
# Word error rate the default model must stay under on these four sentences, summed. Its measured rate is
# in the model card (models/streamer-tdt-small/README.md); this bound is looser so a test failure means
# recognition broke, not that the corpus numbers moved by a point.
MAX_WER = 0.35

# The default model ships in the repository; a checkout or package without it (for instance one stripped
# of model weights) skips these tests visibly rather than failing on a missing file.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} is missing from this checkout"),
]


def check_wer(hyps: list[str], where: str) -> None:
    wer, errors, words = word_error_rate([t for _, t in SPOKEN], hyps)
    assert wer <= MAX_WER, f"{errors}/{words} word errors ({where}): {hyps}"


@pytest.fixture(scope="module")
def wavs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = []
    folder = tmp_path_factory.mktemp("spoken")
    for i, (voice, text) in enumerate(SPOKEN):
        path = folder / f"utt{i}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True)
        out.append(path)
    return out


def streamer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamer", *args], capture_output=True, text=True, timeout=300 * TIMEOUT
    )


def test_the_default_model_says_how_far_it_was_trained() -> None:
    record = json.loads((MODEL.parent / "training.json").read_text())
    assert record["hours_seen"] > 0 and record["step"] > 0


@pytest.mark.parametrize("mode", ["offline", "streaming"])
def test_transcribe_prints_the_spoken_sentences(wavs: list[Path], mode: str) -> None:
    """`streamer transcribe` with no --model: the default model writes down what espeak-ng said."""
    result = streamer("transcribe", "--mode", mode, "--format", "json", *map(str, wavs))
    assert result.returncode == 0, result.stderr
    results = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["file"] for r in results] == list(map(str, wavs))
    assert all(r["duration_s"] > 1.0 and r["mode"] == mode and r["decoder"] == "tdt" for r in results)
    check_wer([r["text"] for r in results], f"streamer transcribe --mode {mode}")


@pytest.fixture
async def serve_default(tmp_path: Path) -> AsyncIterator[int]:
    """`streamer serve` with no --model (the bundled default) on a free port; yields the port."""
    port_file = tmp_path / "port"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamer", "serve", "--port-file", str(port_file),
        env={**os.environ, "STREAMER_SERVER__PORT": "0"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(120 * TIMEOUT):
            line = (await proc.stdout.readline()).decode()
            assert line.startswith("streamer: listening on"), line
            while not port_file.is_file() or not port_file.read_text().strip():
                await asyncio.sleep(0.05)
        yield int(port_file.read_text())
    finally:
        proc.terminate()
        async with asyncio.timeout(60 * TIMEOUT):
            await proc.communicate()


async def test_the_daemon_captions_speech_with_the_default_model(wavs: list[Path], serve_default: int) -> None:
    """`streamer serve` with no --model: finals over /v1/listen carry the spoken words."""
    hyps = []
    for wav in wavs:  # one session per recording: `stop` ends the session
        async with connect(f"ws://127.0.0.1:{serve_default}/v1/listen") as ws:
            data, rate = sf.read(wav, dtype="int16")
            await ws.send(json.dumps({"type": "start", "sample_rate": rate, "encoding": "pcm_s16le"}))
            pcm = data.tobytes()
            for i in range(0, len(pcm), 3200):
                await ws.send(pcm[i : i + 3200])
            await ws.send(json.dumps({"type": "stop"}))
            text = []
            async with asyncio.timeout(60 * TIMEOUT):
                while (message := json.loads(await ws.recv()))["type"] != "end":
                    if message["type"] == "final":
                        text.append(message["text"])
            hyps.append(" ".join(text))
    check_wer(hyps, "the daemon over /v1/listen")

