"""Wyoming end to end: `streamer serve --set wyoming.enabled=true` as a subprocess with the bundled default model, and
the ``wyoming`` package's own :class:`~wyoming.client.AsyncTcpClient` as the peer (what Home Assistant uses).

espeak-ng speaks sentences the model is known to get right; the transcripts must carry the words (by word error
rate, as the other default-model tests). Bad input is sent through the same client (its writer for bytes no
well-behaved client would send) and must be answered with Wyoming ``error`` events while the connection, other
connections and the server go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr
from wyoming.asr import Transcribe, Transcript, TranscriptChunk
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.ping import Ping, Pong

from streamer.training.evaluate import word_error_rate
from tests.speech import espeak_sentences

MODEL = Path(__file__).resolve().parents[1] / "models" / "streamer-tdt-small" / "model.nemo"
TIMEOUT = float(os.environ.get("STREAMER_TEST_TIMEOUT_FACTOR", "1"))
FIRST, SECOND = "please turn off the lights in the kitchen", "set a timer for ten minutes"
IDLE_S = 8.0  # the test daemon's server.idle_timeout_s

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} is missing from this checkout"),
]


@dataclass
class Serving:
    proc: subprocess.Popen[bytes]
    port: int  # the Wyoming port
    log: Path

    def stop(self) -> int:
        """SIGTERM, then the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60 * TIMEOUT)


@contextlib.contextmanager
def serve(folder: Path, *extra: str) -> Iterator[Serving]:
    """`streamer serve` (default model) with Wyoming on a free port, enabled by ``--set``; killed if left running."""
    log = folder / "serve.log"
    with log.open("wb") as err:  # a file, not a pipe: a pipe nobody reads fills up and stalls the daemon
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamer", "--log-level", "INFO", "serve", "--port", "0",
             "--set", "wyoming.enabled=true", "--set", "wyoming.port=0", "--set", f"server.idle_timeout_s={IDLE_S}",
             *extra], stdout=subprocess.PIPE, stderr=err,
        )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().decode() for _ in range(2)]
        assert lines[0].startswith("streamer: listening on http://127.0.0.1:"), f"{lines}\n{log.read_text()[-3000:]}"
        prefix = "streamer: wyoming on tcp://127.0.0.1:"
        assert lines[1].startswith(prefix), f"{lines}\n{log.read_text()[-3000:]}"
        yield Serving(proc, int(lines[1][len(prefix):]), log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serving]:
    with serve(tmp_path_factory.mktemp("wyoming")) as running:
        yield running


@pytest.fixture(scope="module")
def spoken(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[np.ndarray, int]]:
    """Each sentence as float samples in [-1, 1] and their rate (espeak-ng's 22.05 kHz)."""
    return espeak_sentences(tmp_path_factory.mktemp("spoken"), (FIRST, SECOND))


def pcm(samples: np.ndarray, width: int) -> bytes:
    """(S,) or (S, C) float samples as interleaved PCM of ``width`` bytes (1: unsigned, as WAV has it)."""
    if width == 1:
        return np.clip(np.round(samples * 127 + 128), 0, 255).astype("u1").tobytes()
    scale, dtype = {2: (32767, "<i2"), 4: (2147483647, "<i4")}[width]
    return np.round(samples.astype(np.float64) * scale).astype(dtype).tobytes()


def check_words(text: str, spoken_text: str) -> None:
    wer, errors, words = word_error_rate([spoken_text], [text])
    assert wer <= 0.35, f"{errors}/{words} word errors: {text!r} for {spoken_text!r}"


async def read(client: AsyncTcpClient) -> Event:
    async with asyncio.timeout(60 * TIMEOUT):
        event = await client.read_event()
    assert event is not None, "the server closed the connection"
    return event


async def read_error(client: AsyncTcpClient) -> Error:
    event = await read(client)
    assert Error.is_type(event.type), event
    return Error.from_event(event)


async def utterance(client: AsyncTcpClient, audio: bytes, rate: int, width: int = 2, channels: int = 1,
                    chunk_bytes: int = 4096) -> list[Event]:
    """transcribe, audio-start, the audio in chunks, audio-stop; the events up to ``transcript-stop``."""
    await client.write_event(Transcribe(language="en").event())
    await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
    for i in range(0, len(audio), chunk_bytes):
        await client.write_event(AudioChunk(rate=rate, width=width, channels=channels,
                                            audio=audio[i : i + chunk_bytes]).event())
    await client.write_event(AudioStop().event())
    events = [await read(client)]
    while events[-1].type != "transcript-stop":
        events.append(await read(client))
    return events


def transcript_of(events: list[Event]) -> str:
    """The transcript's text, after checking the stream's shape: start, chunks that add up to the text, stop."""
    types = [e.type for e in events]
    assert types[0] == "transcript-start" and types[-2:] == ["transcript", "transcript-stop"], types
    assert set(types[1:-2]) <= {"transcript-chunk"}, types
    text = Transcript.from_event(events[-2]).text
    chunks = [TranscriptChunk.from_event(e).text for e in events[1:-2]]
    assert "".join(chunks) == text, chunks
    return text


async def test_describe_answers_an_installed_streaming_asr_program(daemon: Serving) -> None:
    """describe → info as Home Assistant reads it: an installed ASR program with the model, its languages,
    transcript streaming; ping → pong."""
    async with AsyncTcpClient("127.0.0.1", daemon.port) as client:
        await client.write_event(Describe().event())
        info = Info.from_event(await read(client))
        await client.write_event(Ping(text="hello").event())
        pong = await read(client)
    assert len(info.asr) == 1 and not info.tts and not info.wake
    program = info.asr[0]
    assert program.name == "streamer" and program.installed and program.supports_transcript_streaming
    assert program.version and program.attribution.name == "streamer" and program.requires_external_vad
    (model,) = program.models
    assert model.name == "streamer-tdt-small" and model.installed and model.languages == ["en"]
    assert "[70,13]" in (model.description or "")  # the daemon's default look-ahead
    assert Pong.is_type(pong.type) and Pong.from_event(pong).text == "hello"


async def test_utterances_on_one_connection_give_the_spoken_words(
    daemon: Serving, spoken: dict[str, tuple[np.ndarray, int]]
) -> None:
    """Two utterances one after the other on one connection, as Home Assistant sends them: each gets its words,
    streamed as chunks that add up to the transcript."""
    async with AsyncTcpClient("127.0.0.1", daemon.port) as client:
        for text in (FIRST, SECOND):
            samples, rate = spoken[text]
            events = await utterance(client, pcm(samples, 2), rate)
            check_words(transcript_of(events), text)
            assert Transcript.from_event(events[-2]).language == "en"


async def test_chunks_stream_while_the_audio_comes(daemon: Serving, spoken: dict[str, tuple[np.ndarray, int]]) -> None:
    """Before audio-stop the client already has transcript-start and words in transcript-chunk events; after it,
    the rest of the chunks, then the transcript they add up to."""
    samples, rate = spoken[SECOND]
    audio = pcm(np.concatenate([samples, np.zeros(rate // 2, np.float32)]), 2)
    async with AsyncTcpClient("127.0.0.1", daemon.port) as client:
        await client.write_event(AudioStart(rate=rate, width=2, channels=1).event())
        await client.write_event(AudioChunk(rate=rate, width=2, channels=1, audio=audio).event())
        events = [await read(client)]
        while events[-1].type != "transcript-chunk":  # no audio-stop yet: only streaming can bring these
            events.append(await read(client))
        early = TranscriptChunk.from_event(events[-1]).text
        await client.write_event(AudioStop().event())
        while events[-1].type != "transcript-stop":
            events.append(await read(client))
    assert early.split()[0] in SECOND.split()
    check_words(transcript_of(events), SECOND)


@pytest.mark.parametrize(
    ("width", "rate", "channels"),
    [(1, 16000, 2), (4, 48000, 3), (2, 44100, 2)],
    ids=["u8-16k-stereo", "s32-48k-3ch", "s16-44k-stereo"],
)
async def test_any_width_rate_and_channel_count_is_converted(
    daemon: Serving, spoken: dict[str, tuple[np.ndarray, int]], width: int, rate: int, channels: int
) -> None:
    """The declared format goes through the core's audio path: resampled, channels mixed down (the speech is in
    the first channel only, the others are silent)."""
    samples, espeak_rate = spoken[FIRST]
    mono = soxr.resample(samples, espeak_rate, rate)
    frames = np.zeros((len(mono), channels), dtype=np.float32)
    frames[:, 0] = mono
    async with AsyncTcpClient("127.0.0.1", daemon.port) as client:
        events = await utterance(client, pcm(frames, width), rate, width, channels)
    check_words(transcript_of(events), FIRST)


async def test_bad_input_gets_wyoming_errors_and_every_connection_goes_on(
    daemon: Serving, spoken: dict[str, tuple[np.ndarray, int]]
) -> None:
    """Each bad input gets an ``error`` {text, code}; the same connection then transcribes, and an utterance on
    another connection that was open meanwhile loses nothing."""
    samples, rate = spoken[FIRST]
    audio = pcm(samples, 2)
    half = len(audio) // 2 & ~1
    async with AsyncTcpClient("127.0.0.1", daemon.port) as other, AsyncTcpClient("127.0.0.1", daemon.port) as bad:
        await other.write_event(AudioStart(rate=rate, width=2, channels=1).event())
        await other.write_event(AudioChunk(rate=rate, width=2, channels=1, audio=audio[:half]).event())
        seen = await send_bad_input(bad, rate)
        await other.write_event(AudioChunk(rate=rate, width=2, channels=1, audio=audio[half:]).event())
        await other.write_event(AudioStop().event())
        events = [await read(other)]
        while events[-1].type != "transcript-stop":
            events.append(await read(other))
        check_words(transcript_of(events), FIRST)
        check_words(transcript_of(await utterance(bad, audio, rate)), FIRST)
    print(json.dumps(seen, indent=1))  # what a client sees, for the note (pytest -s)


async def send_bad_input(client: AsyncTcpClient, rate: int) -> dict[str, Any]:
    """Every kind of bad input, each checked for its error; returns what the client saw, by case."""
    seen: dict[str, Any] = {}
    writer = client._writer  # bytes that the client's own encoder would never produce
    assert writer is not None

    async def raw(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    async def in_step() -> None:
        await client.write_event(Describe().event())
        assert Info.is_type((await read(client)).type)

    async def expect(case: str, code: str, *words: str) -> None:
        error = await read_error(client)
        seen[case] = {"code": error.code, "text": error.text}
        assert error.code == code and all(w in error.text for w in words), (case, error)

    await client.write_event(Event("frobnicate", {"x": 1}))
    await expect("unknown event type", "unsupported_event", "'frobnicate'", "describe")
    await client.write_event(Event("synthesize", {"text": "hello"}))
    await expect("an event of another service (TTS)", "unsupported_event", "speech-to-text only")
    # After a header that does not parse, the server cannot know where the next event starts: it says so once and
    # skips lines until a header parses (here, each case is followed by a describe to show that it does).
    await raw(b'{"type": "describe", oops\n["describe"]\n{"data": {}}\n')
    await expect("malformed JSON header (and two more bad lines after it)", "bad_event", "one line of JSON")
    await in_step()  # and no error for the two lines after the first
    await raw(b'["describe"]\n')
    await expect("JSON that is no object", "bad_event", "JSON object")
    await in_step()
    await raw(b'{"data": {}}\n')
    await expect("a header without type", "bad_event", "'type'")
    await in_step()
    await raw(b'{"type": "audio-chunk", "payload_length": -5}\n')
    await expect("negative payload_length", "bad_event", "payload_length")
    await in_step()
    block = b'{"lang": }'
    await raw(json.dumps({"type": "transcribe", "data_length": len(block)}).encode() + b"\n" + block)
    await expect("data block that is no JSON", "bad_event", "data block")
    await raw(json.dumps({"type": "audio-chunk", "payload_length": 2 << 20}).encode() + b"\n" + bytes(2 << 20))
    await expect("payload over server.max_frame_bytes", "too_large", "server.max_frame_bytes")
    for _ in range(3):
        await client.write_event(AudioChunk(rate=rate, width=2, channels=1, audio=bytes(640)).event())
    await expect("audio-chunk before audio-start (3 of them: one error)", "no_audio_start", "'audio-start'")
    await client.write_event(AudioStop().event())
    await expect("audio-stop without audio-start", "no_audio_start", "nothing to transcribe")
    await client.write_event(Transcribe(language="de").event())
    await expect("a language the model does not speak", "unsupported_language", "'de'", "'en'")
    for bad_rate, words in ((1, ("1 Hz", "8000")), (10**12, ("1000000000000",)), (0, ("0 Hz",))):
        await client.write_event(AudioStart(rate=bad_rate, width=2, channels=1).event())
        await expect(f"absurd rate {bad_rate}", "unsupported_audio", *words)
        await client.write_event(AudioChunk(rate=bad_rate, width=2, channels=1, audio=bytes(640)).event())
        await client.write_event(AudioStop().event())  # the refused utterance's audio-stop: an empty transcript
        assert Transcript.from_event(await read(client)).text == ""
    await client.write_event(AudioStart(rate=16000, width=3, channels=1).event())
    await expect("24-bit samples", "unsupported_audio", "width 3")
    await client.write_event(AudioStop().event())
    assert Transcript.from_event(await read(client)).text == ""
    await client.write_event(Event("audio-start", {"rate": "fast", "width": 2, "channels": 1}))
    await expect("a rate that is no number", "bad_event", "'rate'")
    await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
    assert (await read(client)).type == "transcript-start"
    await client.write_event(AudioChunk(rate=8000, width=2, channels=1, audio=bytes(640)).event())
    await expect("audio-chunk in another format than audio-start", "bad_audio", "rate 8000")
    await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
    await expect("audio-start inside an utterance", "bad_event", "'audio-stop' first")
    await raw(json.dumps({"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1},
                          "payload_length": 10}).encode() + b"\n" + bytes(100) + b"\n")
    await expect("payload_length shorter than the payload", "bad_event", "one line of JSON")
    await in_step()
    await client.write_event(AudioStop().event())  # silence only: an empty transcript, start and stop
    assert [e.type for e in [await read(client) for _ in range(2)]] == ["transcript", "transcript-stop"]
    return seen


async def test_a_payload_that_never_comes_ends_that_connection_only(daemon: Serving) -> None:
    """payload_length longer than what is sent: after server.idle_timeout_s the client is told what was missing and
    the connection closes; the server takes the next one."""
    async with AsyncTcpClient("127.0.0.1", daemon.port) as client:
        assert client._writer is not None
        client._writer.write(b'{"type": "audio-chunk", "payload_length": 1000}\n' + bytes(10))
        error = await read_error(client)
        assert error.code == "idle_timeout" and "the payload (payload_length)" in error.text, error
        assert "(10 of 1000 bytes came)" in error.text and f"{IDLE_S:g} s" in error.text, error
        async with asyncio.timeout(10 * TIMEOUT):
            assert await client.read_event() is None  # closed
    async with AsyncTcpClient("127.0.0.1", daemon.port) as client:
        await client.write_event(Describe().event())
        assert Info.is_type((await read(client)).type)


@contextlib.asynccontextmanager
async def mqtt_finals(broker: Any) -> AsyncIterator[asyncio.Queue[Any]]:
    import aiomqtt

    queue: asyncio.Queue[Any] = asyncio.Queue()
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe("streamer/den/+/final", qos=1)

        async def collect() -> None:
            async for message in client.messages:
                queue.put_nowait(message)

        task = asyncio.create_task(collect())
        try:
            yield queue
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


async def test_mqtt_zeroconf_and_sigterm(
    tmp_path: Path, mosquitto_broker: Any, spoken: dict[str, tuple[np.ndarray, int]]
) -> None:
    """With zeroconf, a browser finds _wyoming._tcp.local. at the port; a Wyoming utterance's final reaches MQTT
    like any stream's; SIGTERM mid-utterance gives the client the transcript of what it heard, then closes."""
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    samples, rate = spoken[FIRST]
    audio = pcm(samples, 2)
    with serve(tmp_path, "--set", "wyoming.zeroconf=true", "--set", "mqtt.enabled=true", "--set",
               "mqtt.host=127.0.0.1", "--set", f"mqtt.port={mosquitto_broker.port}", "--set",
               "mqtt.device_id=den") as daemon:
        browser_zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        found: asyncio.Queue[str] = asyncio.Queue()

        def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
            found.put_nowait(name)

        browser = AsyncServiceBrowser(browser_zc.zeroconf, "_wyoming._tcp.local.", handlers=[on_change])
        try:
            async with asyncio.timeout(20 * TIMEOUT):
                while True:
                    service = AsyncServiceInfo("_wyoming._tcp.local.", await found.get())
                    if await service.async_request(browser_zc.zeroconf, 3000) and service.port == daemon.port:
                        break
            assert service.name.startswith("streamer-") and service.parsed_addresses() == ["127.0.0.1"]
        finally:
            await browser.async_cancel()
            await browser_zc.async_close()

        async with mqtt_finals(mosquitto_broker) as finals, AsyncTcpClient("127.0.0.1", daemon.port) as client:
            text = transcript_of(await utterance(client, audio, rate))
            async with asyncio.timeout(30 * TIMEOUT):
                message = await finals.get()
            payload = json.loads(message.payload)
            assert str(message.topic).startswith("streamer/den/wyoming-") and payload["text"] == text
            await client.write_event(AudioStart(rate=rate, width=2, channels=1).event())
            await client.write_event(AudioChunk(rate=rate, width=2, channels=1, audio=audio).event())
            events = [await read(client)]  # transcript-start: the utterance is open
            daemon.proc.send_signal(signal.SIGTERM)
            while events[-1].type != "transcript-stop":
                events.append(await read(client))
            check_words(transcript_of(events), FIRST)
            async with asyncio.timeout(30 * TIMEOUT):
                assert await client.read_event() is None  # closed after the transcript
        assert daemon.proc.wait(timeout=60 * TIMEOUT) == 0, daemon.log.read_text()[-3000:]
