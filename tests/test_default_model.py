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
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr
from websockets.asyncio.client import connect

from streamer.training.evaluate import word_error_rate
from tests.test_browser import CHROMIUM, chromium_args, page_finals, start_speaker, wait_state

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
# The caption page's bound: Chromium's fake microphone adds timing jitter (see the page test's docstring).
PAGE_MAX_WER = 0.5

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
    port_file, log_path = tmp_path / "port", tmp_path / "serve.log"
    with log_path.open("wb") as log:  # a file, not a pipe: a pipe nobody reads fills up and stalls the daemon
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamer", "serve", "--port-file", str(port_file),
            env={**os.environ, "STREAMER_SERVER__PORT": "0"}, stdout=subprocess.PIPE, stderr=log,
        )
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(120 * TIMEOUT):
                line = (await proc.stdout.readline()).decode()
                assert line.startswith("streamer: listening on"), f"{line!r}; {log_path.read_text()[-2000:]}"
                while not port_file.is_file() or not port_file.read_text().strip():
                    await asyncio.sleep(0.05)
            yield int(port_file.read_text())
        finally:
            proc.terminate()
            async with asyncio.timeout(60 * TIMEOUT):
                await proc.communicate()


async def session_messages(port: int, pcm: bytes, rate: int) -> list[dict[str, Any]]:
    """One /v1/listen session: s16le ``pcm`` sent in 100 ms frames, then ``stop``; every message before ``end``."""
    async with connect(f"ws://127.0.0.1:{port}/v1/listen") as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": rate, "encoding": "pcm_s16le"}))
        for i in range(0, len(pcm), 3200):
            await ws.send(pcm[i : i + 3200])
        await ws.send(json.dumps({"type": "stop"}))
        messages = []
        async with asyncio.timeout(60 * TIMEOUT):
            while (message := json.loads(await ws.recv()))["type"] != "end":
                messages.append(message)
    return messages


async def test_the_daemon_captions_speech_with_the_default_model(wavs: list[Path], serve_default: int) -> None:
    """`streamer serve` with no --model: finals over /v1/listen carry the spoken words."""
    hyps = []
    for wav in wavs:  # one session per recording: `stop` ends the session
        data, rate = sf.read(wav, dtype="int16")
        messages = await session_messages(serve_default, data.tobytes(), rate)
        hyps.append(" ".join(m["text"] for m in messages if m["type"] == "final"))
    check_wer(hyps, "the daemon over /v1/listen")


@pytest.mark.parametrize("lead_s", [0.0, 0.28, 0.56, 0.84])
async def test_a_pause_longer_than_the_silence_rule_ends_the_segment_whatever_the_chunk(
    wavs: list[Path], serve_default: int, lead_s: float
) -> None:
    """At the daemon's default look-ahead (1.12 s chunks), two sentences 1.5 s apart are two finals with a 1.0 s
    silence rule, wherever the pause falls against the chunk boundaries; no time lies beyond the audio sent."""
    (a, rate), (b, _) = (sf.read(w, dtype="int16") for w in wavs[:2])
    assert sf.info(wavs[1]).samplerate == rate
    audio = np.concatenate([np.zeros(round(lead_s * rate), "int16"), a, np.zeros(round(1.5 * rate), "int16"), b])
    messages = await session_messages(serve_default, audio.tobytes(), rate)
    finals = [m for m in messages if m["type"] == "final"]
    assert [f["reason"] for f in finals] == ["silence", "stop"], [(f["reason"], f["text"]) for f in finals]
    end_s = len(audio) / rate
    assert all(m["end"] <= end_s + 1e-3 for m in messages if m["type"] in ("partial", "final"))
    assert finals[0]["end"] <= (lead_s + len(a) / rate) + 0.2 < 0.5 + finals[0]["end"] < finals[1]["start"]


def sent_audio_gaps(spoken: Path, sent: np.ndarray, sent_rate: int) -> tuple[list[float], list[tuple[float, float]]]:
    """Is the microphone's speech all in the audio the page sent, in order? Compared in 50 ms windows.

    Each speech window of ``spoken`` is looked for in ``sent`` within a second either side; its lag is where it
    matches best. Returns the start times (s) of windows found nowhere, and each change of lag as (time,
    milliseconds): a positive change is audio inserted before that point, a negative one audio lost.

    The sent audio's lag falls between samples, and at 16 kHz half a sample turns the phase of the top of the
    band enough to fail a match of fricatives (seen in CI at 44.1 kHz). So both sides are low-passed to 3 kHz
    and compared at 32 kHz, where the lag is off by at most an eighth of a 16 kHz sample.
    """
    rate = 32000

    def band(x: np.ndarray, from_rate: int) -> np.ndarray:
        return soxr.resample(soxr.resample(x, from_rate, 6000), 6000, rate)

    src = band(sf.read(spoken, dtype="float32")[0], sf.info(spoken).samplerate)
    got = band(sent.astype(np.float32) / 32768, sent_rate)
    width, unmatched, shifts, last = rate // 20, [], [], None
    for s in range(0, len(src) - width, width):
        seg = src[s : s + width]
        energy = float(np.sum(seg**2))
        if energy < width * 0.02**2:  # silence matches anything
            continue
        lo = max(0, s - rate)
        win = got[lo : s + width + rate]
        if len(win) < 2 * width:
            unmatched.append(s / rate)
            continue
        n = len(win) + width
        corr = np.fft.irfft(np.fft.rfft(win, n) * np.conj(np.fft.rfft(seg, n)), n)[: len(win) - width + 1]
        rho = corr / np.sqrt(np.maximum(np.convolve(win**2, np.ones(width), "valid"), energy / 4) * energy)
        k = int(np.argmax(rho))
        if rho[k] < 0.95:
            unmatched.append(s / rate)
            continue
        lag = lo + k - s
        if last is not None and abs(lag - last) > 4:  # resampling blurs a lag by a few samples
            shifts.append((s / rate, (lag - last) * 1000 / rate))
        last = lag
    return unmatched, shifts


def microphone_wav(wavs: list[Path], path: Path) -> Path:
    """The four recordings as one WAV for the fake microphone, a second of silence before each (which ends the
    segment before it) and two after the last."""
    parts = []
    for wav in wavs:
        data, rate = sf.read(wav, dtype="float32")
        parts += [np.zeros(rate, dtype=np.float32), data]
    sf.write(path, np.concatenate([*parts, np.zeros(2 * rate, dtype=np.float32)]), rate, subtype="PCM_16")
    return path


def test_the_gap_finder_sees_lost_and_padded_audio_and_nothing_else(wavs: list[Path], tmp_path: Path) -> None:
    """`sent_audio_gaps` (the page test's witness) on audio made here: resampled to 44.1 kHz and delayed by a
    lag that falls between samples it reports nothing; with 50 ms cut out and 10 ms of silence put in, it
    reports exactly those two lag changes."""
    mic = microphone_wav(wavs, tmp_path / "mic.wav")
    speech, rate = sf.read(mic, dtype="float32")
    sent_rate = 44100
    sent = np.concatenate([np.zeros(1301, dtype=np.float32), soxr.resample(speech, rate, sent_rate)])

    def pcm(x: np.ndarray) -> np.ndarray:
        return (np.clip(x, -1, 1) * 32767).astype("<i2")

    assert sent_audio_gaps(mic, pcm(sent), sent_rate) == ([], [])
    cut, pad = int(5.0 * sent_rate), int(8.0 * sent_rate)
    damaged = np.concatenate([sent[:cut], sent[cut + sent_rate // 20 : pad], np.zeros(sent_rate // 100), sent[pad:]])
    unmatched, shifts = sent_audio_gaps(mic, pcm(damaged), sent_rate)
    assert [ms for _, ms in shifts] == pytest.approx([-50.0, 10.0], abs=0.2), shifts
    assert [round(t) for t, _ in shifts] == [5, 8] and all(abs(t - 5.0) <= 0.1 for t in unmatched), unmatched


async def test_the_caption_page_shows_the_spoken_words(wavs: list[Path], serve_default: int, tmp_path: Path) -> None:
    """Headless Chromium's fake microphone speaks the four sentences into the caption page served by the
    daemon on the default model: the finals the page shows carry the words (what a newcomer sees at /).

    Every step of the audio's way is checked, so that a failure says where words went missing: every sample
    the page's worklet delivered must reach the wire, the server's ``end`` must count all of it, and the page
    must show every final the server sent.

    On a busy machine Chromium's fake capture pads its 10 ms buffers with silence, sometimes two in a row,
    now and then skips one (seen as lag shifts of +10, +20 or -10 ms in the sent audio), and in one CI run
    skipped about a second. That happens before the page's worklet sees the audio, so the test holds the
    page to its own account (every sample the worklet delivered reached the wire) and reports the gap
    finder's view of the capture path in the failure message. Each pad moves
    the 80 ms step grid against the speech, and this model, still early in its training, is sensitive to
    that: with 1-3 such pads put into the same recording, `streamer transcribe --mode streaming` made 6-11
    errors in the 31 words (6 without; run 6's weights). That is why this test allows more errors than the
    file-based ones above.
    """
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found (apt install chromium)")
    async_api = pytest.importorskip("playwright.async_api")
    mic = microphone_wav(wavs, tmp_path / "mic.wav")
    async with async_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=chromium_args(mic))
        try:
            page, wire = await start_speaker(browser, f"http://127.0.0.1:{serve_default}/")
            await page.wait_for_selector("#captions .final", timeout=60_000 * TIMEOUT)
            await asyncio.sleep(sf.info(mic).duration)  # the fake microphone plays in real time, once
            await page.screenshot(path=tmp_path / "captions.png")
            await page.get_by_role("button", name="Stop").click()  # the open segment's final, then "end"
            await wait_state(page, "stopped", wire)
            shown = " ".join(await page_finals(page))
            health = await page.evaluate("speaker.health")
            captured = await page.evaluate("speaker.captured")  # samples the page's worklet delivered
            notice = await page.locator("#notice").inner_text()
        finally:
            await browser.close()
    sent_rate = wire.sent_text[0]["sample_rate"]
    sent = np.frombuffer(b"".join(wire.sent_bytes), dtype="<i2")
    sf.write(tmp_path / "sent.wav", sent, sent_rate, subtype="PCM_16")  # kept for a look after a failure
    end = wire.received[-1]
    unmatched, shifts = sent_audio_gaps(mic, sent, sent_rate)
    wer, errors, words = word_error_rate([" ".join(t for _, t in SPOKEN)], [shown])
    story = (f"page showed {shown!r} ({errors}/{words} word errors); page health {health}; notice {notice!r}; "
             f"worklet delivered {captured / sent_rate:.2f} s, sent {len(sent) / sent_rate:.2f} s at {sent_rate} Hz, "
             f"server's end {end}; speech windows missing "
             f"from the sent audio at {unmatched[:20]} s, lag shifts (s, ms) {shifts[:20]}; "
             f"{len(wire.sockets)} connection(s); files in {tmp_path}")
    assert end["type"] == "end" and len(wire.sockets) == 1, story
    assert end["audio_s"] == pytest.approx(len(sent) / sent_rate, abs=0.002) and end["dropped_s"] == 0, story
    # Nothing lost between the worklet and the socket: every sample the page's audio worklet delivered went
    # out on the wire. What Chromium's capture did before the worklet (the gap finder's shifts and missing
    # windows, in the story) is not the page's to fix: on a starved 2-core CI box it has padded 10-20 ms and
    # once skipped about a second of the fake microphone's file, all before the page saw any of it.
    assert captured == len(sent), story
    assert shown == " ".join(wire.finals()), story  # the page shows every final the server sent
    assert health == {"serverShortS": 0, "serverDroppedS": 0} and not notice, story
    assert wer <= PAGE_MAX_WER, story
