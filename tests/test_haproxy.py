"""The shipped HAProxy configuration (deploy/haproxy/haproxy.cfg) in front of two real daemons on loopback.

Two ``streamer serve`` subprocesses (the bundled model, capacity 1 session each, the agent check on) behind a real
``haproxy`` running the shipped file with loopback addresses and free ports substituted: speech streamed through
HAProxy over ``/v1/listen`` is recognized; a box that is full (its agent says ``drain``) gets no new sessions, which
go to the other; with both full a new session is refused with HTTP 503; a box draining after SIGTERM gets no new
sessions while its open one finishes. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamer.training.evaluate import word_error_rate
from tests.fixtures_realpeers import free_port
from tests.serve_process import TIMEOUT, Served, serve
from tests.speech import espeak_sentences

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy (setup.sh)")]

SHIPPED = Path(__file__).resolve().parents[1] / "deploy" / "haproxy" / "haproxy.cfg"
SENTENCE = "turn on the kitchen lights and set a timer for ten minutes"
DAEMON_ARGS = ("--set", "admission.capacity_streams=1", "--set", "admission.agent_port=0",
               "--set", "admission.drain_timeout_s=60", "--set", "server.max_sessions=4")


def render(shipped: str, lb_port: int, stats_port: int, boxes: list[tuple[int, int]]) -> str:
    """The shipped file with our ports: each substitution must find its line (a changed file fails loudly)."""
    def sub(pattern: str, replacement: str, text: str) -> str:
        out, count = re.subn(pattern, replacement, text, flags=re.M)
        assert count == 1, f"the shipped haproxy.cfg has no line matching {pattern!r}"
        return out

    text = sub(r"^    bind :8080$", f"    bind 127.0.0.1:{lb_port}", shipped)
    text = sub(r"^    bind 127\.0\.0\.1:8404$", f"    bind 127.0.0.1:{stats_port}", text)
    text = sub(r"inter 2s fall 2 rise 2", "inter 300ms fall 1 rise 1", text)  # quicker checks for the test
    text = sub(r"agent-inter 2s", "agent-inter 300ms", text)
    servers = "\n".join(f"    server streamer{i + 1} 127.0.0.1:{port} agent-port {agent}"
                        for i, (port, agent) in enumerate(boxes))
    return sub(r"(^    server streamer\d .*\n)+", servers + "\n", text)


@contextlib.asynccontextmanager
async def haproxy(folder: Path, config: str, stats_port: int) -> AsyncIterator[None]:
    """HAProxy in the foreground on ``config``, until its stats page answers."""
    path, log_path = folder / "haproxy.cfg", folder / "haproxy.log"
    path.write_text(config)
    check = subprocess.run(["haproxy", "-c", "-q", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec("haproxy", "-db", "-f", str(path), stdout=log, stderr=log)
    try:
        async with asyncio.timeout(20 * TIMEOUT):
            while not await server_states(stats_port):
                assert proc.returncode is None, f"haproxy exited:\n{log_path.read_text()}"
                await asyncio.sleep(0.05)
        yield
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGUSR1)  # soft stop
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5 * TIMEOUT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


async def server_states(stats_port: int) -> dict[str, str]:
    """``{server: status}`` from HAProxy's stats CSV (UP, DOWN, DRAIN, ...)."""
    try:
        _, body = await asyncio.to_thread(get, f"http://127.0.0.1:{stats_port}/stats;csv")
    except urllib.error.URLError:  # not listening yet
        return {}
    rows = csv.DictReader(io.StringIO(body.lstrip("# ")))
    return {row["svname"]: row["status"] for row in rows if row["pxname"] == "streamer"
            and row["svname"] not in ("BACKEND", "FRONTEND")}


async def wait_up(stats_port: int, **up: bool) -> None:
    """Wait until HAProxy has each named server UP (True) or out of rotation (False: DRAIN, DOWN, MAINT)."""
    async with asyncio.timeout(30 * TIMEOUT):
        while True:
            states = await server_states(stats_port)
            if all(states.get(name, "").startswith("UP") == want for name, want in up.items()):
                return
            await asyncio.sleep(0.1)


async def active(box: Served) -> float:
    _, body = await asyncio.to_thread(get, f"http://127.0.0.1:{box.port}/metrics")
    match = re.search(r"^streamer_sessions_active (\S+)$", body, flags=re.M)
    assert match, "no streamer_sessions_active in /metrics"
    return float(match.group(1))


async def agent_port(box: Served) -> int:
    await box.wait_for_log("HAProxy agent check on ")
    match = re.search(r"HAProxy agent check on 127\.0\.0\.1:(\d+)", box.log.read_text())
    assert match
    return int(match.group(1))


async def open_session(port: int, rate: int, stream: str) -> ClientConnection:
    async with asyncio.timeout(20 * TIMEOUT):
        ws = await connect(f"ws://127.0.0.1:{port}/v1/listen")
        await ws.send(json.dumps({"type": "start", "sample_rate": rate, "encoding": "pcm_s16le", "stream": stream}))
        assert json.loads(await ws.recv())["type"] == "ready"
    return ws


async def speak(ws: ClientConnection, pcm: bytes, rate: int) -> tuple[str, int | None]:
    """Send the speech and a stop; return the finals' text and the close code."""
    for i in range(0, len(pcm), rate // 5 * 2):
        await ws.send(pcm[i : i + rate // 5 * 2])
    await ws.send(json.dumps({"type": "stop"}))
    finals = []
    try:
        async with asyncio.timeout(60 * TIMEOUT):
            async for message in ws:
                msg = json.loads(message)
                if msg["type"] == "final":
                    finals.append(msg["text"])
    except ConnectionClosed:
        pass
    return " ".join(finals), ws.close_code


async def test_haproxy_spreads_sessions_by_capacity_and_drain(tmp_path: Path) -> None:
    samples, rate = espeak_sentences(tmp_path, [SENTENCE])[SENTENCE]
    pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16).tobytes()
    lb_port, stats_port = free_port(), free_port()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    env = {"STREAMER_STATE__DIR": ""}
    async with serve(tmp_path / "a", env, *DAEMON_ARGS) as one, serve(tmp_path / "b", env, *DAEMON_ARGS) as two:
        boxes = [(one.port, await agent_port(one)), (two.port, await agent_port(two))]
        config = render(SHIPPED.read_text(), lb_port, stats_port, boxes)
        async with haproxy(tmp_path, config, stats_port):
            await wait_up(stats_port, streamer1=True, streamer2=True)
            # Speech through HAProxy is recognized.
            text, code = await speak(await open_session(lb_port, rate, "spoken"), pcm, rate)
            wer, errors, words = word_error_rate([SENTENCE], [text])
            assert code == 1000 and wer <= 0.35, f"{errors}/{words} word errors: {text!r}"
            await wait_up(stats_port, streamer1=True, streamer2=True)
            # A full box is out of rotation (agent: drain, /readyz 503); the next session goes to the other one.
            first = await open_session(lb_port, rate, "first")
            first_on_one = await active(one) == 1
            await wait_up(stats_port, streamer1=not first_on_one, streamer2=first_on_one)
            second = await open_session(lb_port, rate, "second")
            assert (await active(one), await active(two)) == (1, 1)
            # Both full: a new session is refused with 503.
            await wait_up(stats_port, streamer1=False, streamer2=False)
            with pytest.raises(InvalidStatus) as refused:
                async with asyncio.timeout(20 * TIMEOUT):
                    await connect(f"ws://127.0.0.1:{lb_port}/v1/listen")
            assert refused.value.response.status_code == 503
            await first.close()
            await second.close()
            await wait_up(stats_port, streamer1=True, streamer2=True)
            # SIGTERM with a session open on box one (directly): it drains, new sessions go to box two.
            held = await open_session(one.port, rate, "held")
            one.proc.send_signal(signal.SIGTERM)
            await one.wait_for_log("draining: waiting up to 60 s for 1 session(s) to end")
            for i in range(2):
                await wait_up(stats_port, streamer1=False, streamer2=True)
                ws = await open_session(lb_port, rate, f"after-{i}")
                assert (await active(one), await active(two)) == (1, 1)
                await ws.close()
                async with asyncio.timeout(10 * TIMEOUT):
                    while await active(two):
                        await asyncio.sleep(0.05)
            text, code = await speak(held, pcm, rate)  # the draining box's session finishes on its own
            assert code == 1000 and text
            async with asyncio.timeout(60 * TIMEOUT):  # its last session ended: the drain is over, it exits
                assert await one.proc.wait() == 0
            assert await two.terminate() == 0
    assert "Traceback" not in one.tail(100_000) + two.tail(100_000)


def test_shipped_config_is_valid_for_haproxy(tmp_path: Path) -> None:
    """``haproxy -c`` accepts the file as shipped (example addresses included)."""
    path = tmp_path / "haproxy.cfg"
    path.write_text(SHIPPED.read_text())
    check = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr + check.stdout
    assert "leastconn" in SHIPPED.read_text() and os.path.getsize(SHIPPED) > 0
