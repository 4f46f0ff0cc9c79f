"""Session resume on /v1/listen: a dropped connection, a reconnect with the token, the same session.

Real daemons on loopback (the tiny random model, whose tokens are deterministic for the same audio, and
the bundled default model for words), real websockets clients; a drop is ``transport.abort()``: the TCP
connection goes away without a close frame, as a network failure would. :class:`Proxy` (a loopback TCP
relay whose connections can be cut) lets programs that own their sockets (ws_client.py, the browser
page) lose their connection too.
"""
# ruff: noqa: F811  (pytest fixtures imported from test_server are redefined as test parameters)

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from streamer.asr.model import AsrModel
from streamer.engine.recognizer import Recognizer
from streamer.service import Daemon
from streamer.settings import Settings
from tests.test_clients import FileMic, file_mics, speech_16k  # noqa: F401  (fixtures)
from tests.test_server import (  # noqa: F401  (fixtures)
    Start,
    check_segments,
    http_get,
    pcm,
    recognizer,
    recv,
    recv_all,
    recv_until,
    send_audio,
    start_daemon,
    start_msg,
    url,
)

TIMEOUT = float(os.environ.get("STREAMER_TEST_TIMEOUT_FACTOR", "1"))
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "streamer-tdt-small" / "model.nemo"
SEGMENT_S = 1.0  # max_segment_s: several segments in the few seconds of test speech


class Proxy:
    """A TCP relay on 127.0.0.1 to ``port``; :meth:`cut` drops every relayed connection without a close frame,
    :meth:`outage` loses what either side sends for a while first (as a dead Wi-Fi link does)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self.connections = 0
        self.lost_bytes = 0
        self._is_losing = False
        self._transports: list[asyncio.BaseTransport] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._transports += [writer.transport, up_writer.transport]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if self._is_losing:
                        self.lost_bytes += len(data)
                        continue
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        """Abort both sides of every relayed connection (no WebSocket close frame either way)."""
        for transport in self._transports:
            transport.abort()
        self._transports.clear()
        self._is_losing = False

    async def outage(self, seconds: float) -> None:
        """Lose everything relayed for ``seconds``, then :meth:`cut`: what was sent meanwhile never arrives."""
        self._is_losing = True
        await asyncio.sleep(seconds)
        self.cut()


def resume_msg(rate: int, ready: dict[str, Any], next_segment: int, **extra: Any) -> str:
    resume = {"session": ready["session"], "token": ready["resume_token"], "next_segment": next_segment}
    return start_msg(rate, resume=resume, **extra)


async def collect(ws: ClientConnection, into: list[dict[str, Any]]) -> None:
    """Append every message until the connection ends (however it ends)."""
    try:
        async for message in ws:
            into.append(json.loads(message))
    except ConnectionClosed:
        pass


async def uninterrupted(daemon: Daemon, data: bytes, rate: int, stream: str) -> list[dict[str, Any]]:
    """The finals of one plain run of ``data`` (no drop), for comparison."""
    async with connect(url(daemon, "/v1/listen")) as ws:
        await ws.send(start_msg(rate, stream=stream, endpointing={"max_segment_s": SEGMENT_S}))
        await recv(ws)
        await send_audio(ws, data)
        await ws.send(json.dumps({"type": "stop"}))
        messages, code = await recv_all(ws)
    assert code == 1000
    return check_segments(messages)


async def interrupted(
    daemon: Daemon, data: bytes, rate: int, stream: str, cut_at: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Send ``data``, drop the connection after ``cut_at`` of it (mid-segment: a partial is out), resume,
    re-send from the server's ``audio_s``, stop. Returns every message of both connections and the
    resumed ``ready``."""
    first: list[dict[str, Any]] = []
    ws = await connect(url(daemon, "/v1/listen"))
    await ws.send(start_msg(rate, stream=stream, endpointing={"max_segment_s": SEGMENT_S}))
    ready = await recv(ws)
    assert ready["resumed"] is False and ready["audio_s"] == 0 and len(ready["resume_token"]) >= 40
    reading = asyncio.create_task(collect(ws, first))
    cut = int(len(data) * cut_at) & ~1
    await send_audio(ws, data[:cut])
    async with asyncio.timeout(20 * TIMEOUT):
        while not first or first[-1]["type"] != "partial":  # a segment is open and has text
            await asyncio.sleep(0.01)
    ws.transport.abort()  # no close frame, no stop: what a network failure looks like to the server
    await reading
    finals_seen = len([m for m in first if m["type"] == "final"])
    async with connect(url(daemon, "/v1/listen")) as ws:
        await ws.send(resume_msg(rate, ready, finals_seen))
        resumed = await recv(ws)
        assert resumed["type"] == "ready" and resumed["session"] == ready["session"], resumed
        received = round(resumed["audio_s"] * rate) * 2  # bytes of s16le mono
        assert 0 < received <= cut
        await send_audio(ws, data[received:])
        await ws.send(json.dumps({"type": "stop"}))
        second, code = await recv_all(ws)
    assert code == 1000
    return first, second, resumed


async def start_half_then_vanish(
    daemon: Daemon, viewer: ClientConnection, stream: str, data: bytes, rate: int
) -> dict[str, Any]:
    """Open a /v1/listen session on ``stream`` with one long segment, send half of ``data``, wait until the
    viewer has a partial, then drop the TCP connection without a close frame. Returns the ``ready``."""
    ws = await connect(url(daemon, "/v1/listen"))
    await ws.send(start_msg(rate, stream=stream, endpointing={"max_segment_s": 60}))
    ready = await recv(ws)
    await send_audio(ws, data[: len(data) // 2 & ~1])
    await recv_until(viewer, "partial")
    ws.transport.abort()
    return ready


def comparable(finals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in f.items() if k != "stream"} for f in finals]


# ---------------------------------------------------------------- resume within the window


async def test_a_dropped_session_resumes_and_gives_the_uninterrupted_finals(
    start_daemon: Start, pcm: tuple[bytes, int]
) -> None:
    """Drop mid-segment, resume with the token, re-send from audio_s: one final per segment, in order, equal to an
    uninterrupted run of the same audio; a captions viewer sees each final once; nothing was flushed as disconnect."""
    daemon = await start_daemon()
    data, rate = pcm
    expected = await uninterrupted(daemon, data, rate, "plain")
    assert len(expected) >= 3
    async with connect(url(daemon, "/v1/captions?stream=roam")) as viewer:
        seen: list[dict[str, Any]] = []
        watching = asyncio.create_task(collect(viewer, seen))
        first, second, resumed = await interrupted(daemon, data, rate, "roam", cut_at=0.5)
        async with asyncio.timeout(10 * TIMEOUT):
            while len([m for m in seen if m["type"] == "final"]) < len(expected):
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # a duplicate would arrive here
        watching.cancel()
    assert resumed["resumed"] is True and resumed["stream"] == "roam"
    finals = check_segments([m for m in first + second if m["type"] in ("partial", "final")])
    assert comparable(finals) == comparable(expected)
    assert "disconnect" not in [f["reason"] for f in finals] and finals[-1]["reason"] == "stop"
    assert second[-1] == {"type": "end", "stream": "roam", "segments": len(expected),
                          "audio_s": round(len(data) / 2 / rate, 3), "dropped_s": 0.0}
    assert comparable(check_segments(seen)) == comparable(expected)  # the viewer: each final exactly once
    assert daemon.metrics.sessions_resumed_total.value() == 1 and daemon.metrics.sessions_total.value("listen") == 2


async def test_finals_made_while_away_are_kept_for_the_client(start_daemon: Start, pcm: tuple[bytes, int]) -> None:
    """A final the client never read reaches the viewer at once and the client on resume, before any live result;
    a client that says it has it already does not get it twice."""
    daemon = await start_daemon()
    data, rate = pcm
    async with connect(url(daemon, "/v1/captions?stream=away")) as viewer:
        ws = await connect(url(daemon, "/v1/listen"))
        await ws.send(start_msg(rate, stream="away", endpointing={"max_segment_s": 60}))
        ready = await recv(ws)
        await send_audio(ws, data)
        await ws.send(json.dumps({"type": "finalize"}))
        final = (await recv_until(viewer, "final"))[-1]  # made and sent; the client does not read it
        assert final["reason"] == "finalize"
        ws.transport.abort()
    async with connect(url(daemon, "/v1/listen")) as again:  # says it has segment 0 already: nothing replayed
        await again.send(resume_msg(rate, ready, 1))
        ready = await recv(again)
        assert ready["resumed"] is True and ready["audio_s"] == len(data) / 2 / rate
        await asyncio.sleep(0.3)
        again.transport.abort()
    async with connect(url(daemon, "/v1/listen")) as last:  # asks for everything from segment 0
        await last.send(resume_msg(rate, ready, 0))
        assert (await recv(last))["resumed"] is True
        await last.send(json.dumps({"type": "stop"}))
        messages, _ = await recv_all(last)
    assert [m["type"] for m in messages] == ["final", "end"]  # the replay first, then the session's end
    assert messages[0] == final and messages[-1]["segments"] == 1


# ---------------------------------------------------------------- failures


async def test_window_expiry_flushes_as_disconnect_and_a_late_resume_fails(
    start_daemon: Start, pcm: tuple[bytes, int]
) -> None:
    """No resume within resume_window_s: today's disconnect final to the viewer, after the window; then a resume
    gets resume_failed and a new session."""
    daemon = await start_daemon(server={"resume_window_s": 0.8})
    data, rate = pcm
    async with connect(url(daemon, "/v1/captions?stream=late")) as viewer:
        ready = await start_half_then_vanish(daemon, viewer, "late", data, rate)
        dropped = time.monotonic()
        assert ready["resume_window_s"] == 0.8
        final = (await recv_until(viewer, "final"))[-1]
        assert final["reason"] == "disconnect" and final["segment"] == 0
        assert time.monotonic() - dropped >= 0.7  # held for the window first
    async with connect(url(daemon, "/v1/listen")) as ws:
        await ws.send(resume_msg(rate, ready, 0, stream="late"))
        error, fresh = await recv(ws), await recv(ws)
    assert error["type"] == "error" and error["code"] == "resume_failed"
    assert "no such session: it ended, or its resume window of 0.8 s passed" in error["message"]
    assert "starting a new session instead" in error["message"]
    assert fresh["type"] == "ready" and fresh["resumed"] is False and fresh["session"] != ready["session"]
    assert daemon.metrics.protocol_errors_total.value("resume_failed") == 1


async def test_wrong_token_used_token_and_other_format_are_refused(start_daemon: Start, pcm: tuple[bytes, int]):
    """A wrong token, a token used already, another sample rate, encoding, stream or endpointing: resume_failed
    saying so; the held session stays held for its real client."""
    daemon = await start_daemon()
    data, rate = pcm
    ws = await connect(url(daemon, "/v1/listen"))
    await ws.send(start_msg(rate, stream="held", endpointing={"max_segment_s": 60}))
    first_ready = await recv(ws)
    await send_audio(ws, data[: len(data) // 2 & ~1])
    ws.transport.abort()

    async def refused(message: str) -> tuple[dict[str, Any], dict[str, Any]]:
        async with connect(url(daemon, "/v1/listen")) as other:
            await other.send(message)
            return await recv(other), await recv(other)

    wrong = {**first_ready, "resume_token": first_ready["resume_token"][:-2] + "xx"}
    error, then = await refused(resume_msg(rate, wrong, 0, stream="held"))
    assert error["code"] == "resume_failed" and "the resume token does not match" in error["message"]
    assert then["code"] == "stream_in_use"  # the start went on as a new session, whose name is still taken
    error, then = await refused(resume_msg(16000, first_ready, 0))
    assert error["code"] == "resume_failed"
    assert "the session's sample_rate is 22050, this start declares 16000" in error["message"]
    assert then["type"] == "ready" and then["resumed"] is False  # no name: a new session of its own
    error, _ = await refused(json.dumps({"type": "start", "sample_rate": rate, "encoding": "pcm_f32le",
                                         "resume": {"session": first_ready["session"],
                                                    "token": first_ready["resume_token"]}}))
    assert "the session's encoding is 'pcm_s16le'" in error["message"]
    error, _ = await refused(resume_msg(rate, first_ready, 0, stream="other"))
    assert "the session's stream is 'held', this start names 'other'" in error["message"]
    error, then = await refused(resume_msg(rate, first_ready, 0, endpointing={"max_segment_s": 30}))
    assert error["code"] == "resume_failed"
    assert "this start's endpointing differs from the session's (leave it out" in error["message"]
    assert then["type"] == "ready" and then["resumed"] is False and then["session"] != first_ready["session"]

    async with connect(url(daemon, "/v1/listen")) as back:  # the real client still gets its session
        await back.send(resume_msg(rate, first_ready, 0))
        ready = await recv(back)
        assert ready["resumed"] is True and ready["session"] == first_ready["session"]
        assert ready["resume_token"] != first_ready["resume_token"]
        error, then = await refused(resume_msg(rate, first_ready, 0))  # the spent token, while the session is live
        assert error["code"] == "resume_failed" and "this resume token was used already" in error["message"]
        await back.send(json.dumps({"type": "stop"}))
        messages, code = await recv_all(back)
    assert code == 1000 and messages[-1]["type"] == "end"  # undisturbed by the attempts


async def test_a_resume_takes_over_a_connection_the_server_still_thinks_open(
    start_daemon: Start, pcm: tuple[bytes, int]
) -> None:
    """The client comes back before the server noticed its old connection die: the resume takes the session over
    and the old connection is dropped."""
    daemon = await start_daemon()
    data, rate = pcm
    async with connect(url(daemon, "/v1/listen")) as old:
        await old.send(start_msg(rate, stream="roam2"))
        ready = await recv(old)
        await send_audio(old, data[:8820])
        async with connect(url(daemon, "/v1/listen")) as new:
            await new.send(resume_msg(rate, ready, 0))
            resumed = await recv(new)
            assert resumed["resumed"] is True and resumed["session"] == ready["session"]
            _, old_code = await recv_all(old, timeout_s=5)
            assert old_code == 1006  # dropped, no close frame
            await send_audio(new, data[round(resumed["audio_s"] * rate) * 2 :])
            await new.send(json.dumps({"type": "stop"}))
            messages, code = await recv_all(new)
    assert code == 1000 and messages[-1]["audio_s"] == round(len(data) / 2 / rate, 3)


async def test_held_sessions_count_against_max_sessions(start_daemon: Start, pcm: tuple[bytes, int]) -> None:
    """max_sessions = 1 and one session held: a new connection gets in, but only to resume it; a new session is
    refused with server_busy and 1013."""
    daemon = await start_daemon(server={"max_sessions": 1})
    data, rate = pcm
    ws = await connect(url(daemon, "/v1/listen"))
    await ws.send(start_msg(rate, stream="only"))
    ready = await recv(ws)
    ws.transport.abort()
    async with asyncio.timeout(10 * TIMEOUT):
        while "streamer_sessions_held 1" not in (await http_get(daemon, "/metrics"))[2]:
            await asyncio.sleep(0.01)
    async with connect(url(daemon, "/v1/listen")) as other:
        await other.send(start_msg(rate, stream="another"))
        messages, code = await recv_all(other)
    assert code == 1013 and [m["code"] for m in messages] == ["server_busy"]
    assert "counting sessions kept for their clients to reconnect" in messages[0]["message"]
    async with connect(url(daemon, "/v1/listen")) as back:
        await back.send(resume_msg(rate, ready, 0))
        assert (await recv(back))["resumed"] is True


async def test_shutdown_flushes_held_sessions_without_waiting_for_the_window(
    recognizer: Recognizer, pcm: tuple[bytes, int]  # noqa: F811
) -> None:
    """SIGTERM while a session is held for 60 s: its open segment goes to the viewer as a shutdown final at once."""
    daemon = Daemon(Settings(server={"port": 0, "close_timeout_s": 2.0, "resume_window_s": 60}), recognizer)
    await daemon.start()
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    await daemon.ready.wait()
    data, rate = pcm
    async with connect(url(daemon, "/v1/captions?stream=bye")) as viewer:
        await start_half_then_vanish(daemon, viewer, "bye", data, rate)
        await asyncio.sleep(0.2)
        stopped = time.monotonic()
        stop.set()
        messages, code = await recv_all(viewer)
    assert code == 1001 and [m["reason"] for m in messages if m["type"] == "final"] == ["shutdown"]
    async with asyncio.timeout(20 * TIMEOUT):
        assert await task == 0
    assert time.monotonic() - stopped < 10


async def test_resume_window_0_keeps_todays_behaviour(start_daemon: Start, pcm: tuple[bytes, int]) -> None:
    """resume_window_s = 0: ready has no resume fields, a drop is flushed as disconnect at once, a resume is refused."""
    daemon = await start_daemon(server={"resume_window_s": 0})
    data, rate = pcm
    async with connect(url(daemon, "/v1/captions?stream=now")) as viewer:
        ready = await start_half_then_vanish(daemon, viewer, "now", data, rate)
        assert not {"resume_token", "resume_window_s", "resumed", "audio_s"} & set(ready)
        final = (await recv_until(viewer, "final", timeout_s=3))[-1]  # no window to wait out (held: 10 s)
        assert final["reason"] == "disconnect"
    async with connect(url(daemon, "/v1/listen")) as again:
        await again.send(resume_msg(rate, {**ready, "resume_token": "x" * 43}, 0, stream="now"))
        error, fresh = await recv(again), await recv(again)
    assert error["code"] == "resume_failed" and "server.resume_window_s is 0" in error["message"]
    assert fresh["type"] == "ready" and "resumed" not in fresh


async def test_a_client_that_closes_cleanly_without_stop_is_not_held(
    start_daemon: Start, pcm: tuple[bytes, int]
) -> None:
    """A close frame from the client means it hung up: its segment is flushed as disconnect at once, as before."""
    daemon = await start_daemon(server={"resume_window_s": 60})
    data, rate = pcm
    async with connect(url(daemon, "/v1/captions?stream=bye2")) as viewer:
        async with connect(url(daemon, "/v1/listen")) as ws:
            await ws.send(start_msg(rate, stream="bye2", endpointing={"max_segment_s": 60}))
            await recv(ws)
            await send_audio(ws, data[: len(data) // 2 & ~1])
            await recv_until(viewer, "partial")
        final = (await recv_until(viewer, "final", timeout_s=5))[-1]
    assert final["reason"] == "disconnect"


# ---------------------------------------------------------------- real words


@pytest.mark.slow
@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason=f"{DEFAULT_MODEL} is missing from this checkout")
async def test_resumed_speech_gives_the_same_words_on_the_default_model(tmp_path: Path) -> None:
    """espeak-ng speech on the bundled default model, dropped mid-sentence and resumed: the same words as without
    the drop (and they are the spoken words, more or less: the model is small)."""
    import subprocess

    import soundfile as sf

    from streamer.training.evaluate import word_error_rate

    sentence = "please turn off the lights in the kitchen and set a timer for ten minutes"
    wav = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(wav), sentence], check=True)
    samples, rate = sf.read(wav, dtype="int16")
    data = samples.tobytes()
    daemon = Daemon(Settings(server={"port": 0, "close_timeout_s": 2.0}), Recognizer(AsrModel.load(str(DEFAULT_MODEL))))
    await daemon.start()
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await daemon.ready.wait()
        expected = await uninterrupted(daemon, data, rate, "plain")
        first, second, _ = await interrupted(daemon, data, rate, "roam", cut_at=0.45)
    finally:
        stop.set()
        async with asyncio.timeout(30 * TIMEOUT):
            assert await task == 0
    finals = check_segments([m for m in first + second if m["type"] in ("partial", "final")])
    words = " ".join(f["text"] for f in finals).split()
    assert words == " ".join(f["text"] for f in expected).split()
    assert comparable(finals) == comparable(expected)
    wer, errors, total = word_error_rate([sentence], [" ".join(words)])
    assert wer <= 0.35, f"{errors}/{total} word errors: {words}"


# ---------------------------------------------------------------- the clients


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


async def test_ws_client_resumes_through_a_dropped_connection(start_daemon: Start, speech_wav: Path) -> None:
    """clients/ws_client.py --realtime, its connection cut mid-segment by a relay: it reconnects, resumes, re-sends
    what the server missed, and prints the same finals as an uninterrupted run, each once; the server got it all."""
    from tests.test_clients import finish, start_client, without_importtime

    daemon = await start_daemon(endpointing={"max_segment_s": SEGMENT_S})
    direct = f"ws://127.0.0.1:{daemon.port}"
    rc, out, err = await finish(await start_client("ws_client.py", str(speech_wav), "--url", direct, "--realtime",
                                                   "--json"))
    assert rc == 0, without_importtime(err)
    expected = [m for m in json_lines(out) if m["type"] == "final"]
    async with Proxy(daemon.port) as proxy:
        proc = await start_client("ws_client.py", str(speech_wav), "--url", f"ws://127.0.0.1:{proxy.port}",
                                  "--realtime", "--json")
        assert proc.stdout is not None
        head: list[str] = []
        async with asyncio.timeout(20 * TIMEOUT):
            while not head or '"type":"partial"' not in head[-1] or '"segment":1' not in head[-1]:
                head.append((await proc.stdout.readline()).decode())
        await proxy.outage(0.5)  # mid-way through the second segment: audio and results are lost, then the cut
        rc, out, err = await finish(proc)
    assert proxy.lost_bytes > 10000  # some of the audio had to be sent again
    assert rc == 0, without_importtime(err)
    messages = json_lines("".join(head) + out)
    readies = [m for m in messages if m["type"] == "ready"]
    assert [r["resumed"] for r in readies] == [False, True] and proxy.connections == 2
    assert "ws_client: resumed session" in err and "connection lost" in err
    assert comparable([m for m in messages if m["type"] == "final"]) == comparable(expected)
    assert messages[-1]["type"] == "end" and messages[-1]["segments"] == len(expected)
    assert "server received" not in err and "lost" not in err.replace("connection lost", "")


class MicURL:
    """`streamer mic --url URL --json` running in this loop on a FileMic (see ``file_mics``), its output kept."""

    def __init__(self, url: str, *argv: str) -> None:
        from streamer.mic_remote import run_remote
        from streamer.terminal_captions import Captions
        from tests.test_clients import mic_args

        self.out, self.err, self.stop = io.StringIO(), io.StringIO(), asyncio.Event()
        captions = Captions(self.out, self.err, as_json=True)
        self.task = asyncio.create_task(run_remote(mic_args("--url", url, *argv), captions, self.stop))

    async def until(self, predicate: Callable[[], object], seconds: float = 20) -> None:
        """Wait for ``predicate`` to hold (the client is still running)."""
        try:
            async with asyncio.timeout(seconds * TIMEOUT):
                while not predicate():
                    assert not self.task.done(), self.err.getvalue()
                    await asyncio.sleep(0.01)
        except TimeoutError:
            pytest.fail(f"not there after {seconds} s; stdout:\n{self.out.getvalue()}\nstderr:\n{self.err.getvalue()}")

    @classmethod
    async def mid_segment(cls, port: int, stream: str, mics: list[FileMic], audio: np.ndarray) -> MicURL:
        """Connected to ``port`` as ``stream``, with ``audio`` spoken into the microphone it opened (the newest
        of ``mics``) and the second segment's partial shown."""
        client = cls(f"ws://127.0.0.1:{port}", "--stream", stream)
        await client.until(lambda: f"connected: stream {stream}" in client.err.getvalue())
        mics[-1].feed(audio)
        await client.until(lambda: f'"type":"partial","stream":"{stream}","segment":1' in client.out.getvalue())
        return client

    async def finish(self) -> tuple[int, list[dict[str, Any]], str]:
        """Ctrl-C: the exit status, the messages printed and the status lines."""
        self.stop.set()
        async with asyncio.timeout(30 * TIMEOUT):
            rc = await self.task
        return rc, json_lines(self.out.getvalue()), self.err.getvalue()


def finals_of(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] == "final"]


async def test_streamer_mic_url_resumes_through_a_dropped_connection(
    start_daemon: Start, file_mics: list[FileMic], speech_16k: np.ndarray  # noqa: F811
) -> None:
    """`streamer mic --url`, its connection dead for a while and then cut mid-segment by a relay: it reconnects, says
    "resumed", re-sends what the server missed and shows the same finals as an uninterrupted run, each once."""
    daemon = await start_daemon(endpointing={"max_segment_s": SEGMENT_S})
    plain = MicURL(f"ws://127.0.0.1:{daemon.port}", "--stream", "plain")
    await plain.until(lambda: "connected: stream plain" in plain.err.getvalue())
    file_mics[-1].feed(speech_16k)
    rc, messages, err = await plain.finish()
    assert rc == 0, err
    expected, expected_end = finals_of(messages), messages[-1]
    assert len(expected) >= 3 and expected_end["type"] == "end" and "(resumed" not in err
    half = len(speech_16k) * 7 // 10  # the second segment is open (max_segment_s: 1 s; 2.6 s of speech)
    async with Proxy(daemon.port) as proxy:
        roam = await MicURL.mid_segment(proxy.port, "roam", file_mics, speech_16k[:half])
        outage = asyncio.create_task(proxy.outage(0.5))
        await asyncio.sleep(0)  # the outage begins
        file_mics[-1].feed(speech_16k[half:])  # sent while the link is dead: lost on the way
        await outage
        await roam.until(lambda: "(resumed at" in roam.err.getvalue())
        rc, messages, err = await roam.finish()
    assert rc == 0, err
    assert proxy.connections == 2 and proxy.lost_bytes > 10000  # audio had to be sent again
    assert "connection to" in err and "lost" in err and "resume_failed" not in err
    assert "lost while disconnected" not in err
    assert comparable(finals_of(messages)) == comparable(expected)
    assert messages[-1] == {**expected_end, "stream": "roam"}  # the server got all the audio, once


async def test_streamer_mic_url_goes_on_in_a_new_session_when_the_resume_fails(
    start_daemon: Start, file_mics: list[FileMic], speech_16k: np.ndarray  # noqa: F811
) -> None:
    """The connection comes back to a daemon that does not know the session (as after a restart): resume_failed is
    shown, the status line says it is a new session, and the audio captured meanwhile goes to that one."""
    first = await start_daemon(endpointing={"max_segment_s": SEGMENT_S})
    second = await start_daemon(endpointing={"max_segment_s": SEGMENT_S})
    half = len(speech_16k) * 7 // 10  # the second segment is open (max_segment_s: 1 s; 2.6 s of speech)
    async with Proxy(first.port) as proxy:
        mic = await MicURL.mid_segment(proxy.port, "moved", file_mics, speech_16k[:half])
        proxy.target = second.port
        proxy.cut()
        file_mics[-1].feed(speech_16k[half:])  # captured while away
        await mic.until(lambda: mic.err.getvalue().count("connected: stream moved") == 2)
        rc, messages, err = await mic.finish()
    assert rc == 0, err
    errors = [m for m in messages if m["type"] == "error"]  # --json: on stdout; on a terminal, a line on stderr
    assert [e["code"] for e in errors] == ["resume_failed"] and "no such session" in errors[0]["message"]
    assert "connected: stream moved, model streamer-tdt-small (a new session: the old one could not be resumed)" in err
    end = messages[-1]
    rest_s = (len(speech_16k) - half) / 16000  # less what went into the dead socket before the client noticed
    assert end["type"] == "end" and rest_s - 0.2 < end["audio_s"] <= round(rest_s, 3)
    segments = [f["segment"] for f in finals_of(messages)]
    before = len(segments) - end["segments"]  # the old session's finals, then the new one's from 0
    assert before >= 1 and segments == list(range(before)) + list(range(end["segments"]))
