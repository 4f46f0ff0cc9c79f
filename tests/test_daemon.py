"""The real daemon as a subprocess: READY=1 over NOTIFY_SOCKET, a WAV over /v1/listen, a file source, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import soundfile as sf
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.slow
TIMEOUT = float(os.environ.get("STREAMER_TEST_TIMEOUT_FACTOR", "1"))


@dataclass
class Running:
    proc: asyncio.subprocess.Process
    port: int
    notify: socket.socket

    async def notification(self, prefix: str) -> str:
        """The next datagram that starts with ``prefix`` (STATUS= progress lines come before READY=1)."""
        async with asyncio.timeout(60 * TIMEOUT):
            while True:
                message = (await asyncio.get_running_loop().sock_recv(self.notify, 4096)).decode()
                if message.startswith(prefix):
                    return message

    async def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60 * TIMEOUT):
            _, err = await self.proc.communicate()
        return int(self.proc.returncode or 0), err.decode()


@pytest.fixture
async def daemon(tmp_path: Path, tiny_nemo: Path) -> AsyncIterator[Any]:
    """Start `streamer serve` with the tiny model on a free port under a fake NOTIFY_SOCKET; kill it if left running."""
    procs: list[asyncio.subprocess.Process] = []
    sockets: list[socket.socket] = []

    async def start(*extra: str) -> Running:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(tmp_path / f"notify{len(procs)}"))
        notify.setblocking(False)
        sockets.append(notify)
        port_file = tmp_path / f"port{len(procs)}"
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / f"notify{len(procs)}"), "STREAMER_SERVER__PORT": "0"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamer", "--log-level", "INFO", "serve", "--model", str(tiny_nemo),
            "--att-context-size", "70,1", "--port-file", str(port_file), "--set", "server.close_timeout_s=2",
            *extra, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        procs.append(proc)
        running = Running(proc, 0, notify)
        ready_task = asyncio.create_task(running.notification("READY=1"))
        exited = asyncio.create_task(proc.wait())
        await asyncio.wait({ready_task, exited}, return_when=asyncio.FIRST_COMPLETED)
        if not ready_task.done():  # the daemon exited before READY=1: show why
            ready_task.cancel()
            assert proc.stderr is not None
            pytest.fail(f"streamer serve exited with {proc.returncode}:\n{(await proc.stderr.read()).decode()[-3000:]}")
        exited.cancel()
        ready = ready_task.result()
        assert ready.startswith("READY=1\nSTATUS=listening on http://127.0.0.1:"), ready
        running.port = int(port_file.read_text())
        assert ready.endswith(f":{running.port}")
        assert proc.stdout is not None
        line = (await proc.stdout.readline()).decode()
        assert line.strip() == f"streamer: listening on http://127.0.0.1:{running.port}"
        return running

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
    for sock in sockets:
        sock.close()


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(30 * TIMEOUT):
        return json.loads(await ws.recv())


async def drain(ws: ClientConnection) -> tuple[list[dict[str, Any]], int | None]:
    out: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(30 * TIMEOUT):
            async for message in ws:
                out.append(json.loads(message))
    except ConnectionClosed:
        pass
    return out, ws.close_code


async def test_sigterm_flushes_the_open_segment_and_exits_0(daemon: Any, speech_wav: Path) -> None:
    """READY=1 once serving; a WAV gives partials; SIGTERM: STOPPING=1, the open segment's final, end, 1001, exit 0."""
    running = await daemon()
    data, rate = sf.read(speech_wav, dtype="int16")
    pcm = data.tobytes()
    base = f"ws://127.0.0.1:{running.port}"
    async with connect(f"{base}/v1/captions?stream=desk") as sub, connect(f"{base}/v1/listen") as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": rate, "encoding": "pcm_s16le", "stream": "desk",
                                  "endpointing": {"max_segment_s": 60}}))
        assert (await recv_json(ws))["type"] == "ready"
        for i in range(0, len(pcm) // 2, 4410):
            await ws.send(pcm[i : i + 4410])
        while (await recv_json(sub))["type"] != "partial":
            pass
        code, stderr = await running.stop()
        messages, close = await drain(ws)
        sub_messages, sub_close = await drain(sub)
    assert (await running.notification("STOPPING=1")).startswith("STOPPING=1\nSTATUS=flushing")
    assert code == 0, stderr
    assert close == 1001 and sub_close == 1001
    finals = [m for m in messages if m["type"] == "final"]
    assert len(finals) == 1 and finals[0]["reason"] == "shutdown" and finals[0]["segment"] == 0
    end = messages[-1]
    assert {k: end[k] for k in ("type", "stream", "segments", "dropped_s")} == {
        "type": "end", "stream": "desk", "segments": 1, "dropped_s": 0.0}
    assert 0 < end["audio_s"] <= len(pcm) / 2 / rate  # what arrived before SIGTERM, nothing more
    assert [m for m in sub_messages if m["type"] == "final"] == finals


async def test_file_source_is_recognized_as_a_stream(daemon: Any, speech_wav: Path) -> None:
    """--source file:WAV?realtime=1&name=replay: a captions subscriber gets its partials and its final."""
    running = await daemon("--source", f"file:{speech_wav}?realtime=1&name=replay")
    async with connect(f"ws://127.0.0.1:{running.port}/v1/captions?stream=replay") as sub:
        messages: list[dict[str, Any]] = []
        while not messages or messages[-1]["type"] != "final":
            messages.append(await recv_json(sub))
    assert messages[-1]["reason"] == "stop" and messages[-1]["segment"] == 0
    assert all(m["stream"] == "replay" for m in messages)
    code, stderr = await running.stop()
    assert code == 0, stderr


def test_the_daemon_leaves_a_core_to_the_event_loop_unless_told() -> None:
    """serve: unset model.threads becomes cores - 1 (at least 1) on a CPU; a set value or a GPU is left alone."""
    from streamer.service import serving_model_settings
    from streamer.settings import ModelSettings

    assert serving_model_settings(ModelSettings(), cores=2).threads == 1
    assert serving_model_settings(ModelSettings(), cores=16).threads == 15
    assert serving_model_settings(ModelSettings(), cores=1).threads == 1
    assert serving_model_settings(ModelSettings(threads=2), cores=2).threads == 2
    assert serving_model_settings(ModelSettings(device="cuda"), cores=2).threads is None
