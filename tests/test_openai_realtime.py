"""``WS /v1/realtime?intent=transcription`` against ``streamer serve``: the ``openai`` SDK's realtime client as the
peer (GA ``session.update``, server VAD and manual commits, the beta ``transcription_session.update``), then a
raw WebSocket client for bad input, each answered with an ``error`` event in OpenAI's shape while the session
goes on; and SIGTERM, which completes the open turn before the connection closes."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.openai_peers import FIRST, KEY, SECOND, TIMEOUT, Served, check_words, needs_model, pcm16, serve, speak

pytestmark = [pytest.mark.slow, needs_model]

RATE = 24000
FRAME = 4800  # bytes: 100 ms of 16-bit audio at 24 kHz


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tmp_path_factory.mktemp("openai-realtime")) as served:
        yield served


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("openai-speech")
    return {text: speak(text, folder) for text in (FIRST, SECOND)}


def appends(pcm: bytes) -> list[dict[str, Any]]:
    return [{"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i : i + FRAME]).decode()}
            for i in range(0, len(pcm), FRAME)]


def ga_update(turn_detection: dict[str, Any] | None) -> dict[str, Any]:
    return {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": RATE}, "turn_detection": turn_detection,
        "transcription": {"model": "gpt-4o-transcribe", "language": "en", "prompt": "kitchen"}}}}}


@pytest.fixture
async def sdk(daemon: Served) -> AsyncIterator[AsyncOpenAI]:
    client = AsyncOpenAI(api_key=KEY, base_url=f"{daemon.http}/v1", websocket_base_url=f"{daemon.ws}/v1",
                         max_retries=0)
    yield client
    await client.close()


async def until(conn: Any, done: Callable[[list[Any]], bool]) -> list[Any]:
    """The connection's events until ``done`` says enough (each read under a timeout)."""
    events: list[Any] = []
    async with asyncio.timeout(60 * TIMEOUT):
        while not done(events):
            events.append(await conn.recv())
    return events


def completed(events: list[Any]) -> list[Any]:
    return [e for e in events if e.type == "conversation.item.input_audio_transcription.completed"]


async def test_server_vad_turns_carry_the_spoken_words_in_order(sdk: AsyncOpenAI, speech: dict[str, Path]) -> None:
    """GA session with server VAD: per turn speech_started, deltas, speech_stopped, committed, completed."""
    async with sdk.realtime.connect(model="gpt-4o-transcribe", extra_query={"intent": "transcription"}) as conn:
        created = await conn.recv()
        assert created.type == "session.created" and created.session.type == "transcription"
        await conn.send(ga_update({"type": "server_vad", "silence_duration_ms": 600}))
        updated = await conn.recv()
        assert updated.type == "session.updated"
        assert updated.session.audio.input.turn_detection.silence_duration_ms == 600
        assert updated.session.audio.input.transcription.language == "en"
        for text in (FIRST, SECOND):
            for event in appends(pcm16(speech[text], RATE, silence_after_s=3.0)):
                await conn.send(event)
        events = await until(conn, lambda es: len(completed(es)) == 2)
    turns = completed(events)
    check_words([FIRST, SECOND], [t.transcript for t in turns])
    previous = None
    for turn in turns:
        mine = [e for e in events if getattr(e, "item_id", None) == turn.item_id]
        kinds = [e.type.rsplit(".", 1)[-1] for e in mine]
        assert kinds[0] == "speech_started" and kinds[-1] == "completed", kinds
        assert [k for k in kinds if k != "delta"] == ["speech_started", "speech_stopped", "committed", "completed"]
        assert "".join(e.delta for e in mine if e.type.endswith(".delta")) == turn.transcript
        committed = next(e for e in mine if e.type == "input_audio_buffer.committed")
        assert committed.previous_item_id == previous
        previous = turn.item_id
        assert mine[0].audio_start_ms < next(e for e in mine if e.type.endswith("speech_stopped")).audio_end_ms


async def test_manual_commits_and_clear(sdk: AsyncOpenAI, speech: dict[str, Path]) -> None:
    """turn_detection null: a commit ends a turn (no VAD events); a commit of silence completes empty; a commit of
    nothing is refused; a clear drops the turn's text; audio before any update runs on the defaults."""
    async with sdk.realtime.connect(model="gpt-4o-transcribe", extra_query={"intent": "transcription"}) as conn:
        await conn.recv()  # session.created
        await conn.send(ga_update(None))
        assert (await conn.recv()).type == "session.updated"
        await conn.send({"type": "input_audio_buffer.commit"})
        refused = await conn.recv()
        assert refused.type == "error" and refused.error.code == "input_audio_buffer_commit_empty"
        for event in appends(pcm16(speech[FIRST], RATE)):
            await conn.send(event)
        await conn.send({"type": "input_audio_buffer.commit"})
        first = await until(conn, lambda es: len(completed(es)) == 1)
        for event in appends(bytes(RATE)):  # half a second of silence
            await conn.send(event)
        await conn.send({"type": "input_audio_buffer.commit"})
        quiet = await until(conn, lambda es: len(completed(es)) == 1)
        for event in appends(pcm16(speech[SECOND], RATE)):
            await conn.send(event)
        await conn.send({"type": "input_audio_buffer.clear"})
        for event in appends(pcm16(speech[FIRST], RATE)):
            await conn.send(event)
        await conn.send({"type": "input_audio_buffer.commit"})
        last = await until(conn, lambda es: len(completed(es)) == 1)
    assert not any("speech_" in e.type for e in first + quiet + last)
    for events, transcript in ((first, FIRST), (last, FIRST)):
        committed = next(e for e in events if e.type == "input_audio_buffer.committed")
        turn = completed(events)[0]
        assert turn.item_id == committed.item_id
        check_words([transcript], [turn.transcript])  # of the last, without the cleared sentence
        assert "".join(e.delta for e in events if e.type.endswith(".delta") and e.item_id == turn.item_id) == \
            turn.transcript
    assert [e.type for e in quiet] == ["input_audio_buffer.committed", completed(quiet)[0].type]
    assert completed(quiet)[0].transcript == "" and completed(quiet)[0].item_id == quiet[0].item_id
    assert quiet[0].previous_item_id == completed(first)[0].item_id
    assert "input_audio_buffer.cleared" in [e.type for e in last]


async def test_the_beta_session_update(sdk: AsyncOpenAI, speech: dict[str, Path]) -> None:
    """OpenAI-Beta: realtime=v1: transcription_session.created/.updated with the flat fields."""
    async with sdk.realtime.connect(model="gpt-4o-transcribe", extra_query={"intent": "transcription"},
                                    extra_headers={"OpenAI-Beta": "realtime=v1"}) as conn:
        created = json.loads(await conn.recv_bytes())
        assert created["type"] == "transcription_session.created"
        assert created["session"]["input_audio_format"] == "pcm16"
        await conn.send({"type": "transcription_session.update", "session": {  # type: ignore[misc,arg-type]
            "input_audio_format": "pcm16", "input_audio_transcription": {"model": "whisper-1", "language": "en"},
            "turn_detection": None}})
        updated = json.loads(await conn.recv_bytes())
        assert updated["type"] == "transcription_session.updated" and updated["session"]["turn_detection"] is None
        assert updated["session"]["input_audio_transcription"]["model"] == "whisper-1"
        for event in appends(pcm16(speech[SECOND], RATE)):
            await conn.send(event)
        await conn.send({"type": "input_audio_buffer.commit"})
        events = await until(conn, lambda es: len(completed(es)) == 1)
    check_words([SECOND], [completed(events)[0].transcript])


async def test_audio_before_any_update_and_the_caption_stream(daemon: Served, sdk: AsyncOpenAI,
                                                               speech: dict[str, Path]) -> None:
    """Appends right after session.created run on its defaults (server VAD); ``?stream=NAME`` names the stream
    that /v1/captions shows."""
    headers = {"Authorization": f"Bearer {KEY}"}
    async with connect(f"{daemon.ws}/v1/captions?stream=oa-live", additional_headers=headers) as viewer, \
            sdk.realtime.connect(model="x", extra_query={"intent": "transcription", "stream": "oa-live"}) as conn:
        assert (await conn.recv()).type == "session.created"
        for event in appends(pcm16(speech[FIRST], RATE, silence_after_s=3.0)):
            await conn.send(event)
        events = await until(conn, lambda es: len(completed(es)) == 1)
        async with asyncio.timeout(30 * TIMEOUT):
            while (caption := json.loads(await viewer.recv()))["type"] != "final":
                pass
    assert caption["stream"] == "oa-live" and caption["text"] == completed(events)[0].transcript
    check_words([FIRST], [caption["text"]])


async def raw_client(daemon: Served, **headers: str) -> ClientConnection:
    return await connect(f"{daemon.ws}/v1/realtime?intent=transcription",
                         additional_headers={"Authorization": f"Bearer {KEY}", **headers})


async def next_event(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(30 * TIMEOUT):
        return json.loads(await ws.recv())


async def test_bad_input_gets_error_events_and_the_session_goes_on(daemon: Served, speech: dict[str, Path]) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"{daemon.ws}/v1/realtime?intent=transcription",
                      additional_headers={"Authorization": "Bearer wrong"})
    assert refused.value.response.status_code == 401
    ws = await raw_client(daemon)
    assert (await next_event(ws))["type"] == "session.created"
    pcmu = {"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}}
    cases: list[tuple[str | bytes, str, str | None, str]] = [
        ("{not json", "invalid_json", None, "not valid JSON"),
        ('["a list"]', "missing_required_parameter", "type", "'type'"),
        ('{"type": "input_audio_buffer.push"}', "invalid_value", "type", "input_audio_buffer.push"),
        ('{"type": "response.create"}', "invalid_value", "type", "transcription session"),
        ('{"type": "input_audio_buffer.append", "audio": "***not base64***"}', "invalid_value", "audio", "base64"),
        ('{"type": "input_audio_buffer.append"}', "missing_required_parameter", "audio", "'audio'"),
        (b"\x00\x01 raw pcm", "invalid_value", None, "base64"),
        (json.dumps(pcmu), "invalid_value", "session.audio.input.format.type", "audio/pcmu"),
        (json.dumps({"type": "session.update", "session": {"type": "realtime"}}), "invalid_value", "session.type",
         "transcription"),
        (json.dumps({"type": "session.update", "event_id": "mine", "session": {"audio": {"input": {
            "turn_detection": {"silence_duration_ms": "long"}}}}}), "invalid_value",
         "session.audio.input.turn_detection.silence_duration_ms", "milliseconds"),
    ]
    for message, code, param, words in cases:
        await ws.send(message)
        event = await next_event(ws)
        assert event["type"] == "error", (message, event)
        error = event["error"]
        assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error"), error
        assert words in error["message"], (message, error)
    assert error["event_id"] == "mine"  # the last case named its event: the error says which it answers
    for event in appends(pcm16(speech[SECOND], RATE)):
        await ws.send(json.dumps(event))
    await ws.send(json.dumps(ga_update(None)))  # turn detection cannot change once audio came
    event = await next_event(ws)
    while event["type"] != "error":
        event = await next_event(ws)
    assert event["error"]["code"] == "session_in_progress"
    for event in appends(pcm16(speech[SECOND], RATE, silence_after_s=3.0)[len(pcm16(speech[SECOND], RATE)):]):
        await ws.send(json.dumps(event))
    async with asyncio.timeout(60 * TIMEOUT):
        while (event := await next_event(ws))["type"] != "conversation.item.input_audio_transcription.completed":
            pass
    check_words([SECOND], [event["transcript"]])
    await ws.close()


async def test_sigterm_completes_the_open_turn_then_closes(tmp_path: Path, speech: dict[str, Path]) -> None:
    """A turn still open at SIGTERM is flushed through this protocol: its completed event, then close 1001."""
    with serve(tmp_path) as daemon:
        ws = await raw_client(daemon)
        assert (await next_event(ws))["type"] == "session.created"
        for event in appends(pcm16(speech[FIRST], RATE)):  # no trailing silence: the turn stays open
            await ws.send(json.dumps(event))
        async with asyncio.timeout(60 * TIMEOUT):
            while (await next_event(ws))["type"] != "conversation.item.input_audio_transcription.delta":
                pass
        exit_code = asyncio.get_running_loop().run_in_executor(None, daemon.terminate)
        events = []
        try:
            async with asyncio.timeout(60 * TIMEOUT):
                async for message in ws:
                    events.append(json.loads(message))
        except ConnectionClosed:
            pass
        assert await exit_code == 0, daemon.log_tail()
    assert ws.close_code == 1001
    done = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert len(done) == 1
    check_words([FIRST], [done[0]["transcript"]])


async def test_a_full_server_refuses_in_each_apis_shape(tmp_path: Path, speech: dict[str, Path]) -> None:
    """server.max_sessions=1, taken by a realtime session: another one gets a server_busy error event and close
    1013, a file gets HTTP 503 in OpenAI's shape (the SDK's InternalServerError); once it ends, files go through."""
    with serve(tmp_path, "server.max_sessions=1") as daemon:
        first = await raw_client(daemon)
        assert (await next_event(first))["type"] == "session.created"
        for event in appends(pcm16(speech[FIRST], RATE)):
            await first.send(json.dumps(event))
        second = await raw_client(daemon)
        refused = await next_event(second)
        assert refused["type"] == "error" and refused["error"]["code"] == "server_busy"
        assert refused["error"]["type"] == "server_error"
        with pytest.raises(ConnectionClosed):
            await next_event(second)
        assert second.close_code == 1013
        sdk = AsyncOpenAI(api_key=KEY, base_url=f"{daemon.http}/v1", max_retries=0)
        with pytest.raises(openai.InternalServerError) as busy:
            await sdk.audio.transcriptions.create(file=speech[SECOND], model="whisper-1")
        assert busy.value.status_code == 503 and busy.value.code == "server_busy"
        await first.close()
        async with asyncio.timeout(30 * TIMEOUT):
            while True:  # the closed session's place frees up once its handler is done
                try:
                    result = await sdk.audio.transcriptions.create(file=speech[SECOND], model="whisper-1")
                    break
                except openai.InternalServerError:
                    await asyncio.sleep(0.2)
        check_words([SECOND], [result.text])
        await sdk.close()
