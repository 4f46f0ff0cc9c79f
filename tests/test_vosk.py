"""The Vosk server protocol end to end: websockets clients written like vosk-server's own ``websocket/test.py``
against `streamer serve` with the bundled default model, espeak-ng speech.

vosk-server's client: connect to ``ws://host:2700``, send ``{ "config" : { "sample_rate" : RATE } }``, then 0.2 s of
s16le audio per message, reading one reply after each, then ``{"eof" : 1}`` and one last reply. The daemon here has
an access token, so every URL carries ``?token=``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamer.training.evaluate import word_error_rate
from tests.fixtures_realpeers import Mosquitto, free_port
from tests.serve_process import TIMEOUT, serve
from tests.speech import espeak_sentences

MODEL = Path(__file__).resolve().parents[1] / "models" / "streamer-tdt-small" / "model.nemo"
FIRST, SECOND = "please turn off the lights in the kitchen", "set a timer for ten minutes"
TOKEN = "vosk-test-token"
MAX_WER = 0.35  # as tests/test_default_model.py

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} is missing from this checkout"),
]


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int]:
    """Both sentences with 1.5 s between them, s16le at espeak-ng's 22.05 kHz."""
    spoken = espeak_sentences(tmp_path_factory.mktemp("spoken"), (FIRST, SECOND), dtype="int16")
    rate = spoken[FIRST][1]
    gap = np.zeros(round(1.5 * rate), dtype=np.int16)
    return np.concatenate([part for data, _ in spoken.values() for part in (data, gap)]).tobytes(), rate


def vosk_env(port: int, **extra: str) -> dict[str, str]:
    return {"STREAMER_VOSK__ENABLED": "true", "STREAMER_VOSK__PORT": str(port),
            "STREAMER_SERVER__AUTH_TOKENS": json.dumps([TOKEN]), **extra}


def url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/?token={TOKEN}"


async def vosk_test_client(uri: str, pcm: bytes, rate: int | None, config: dict[str, Any] | None = None,
                           chunk_bytes: int | None = None, realtime: bool = False) -> list[dict[str, Any]]:
    """vosk-server's test.py: config, 0.2 s messages each answered by one reply, eof, the last reply; with
    ``realtime``, a message every 0.2 s as a microphone client sends them.

    Returns every reply; asserts one reply per message (none for the config) and the server's close after eof.
    """
    replies = []
    async with websockets.connect(uri) as websocket:
        if rate is not None:
            await websocket.send(json.dumps({"config": {"sample_rate": rate, **(config or {})}}))
        buffer_size = chunk_bytes or 2 * int((rate or 16000) * 0.2)
        started = asyncio.get_running_loop().time()
        for n, i in enumerate(range(0, len(pcm), buffer_size)):
            await websocket.send(pcm[i : i + buffer_size])
            replies.append(json.loads(await websocket.recv()))
            if realtime:
                await asyncio.sleep(max(0.0, started + (n + 1) * 0.2 - asyncio.get_running_loop().time()))
        await websocket.send('{"eof" : 1}')
        replies.append(json.loads(await websocket.recv()))
        async with asyncio.timeout(10 * TIMEOUT):
            await websocket.wait_closed()
        assert websocket.close_code == 1000
    assert len(replies) == len(range(0, len(pcm), buffer_size)) + 1
    return replies


def heard(replies: list[dict[str, Any]]) -> str:
    return " ".join(r["text"] for r in replies if r.get("text"))


def check_words(text: str, said: str) -> None:
    wer, errors, words = word_error_rate([said], [text])
    assert wer <= MAX_WER, f"{errors}/{words} word errors: heard {text!r} for {said!r}"


@pytest.mark.broker
async def test_vosk_clients_get_the_spoken_words(tmp_path: Path, speech: tuple[bytes, int],
                                                 mosquitto_broker: Mosquitto) -> None:
    """words on (vosk-server's default), sent in real time: partials, then a result with conf/start/end/word per
    utterance; sent as fast as replies come (the others): every final not yet sent comes with eof's reply. words
    off: text only; max_alternatives: Vosk's alternatives shape; no config: the rate of vosk.sample_rate. Four
    clients at once. Their sessions are streams like any other: their finals are on the daemon's MQTT topics."""
    pcm, rate = speech
    port = free_port()
    published: list[tuple[str, dict[str, Any]]] = []
    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    watcher.on_message = lambda client, userdata, m: published.append((m.topic, json.loads(m.payload)))
    watcher.connect("127.0.0.1", mosquitto_broker.port)
    watcher.subscribe("streamer/box/+/final", qos=1)
    watcher.loop_start()
    env = vosk_env(port, STREAMER_VOSK__SAMPLE_RATE=str(rate), STREAMER_MQTT__ENABLED="true",
                   STREAMER_MQTT__HOST="127.0.0.1", STREAMER_MQTT__PORT=str(mosquitto_broker.port),
                   STREAMER_MQTT__DEVICE_ID="box")
    async with serve(tmp_path, env):
        default, plain, alternatives, unconfigured = await asyncio.gather(
            vosk_test_client(url(port), pcm, rate, realtime=True),
            vosk_test_client(url(port), pcm, rate, {"words": False}),
            vosk_test_client(url(port), pcm, rate, {"max_alternatives": 3, "phrase_list": ["kitchen"]}),
            vosk_test_client(url(port), pcm, None, chunk_bytes=2 * int(rate * 0.2)),
        )
    finals = [r for r in default if "text" in r]
    assert len(finals) >= 2 and all(set(r) <= {"partial", "text", "result"} for r in default)
    assert any(r.get("partial") for r in default)
    check_words(heard(default), f"{FIRST} {SECOND}")
    words = [w for r in finals for w in r.get("result", [])]
    assert " ".join(w["word"] for w in words) == heard(default)
    assert all(set(w) == {"conf", "start", "end", "word"} and 0 < w["conf"] <= 1 for w in words)
    assert all(a["start"] < a["end"] <= b["start"] for a, b in zip(words, words[1:], strict=False))
    assert words[-1]["end"] <= len(pcm) / 2 / rate

    assert all("result" not in r for r in plain)
    check_words(heard(plain), f"{FIRST} {SECOND}")
    picked = [r["alternatives"] for r in alternatives if "alternatives" in r]
    assert picked and all(len(a) == 1 and 0 < a[0]["confidence"] <= 1 for a in picked)
    check_words(" ".join(a[0]["text"] for a in picked if a[0]["text"]), f"{FIRST} {SECOND}")
    assert all(set(w) == {"start", "end", "word"} for a in picked for w in a[0].get("result", []))
    check_words(heard(unconfigured), f"{FIRST} {SECOND}")
    watcher.loop_stop()
    watcher.disconnect()
    streams = {topic.split("/")[2] for topic, _ in published}
    assert len(streams) == 4 and all(s.startswith("vosk-") for s in streams), streams
    assert sum(f["text"] == finals[0]["text"] for _, f in published) >= 1


async def expect_close(websocket: Any) -> tuple[list[dict[str, Any]], int | None, str | None]:
    """The replies until the server closes, and its close code and reason."""
    replies = []
    try:
        async with asyncio.timeout(10 * TIMEOUT):
            while True:
                replies.append(json.loads(await websocket.recv()))
    except ConnectionClosed:
        pass
    return replies, websocket.close_code, websocket.close_reason


async def test_bad_input_gets_an_error_and_a_close_and_other_sessions_keep_working(
    tmp_path: Path, speech: tuple[bytes, int]
) -> None:
    pcm, rate = speech
    port = free_port()
    seen: dict[str, Any] = {}
    async with serve(tmp_path, vosk_env(port)):

        async def bad_config() -> None:
            async with websockets.connect(url(port)) as ws:
                await ws.send('{"config" : {"sample_rate" : 16000')
                seen["bad_json"] = await expect_close(ws)
            async with websockets.connect(url(port)) as ws:
                await ws.send('{"config" : {"sample_rate" : "fast"}}')
                seen["bad_type"] = await expect_close(ws)
            async with websockets.connect(url(port)) as ws:
                await ws.send('{"config" : {"sample_rate" : 1e9}}')
                seen["absurd_rate"] = await expect_close(ws)
            async with websockets.connect(url(port)) as ws:
                await ws.send('{"config" : {"sample_rate" : 4000}}')
                await ws.send(bytes(800))
                seen["low_rate"] = await expect_close(ws)

        async def odd_bytes_and_chatter() -> None:
            async with websockets.connect(url(port)) as ws:
                await ws.send(json.dumps({"config": {"sample_rate": rate}}))
                await ws.send('{"hello" : 1}')
                seen["unknown"] = json.loads(await ws.recv())
                replies = []
                for i in range(0, len(pcm), 4411):  # an odd number of bytes per message
                    await ws.send(pcm[i : i + 4411])
                    replies.append(json.loads(await ws.recv()))
                await ws.send('{"reset" : 1}')
                replies.append(json.loads(await ws.recv()))
                await ws.send('{"eof":1}')  # other spacing than vosk-server's literal
                replies.append(json.loads(await ws.recv()))
                seen["odd"] = replies

        async def refused_without_token() -> None:
            with pytest.raises(InvalidStatus) as refused:
                async with websockets.connect(f"ws://127.0.0.1:{port}/"):
                    pass
            seen["no_token"] = refused.value.response.status_code

        good, *_ = await asyncio.gather(vosk_test_client(url(port), pcm, rate), bad_config(),
                                        odd_bytes_and_chatter(), refused_without_token())

    check_words(heard(good), f"{FIRST} {SECOND}")
    check_words(heard(seen["odd"]), f"{FIRST} {SECOND}")
    assert seen["unknown"] == {"error": seen["unknown"]["error"]} and "unknown message" in seen["unknown"]["error"]
    assert seen["no_token"] == 401
    for case, words in (("bad_json", "not valid JSON"), ("bad_type", "'sample_rate' must be a whole number"),
                        ("absurd_rate", "unsupported sample rate 1000000000 Hz"),
                        ("low_rate", "unsupported sample rate 4000 Hz")):
        replies, code, reason = seen[case]
        assert code == 1007, (case, code, reason)
        assert len(replies) == 1 and words in replies[0]["error"], (case, replies)
        assert reason and words[:20] in reason


async def test_sigterm_sends_the_last_final_then_closes_1001(tmp_path: Path, speech: tuple[bytes, int]) -> None:
    """The daemon stops mid-utterance: the client gets that utterance's final as a last reply, then 1001."""
    pcm, rate = speech
    first_only = pcm[: 2 * int(rate * 2.4)]  # the first sentence without the pause after it: no final yet
    port = free_port()
    async with serve(tmp_path, vosk_env(port)) as served:
        async with websockets.connect(url(port)) as ws:
            await ws.send(json.dumps({"config": {"sample_rate": rate}}))
            before = []
            for i in range(0, len(first_only), 8820):
                await ws.send(first_only[i : i + 8820])
                before.append(json.loads(await ws.recv()))
            assert not heard(before)
            assert await served.terminate() == 0
            replies, code, _ = await expect_close(ws)
    assert code == 1001
    assert len(replies) == 1
    check_words(heard(replies), FIRST)
