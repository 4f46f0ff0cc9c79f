"""Hostile input: limits on a client's text message, no 1011 for anything a client sends, valid JSON out.

Against the running daemon (the tiny random model on a loopback port, real websockets clients) where a
defect was seen there, and in-process for the parser's and serialiser's own contracts. The fuzz test is
tests/test_fuzz.py.
"""

# ruff: noqa: F811  (pytest fixtures imported from test_server are redefined as test parameters)

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect

from streamer.protocol import (
    MAX_ID_CHARS,
    MAX_INT_DIGITS,
    MAX_JSON_DEPTH,
    MAX_NUMBER_CHARS,
    MAX_TEXT_BYTES,
    Error,
    Final,
    KeepAlive,
    MessageError,
    Partial,
    WordTiming,
    parse_client_message,
    to_dict,
)
from tests.test_server import (  # noqa: F401  (fixtures)
    Start,
    check_segments,
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


def strict_loads(text: str | bytes) -> Any:
    """``json.loads`` as a browser's ``JSON.parse`` reads it: NaN, Infinity and -Infinity are errors."""

    def refuse(literal: str) -> Any:
        raise ValueError(f"{literal} is not JSON")

    return json.loads(text, parse_constant=refuse)


async def expect_error(ws: ClientConnection, code: str, fragment: str) -> dict[str, Any]:
    msg = await recv(ws)
    assert msg["type"] == "error" and msg["code"] == code, msg
    assert fragment in msg["message"], msg
    return msg


async def speak(ws: ClientConnection, data: bytes) -> list[dict[str, Any]]:
    """Send the speech and ``stop`` on a started session; its results must hold a final with words, then end
    and close 1000."""
    await send_audio(ws, data)
    await ws.send(json.dumps({"type": "stop"}))
    messages, code = await recv_all(ws)
    assert code == 1000, (code, messages[-3:])
    finals = check_segments([m for m in messages if m["type"] in ("partial", "final")])
    assert finals and any(f["words"] for f in finals), messages
    assert messages[-1]["type"] == "end"
    return messages


def nested(depth: int) -> str:
    return '{"type": "keepalive", "x": ' + '{"a": ' * depth + "1" + "}" * depth + "}"


# The inputs that closed a session with 1011 "internal error" before the limits, with a fragment of the reason
# given instead. The server's frame limit (1 MiB) lets each of them through to the parser.
BEFORE_START = [
    pytest.param("[" * 1000 + "]" * 1000, f"nested 1000 deep; the limit is {MAX_JSON_DEPTH}", id="1000-arrays"),
    pytest.param('{"type": "start", "sample_rate": ' + "1" * 4301 + ', "encoding": "pcm_s16le"}',
                 f"integer of 4301 digits is over the limit of {MAX_INT_DIGITS}", id="4301-digits"),
]
MID_STREAM = [
    pytest.param(nested(100_000), f"over the limit of {MAX_TEXT_BYTES} bytes", id="100000-objects"),
    pytest.param(nested(5_000), f"nested 5001 deep; the limit is {MAX_JSON_DEPTH}", id="5000-objects"),
    pytest.param('{"type": "keepalive", "n": -' + "9" * 5000 + "}", "integer of 5000 digits", id="5000-digits"),
]


@pytest.mark.parametrize(("text", "reason"), BEFORE_START)
async def test_hostile_message_before_start_is_refused_and_the_session_goes_on(
    start_daemon: Start, pcm: tuple[bytes, int], text: str, reason: str
) -> None:
    """Deep nesting or a huge integer before ``start``: error bad_message naming the limit (not close 1011), then a
    start on the same connection gets ready and its speech a final with words."""
    daemon = await start_daemon()
    data, rate = pcm
    async with connect(url(daemon, "/v1/listen")) as ws:
        await ws.send(text)
        await expect_error(ws, "bad_message", reason)
        await ws.send(start_msg(rate, stream="after"))
        assert (await recv(ws))["type"] == "ready"
        await speak(ws, data)


@pytest.mark.parametrize(("text", "reason"), MID_STREAM)
async def test_hostile_message_mid_stream_is_refused_and_the_segment_survives(
    start_daemon: Start, pcm: tuple[bytes, int], text: str, reason: str
) -> None:
    """A hostile message between audio frames: error bad_message naming the limit; the open segment goes on and
    the session ends normally with its finals."""
    daemon = await start_daemon()
    data, rate = pcm
    half = len(data) // 2 & ~1
    async with connect(url(daemon, "/v1/listen"), max_size=None) as ws:
        await ws.send(start_msg(rate, stream="mid"))
        assert (await recv(ws))["type"] == "ready"
        await send_audio(ws, data[:half])
        await ws.send(text)
        messages = await recv_until(ws, "error")
        assert reason in messages[-1]["message"] and messages[-1]["code"] == "bad_message"
        await speak(ws, data[half:])
    assert daemon.metrics.protocol_errors_total.value("bad_message") == 1


async def test_resume_token_with_a_lone_surrogate_is_refused_and_both_sessions_go_on(
    start_daemon: Start, pcm: tuple[bytes, int]
) -> None:
    """A resume naming a live session with a token holding a lone surrogate: bad_message, not 1011; that
    connection may start a session of its own, and the named session is untouched."""
    daemon = await start_daemon()
    data, rate = pcm
    async with connect(url(daemon, "/v1/listen")) as owner, connect(url(daemon, "/v1/listen")) as intruder:
        await owner.send(start_msg(rate, stream="owner"))
        session = (await recv(owner))["session"]
        resume = {"session": session, "token": "\ud800", "next_segment": 0}
        await intruder.send(start_msg(rate, resume=resume))  # ensure_ascii: the surrogate goes as the escape \ud800
        await expect_error(intruder, "bad_message", "lone surrogate")
        await intruder.send(start_msg(rate, stream="intruder"))
        ready = await recv(intruder)
        assert ready["type"] == "ready" and ready["session"] != session and not ready["resumed"]
        await speak(owner, data)
        await speak(intruder, data)


async def test_a_failure_handling_a_message_is_internal_error_and_the_session_goes_on(
    start_daemon: Start, pcm: tuple[bytes, int], caplog: pytest.LogCaptureFixture
) -> None:
    """A bug while handling a message (injected: the scheduler fails to open the channel once) is answered with
    error internal_error, logged at ERROR with the session id and traceback, and counted; the same connection's
    next start works."""
    daemon = await start_daemon()
    data, rate = pcm
    real_open = daemon.scheduler.open

    def fail_once(*args: Any, **kwargs: Any) -> Any:
        daemon.scheduler.open = real_open  # type: ignore[method-assign]
        raise RuntimeError("injected fault")

    daemon.scheduler.open = fail_once  # type: ignore[method-assign]
    async with connect(url(daemon, "/v1/listen")) as ws:
        await ws.send(start_msg(rate, stream="unlucky"))
        error = await expect_error(ws, "internal_error", "the session goes on")
        await ws.send(start_msg(rate, stream="unlucky"))
        ready = await recv(ws)
        assert ready["type"] == "ready" and ready["session"] in error["message"]
        await speak(ws, data)
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failures) == 1 and failures[0].exc_info is not None
    assert ready["session"] in failures[0].getMessage() and "injected fault" in str(failures[0].exc_info[1])
    assert daemon.metrics.protocol_errors_total.value("internal_error") == 1


async def test_absurd_float_audio_gives_only_strict_json(start_daemon: Start, pcm: tuple[bytes, int]) -> None:
    """pcm_f32le speech scaled to 1e20 (finite float32): every message the client gets parses as strict JSON
    (no NaN, no Infinity), and the session ends with end and 1000."""
    daemon = await start_daemon()
    data, rate = pcm
    speech = np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
    absurd = (speech * np.float32(1e20) + np.float32(1e20)).astype("<f4")
    assert np.isfinite(absurd).all()
    async with connect(url(daemon, "/v1/listen")) as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": rate, "encoding": "pcm_f32le", "stream": "loud",
                                  "endpointing": {"max_segment_s": 1.0}}))
        await send_audio(ws, absurd.tobytes(), frame_bytes=8820)
        await ws.send(json.dumps({"type": "stop"}))
        texts: list[str] = []
        async for text in ws:
            texts.append(text)  # type: ignore[arg-type]
        code = ws.close_code
    messages = [strict_loads(t) for t in texts]
    assert code == 1000 and messages[0]["type"] == "ready" and messages[-1]["type"] == "end"
    for final in (m for m in messages if m["type"] == "final"):
        assert final["confidence"] is None or 0 <= final["confidence"] <= 1


# ---------------------------------------------------------------- the parser's limits, in-process


@pytest.mark.parametrize(
    ("text", "code", "fragment"),
    [
        ("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "bad_message", "the limit is 16"),
        ('{"type": "keepalive", "x": "' + "[{" * 1000 + '"}', "bad_message", "unknown field 'x'"),  # in a string
        ('{"type": "keepalive", "x": "\\"' + "[" * 100 + '"}', "bad_message", "unknown field 'x'"),  # after \"
        ('{"type": "keepalive", "x": "' + "[" * 100, "bad_json", "Unterminated string"),
        ('{"type": "keepalive", "x": "\\\\", "y": ' + "[" * 17 + "]" * 17 + "}", "bad_message", "nested 18 deep"),
        ('{"type": "keepalive", "x": "' + '\\"[' * 20_000, "bad_json", "Unterminated string"),  # linear scan
        ('{"type": "keepalive", "x": "' + "a" * MAX_TEXT_BYTES + '"}', "bad_message", "over the limit of 65536"),
        ('{"type": "keepalive", "x": "' + "é" * (MAX_TEXT_BYTES // 2) + '"}', "bad_message", "bytes is over"),
        (b'{"type": "keepalive", "x": "' + b"a" * MAX_TEXT_BYTES + b'"}', "bad_message", "over the limit"),
        (b'{"type": "keepalive", "x": "\xff"}', "bad_json", "not UTF-8"),
        ('{"type": "start", "sample_rate": 1' + "0" * MAX_INT_DIGITS + ', "encoding": "pcm_s16le"}',
         "bad_message", f"33 digits is over the limit of {MAX_INT_DIGITS}"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "endpointing": {"max_segment_s": 1e400}}',
         "bad_message", "1e400 is out of range"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "endpointing": {"max_segment_s": 1.'
         + "5" * MAX_NUMBER_CHARS + "}}", "bad_message", f"over the limit of {MAX_NUMBER_CHARS}"),
        ('{"type": "start", "sample_rate": Infinity, "encoding": "pcm_s16le"}', "bad_message",
         "'sample_rate' must be an integer, got inf"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "resume": {"session": "s", "token": "t", '
         '"next_segment": -Infinity}}', "bad_message", "'resume.next_segment' must be an integer >= 0, got -inf"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "endpointing": {"max_segment_s": NaN}}',
         "bad_message", "endpointing.max_segment_s must be a number of seconds, got nan"),
        ('{"type": "keepalive", "\\udc00": 1}', "bad_message", "lone surrogate"),
        ('{"type": "\\ud800x"}', "bad_message", "lone surrogate"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", '
         '"resume": {"session": "a\\u0007", "token": "t"}}', "bad_message", "'resume.session' 'a\\x07' holds"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", '
         '"resume": {"session": "s", "token": "t\\u0085"}}', "bad_message", "'resume.token'"),
        ('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", '
         '"resume": {"session": "s", "token": "' + "t" * (MAX_ID_CHARS + 1) + '"}}', "bad_message", "257 characters"),
        ('{"type": "' + "x" * 10_000 + '"}', "bad_message", "unknown message type 'xxxxx"),
    ],
)
def test_each_limit_is_refused_with_a_reason(text: str | bytes, code: str, fragment: str) -> None:
    """Each limit refuses its message with MessageError, a code and a reason naming the limit; nothing else
    escapes, and no reason echoes a whole hostile input."""
    with pytest.raises(MessageError) as info:
        parse_client_message(text)
    assert info.value.code == code and fragment in str(info.value), str(info.value)
    assert len(str(info.value)) < 300


def test_limits_leave_ordinary_messages_alone() -> None:
    """At the limits and below them messages parse: depth 16, 32 digits, a surrogate pair, a non-ASCII key."""
    assert parse_client_message('{"type": "keepalive"}') == KeepAlive()
    deep = "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1)
    with pytest.raises(MessageError, match="unknown field"):
        parse_client_message('{"type": "keepalive", "x": ' + deep + "}")
    with pytest.raises(MessageError, match="out of range"):  # 32 digits parse: the range check refuses the value
        parse_client_message('{"type": "start", "sample_rate": ' + "9" * MAX_INT_DIGITS + ', "encoding": "pcm_s16le"}')
    with pytest.raises(MessageError, match="unknown field 'x'"):
        parse_client_message('{"type": "keepalive", "x": "\\ud83d\\ude00 ü"}')
    start = parse_client_message('{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "resume": '
                                 '{"session": "0123456789ab", "token": "' + "T" * MAX_ID_CHARS + '"}}')
    assert start.resume is not None and len(start.resume.token) == MAX_ID_CHARS  # type: ignore[union-attr]


# ---------------------------------------------------------------- the serialiser, in-process


def test_non_finite_numbers_are_written_as_null_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """A final with NaN and infinite numbers serialises to strict JSON with null in their place (the first of
    each field logged once); finite numbers are untouched."""
    word = WordTiming("hi", 0.5, float("inf"), float("nan"))
    final = Final("s", 0, "hi", 0.5, 1.0, (word,), (3,), float("nan"), False, "stop")
    with caplog.at_level(logging.WARNING, logger="streamer.protocol"):
        first, again = strict_loads(final.to_json()), strict_loads(final.to_json())
    assert first == again
    assert first["confidence"] is None and first["start"] == 0.5 and first["end"] == 1.0
    assert first["words"] == [{"word": "hi", "start": 0.5, "end": None, "confidence": None}]
    assert to_dict(final)["confidence"] is None  # what MQTT publishes
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) <= 3 and all("sent as null" in m for m in logged)  # at most once per field, ever
    assert strict_loads(Partial("s", 0, "x", "", 0.0, float("-inf")).to_json())["end"] is None


def test_lone_surrogates_in_server_text_become_replacement_characters() -> None:
    """A server message whose text holds a lone surrogate is still UTF-8 (a WebSocket text frame must be)."""
    text = Error("bad_message", "x\ud800y", "s").to_json()
    assert text.encode("utf-8") and strict_loads(text)["message"] == "x\ufffdy"


async def test_float32_channels_near_the_maximum_do_not_fail_the_mixdown(
    start_daemon: Start, pcm: tuple[bytes, int], caplog: pytest.LogCaptureFixture
) -> None:
    """Two pcm_f32le channels of 3e38 (finite; their float32 sum is not): the mono mix neither fails nor logs an
    error (the fuzz test found this), and every message is strict JSON up to end and 1000."""
    daemon = await start_daemon()
    data, rate = pcm
    speech = np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
    stereo = np.repeat(speech, 2).astype("<f4")
    async with connect(url(daemon, "/v1/listen")) as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": rate, "encoding": "pcm_f32le", "channels": 2}))
        assert (await recv(ws))["type"] == "ready"
        await ws.send(np.full(640, 3e38, "<f4").tobytes())
        await send_audio(ws, stereo.tobytes(), frame_bytes=8820)
        await ws.send(json.dumps({"type": "stop"}))
        texts = [text async for text in ws]
        code = ws.close_code
    messages = [strict_loads(t) for t in texts]
    assert code == 1000 and messages[-1]["type"] == "end", messages[-3:]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
