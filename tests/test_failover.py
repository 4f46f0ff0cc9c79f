"""Sessions that survive their replica (issue 21 item 3): two real daemons in a cluster (a real mosquitto, a real
redis-server, a shared resume secret), a client with :class:`streamer.client.ClientSession`'s bookkeeping (its
buffered audio, its token, its finals) streaming espeak speech to replica A.

- ``kill -9`` A mid-utterance: the client resumes on B, re-sends its audio from where B says, and gets every final
  exactly once, in order, numbered on; the words of the utterance the kill cut are there.
- SIGTERM A mid-utterance (a drain): A finalizes the segment, says ``moved`` and closes with 1012; the client
  resumes on B and loses no final.
- A tampered, expired, spent or unknown token is refused with ``resume_failed`` saying why, and a new session
  follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from streamer.client import ClientSession
from streamer.protocol import Final, Ready, Start, parse_server_message
from streamer.session.resume_token import TokenSigner
from tests.fixtures_realpeers import Mosquitto
from tests.fixtures_redis import RedisServer
from tests.serve_process import TIMEOUT, Served, serve
from tests.speech import espeak_sentences
from tests.test_cluster import env_of

MODEL = Path(__file__).resolve().parents[1] / "models" / "streamer-tdt-small" / "model.nemo"
FIRST, SECOND = "please turn off the lights in the kitchen", "set a timer for ten minutes"
SECRET = "failover-test-secret-0123456789"
WAIT_S = 60.0 * TIMEOUT
CHUNK_BYTES = 8820  # 0.2 s of s16le at espeak-ng's 22.05 kHz

pytestmark = [
    pytest.mark.slow,
    pytest.mark.broker,
    pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} is missing from this checkout"),
]


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int, int]:
    """Both sentences with a pause between and after (s16le bytes at espeak-ng's rate), and a byte offset in the
    middle of the second sentence."""
    spoken = espeak_sentences(tmp_path_factory.mktemp("spoken"), (FIRST, SECOND), dtype="int16")
    rate = spoken[FIRST][1]
    pause = np.zeros(round(1.5 * rate), dtype=np.int16)
    middle = len(spoken[FIRST][0]) + len(pause) + len(spoken[SECOND][0]) // 2
    pcm = np.concatenate([spoken[FIRST][0], pause, spoken[SECOND][0], pause]).tobytes()
    return pcm, rate, 2 * middle


@contextlib.asynccontextmanager
async def replica(tmp_path: Path, broker: Mosquitto, store: RedisServer, node: str,
                  **settings: str) -> AsyncIterator[Served]:
    folder = tmp_path / node
    folder.mkdir()
    env = env_of(broker, store, node) | {"STREAMER_CLUSTER__RESUME_SECRET": SECRET} | settings
    async with serve(folder, env) as served:
        await served.wait_for_log("results bus: subscribed")
        yield served


class Client:
    """A live ``/v1/listen`` client: what it captured is kept (``ClientSession``), sent, and re-sent after a
    resume from where the server says; every message it receives is recorded."""

    def __init__(self, rate: int, stream: str) -> None:
        self.session = ClientSession(Start(rate, "pcm_s16le", stream=stream, live=True))
        self.messages: list[dict[str, Any]] = []
        self.ws: ClientConnection | None = None

    async def open(self, port: int) -> Ready:
        """Connect, start (resuming the session if there is one), and take the ``ready``."""
        self.ws = await connect(f"ws://127.0.0.1:{port}/v1/listen")
        await self.ws.send(self.session.start_message().to_json())
        msg = await self.read_until(lambda m: m["type"] in ("ready", "error"))
        assert msg["type"] == "ready", msg  # a failed resume would say resume_failed first
        ready = parse_server_message(json.dumps(msg))
        assert isinstance(ready, Ready)
        assert self.session.on_ready(ready) == 0  # the client still had all the audio the server needs
        return ready

    async def capture_and_send(self, pcm: bytes) -> None:
        for i in range(0, len(pcm), CHUNK_BYTES):
            self.session.audio.add(pcm[i : i + CHUNK_BYTES])
        assert self.ws is not None
        for payload in self.session.unsent():
            await self.ws.send(payload)
            self.session.mark_sent(payload)

    async def read_until(self, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        assert self.ws is not None
        async with asyncio.timeout(WAIT_S):
            while True:
                msg = json.loads(await self.ws.recv())
                self.messages.append(msg)
                if msg["type"] == "final":
                    final = parse_server_message(json.dumps(msg))
                    assert isinstance(final, Final)
                    self.session.on_final(final)
                if done(msg):
                    return msg

    async def read_to_close(self) -> int | None:
        """Everything until the connection closes (a killed server's socket breaks); the close code."""
        assert self.ws is not None
        with contextlib.suppress(ConnectionClosed):
            await self.read_until(lambda m: False)
        return self.ws.close_code

    def finals(self) -> list[tuple[int, str]]:
        return [(m["segment"], m["text"]) for m in self.messages if m["type"] == "final"]


def mid_second_sentence(msg: dict[str, Any]) -> bool:
    return msg["type"] == "partial" and msg["segment"] == 1 and bool(msg["text"].strip())


def check_finals(client: Client, end: dict[str, Any]) -> str:
    """Every final once, in order, numbered 0..n-1, the accounting right; the text after the first final."""
    finals = client.finals()
    assert [segment for segment, _ in finals] == list(range(len(finals))), finals
    assert end["segments"] == len(finals) >= 2, (end, finals)
    assert "kitchen" in finals[0][1] and "kitchen" not in " ".join(t for _, t in finals[1:]), finals
    assert abs(end["audio_s"] - client.session.session_audio_s) < 0.002, (end, client.session.session_audio_s)
    times = [(m["start"], m["end"]) for m in client.messages if m["type"] == "final"]
    assert all(a[1] <= b[0] for a, b in zip(times, times[1:], strict=False)), times  # one clock throughout
    return " ".join(text for _, text in finals[1:])


async def refused_resume(port: int, rate: int, resume: dict[str, Any]) -> str:
    """Start with ``resume`` on a stream of its own: the ``resume_failed`` message (a new session follows)."""
    async with connect(f"ws://127.0.0.1:{port}/v1/listen") as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": rate, "encoding": "pcm_s16le", "stream": "probe",
                                  "resume": resume}))
        async with asyncio.timeout(WAIT_S):
            error, ready = json.loads(await ws.recv()), json.loads(await ws.recv())
        assert error["type"] == "error" and error["code"] == "resume_failed", error
        assert ready["type"] == "ready" and ready["resumed"] is False and ready["stream"] == "probe", ready
        await ws.send(json.dumps({"type": "stop"}))
        async with asyncio.timeout(WAIT_S):
            while json.loads(await ws.recv())["type"] != "end":
                pass
        return str(error["message"])


async def test_kill_9_mid_utterance_the_client_resumes_on_another_replica_without_losing_a_final(
    tmp_path: Path, mosquitto_broker: Mosquitto, redis_server: RedisServer, speech: tuple[bytes, int, int]
) -> None:
    pcm, rate, middle = speech
    async with replica(tmp_path, mosquitto_broker, redis_server, "node-a") as a, \
            replica(tmp_path, mosquitto_broker, redis_server, "node-b", STREAMER_SERVER__START_TIMEOUT_S="1") as b:
        # (B's start timeout is shorter than the lease A leaves behind: a resume waiting for it is not cut)
        client = Client(rate, "kitchen")
        first = await client.open(a.port)
        assert first.resume_token and first.resume_token.startswith("c1~") and not first.resumed
        await client.capture_and_send(pcm[:middle])
        cut_words = await client.read_until(mid_second_sentence)  # A is in the middle of the second utterance
        a.proc.kill()  # kill -9: no flush, no release
        await a.proc.wait()
        await client.read_to_close()
        assert client.finals()[:1] and client.finals()[0][0] == 0, client.finals()

        token = first.resume_token
        tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
        reason = await refused_resume(b.port, rate, {"session": first.session, "token": tampered, "next_segment": 1})
        assert "signature does not verify" in reason
        expired, _ = TokenSigner(SECRET.encode(), 60).issue(first.session, "kitchen", "node-a", time.time() - 120)
        reason = await refused_resume(b.port, rate, {"session": first.session, "token": expired, "next_segment": 1})
        assert "expired" in reason
        unknown, _ = TokenSigner(SECRET.encode(), 60).issue("0123456789ab", "kitchen", "node-a")
        reason = await refused_resume(b.port, rate, {"session": "0123456789ab", "token": unknown})
        assert "no such session in the cluster" in reason

        resumed = await client.open(b.port)  # through the load balancer, on another replica
        assert resumed.resumed and resumed.session == first.session and resumed.stream == "kitchen"
        assert 0 < (resumed.audio_s or 0) < middle / 2 / rate  # from the end of the last final, before the kill
        reason = await refused_resume(b.port, rate, {"session": first.session, "token": token, "next_segment": 1})
        assert "used already" in reason
        await client.capture_and_send(pcm[middle:])
        assert client.ws is not None
        await client.ws.send(json.dumps({"type": "stop"}))
        end = await client.read_until(lambda m: m["type"] == "end")
        after = check_finals(client, end)
        assert "timer" in after and "minutes" in after, (cut_words, client.finals())
        assert set(cut_words["text"].split()[:-1]) <= set(after.split()), (cut_words, after)  # heard before the kill
        assert any(m["type"] == "final" for m in client.messages[-4:])  # B's own results arrived too
        await client.ws.close()
    assert "taken over from server node-a" in b.log.read_text()


async def test_sigterm_drains_a_session_to_another_replica(
    tmp_path: Path, mosquitto_broker: Mosquitto, redis_server: RedisServer, speech: tuple[bytes, int, int]
) -> None:
    pcm, rate, middle = speech
    async with replica(tmp_path, mosquitto_broker, redis_server, "node-a") as a, \
            replica(tmp_path, mosquitto_broker, redis_server, "node-b") as b:
        client = Client(rate, "porch")
        first = await client.open(a.port)
        await client.capture_and_send(pcm[:middle])
        await client.read_until(mid_second_sentence)
        a.proc.send_signal(signal.SIGTERM)  # as Kubernetes' preStop or systemd would
        moved = await client.read_until(lambda m: m["type"] == "moved")
        assert await client.read_to_close() == 1012
        assert await a.proc.wait() == 0
        on_a = client.finals()
        assert [s for s, _ in on_a] == list(range(len(on_a))) and len(on_a) == 2, on_a  # the cut segment's final
        assert client.messages[-2]["type"] == "final" and client.messages[-2]["reason"] == "finalize"
        assert moved["session"] == first.session and moved["next_segment"] == len(on_a)
        assert moved["resume_token"] == first.resume_token

        resumed = await client.open(b.port)
        assert resumed.resumed and resumed.session == first.session
        assert resumed.audio_s == pytest.approx(moved["audio_s"], abs=1e-6) and moved["audio_s"] > 0
        await client.capture_and_send(pcm[middle:])
        assert client.ws is not None
        await client.ws.send(json.dumps({"type": "stop"}))
        end = await client.read_until(lambda m: m["type"] == "end")
        after = check_finals(client, end)
        assert "timer" in after and "minutes" in after, client.finals()
        await client.ws.close()
    log_a = a.log.read_text()
    assert "draining: 1 of 1 session(s) moved" in log_a
    assert "taken over from server node-a" in b.log.read_text()


async def test_a_replica_that_lives_hands_a_held_session_over_when_its_client_reconnects_elsewhere(
    tmp_path: Path, mosquitto_broker: Mosquitto, redis_server: RedisServer, speech: tuple[bytes, int, int]
) -> None:
    pcm, rate, middle = speech
    async with replica(tmp_path, mosquitto_broker, redis_server, "node-a") as a, \
            replica(tmp_path, mosquitto_broker, redis_server, "node-b") as b:
        client = Client(rate, "hall")
        first = await client.open(a.port)
        await client.capture_and_send(pcm[:middle])
        await client.read_until(mid_second_sentence)
        assert client.ws is not None
        client.ws.transport.abort()  # the network drops: no close frame, so A holds the session (and its lease)
        await client.read_to_close()
        await a.wait_for_log(f"session {first.session}: connection lost")
        resumed = await client.open(b.port)  # the balancer sends the reconnect to B; A is alive
        assert resumed.resumed and resumed.session == first.session
        await client.capture_and_send(pcm[middle:])
        await client.ws.send(json.dumps({"type": "stop"}))
        end = await client.read_until(lambda m: m["type"] == "end")
        after = check_finals(client, end)
        assert "timer" in after and "minutes" in after, client.finals()
        await client.ws.close()
        assert a.proc.returncode is None
    assert f"session {first.session}: handed over" in a.log.read_text()


class Balancer:
    """A TCP relay on 127.0.0.1 that sends each new connection to the first of ``ports`` that accepts it, as a
    load balancer whose first choice went away would (the multi-host HAProxy test is another one)."""

    def __init__(self, *ports: int) -> None:
        self.ports, self.port, self.routed = ports, 0, []  # routed: the port each connection went to
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Balancer:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for port in self.ports:
            with contextlib.suppress(OSError):
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
                break
        else:
            writer.transport.abort()
            return
        self.routed.append(port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_ws_client_follows_a_drained_session_to_another_replica(
    tmp_path: Path, mosquitto_broker: Mosquitto, redis_server: RedisServer, speech: tuple[bytes, int, int]
) -> None:
    """clients/ws_client.py --realtime through a balancer: A drains mid-utterance, the client gets ``moved``, its
    reconnect lands on B, it resumes, and it prints every final once."""
    from tests.test_clients import finish, start_client, without_importtime

    pcm, rate, _ = speech
    wav = tmp_path / "speech.wav"
    sf.write(wav, np.frombuffer(pcm, dtype=np.int16), rate)
    async with replica(tmp_path, mosquitto_broker, redis_server, "node-a") as a, \
            replica(tmp_path, mosquitto_broker, redis_server, "node-b") as b, Balancer(a.port, b.port) as balancer:
        proc = await start_client("ws_client.py", str(wav), "--url", f"ws://127.0.0.1:{balancer.port}", "--realtime",
                                  "--s16", "--stream", "desk", "--json")
        assert proc.stdout is not None
        head: list[str] = []
        async with asyncio.timeout(WAIT_S):
            while not head or not (head[-1].startswith("{") and mid_second_sentence(json.loads(head[-1]))):
                line = (await proc.stdout.readline()).decode()
                assert line, "ws_client ended early"
                head.append(line)
        a.proc.send_signal(signal.SIGTERM)
        rc, out, err = await finish(proc)
        assert await a.proc.wait() == 0
    assert rc == 0, without_importtime(err)
    messages = [json.loads(line) for line in "".join(head).splitlines() + out.splitlines() if line.startswith("{")]
    assert [m["resumed"] for m in messages if m["type"] == "ready"][-1] is True
    assert any(m["type"] == "moved" for m in messages) and "ws_client: resumed session" in err
    assert balancer.routed[0] == a.port and balancer.routed[-1] == b.port
    finals = [(m["segment"], m["text"]) for m in messages if m["type"] == "final"]
    assert [s for s, _ in finals] == list(range(len(finals))) and len(finals) >= 3, finals
    text = " ".join(t for _, t in finals)
    assert "kitchen" in finals[0][1] and "timer" in text and "minutes" in text, finals
    assert messages[-1]["type"] == "end" and messages[-1]["segments"] == len(finals)
    assert "server received" not in err  # the accounting matched what the client sent
