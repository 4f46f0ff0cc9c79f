"""The clients in clients/ and `streamer mic`, run as programs against real peers.

A stand-in WebSocket server checks what ws_client.py puts on the wire; the real daemon (tiny random
model: garbage words, but tokens flow) and a real mosquitto check what the clients print; the
PulseAudio virtual microphone feeds the mic demo. Clients must never import torch: each run is
started with ``-X importtime`` and its import list is checked.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.server import ServerConnection, serve

from streamer import mic_command
from streamer.errors import ConfigError
from streamer.mic_remote import listen_url
from streamer.protocol import End, Final, Partial, Ready, WordTiming
from streamer.terminal_captions import CLEAR_LINE, DIM, NORMAL, Captions
from tests.test_daemon import daemon  # noqa: F401  (the fixture that starts `streamer serve`)

TIMEOUT = float(os.environ.get("STREAMER_TEST_TIMEOUT_FACTOR", "1"))
CLIENTS = Path(__file__).parents[1] / "clients"


def imported_modules(stderr: str) -> set[str]:
    """Top-level package names from ``-X importtime`` output."""
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


def without_importtime(stderr: str) -> str:
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("import time:"))


async def start_client(script: str, *args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    """``python -X importtime clients/<script> args...`` with pipes."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-X", "importtime", str(CLIENTS / script), *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip


async def finish(proc: asyncio.subprocess.Process, seconds: float = 60) -> tuple[int, str, str]:
    """Wait for the process (killing it after ``seconds``): exit status, stdout, stderr (imports checked)."""
    try:
        async with asyncio.timeout(seconds * TIMEOUT):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        pytest.fail(f"client still running after {seconds} s:\n{out.decode()}\n{without_importtime(err.decode())}")
    stderr = err.decode()
    return int(proc.returncode or 0), out.decode(), stderr


async def read_line_until(stream: asyncio.StreamReader, predicate: Any, seconds: float = 30) -> list[str]:
    """Lines read until one satisfies ``predicate`` (that one included)."""
    lines: list[str] = []
    async with asyncio.timeout(seconds * TIMEOUT):
        while True:
            raw = await stream.readline()
            if not raw:
                raise AssertionError(f"stream ended before the expected line; read: {lines}")
            line = raw.decode().rstrip("\n")
            if not line.startswith("import time:"):
                lines.append(line)
                if predicate(line):
                    return lines


# ---------------------------------------------------------------- terminal output


def test_captions_rewrite_the_partial_in_place_and_scroll_finals() -> None:
    """On a terminal: \\r + clear-to-EOL partials (unstable part dimmed, tail that fits), finals on their own line."""
    out, err = io.StringIO(), io.StringIO()
    captions = Captions(out, err, inplace=True, width=20)
    captions.show(Partial("mic", 0, "hello wor", "hello", 0.0, 1.0))
    assert out.getvalue() == CLEAR_LINE + "hello" + DIM + " wor" + NORMAL
    captions.status("reconnecting")
    assert err.getvalue() == "reconnecting\n"
    assert out.getvalue().endswith(CLEAR_LINE + "hello" + DIM + " wor" + NORMAL)  # redrawn after the status line
    out.truncate(0), out.seek(0)
    captions.show(Partial("mic", 0, "x" * 30, "x" * 30, 0.0, 2.0))
    assert out.getvalue() == CLEAR_LINE + "…" + "x" * 18  # one line: a wrapped line could not be rewritten
    out.truncate(0), out.seek(0)
    words = (WordTiming("hello", 0.1, 0.4, 0.9), WordTiming("world", 0.5, 0.9, 0.9))
    captions.show(Final("mic", 0, "hello world", 0.0, 1.0, words, (1, 2), 0.9, False, "silence"))
    assert out.getvalue() == CLEAR_LINE + "hello world\n"

    piped = io.StringIO()
    captions = Captions(piped, err)  # not a terminal: finals only
    captions.show(Partial("mic", 1, "again", "", 1.0, 2.0))
    captions.show(Final("mic", 1, "again", 1.0, 2.0, (), (), 0.9, False, "stop"))
    assert piped.getvalue() == "again\n"


def test_listen_url_accepts_a_base_address() -> None:
    """--url takes ws://host:port, http://host:port/ or the full /v1/listen URL."""
    assert listen_url("ws://h:1") == listen_url("http://h:1/") == listen_url("ws://h:1/v1/listen") == "ws://h:1/v1/listen"
    assert listen_url("https://h:1") == "wss://h:1/v1/listen"
    with pytest.raises(ConfigError, match="expected ws://HOST:PORT"):
        listen_url("h:1")


def test_ws_client_names_a_bad_url() -> None:
    """ws_client.py --url without a scheme: a usage error that says what it expected, before any I/O."""
    result = subprocess.run(
        [sys.executable, str(CLIENTS / "ws_client.py"), "--url", "localhost:8765", __file__],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "expected ws://HOST:PORT" in result.stderr, result.stderr


# ---------------------------------------------------------------- ws_client.py on the wire


@pytest.mark.parametrize(
    ("rate", "channels", "flags", "sent_rate", "encoding"),
    [(22050, 1, [], 22050, "pcm_f32le"), (96000, 2, ["--s16"], 48000, "pcm_s16le")],
)
async def test_ws_client_sends_samples_at_the_files_rate_never_its_header(
    tmp_path: Path, rate: int, channels: int, flags: list[str], sent_rate: int, encoding: str
) -> None:
    """The file is decoded: `start` declares its rate (resampled only outside 8-48 kHz) and channels; no RIFF bytes."""
    samples = (np.random.default_rng(0).uniform(-0.5, 0.5, (rate // 2, channels))).astype(np.float32)
    wav = tmp_path / "in.wav"
    sf.write(wav, samples, rate, subtype="PCM_16")
    seen: dict[str, Any] = {"audio": bytearray(), "text": []}

    async def handler(ws: ServerConnection) -> None:
        seen["text"].append(json.loads(await ws.recv()))
        await ws.send(Ready("s1", "fake", "fake", (70, 1), sent_rate, 0.08, {}).to_json())
        async for message in ws:
            if isinstance(message, bytes):
                seen["audio"] += message
                continue
            seen["text"].append(json.loads(message))
            await ws.send(Final("fake", 0, "hello world", 0.0, 0.5, (), (), 1.0, False, "stop").to_json())
            await ws.send(End("fake", 1).to_json())
            return

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        rc, out, err = await finish(await start_client("ws_client.py", str(wav), "--url", f"ws://127.0.0.1:{port}",
                                                        "--stream", "desk", *flags))
    assert rc == 0, without_importtime(err)
    assert out == "hello world\n"
    assert seen["text"] == [
        {"type": "start", "sample_rate": sent_rate, "encoding": encoding, "channels": channels, "stream": "desk",
         "interim_results": True, "endpointing": {}, "version": 1, "live": False},  # a file can wait: not live
        {"type": "stop"},
    ]
    audio = bytes(seen["audio"])
    assert not audio.startswith(b"RIFF")
    sent = np.frombuffer(audio, "<f4" if encoding == "pcm_f32le" else "<i2").reshape(-1, channels)
    if sent_rate == rate:
        np.testing.assert_array_equal(sent, sf.read(wav, dtype="float32", always_2d=True)[0])
    else:
        assert abs(len(sent) - len(samples) * sent_rate // rate) <= 2
    assert "torch" not in imported_modules(err)


async def test_ws_client_says_when_the_server_received_less_than_it_sent(tmp_path: Path) -> None:
    """`end` reports what the server received and dropped; the client compares it with what it sent."""
    wav = tmp_path / "in.wav"
    sf.write(wav, np.zeros(16000, dtype=np.float32), 16000, subtype="PCM_16")  # 1 s

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send(Ready("s1", "fake", "fake", (70, 1), 16000, 0.08, {}).to_json())
        async for message in ws:
            if isinstance(message, str):
                await ws.send(End("fake", 0, audio_s=0.75, dropped_s=0.25).to_json())
                return

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        rc, _, err = await finish(await start_client("ws_client.py", str(wav), "--url", f"ws://127.0.0.1:{port}"))
    assert rc == 0, without_importtime(err)
    assert "sent 1.000 s of audio but the server received 0.750 s" in err
    assert "the server fell behind and dropped 0.25 s" in err


# ---------------------------------------------------------------- against the daemon (and mosquitto)


@pytest.mark.slow
async def test_ws_client_prints_the_daemons_finals(daemon: Any, speech_wav: Path) -> None:  # noqa: F811
    """Against the real daemon: --json shows ready, finals and end; plain mode prints the finals' text."""
    running = await daemon("--set", "endpointing.max_segment_s=1.5")
    url = f"ws://127.0.0.1:{running.port}"
    rc, out, err = await finish(await start_client("ws_client.py", str(speech_wav), "--url", url, "--json"))
    assert rc == 0, without_importtime(err)
    messages = [json.loads(line) for line in out.splitlines()]
    kinds = [m["type"] for m in messages]
    assert kinds[0] == "ready" and kinds[-1] == "end" and "final" in kinds  # partials: sent fast, finals win
    assert messages[0]["sample_rate"] == sf.info(speech_wav).samplerate
    assert messages[-1]["segments"] == kinds.count("final")
    info = sf.info(speech_wav)
    assert messages[-1]["audio_s"] == round(info.frames / info.samplerate, 3) and messages[-1]["dropped_s"] == 0
    assert "server received" not in err and "dropped" not in err
    assert "torch" not in imported_modules(err)

    # the full address as the daemon's banner prints it works too
    client = await start_client("ws_client.py", str(speech_wav), "--url", url + "/v1/listen", "--s16")
    rc, out, err = await finish(client)
    assert rc == 0, without_importtime(err)
    assert out and all(line.strip() for line in out.splitlines())  # one line of text per final
    code, stderr = await running.stop()
    assert code == 0, stderr


@pytest.mark.slow
@pytest.mark.broker
async def test_mqtt_subscriber_prints_status_and_finals(
    daemon: Any, mosquitto_broker: Any, speech_wav: Path  # noqa: F811
) -> None:
    """The subscriber shows the retained status, each final as device/stream: text, and `offline` at shutdown."""
    running = await daemon("--set", "mqtt.enabled=true", "--set", "mqtt.host=127.0.0.1",
                           "--set", f"mqtt.port={mosquitto_broker.port}", "--set", "mqtt.device_id=testbox")
    sub = await start_client("mqtt_subscriber.py", "--host", "127.0.0.1", "--port", str(mosquitto_broker.port),
                             "--device", "testbox")
    try:
        assert sub.stdout is not None
        await read_line_until(sub.stdout, lambda line: line == "testbox status: online")
        rc, out, err = await finish(await start_client(
            "ws_client.py", str(speech_wav), "--url", f"ws://127.0.0.1:{running.port}", "--stream", "kitchen"))
        assert rc == 0, without_importtime(err)
        finals = out.splitlines()
        assert finals
        lines = await read_line_until(sub.stdout, lambda line: line == f"testbox/kitchen: {finals[-1]}")
        assert [line for line in lines if line.startswith("testbox/kitchen: ")] == [f"testbox/kitchen: {f}"
                                                                                  for f in finals]
        code, stderr = await running.stop()
        assert code == 0, stderr
        await read_line_until(sub.stdout, lambda line: line == "testbox status: offline")
    finally:
        if sub.returncode is None:
            sub.send_signal(signal.SIGINT)
    rc, _, err = await finish(sub, 10)
    assert rc == 0, without_importtime(err)
    assert "torch" not in imported_modules(err)


# ---------------------------------------------------------------- the microphone demo on the virtual microphone


class FileMic:
    """Stands in for ``MicrophoneSource`` in `streamer mic --url`: the test hands it 16 kHz float32 audio with
    `feed`, as fast as it likes (no pacing), and the client takes it as captured."""

    def __init__(self, device: Any, on_audio: Any) -> None:
        self.on_audio, self.device_name = on_audio, "file"
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        pass

    async def wait(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        self._stopped.set()

    def feed(self, samples: np.ndarray, block: int = 320) -> None:
        """Deliver ``samples`` in 20 ms blocks, as MicrophoneSource does on the loop thread."""
        for first in range(0, len(samples), block):
            self.on_audio(samples[first : first + block])


@pytest.fixture
def file_mics(monkeypatch: pytest.MonkeyPatch) -> list[FileMic]:
    """`streamer mic` gets a :class:`FileMic` instead of the microphone; the list holds the ones it opened."""
    import streamer.audio.mic
    from streamer.audio.mic import InputDevice

    opened: list[FileMic] = []

    def open_mic(device: Any, on_audio: Any) -> FileMic:
        opened.append(FileMic(device, on_audio))
        return opened[-1]

    monkeypatch.setattr(streamer.audio.mic, "MicrophoneSource", open_mic)
    monkeypatch.setattr(streamer.audio.mic, "list_devices", lambda: [InputDevice(0, "file", 1, 16000, "test", True)])
    return opened


@pytest.fixture(scope="module")
def speech_16k(speech_wav: Path) -> np.ndarray:
    """The speech WAV as MicrophoneSource delivers it: 16 kHz float32 mono."""
    import soxr

    data, rate = sf.read(speech_wav, dtype="float32")
    return soxr.resample(data, rate, 16000).astype(np.float32)


def mic_args(*argv: str) -> argparse.Namespace:
    """The options of `streamer mic` as parsed from ``argv``."""
    parser = argparse.ArgumentParser()
    mic_command.add_mic_args(parser)
    return parser.parse_args(list(argv))



async def mic_session(virtual_mic: Any, speech_wav: Path, script: str, ready: str, *args: str) -> tuple[int, str, str]:
    """Run a client on the virtual mic: wait for its ``ready`` line, play the speech, Ctrl-C, collect the output."""
    proc = await start_client(script, "--device", virtual_mic.device, *args, env=virtual_mic.env)
    assert proc.stderr is not None
    try:
        await read_line_until(proc.stderr, lambda line: ready in line, seconds=60)
        await asyncio.to_thread(virtual_mic.play, speech_wav)
        await asyncio.sleep(0.5)  # the tail of the speech through PulseAudio and the resampler
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)  # the open segment's final, then exit 0
    return await finish(proc, 30)


@pytest.mark.audio
async def test_mic_demo_in_process_prints_captions(virtual_mic: Any, tiny_nemo: Path, speech_wav: Path) -> None:
    """The recognizer in process, on the virtual microphone: partials and finals of stream `mic`; Ctrl-C exits 0."""
    rc, out, err = await mic_session(virtual_mic, speech_wav, "mic_demo.py", "listening on", "--model", str(tiny_nemo),
                                     "--att-context-size", "70,1", "--json")
    assert rc == 0, without_importtime(err)
    messages = [json.loads(line) for line in out.splitlines()]
    assert {m["type"] for m in messages} >= {"partial", "final"}, without_importtime(err)
    assert all(m["stream"] == "mic" for m in messages)
    assert messages[-1]["type"] == "final" and messages[-1]["reason"] == "stop"


@pytest.mark.audio
@pytest.mark.slow
async def test_mic_demo_url_and_ws_client_mic_stream_to_the_daemon(
    virtual_mic: Any, daemon: Any, speech_wav: Path  # noqa: F811
) -> None:
    """mic_demo.py --url (reconnecting after a daemon restart) and ws_client.py --mic: finals printed, no torch."""
    first = await daemon()
    url = f"ws://127.0.0.1:{first.port}"
    proc = await start_client("mic_demo.py", "--device", virtual_mic.device, "--url", url, "--stream", "desk",
                              env=virtual_mic.env)
    assert proc.stderr is not None
    try:
        await read_line_until(proc.stderr, lambda line: line.startswith("connected: stream desk"))
        code, stderr = await first.stop()
        assert code == 0, stderr
        await read_line_until(proc.stderr, lambda line: line.startswith("retrying in"))
        running = await daemon("--port", str(first.port))
        await read_line_until(proc.stderr, lambda line: line.startswith("connected: stream desk"))
        await asyncio.to_thread(virtual_mic.play, speech_wav)
        await asyncio.sleep(0.5)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
    rc, out, err = await finish(proc, 30)
    assert rc == 0, without_importtime(err)
    assert out and all(line.strip() for line in out.splitlines()), without_importtime(err)
    assert "torch" not in imported_modules(err)

    rc, out, err = await mic_session(virtual_mic, speech_wav, "ws_client.py", "ws_client: streaming the microphone",
                                     "--mic", "--url", url, "--json")
    assert rc == 0, without_importtime(err)
    kinds = [json.loads(line)["type"] for line in out.splitlines()]
    assert kinds[0] == "ready" and "final" in kinds and kinds[-1] == "end", without_importtime(err)
    assert "torch" not in imported_modules(err)
    code, stderr = await running.stop()
    assert code == 0, stderr


@pytest.mark.parametrize("args", [[], ["--url", "ws://127.0.0.1:9"], ["--list-devices"]])
def test_mic_demo_says_in_one_line_when_there_is_no_microphone(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    """PortAudio lists no input device: one line naming the problem, exit 2, before any model is loaded."""
    import streamer.audio.mic

    monkeypatch.setattr(streamer.audio.mic, "list_devices", lambda: [])
    monkeypatch.setattr(mic_command, "load_recognizer", lambda args: pytest.fail("loaded a model without a microphone"))
    assert mic_command.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("mic_demo: error: no microphone found: PortAudio lists no input device")
    assert err.count("\n") == 1


def test_list_devices_marks_the_default(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`streamer mic --list-devices` (once wired into streamer/cli.py) and mic_demo.py print the same table."""
    import streamer.audio.mic
    from streamer.audio.mic import InputDevice
    from streamer.cli import build_parser, main

    devices = [InputDevice(0, "pulse", 32, 44100, "ALSA", False), InputDevice(3, "USB Mic", 1, 48000, "ALSA", True)]
    monkeypatch.setattr(streamer.audio.mic, "list_devices", lambda: devices)
    expected = "    0  pulse  (32 ch, 44100 Hz, ALSA)\n*   3  USB Mic  (1 ch, 48000 Hz, ALSA)\n"
    assert mic_command.main(["--list-devices"]) == 0
    assert capsys.readouterr().out == expected
    try:
        build_parser().parse_args(["mic", "--list-devices"])
    except SystemExit:
        capsys.readouterr()
        pytest.skip("`streamer mic` is not wired into streamer/cli.py yet (streamer.mic_command.add_mic_parser)")
    assert main(["mic", "--list-devices"]) == 0
    assert capsys.readouterr().out == expected
