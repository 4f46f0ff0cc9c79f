"""Hotwords through the protocols, end to end: `streamer serve` (bundled model, Vosk and Wyoming on) as a subprocess,
each protocol's own client passing a name the model mishears without it, and bad lists answered in each protocol's
own error shape while the sessions go on.

espeak-ng says "call barnaby tomorrow"; without hotwords the bundled model writes "barnaby" as "barna betty"
(tests/test_hotwords_model.py), with "Barnaby" listed it gets it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import websockets
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error

from tests.fixtures_realpeers import free_port
from tests.serve_process import TIMEOUT, Served, serve

MODEL = Path(__file__).resolve().parents[1] / "models" / "streamer-tdt-small" / "model.nemo"
SAID, NAME = "call barnaby tomorrow", "barnaby"
MAX_HOTWORDS = 5  # the test daemon's engine.max_hotwords

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} is missing from this checkout"),
]


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int]:
    """The sentence as s16le at espeak-ng's own rate (22.05 kHz: the server resamples)."""
    path = tmp_path_factory.mktemp("spoken") / "said.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), SAID], check=True)
    data, rate = sf.read(path, dtype="int16")
    return np.concatenate([data, np.zeros(rate // 2, dtype=np.int16)]).tobytes(), rate


async def timed(awaitable: Any) -> Any:
    async with asyncio.timeout(60 * TIMEOUT):
        return await awaitable


async def listen(port: int, start: dict[str, Any], audio: bytes) -> list[dict[str, Any]]:
    """One protocol v1 session: start, the audio, stop; every message up to ``end``."""
    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/listen") as ws:
        await ws.send(json.dumps({"type": "start", "encoding": "pcm_s16le", **start}))
        messages = [json.loads(await timed(ws.recv()))]
        if messages[0]["type"] != "ready":
            return messages
        for i in range(0, len(audio), 8192):
            await ws.send(audio[i : i + 8192])
        await ws.send(json.dumps({"type": "stop"}))
        while messages[-1]["type"] != "end":
            messages.append(json.loads(await timed(ws.recv())))
    return messages


def words_of(messages: list[dict[str, Any]]) -> list[str]:
    return " ".join(m["text"] for m in messages if m["type"] == "final").split()


async def test_protocol_v1(tmp_path: Path, speech: tuple[bytes, int]) -> None:
    """``start.hotwords`` boosts the name and ``ready`` reports it; a session without them is as before; a phrase
    the model cannot spell is named in warning ``hotwords_ignored``; bad lists get ``bad_message`` and the same
    connection then starts with a corrected ``start``."""
    audio, rate = speech
    async with serve(tmp_path, {"STREAMER_ENGINE__MAX_HOTWORDS": str(MAX_HOTWORDS)}) as daemon:
        boosted = await listen(daemon.port, {"sample_rate": rate, "hotwords": [" Barnaby ", "ΩΩ"]}, audio)
        plain = await listen(daemon.port, {"sample_rate": rate}, audio)
        async with websockets.connect(f"ws://127.0.0.1:{daemon.port}/v1/listen") as ws:
            bad = []
            for start in ({"hotwords": "barnaby"}, {"hotwords": ["a", "b", "c", "d", "e", "f"]},
                          {"hotwords": ["x" * 101]}, {"hotwords": ["barnaby"], "hotword_weight": 11}):
                await ws.send(json.dumps({"type": "start", "sample_rate": rate, "encoding": "pcm_s16le", **start}))
                bad.append(json.loads(await timed(ws.recv())))
            await ws.send(json.dumps({"type": "start", "sample_rate": rate, "encoding": "pcm_s16le",
                                      "hotwords": ["barnaby"], "hotword_weight": 2}))
            corrected = json.loads(await timed(ws.recv()))
    ready = boosted[0]
    assert ready["type"] == "ready" and ready["hotwords"] == ["Barnaby"] and ready["hotword_weight"] == 1.0
    warning = next(m for m in boosted if m["type"] == "warning")
    assert warning["code"] == "hotwords_ignored" and "'ΩΩ'" in warning["message"]
    assert NAME in words_of(boosted), words_of(boosted)
    assert plain[0]["type"] == "ready" and "hotwords" not in plain[0] and "hotword_weight" not in plain[0]
    assert NAME not in words_of(plain) and "call" in words_of(plain)
    assert [m["type"] for m in bad] == ["error"] * 4 and {m["code"] for m in bad} == {"bad_message"}
    assert "list of strings" in bad[0]["message"] and "engine.max_hotwords" in bad[1]["message"]
    assert "101 characters" in bad[2]["message"] and "hotword_weight" in bad[3]["message"]
    assert corrected["type"] == "ready" and corrected["hotwords"] == ["barnaby"] and corrected["hotword_weight"] == 2


async def vosk(port: int, config: dict[str, Any], audio: bytes) -> tuple[list[dict[str, Any]], int | None]:
    """vosk-server's test client: config, audio in 0.2 s messages (one reply each), eof; replies and close code."""
    replies = []
    async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
        await ws.send(json.dumps({"config": config}))
        step = 2 * int(config["sample_rate"] * 0.2)
        try:
            for i in range(0, len(audio), step):
                await ws.send(audio[i : i + step])
                replies.append(json.loads(await timed(ws.recv())))
            await ws.send('{"eof" : 1}')
            replies.append(json.loads(await timed(ws.recv())))
        except websockets.ConnectionClosed:
            pass
        await timed(ws.wait_closed())
    return replies, ws.close_code


async def wyoming(port: int, audio: bytes, rate: int, **lists: list[str]) -> tuple[str, list[Error]]:
    """One utterance through the wyoming package's client; its transcript and the error events before it."""
    client = AsyncTcpClient("127.0.0.1", port)
    await client.connect()
    try:
        await client.write_event(Transcribe(language="en", **lists).event())  # type: ignore[arg-type]
        await client.write_event(AudioStart(rate=rate, width=2, channels=1).event())
        for i in range(0, len(audio), 4096):
            await client.write_event(AudioChunk(rate=rate, width=2, channels=1, audio=audio[i : i + 4096]).event())
        await client.write_event(AudioStop().event())
        errors = []
        while True:
            event = await timed(client.read_event())
            assert event is not None, "the server closed the connection"
            if Error.is_type(event.type):
                errors.append(Error.from_event(event))
            elif Transcript.is_type(event.type):
                return Transcript.from_event(event).text, errors
    finally:
        await client.disconnect()


async def test_vosk_and_wyoming(tmp_path: Path, speech: tuple[bytes, int]) -> None:
    """Vosk's ``phrase_list`` (its "[unk]" entry left out) and Wyoming's ``transcript_names``/``transcript_terms``
    boost the name; too long a phrase list closes a Vosk connection with an error (what vosk-server does with a bad
    config), while Wyoming keeps the first ones (names first), says so, and transcribes."""
    audio, rate = speech
    vosk_port, wyoming_port = free_port(), free_port()
    env = {"STREAMER_ENGINE__MAX_HOTWORDS": str(MAX_HOTWORDS), "STREAMER_VOSK__ENABLED": "true",
           "STREAMER_VOSK__PORT": str(vosk_port), "STREAMER_WYOMING__ENABLED": "true",
           "STREAMER_WYOMING__PORT": str(wyoming_port)}
    async with serve(tmp_path, env) as daemon:
        await daemon.wait_for_log("wyoming")
        vosk_boosted, _ = await vosk(vosk_port, {"sample_rate": rate, "phrase_list": [NAME, "[unk]"]}, audio)
        vosk_refused, code = await vosk(vosk_port, {"sample_rate": rate, "phrase_list": list("abcdef")}, audio)
        names, names_errors = await wyoming(wyoming_port, audio, rate, transcript_names=["Barnaby"])
        plain, _ = await wyoming(wyoming_port, audio, rate)
        many, many_errors = await wyoming(wyoming_port, audio, rate, transcript_names=["Barnaby"],
                                          transcript_terms=list("abcdefg"))
        await check_alive(daemon)
    assert NAME in " ".join(r.get("text", "") for r in vosk_boosted).split()
    assert code == 1007 and "engine.max_hotwords" in vosk_refused[-1]["error"]
    assert NAME in names.split() and not names_errors
    assert NAME not in plain.split()
    assert NAME in many.split() and [e.code for e in many_errors] == ["too_many_hotwords"]


async def check_alive(daemon: Served) -> None:
    """The daemon still answers after every session above."""
    async with websockets.connect(f"ws://127.0.0.1:{daemon.port}/v1/listen") as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le"}))
        assert json.loads(await timed(ws.recv()))["type"] == "ready"


@pytest.mark.filterwarnings(r"ignore:websockets\.\S+ is deprecated:DeprecationWarning")  # deepgram-sdk's async
@pytest.mark.filterwarnings("ignore:websockets.legacy is deprecated:DeprecationWarning")  # client is websockets' legacy
async def test_deepgram_keyterm_and_openai_prompt(tmp_path: Path, speech: tuple[bytes, int]) -> None:
    """Deepgram's ``keyterm`` (through ``deepgram-sdk``) and OpenAI's ``prompt`` (through the ``openai`` SDK) become
    the session's hotwords: the name comes out with them and not without; a suppressing ``keywords`` entry (negative
    intensifier) is left out rather than boosted, and a keyterm list over the cap is refused with HTTP 400."""
    import io

    from deepgram import AsyncDeepgramClient, DeepgramClientEnvironment
    from deepgram.core.api_error import ApiError
    from deepgram.core.events import EventType
    from openai import OpenAI

    audio, rate = speech
    wav = io.BytesIO()
    sf.write(wav, np.frombuffer(audio, dtype=np.int16), rate, format="WAV", subtype="PCM_16")
    async with serve(tmp_path, {"STREAMER_ENGINE__MAX_HOTWORDS": str(MAX_HOTWORDS)}) as daemon:
        http, ws = f"http://127.0.0.1:{daemon.port}", f"ws://127.0.0.1:{daemon.port}"
        client = AsyncDeepgramClient(api_key="unused", environment=DeepgramClientEnvironment(
            base=http, production=ws, agent=ws, agent_rest=http))

        async def deepgram(**query: Any) -> list[str]:
            finals: list[str] = []
            closed = asyncio.Event()

            def on_message(message: Any) -> None:
                data = message.dict()
                if data.get("type") == "Results" and data.get("is_final"):
                    finals.append(data["channel"]["alternatives"][0]["transcript"])
                elif data.get("type") == "Metadata":
                    closed.set()

            async with client.listen.v1.connect(model="nova-3", encoding="linear16", sample_rate=str(rate),
                                                **query) as conn:
                conn.on(EventType.MESSAGE, on_message)
                listening = asyncio.create_task(conn.start_listening())
                await conn.send_media(audio)
                await conn.send_close_stream()
                await timed(closed.wait())
                listening.cancel()
            return " ".join(finals).split()

        boosted = await deepgram(keyterm="Barnaby")
        suppressed = await deepgram(keywords="Barnaby:-5")
        with pytest.raises(ApiError) as refused:
            await deepgram(keyterm=[f"name{i}" for i in range(MAX_HOTWORDS + 1)])

        sdk = OpenAI(api_key="unused", base_url=f"{http}/v1", max_retries=0, timeout=120 * TIMEOUT)

        def openai(**form: Any) -> list[str]:
            wav.seek(0)
            return sdk.audio.transcriptions.create(file=("said.wav", wav), model="whisper-1", **form).text.split()

        prompted = await asyncio.to_thread(openai, prompt="Barnaby, Reginald")
        plain = await asyncio.to_thread(openai)
    assert NAME in boosted, boosted
    assert NAME not in suppressed, suppressed
    assert refused.value.status_code == 400
    assert NAME in prompted, prompted
    assert NAME not in plain, plain
