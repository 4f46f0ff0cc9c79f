"""Hermes over MQTT end to end: paho-mqtt plays Rhasspy (its dialogue manager and its audio server) against
`streamer serve` with the bundled default model, on a mosquitto broker of the test's own.

Rhasspy's part, as rhasspy-dialogue-hermes and rhasspy-microphone-*-hermes do it: publish ``startListening``
(camelCase JSON), stream ``hermes/audioServer/<siteId>/audioFrame`` WAV frames of about 64 ms at about real time,
wait for ``textCaptured``, then publish ``stopListening``. espeak-ng speaks sentences the model is known to get right.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import soundfile as sf
import soxr

from streamer.errors import ConfigError
from streamer.settings import load_settings
from streamer.training.evaluate import word_error_rate
from tests.fixtures_realpeers import Mosquitto
from tests.serve_process import TIMEOUT, Served, serve
from tests.speech import espeak_sentences

MODEL = Path(__file__).resolve().parents[1] / "models" / "streamer-tdt-small" / "model.nemo"
FIRST, SECOND = "please turn off the lights in the kitchen", "set a timer for ten minutes"
FRAME_S = 0.064  # Rhasspy's audio servers send 1024 samples at 16 kHz per frame
MAX_WER = 0.35  # as tests/test_default_model.py

pytestmark = [
    pytest.mark.slow,
    pytest.mark.broker,
    pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} is missing from this checkout"),
]


@pytest.fixture(scope="module")
def spoken(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[np.ndarray, int]]:
    """Each sentence as float samples at espeak-ng's rate."""
    return espeak_sentences(tmp_path_factory.mktemp("spoken"), (FIRST, SECOND))


def s16_wav(samples: np.ndarray, rate: int) -> bytes:
    """A frame as Rhasspy's audio servers write it: the stdlib's wave, 16-bit mono."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def float_stereo_wav(samples: np.ndarray, rate: int) -> bytes:
    """A frame from another kind of satellite: 32-bit float, two channels (libsndfile writes it)."""
    buffer = io.BytesIO()
    sf.write(buffer, np.repeat(samples[:, None], 2, axis=1), rate, subtype="FLOAT", format="WAV")
    return buffer.getvalue()


class Rhasspy:
    """paho-mqtt on the test's broker: publishes as Rhasspy does, records what comes back."""

    def __init__(self, broker: Mosquitto) -> None:
        self.received: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="rhasspy-test")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port)
        for topic in ("hermes/asr/textCaptured", "hermes/asr/partialTextCaptured", "hermes/error/asr",
                      "rhasspy/asr/#", "streamer/box/+/final"):
            self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.received.append((message.topic, message.payload))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def publish(self, topic: str, payload: bytes | str, qos: int = 0) -> None:
        self.client.publish(topic, payload, qos=qos).wait_for_publish(5)

    def start_listening(self, site: str, session: str, **extra: Any) -> None:
        self.publish("hermes/asr/startListening", json.dumps({"siteId": site, "sessionId": session, **extra}), 1)

    def stop_listening(self, site: str, session: str) -> None:
        self.publish("hermes/asr/stopListening", json.dumps({"siteId": site, "sessionId": session}), 1)

    async def stream(self, site: str, samples: np.ndarray, rate: int, make_wav: Any = s16_wav) -> None:
        """Frames of FRAME_S, each a WAV, paced at about real time (as a microphone delivers them)."""
        step = round(FRAME_S * rate)
        started = time.monotonic()
        for n, i in enumerate(range(0, len(samples), step)):
            self.client.publish(f"hermes/audioServer/{site}/audioFrame", make_wav(samples[i : i + step], rate))
            await asyncio.sleep(max(0.0, started + (n + 1) * FRAME_S * 0.9 - time.monotonic()))

    def of(self, topic: str) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(p) for t, p in self.received if t == topic]

    def raw(self, topic_end: str) -> list[tuple[str, bytes]]:
        with self._lock:
            return [(t, p) for t, p in self.received if t.endswith(topic_end)]

    async def wait_for(self, topic: str, session: str, timeout_s: float = 30.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s * TIMEOUT):
            while True:
                found = [m for m in self.of(topic) if m.get("sessionId") == session]
                if found:
                    return found[0]
                await asyncio.sleep(0.05)


def silence(seconds: float, rate: int) -> np.ndarray:
    return np.zeros(round(seconds * rate), dtype=np.float32)


def check_words(heard: str, said: str) -> None:
    wer, errors, words = word_error_rate([said], [heard])
    assert wer <= MAX_WER, f"{errors}/{words} word errors: heard {heard!r} for {said!r}"


def hermes_daemon(tmp_path: Path, broker: Mosquitto, **settings: str) -> Any:
    env = {"STREAMER_HERMES__ENABLED": "true", "STREAMER_MQTT__HOST": "127.0.0.1",
           "STREAMER_MQTT__PORT": str(broker.port), **settings}
    return serve(tmp_path, env)


async def ready(served: Served) -> None:
    await served.wait_for_log("Hermes: serving")


async def test_rhasspy_gets_the_spoken_words_from_two_sites_at_once(
    tmp_path: Path, mosquitto_broker: Mosquitto, spoken: dict[str, tuple[np.ndarray, int]]
) -> None:
    """Kitchen: Rhasspy's defaults (stopOnSilence), 16-bit mono frames at espeak-ng's 22.05 kHz: the first pause
    ends the session with textCaptured, words, times and confidences, and audioCaptured. Office, at the same time:
    stopOnSilence false, float stereo at 44.1 kHz, two sentences: one textCaptured with both, on stopListening.
    Both are streams like any other: their finals are on the daemon's own MQTT topics too."""
    (first, rate), (second, _) = spoken[FIRST], spoken[SECOND]
    office_rate = 44100
    office = soxr.resample(np.concatenate([first, silence(1.5, rate), second]), rate, office_rate)
    rhasspy = Rhasspy(mosquitto_broker)
    async with hermes_daemon(tmp_path, mosquitto_broker, STREAMER_MQTT__ENABLED="true",
                             STREAMER_MQTT__DEVICE_ID="box") as served:
        await ready(served)
        rhasspy.start_listening("kitchen", "k1", lang="en", sendAudioCaptured=True)
        rhasspy.start_listening("office", "o1", stopOnSilence=False)
        await asyncio.gather(
            rhasspy.stream("kitchen", np.concatenate([silence(0.3, rate), first, silence(2.0, rate)]), rate),
            rhasspy.stream("office", np.concatenate([office, silence(0.5, office_rate)]), office_rate,
                           float_stereo_wav),
        )
        kitchen = await rhasspy.wait_for("hermes/asr/textCaptured", "k1")
        rhasspy.stop_listening("kitchen", "k1")  # as the dialogue manager does after textCaptured
        assert not [m for m in rhasspy.of("hermes/asr/textCaptured") if m["sessionId"] == "o1"]
        rhasspy.stop_listening("office", "o1")
        office_text = await rhasspy.wait_for("hermes/asr/textCaptured", "o1")
        await asyncio.sleep(0.5)  # time for a second textCaptured, which must not come
        captured = rhasspy.raw("/audioCaptured")
        partials = rhasspy.of("hermes/asr/partialTextCaptured")
        texts = rhasspy.of("hermes/asr/textCaptured")
        stream_finals = {site: rhasspy.of(f"streamer/box/hermes-{site}/final") for site in ("kitchen", "office")}
    rhasspy.close()

    check_words(kitchen["text"], FIRST)
    assert kitchen["siteId"] == "kitchen" and kitchen["lang"] == "en"
    assert 0 < kitchen["likelihood"] <= 1 and kitchen["seconds"] > 0
    (tokens,) = kitchen["asrTokens"]
    assert " ".join(t["value"] for t in tokens) == kitchen["text"]
    for token in tokens:
        assert kitchen["text"][token["rangeStart"] : token["rangeEnd"]] == token["value"]
        assert 0 < token["confidence"] <= 1
        assert 0.2 < token["time"]["start"] < token["time"]["end"] < 0.3 + len(first) / rate + 0.3
    check_words(office_text["text"], f"{FIRST} {SECOND}")
    assert office_text["siteId"] == "office" and office_text["lang"] is None
    assert [m["sessionId"] for m in texts].count("k1") == 1 and [m["sessionId"] for m in texts].count("o1") == 1
    assert {p["siteId"] for p in partials} == {"kitchen", "office"}
    assert any(p["text"] and p["sessionId"] == "o1" and SECOND.split()[0] in p["text"] for p in partials)
    (topic, wav_payload), = captured
    assert topic == "rhasspy/asr/kitchen/k1/audioCaptured"
    audio, captured_rate = sf.read(io.BytesIO(wav_payload), dtype="float32")
    assert captured_rate == rate and len(audio) > len(first)
    assert not rhasspy.of("hermes/error/asr")
    assert stream_finals["kitchen"][0]["text"] == kitchen["text"]
    assert " ".join(f["text"] for f in stream_finals["office"]) == office_text["text"]


async def test_bad_input_gets_hermes_errors_and_the_other_sites_keep_working(
    tmp_path: Path, mosquitto_broker: Mosquitto, spoken: dict[str, tuple[np.ndarray, int]]
) -> None:
    """Each bad message gets hermes/error/asr saying what is wrong (a frame problem once per session); a toggled-off
    site's audio is ignored; every startListening still gets its one textCaptured; the kitchen meanwhile gets its
    words."""
    (first, rate), (second, _) = spoken[FIRST], spoken[SECOND]
    rhasspy = Rhasspy(mosquitto_broker)
    async with hermes_daemon(tmp_path, mosquitto_broker, STREAMER_SERVER__IDLE_TIMEOUT_S="3") as served:
        await ready(served)
        rhasspy.publish("hermes/asr/startListening", b"{not json", 1)
        rhasspy.publish("hermes/asr/startListening", json.dumps({"siteId": "garage", "stopOnSilence": "yes"}), 1)
        rhasspy.publish("hermes/asr/stopListening", b"[1, 2]", 1)
        rhasspy.start_listening("kitchen", "k2")
        rhasspy.start_listening("garage", "g1")
        rhasspy.start_listening("attic", "a1")
        rhasspy.start_listening("hall", "h1", stopOnSilence=False)
        rhasspy.start_listening("cellar", "c1")  # no audio at all: idle after 3 s
        rhasspy.publish("hermes/asr/toggleOff", json.dumps({"siteId": "hall", "reason": "ttsSay"}), 1)

        async def garage() -> None:
            rhasspy.publish("hermes/audioServer/garage/audioFrame", b"\x00\x01" * 512)  # raw PCM, no WAV header
            rhasspy.publish("hermes/audioServer/garage/audioFrame", b"RIFF-not-really")
            await rhasspy.stream("garage", silence(0.3, rate), rate)
            await rhasspy.stream("garage", silence(0.3, 16000), 16000)  # another rate mid-session
            rhasspy.stop_listening("garage", "g1")

        async def attic() -> None:
            await rhasspy.stream("attic", silence(0.5, 96000), 96000)  # a rate the core does not take
            rhasspy.stop_listening("attic", "a1")

        async def hall() -> None:
            await rhasspy.stream("hall", first, rate)  # while toggled off: ignored
            rhasspy.publish("hermes/asr/toggleOn", json.dumps({"siteId": "hall", "reason": "ttsSay"}), 1)
            await rhasspy.stream("hall", np.concatenate([second, silence(0.3, rate)]), rate)  # heard again
            rhasspy.stop_listening("hall", "h1")

        await asyncio.gather(
            rhasspy.stream("kitchen", np.concatenate([silence(0.3, rate), first, silence(2.0, rate)]), rate),
            garage(), attic(), hall(),
        )
        kitchen = await rhasspy.wait_for("hermes/asr/textCaptured", "k2")
        captured = {s: await rhasspy.wait_for("hermes/asr/textCaptured", s) for s in ("g1", "a1", "h1", "c1")}
        errors = rhasspy.of("hermes/error/asr")
    rhasspy.close()

    check_words(kitchen["text"], FIRST)
    check_words(captured["h1"]["text"], SECOND)  # the first sentence came while the hall was toggled off
    assert {s: m["text"] for s, m in captured.items() if s != "h1"} == {"g1": "", "a1": "", "c1": ""}
    by_context: dict[str, list[dict[str, Any]]] = {}
    for e in errors:
        by_context.setdefault(e["context"], []).append(e)
    assert set(by_context) == {"hermes/asr/startListening", "hermes/asr/stopListening", "bad_frame",
                               "format_changed", "unsupported_audio", "idle_timeout"}, errors
    bad_json, bad_type = by_context["hermes/asr/startListening"]
    assert "not valid JSON" in bad_json["error"] and bad_json["siteId"] is None
    assert "'stopOnSilence' must be true or false" in bad_type["error"] and bad_type["siteId"] == "garage"
    assert "must be a JSON object" in by_context["hermes/asr/stopListening"][0]["error"]
    (frame,) = by_context["bad_frame"]  # two bad frames, said once
    assert "not a WAV file" in frame["error"] and (frame["siteId"], frame["sessionId"]) == ("garage", "g1")
    (changed,) = by_context["format_changed"]
    assert "16000 Hz" in changed["error"] and "22050 Hz" in changed["error"] and changed["sessionId"] == "g1"
    (rate_error,) = by_context["unsupported_audio"]
    assert "96000" in rate_error["error"] and rate_error["sessionId"] == "a1"
    (idle,) = by_context["idle_timeout"]
    assert idle["sessionId"] == "c1" and "no audio frame for 3 s" in idle["error"]
    assert "k2" not in {e["sessionId"] for e in errors}


async def test_sigterm_flushes_an_open_session_as_text_captured(
    tmp_path: Path, mosquitto_broker: Mosquitto, spoken: dict[str, tuple[np.ndarray, int]]
) -> None:
    """A session still listening when the daemon is stopped gets its textCaptured, with the words, before exit 0.
    With hermes.site_ids, another site's startListening and audio are left alone."""
    first, rate = spoken[FIRST]
    rhasspy = Rhasspy(mosquitto_broker)
    async with hermes_daemon(tmp_path, mosquitto_broker, STREAMER_HERMES__SITE_IDS='["den"]') as served:
        await ready(served)
        rhasspy.start_listening("den", "d1", stopOnSilence=False)
        rhasspy.start_listening("porch", "p1", stopOnSilence=False)
        utterance = np.concatenate([silence(0.3, rate), first, silence(0.2, rate)])
        await asyncio.gather(rhasspy.stream("den", utterance, rate), rhasspy.stream("porch", utterance, rate))
        assert not rhasspy.of("hermes/asr/textCaptured")
        assert await served.terminate() == 0
    captured = await rhasspy.wait_for("hermes/asr/textCaptured", "d1", timeout_s=5)
    rhasspy.close()
    check_words(captured["text"], FIRST)
    assert [m["sessionId"] for m in rhasspy.of("hermes/asr/textCaptured")] == ["d1"]
    assert "hermes-porch" not in served.log.read_text()


@pytest.mark.parametrize("site", ["", "a/b", "a+", "#", "a\0b"])
def test_a_site_id_that_is_no_topic_level_is_a_config_error(site: str) -> None:
    with pytest.raises(ConfigError, match="hermes.site_ids"):
        load_settings(overrides={"hermes": {"site_ids": ["kitchen", site]}})
