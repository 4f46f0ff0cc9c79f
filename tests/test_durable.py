"""Crash-safe MQTT finals: the SQLite journal, the sink on it against a real mosquitto, the real daemon killed -9."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import soundfile as sf
from websockets.asyncio.client import ClientConnection, connect

from streamer.asr.model import AsrModel
from streamer.engine.recognizer import Recognizer
from streamer.errors import ConfigError
from streamer.server.journal import FILE_NAME, FinalJournal
from streamer.server.mqtt import MqttSink
from streamer.service import Daemon
from streamer.settings import Settings, StateSettings, state_directory
from tests.fixtures_realpeers import TIMEOUT_FACTOR, Mosquitto, free_port
from tests.test_daemon import daemon  # noqa: F401  (the fixture: `streamer serve` as a subprocess)
from tests.test_mqtt import final, receive, running, subscriber, until

WAIT_S = 5 * TIMEOUT_FACTOR


# ---------------------------------------------------------------- the journal itself


def test_journal_keeps_rows_in_order_across_reopen(tmp_path: Path) -> None:
    """Appended rows come back oldest first after close and reopen; deleted ones do not; ids keep increasing."""
    journal = FinalJournal.open(tmp_path / "state")
    first = journal.apply([("a/final", "0"), ("a/final", "1"), ("b/final", "2")])
    assert journal.apply([("a/final", "3")], delete=[first[1]]) and len(journal) == 3
    journal.close()
    journal = FinalJournal.open(tmp_path / "state")
    try:
        assert [(r.topic, r.payload) for r in journal.rows()] == [("a/final", "0"), ("b/final", "2"), ("a/final", "3")]
        journal.apply([], delete=[r.row for r in journal.rows()])
        (newer,) = journal.apply([("a/final", "4")])
        assert newer > first[-1]  # an emptied queue never reuses an id: order holds across restarts
    finally:
        journal.close()


def test_journal_survives_a_process_killed_while_writing(tmp_path: Path) -> None:
    """SIGKILL in the middle of a stream of commits: every committed row is there, whole and in order, none torn."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from streamer.server.journal import FinalJournal\n"
        "journal = FinalJournal.open(Path(sys.argv[1]))\n"
        "for i in range(1_000_000):\n"
        "    journal.apply([('s/final', f'{i}:' + 'x' * 2000)])\n"
        "    print(i + 1, flush=True)\n"
    )
    with subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            committed = [int(proc.stdout.readline()) for _ in range(200)][-1]
        finally:
            proc.kill()  # SIGKILL: no atexit, no close, a transaction likely half written
    journal = FinalJournal.open(tmp_path)
    try:
        payloads = [row.payload for row in journal.rows()]
    finally:
        journal.close()
    assert len(payloads) >= committed
    assert payloads == [f"{i}:" + "x" * 2000 for i in range(len(payloads))]


def test_a_second_daemon_cannot_use_the_same_journal(tmp_path: Path) -> None:
    """The journal is locked while open: a second opener (another daemon) gets a ConfigError that says what to do."""
    journal = FinalJournal.open(tmp_path)
    try:
        with pytest.raises(ConfigError, match=r"another streamer uses it \(give each daemon its own state.dir\)"):
            FinalJournal.open(tmp_path)
    finally:
        journal.close()
    FinalJournal.open(tmp_path).close()  # free again once closed


def test_an_unusable_state_directory_is_a_clear_error(tmp_path: Path) -> None:
    """A state directory that cannot be created names the file and the settings that fix it."""
    (tmp_path / "file").write_text("not a directory")
    fix = r'set state.dir to a writable directory, or state.dir = "" to keep finals in memory only'
    with pytest.raises(ConfigError, match=rf"mqtt-outbox.sqlite3: .*{fix}"):
        FinalJournal.open(tmp_path / "file" / "state")


def test_the_session_journal_keeps_the_latest_token_and_the_last_finals(tmp_path: Path) -> None:
    """Per session: the latest token's hash (never the token), the last max_finals finals in order; "end" forgets
    the session; a reopened journal hands them back; a second daemon cannot open it."""
    from streamer.protocol import Final as FinalMessage
    from streamer.server.session_journal import SessionJournal, token_hash

    def final_of(segment: int) -> FinalMessage:
        return FinalMessage("desk", segment, f"words {segment}", 0.0, 1.0, (), (segment,), 0.9, False, "silence")

    journal = SessionJournal.open(tmp_path, max_finals=3)
    journal.apply([("token", "s1", "desk", token_hash("first")), ("token", "s2", "porch", token_hash("x"))])
    journal.apply([("final", "s1", f.segment, f.to_json()) for f in map(final_of, range(5))])
    journal.apply([("token", "s1", "desk", token_hash("second")), ("end", "s2")])
    with pytest.raises(ConfigError, match="another streamer uses it"):
        SessionJournal.open(tmp_path, max_finals=3)
    journal.close()
    journal = SessionJournal.open(tmp_path, max_finals=3)
    try:
        (orphan,) = journal.orphans().values()
    finally:
        journal.close()
    assert (orphan.session, orphan.stream, orphan.token_sha256) == ("s1", "desk", token_hash("second"))
    assert orphan.finals == [final_of(2), final_of(3), final_of(4)]
    assert b"second" not in (tmp_path / "sessions.sqlite3").read_bytes()


def test_state_directory_defaults() -> None:
    """Unset: systemd's $STATE_DIRECTORY (its first entry), else $XDG_STATE_HOME/streamer or ~/.local/state/streamer;
    "": off."""
    unset = StateSettings()
    assert state_directory(unset, {"STATE_DIRECTORY": "/var/lib/streamer:/var/lib/other"}) == Path("/var/lib/streamer")
    assert state_directory(unset, {"XDG_STATE_HOME": "/home/u/.state"}) == Path("/home/u/.state/streamer")
    assert state_directory(unset, {}) == Path.home() / ".local" / "state" / "streamer"
    assert state_directory(StateSettings(dir="/srv/asr"), {"STATE_DIRECTORY": "/x"}) == Path("/srv/asr")
    assert state_directory(StateSettings(dir=""), {"STATE_DIRECTORY": "/x"}) is None


# ---------------------------------------------------------------- the sink on a journal, real mosquitto


def new_sink(broker: Mosquitto, **kwargs: Any) -> MqttSink:
    kwargs.setdefault("device", "den")
    kwargs.setdefault("reconnect_min_s", 0.05)
    kwargs.setdefault("reconnect_max_s", 0.3)
    return MqttSink(broker.host, broker.port, **kwargs)


@pytest.mark.broker
async def test_a_burst_beyond_the_outbox_size_is_delivered_whole_while_the_broker_is_up(
    mosquitto_broker: Mosquitto,
) -> None:
    """With the broker connected nothing is dropped, whatever outbox_size: 200 finals at once all arrive, in order."""
    sink = new_sink(mosquitto_broker, outbox_size=2)
    async with subscriber(mosquitto_broker, "streamer/den/+/final") as messages, running(sink):
        await until(lambda: sink.connected, "the sink connects")
        for segment in range(200):
            sink.offer(final("kitchen" if segment % 2 else "hall", segment))
        got = [json.loads((await receive(messages)).payload)["segment"] for _ in range(200)]
    assert got == list(range(200))
    assert (sink.dropped_finals, sink.published_finals, sink.outbox_depth) == (0, 200, 0)


@pytest.mark.broker
async def test_journaled_finals_outlive_the_sink_and_are_delivered_first_exactly_once(
    mosquitto_broker: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Broker away: finals go to disk, past outbox_size the oldest are dropped (counted, logged once). A new sink
    on the same journal delivers the kept ones first, with their old run, then its own; the journal ends empty."""
    mosquitto_broker.stop()
    first = new_sink(mosquitto_broker, outbox_size=3, journal=FinalJournal.open(tmp_path))
    with caplog.at_level(logging.WARNING, logger="streamer.server.mqtt"):
        async with running(first):
            await until(lambda: first.last_error is not None, "the connection is refused")
            for segment in range(7):
                first.offer(final("kitchen", segment))
            await until(lambda: first.unsaved_finals == 0, "the finals are committed")
    assert (first.dropped_finals, first.outbox_depth) == (4, 3)
    assert sum("MQTT outbox full" in r.getMessage() for r in caplog.records) == 1
    journal = FinalJournal.open(tmp_path)
    assert [json.loads(r.payload)["segment"] for r in journal.rows()] == [4, 5, 6]

    mosquitto_broker.start()
    second = new_sink(mosquitto_broker, journal=journal)
    assert second.recovered_finals == 3 and second.run_id != first.run_id
    async with subscriber(mosquitto_broker, "streamer/den/+/final") as messages, running(second):
        second.offer(final("kitchen", 0, "after the restart"))
        got = [json.loads((await receive(messages)).payload) for _ in range(4)]
        await asyncio.sleep(0.2)
        assert messages.empty()  # exactly once
    assert [(m["run"], m["segment"]) for m in got] == [(first.run_id, 4), (first.run_id, 5), (first.run_id, 6),
                                                        (second.run_id, 0)]
    reopened = FinalJournal.open(tmp_path)
    try:
        assert len(reopened) == 0  # acknowledged finals were deleted
    finally:
        reopened.close()


# ---------------------------------------------------------------- the daemon


@pytest.mark.broker
async def test_metrics_count_the_finals_dropped_while_the_broker_is_away(
    tiny_nemo: Path, speech_wav: Path, tmp_path: Path
) -> None:
    """/metrics of the running daemon: streamer_mqtt_finals_dropped_total counts each final the full outbox dropped."""
    settings = Settings(server={"port": 0, "close_timeout_s": 2.0}, state={"dir": str(tmp_path)},
                        mqtt={"enabled": True, "host": "127.0.0.1", "port": free_port(), "outbox_size": 1})
    served = Daemon(settings, Recognizer(AsrModel.load(str(tiny_nemo)), (70, 1)))
    await served.start()
    stop = asyncio.Event()
    task = asyncio.create_task(served.run(stop))
    try:
        data, rate = sf.read(speech_wav, dtype="int16")
        await speak_finals(served.port, "desk", data.tobytes(), rate, 3)
        assert await metric(served.port, "streamer_mqtt_finals_dropped_total") == 2
        assert await metric(served.port, "streamer_mqtt_outbox_depth") == 1
        assert await metric(served.port, "streamer_mqtt_connected") == 0
    finally:
        stop.set()
        async with asyncio.timeout(30 * TIMEOUT_FACTOR):
            assert await task == 0


# ---------------------------------------------------------------- the real daemon, killed with -9


async def speak_finals(
    port: int, stream: str, pcm: bytes, rate: int, count: int, ready: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """``count`` finals on /v1/listen: speech, then finalize, each time; returns them as the client got them.
    The session's ``ready`` is appended to ``ready`` when given."""
    finals: list[dict[str, Any]] = []
    async with connect(f"ws://127.0.0.1:{port}/v1/listen") as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": rate, "encoding": "pcm_s16le", "stream": stream,
                                  "endpointing": {"max_segment_s": 60}}))
        message = await recv_json(ws)
        assert message["type"] == "ready", message
        if ready is not None:
            ready.append(message)
        finals += await finalize_speech(ws, pcm, count)
    return finals


async def finalize_speech(ws: ClientConnection, pcm: bytes, count: int) -> list[dict[str, Any]]:
    """``count`` times: the speech, then finalize; returns the finals as the client got them."""
    finals: list[dict[str, Any]] = []
    while len(finals) < count:
        for i in range(0, len(pcm), 8820):
            await ws.send(pcm[i : i + 8820])
        await ws.send(json.dumps({"type": "finalize"}))
        while (message := await recv_json(ws))["type"] != "final":
            assert message["type"] in ("partial", "warning"), message
        finals.append(message)
    return finals


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(60 * TIMEOUT_FACTOR):
        return json.loads(await ws.recv())


async def metric(port: int, name: str) -> float:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10 * TIMEOUT_FACTOR) as response:
            return response.read().decode()

    match = re.search(rf"^{name} (\S+)$", await asyncio.to_thread(get), re.MULTILINE)
    assert match, f"{name} is not in /metrics"
    return float(match.group(1))


@contextlib.asynccontextmanager
async def collector(broker: Mosquitto, topic: str) -> AsyncIterator[list[dict[str, Any]]]:
    """Every payload published on ``topic`` while the block runs, parsed, in arrival order."""
    received: list[dict[str, Any]] = []
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe(topic, qos=1)

        async def collect() -> None:
            async for message in client.messages:
                received.append(json.loads(message.payload))

        task = asyncio.create_task(collect())
        try:
            yield received
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def run_id(stderr: str) -> str:
    match = re.search(r"MQTT run id (\S+);", stderr)
    assert match, f"no run id in the daemon's log:\n{stderr[-3000:]}"
    return match.group(1)


@pytest.mark.slow
@pytest.mark.broker
async def test_finals_queued_for_an_absent_broker_survive_kill_9(
    daemon: Callable[..., Any],  # noqa: F811
    mosquitto_factory: Callable[..., Mosquitto],
    speech_wav: Path,
    tmp_path: Path,
) -> None:
    """Finals made while the broker is down survive SIGKILL; after a restart each reaches the broker once, in order,
    first, with the old run's id; the new run's finals follow with a new id (segment numbers start again at 0).
    The session itself died with the process: resuming it gets resume_failed and a new session."""
    broker = mosquitto_factory()
    broker.stop()  # its port stays free: nothing listens while the first daemon runs
    state = tmp_path / "state"
    settings = ("--set", "mqtt.enabled=true", "--set", "mqtt.host=127.0.0.1", "--set", f"mqtt.port={broker.port}",
                "--set", "mqtt.device_id=crashbox", "--set", f"state.dir={state}")
    data, rate = sf.read(speech_wav, dtype="int16")
    pcm = data.tobytes()

    first = await daemon(*settings)
    readies: list[dict[str, Any]] = []
    before = await speak_finals(first.port, "desk", pcm, rate, 3, readies)
    assert [f["segment"] for f in before] == [0, 1, 2]
    async with asyncio.timeout(WAIT_S):
        while await metric(first.port, "streamer_mqtt_outbox_depth") != 3 or \
                await metric(first.port, "streamer_mqtt_finals_unsaved") != 0:
            await asyncio.sleep(0.05)
    assert await metric(first.port, "streamer_mqtt_connected") == 0
    first.proc.kill()  # SIGKILL: no flush, no goodbye
    _, stderr = await first.proc.communicate()
    old_run = run_id(stderr.decode())
    assert (state / FILE_NAME).exists()

    broker.start()
    async with collector(broker, "streamer/crashbox/+/final") as received:
        second = await daemon(*settings)
        assert await metric(second.port, "streamer_mqtt_finals_recovered") == 3
        async with connect(f"ws://127.0.0.1:{second.port}/v1/listen") as ws:  # the session died with the process
            resume = {"session": readies[0]["session"], "token": readies[0]["resume_token"], "next_segment": 3}
            await ws.send(json.dumps({"type": "start", "sample_rate": rate, "encoding": "pcm_s16le", "resume": resume}))
            refused, ready = await recv_json(ws), await recv_json(ws)
            assert (refused["type"], refused["code"]) == ("error", "resume_failed"), refused
            assert (ready["type"], ready["resumed"]) == ("ready", False), ready
        after = await speak_finals(second.port, "desk", pcm, rate, 1)
        await until(lambda: len(received) >= 4, "the recovered finals and the new one arrive", 30 * TIMEOUT_FACTOR)
        code, stderr = await second.stop()
        assert code == 0, stderr
        await asyncio.sleep(0.3)  # a duplicate would arrive about now
    new_run = run_id(stderr)
    assert new_run != old_run
    strip = {"run"}
    assert [{k: v for k, v in m.items() if k not in strip} for m in received[:3]] == before  # whole, in order
    assert [m["run"] for m in received[:3]] == [old_run] * 3
    assert received[3:] == [{**after[0], "run": new_run}]  # exactly once each: nothing more came
    assert after[0]["segment"] == 0  # the same topic, the same segment number as before: only "run" tells them apart
    journal = FinalJournal.open(state)
    try:
        assert len(journal) == 0
    finally:
        journal.close()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "terminate"])
async def test_a_session_held_when_the_daemon_dies_replays_its_finals_after_the_restart(
    daemon: Callable[..., Any], speech_wav: Path, tmp_path: Path, how: str  # noqa: F811
) -> None:
    """A client loses its connection (no close frame: the session is held), then the daemon is killed -9 (or
    stopped with SIGTERM, which ends the held session) and started again on the same state directory. The
    client's resume gets resume_failed saying the server restarted, then the finals it lacks, exactly as it first
    got them, then a new session; the token works once. A session whose client had stopped is not kept."""
    state = tmp_path / "state"
    settings = ("--set", f"state.dir={state}", "--set", "server.resume_window_s=30")
    data, rate = sf.read(speech_wav, dtype="int16")
    pcm = data.tobytes()

    first = await daemon(*settings)
    async with connect(f"ws://127.0.0.1:{first.port}/v1/listen") as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": rate, "encoding": "pcm_s16le", "stream": "desk",
                                  "endpointing": {"max_segment_s": 60}}))
        ready = await recv_json(ws)
        finals = await finalize_speech(ws, pcm, 3)
        ws.transport.abort()  # the network drops: the session is held for its client
    ended = await speak_finals(first.port, "porch", pcm, rate, 1, stopped := [])  # a client that hung up itself
    async with asyncio.timeout(WAIT_S):  # the porch session is over (only the held desk is open), all on disk
        while await metric(first.port, "streamer_streams") != 1 or \
                await metric(first.port, "streamer_session_journal_unsaved") != 0:
            await asyncio.sleep(0.05)
    if how == "kill":
        first.proc.kill()  # SIGKILL: nothing flushed, nothing said
        await first.proc.communicate()
    else:
        code, stderr = await first.stop()
        assert code == 0, stderr

    second = await daemon(*settings)

    async def resume(session: dict[str, Any], next_segment: int) -> list[dict[str, Any]]:
        async with connect(f"ws://127.0.0.1:{second.port}/v1/listen") as ws:
            token = {"session": session["session"], "token": session["resume_token"], "next_segment": next_segment}
            await ws.send(json.dumps({"type": "start", "sample_rate": rate, "encoding": "pcm_s16le", "resume": token}))
            got = [await recv_json(ws)]
            while got[-1]["type"] != "ready":
                got.append(await recv_json(ws))
            return got

    refused, *replayed, new = await resume(ready, 1)
    assert (refused["code"], refused["type"]) == ("resume_failed", "error") and "restarted" in refused["message"]
    assert replayed == finals[1:]  # the finals the client lacked, whole, in order, once
    assert new["resumed"] is False and new["session"] != ready["session"]
    refused, new = await resume(ready, 1)  # a token works once
    assert refused["code"] == "resume_failed" and "restarted" not in refused["message"] and new["type"] == "ready"
    refused, new = await resume(stopped[0], 0)  # the stopped session was over: nothing kept
    assert refused["code"] == "resume_failed" and "restarted" not in refused["message"] and ended
    code, stderr = await second.stop()
    assert code == 0, stderr
