"""Fuzzing what a client may send: text messages, binary frames and their interleavings (issue 15, item 6).

A seeded mutator (:class:`Mutator`) makes cases: valid starts, mutated starts, every message type, random
JSON, deep nesting, huge numbers, bad Unicode, random characters, mutated texts, oversized texts, and
binary frames of odd, empty, random and absurd-float content, one to six actions per case.

- In-process: every text of :data:`PARSER_CASES` cases (and every binary frame, as bytes) goes to
  ``parse_client_message``; only :class:`MessageError` may escape, and whatever parses must round-trip.
- Against the running daemon (the tiny random model on a loopback port, real websockets clients):
  :data:`SERVER_CASES` cases pipelined over a few connections into the session core, while a normal session
  streams speech alongside; no connection is closed with 1011, nothing is logged at ERROR or with a
  traceback, every message the server writes is strict JSON, and the normal sessions get finals with words.

The seeds are fixed (``STREAMER_FUZZ_SEED`` overrides them) and every failure names its seed and case.
"""

# ruff: noqa: F811  (pytest fixtures imported from test_server are redefined as test parameters)

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from streamer.protocol import (
    ENCODINGS,
    ENDPOINT_KEYS,
    MAX_TEXT_BYTES,
    Finalize,
    KeepAlive,
    MessageError,
    Start,
    Stop,
    parse_client_message,
)
from tests.test_server import (  # noqa: F401  (fixtures)
    TIMEOUT,
    check_segments,
    pcm,
    recognizer,
    recv,
    recv_all,
    start_daemon,
    start_msg,
    url,
)
from tests.test_server import Start as StartDaemon

PARSER_SEED = int(os.environ.get("STREAMER_FUZZ_SEED", "15"))
SERVER_SEED = PARSER_SEED + 1
PARSER_CASES = 12_000
SERVER_CASES = 10_000
CONNECTIONS = 4  # fuzzing connections at once (their cases pipelined), besides the normal session
SYNC_EVERY = 8  # cases sent between two probes (see FuzzClient)
SESSION_PLACEHOLDER = "$session"  # replaced, when sent, by the id of a session the server really has
FUZZ_STREAMS = ("fz0", "fz1", "fz2")  # fuzzing connections compete for these; the normal session uses others
Action = tuple[str, str | bytes]  # ("text", message) or ("binary", frame)


class Mutator:
    """Seeded generator of client actions; the same seed gives the same cases."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self._texts: list[Callable[[], str]] = [
            self.valid_start, self.valid_start, self.mutated_start, self.mutated_start, self.control,
            self.control, self.random_json, self.deep, self.huge_number, self.bad_unicode, self.bad_unicode,
            self.random_chars, self.mutated_text, self.mutated_text, self.resume_start,
        ]

    def case(self) -> list[Action]:
        """One case: one to six actions, text and binary interleaved."""
        return [self.action() for _ in range(self.rng.choice((1, 1, 2, 2, 3, 4, 6)))]

    def action(self) -> Action:
        if self.rng.random() < 0.6:
            return "text", self.text()
        return "binary", self.frame()

    def text(self) -> str:
        if self.rng.random() < 0.003:  # rare: it costs bandwidth
            return self.oversized()
        return self.rng.choice(self._texts)()

    # ------------------------------------------------------------ text messages

    def start_body(self) -> dict[str, Any]:
        rng = self.rng
        body: dict[str, Any] = {"type": "start", "sample_rate": rng.choice((8000, 16000, 22050, 44100, 48000)),
                                "encoding": rng.choice(ENCODINGS)}
        if rng.random() < 0.5:
            body["channels"] = rng.randint(1, 8)
        if rng.random() < 0.5:
            body["stream"] = rng.choice(FUZZ_STREAMS)
        if rng.random() < 0.3:
            body["interim_results"] = rng.random() < 0.5
        if rng.random() < 0.4:
            keys = rng.sample(ENDPOINT_KEYS, rng.randint(1, len(ENDPOINT_KEYS)))
            body["endpointing"] = {k: round(rng.uniform(0.05, 20.0), 3) for k in keys}
        if rng.random() < 0.2:
            body["version"] = 1
        return body

    def valid_start(self) -> str:
        return json.dumps(self.start_body(), ensure_ascii=self.rng.random() < 0.5)

    def resume_start(self) -> str:
        body = self.start_body()
        body["resume"] = {"session": SESSION_PLACEHOLDER if self.rng.random() < 0.7 else self.word(),
                          "token": self.rng.choice((self.word(), "\ud800", "t\x00", "\udfff" * 3, "x" * 300)),
                          "next_segment": self.rng.choice((0, 1, 7, -1, 10**40, "0", None))}
        return json.dumps(body)  # ensure_ascii: surrogates go as \\udXXX escapes, as a hostile client sends them

    def mutated_start(self) -> str:
        rng, body = self.rng, self.start_body()
        for _ in range(rng.randint(1, 3)):
            op = rng.random()
            key = rng.choice([*body, "resume", "endpointing", "channels", "x"])
            if op < 0.3 and key in body:
                del body[key]
            elif op < 0.8:
                body[key] = self.value(2)
            elif isinstance(body.get("endpointing"), dict):
                body["endpointing"][rng.choice([*ENDPOINT_KEYS, "rule"])] = self.value(1)
            else:
                body[self.word()] = self.value(1)
        return json.dumps(body, ensure_ascii=rng.random() < 0.5)

    def control(self) -> str:
        rng = self.rng
        body: dict[str, Any] = {"type": rng.choice(("finalize", "keepalive", "keepalive", "finalize", "stop"))}
        if rng.random() < 0.1:
            body[self.word()] = self.value(1)
        if rng.random() < 0.05:
            body["type"] = rng.choice(("Start", "STOP", "end", "ready", "", " stop", "stop\x00"))
        return json.dumps(body)

    def random_json(self) -> str:
        value = self.value(4)
        if self.rng.random() < 0.6:
            value = {"type": self.rng.choice(("start", "stop", "finalize", "keepalive", self.word())),
                     **(value if isinstance(value, dict) else {"v": value})}
        return json.dumps(value, ensure_ascii=self.rng.random() < 0.5)

    def deep(self) -> str:
        rng = self.rng
        depth = rng.choice((14, 15, 16, 17, 20, 100, 1000, 5000, 20000))
        opener = rng.choice(("[", '{"a":', '[{"b":', '{"endpointing":'))
        inner = opener * depth
        closer = "".join("]" if c == "[" else "}" for c in opener if c in "[{")[::-1] * depth
        if rng.random() < 0.2:
            closer = closer[: len(closer) // 2]  # unbalanced
        return '{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "x": ' + inner + "1" + closer + "}"

    def huge_number(self) -> str:
        rng = self.rng
        digits = rng.choice((31, 32, 33, 100, 4300, 4301, 20000))
        literal = rng.choice((
            "-" * rng.randint(0, 1) + "1" + "0" * (digits - 1),
            "1." + "5" * digits, "1e" + str(digits), "-1e400", "1e-400", "NaN", "Infinity", "-Infinity",
            "0." + "0" * digits + "1", "1" + "0" * digits + ".0", "-0", "1E+99999",
        ))
        field = rng.choice(("sample_rate", "channels", "version", "x"))
        where = rng.choice((
            f'{{"type": "start", "{field}": {literal}, "sample_rate": 16000, "encoding": "pcm_s16le"}}',
            f'{{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "endpointing": '
            f'{{"max_segment_s": {literal}}}}}',
            f'{{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "resume": {{"session": "s", '
            f'"token": "t", "next_segment": {literal}}}}}',
            f"[{literal}]", literal,
        ))
        return where

    def bad_unicode(self) -> str:
        rng = self.rng
        bad = rng.choice(("\\ud800", "\\udfff", "\\ud83d", "\\ude00\\ud83d", "\\u0000", "\\u001f", "\\u007f",
                          "\\u0085", "\\ufffe", "\\uffff", "\\ud83d\\ude00", "\\u202e", "\x7f", "\x00", "\ufeff",
                          "\\", "\\x41", "\\u12", "\\U0001f600"))
        template = rng.choice((
            '{"type": "%s"}', '{"type": "keepalive", "%s": 1}',
            '{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "stream": "a%s"}',
            '{"type": "start", "sample_rate": 16000, "encoding": "pcm_%s"}',
            '{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "resume": '
            '{"session": "$session", "token": "tok%s"}}',
            '{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "resume": '
            '{"session": "%s", "token": "tok"}}',
            '{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le", "endpointing": {"%s": 1}}',
        ))
        return template.replace("%s", bad * rng.randint(1, 3))

    def random_chars(self) -> str:
        rng = self.rng
        n = rng.choice((0, 1, 2, 5, 20, 200))
        if rng.random() < 0.5:
            return bytes(rng.getrandbits(8) for _ in range(n)).decode("latin-1")
        return "".join(self.char() for _ in range(n))

    def mutated_text(self) -> str:
        rng = self.rng
        text = list(rng.choice((self.valid_start, self.control, self.resume_start))())
        for _ in range(rng.randint(1, 4)):
            op, i = rng.random(), rng.randrange(len(text) + 1)
            if op < 0.3 and text:
                del text[min(i, len(text) - 1)]
            elif op < 0.6:
                text.insert(i, rng.choice('{}[]",:0123456789eE-+.\\ untrfals') if rng.random() < 0.8 else self.char())
            elif op < 0.8 and text:
                text[min(i, len(text) - 1)] = rng.choice('{}[]":,\\0')
            else:
                text = text[:i]  # truncated
        return "".join(text)

    def oversized(self) -> str:
        filler = self.rng.choice(("a", "é", "[", " "))
        size = MAX_TEXT_BYTES // len(filler.encode()) + self.rng.randint(-20, 20)
        return '{"type": "keepalive", "x": "' + filler * size + '"}'

    # ------------------------------------------------------------ values and pieces

    def value(self, depth: int) -> Any:
        rng = self.rng
        kinds = ["null", "bool", "int", "big", "float", "str"] + (["list", "dict"] * 2 if depth > 0 else [])
        kind = rng.choice(kinds)
        if kind == "null":
            return None
        if kind == "bool":
            return rng.random() < 0.5
        if kind == "int":
            return rng.choice((0, 1, -1, 7, 8000, 16000, 48001, 2**31, -(2**63)))
        if kind == "big":
            return rng.randrange(10**20, 10**40)
        if kind == "float":
            return rng.choice((0.0, -0.0, 0.5, 1e-300, 1e308, 3600.0, 3600.0001, rng.uniform(-1e6, 1e6)))
        if kind == "str":
            return self.word()
        if kind == "list":
            return [self.value(depth - 1) for _ in range(rng.randint(0, 4))]
        return {self.word(): self.value(depth - 1) for _ in range(rng.randint(0, 4))}

    def word(self) -> str:
        rng = self.rng
        if rng.random() < 0.5:
            return rng.choice(("start", "stop", "pcm_s16le", "pcm_f32le", "fz0", "", "type", "sample_rate",
                               "resume", "a/b", "é", "中文", "\U0001f600", "x" * 70))
        return "".join(self.char() for _ in range(rng.randint(0, 12)))

    def char(self) -> str:
        """Any Unicode scalar value (a text frame cannot carry a lone surrogate), mostly small ones."""
        rng = self.rng
        top = rng.choice((0x80, 0x800, 0x10000, 0x110000))
        code = rng.randrange(top)
        return chr(code) if not 0xD800 <= code <= 0xDFFF else "\ufffd"

    # ------------------------------------------------------------ binary frames

    def frame(self) -> bytes:
        rng = self.rng
        kind = rng.random()
        if kind < 0.1:
            return b""
        if kind < 0.3:
            return bytes(rng.getrandbits(8) for _ in range(rng.choice((1, 2, 3, 5, 7, 9, 13))))
        if kind < 0.6:
            return rng.randbytes(rng.randrange(0, 2048))
        if kind < 0.8:
            value = rng.choice((float("nan"), float("inf"), float("-inf"), 1e20, -1e38, 3e38, 1.0, 0.0))
            return struct.pack("<f", value) * rng.choice((1, 2, 8, 160))
        if kind < 0.97:
            return bytes(rng.randrange(0, 1600, 2))  # silence, even sizes
        return rng.randbytes(rng.choice((65536, 65537)))  # larger than the ring's usual bites


def make_cases(seed: int, count: int) -> list[list[Action]]:
    mutator = Mutator(seed)
    return [mutator.case() for _ in range(count)]


def is_stop(text: str) -> bool:
    """True when the server reads ``text`` as ``stop`` (the client's own check: it must not fail)."""
    try:
        return isinstance(parse_client_message(text), Stop)
    except Exception:  # the parser's own failures are test_fuzz_parser_raises_only_message_error's business
        return False


def strict_loads(text: str | bytes) -> Any:
    """``json.loads`` as a browser's ``JSON.parse`` reads it: NaN, Infinity and -Infinity are errors."""

    def refuse(literal: str) -> Any:
        raise ValueError(f"{literal} is not JSON")

    return json.loads(text, parse_constant=refuse)


# ---------------------------------------------------------------- in-process: the parser


def test_fuzz_parser_raises_only_message_error() -> None:
    """Every generated text and frame either parses to a message that round-trips or raises MessageError
    with a known code; no other exception escapes the parser."""
    codes = {"bad_json", "bad_message", "unsupported_audio"}
    seen: Counter[str] = Counter()
    texts = 0
    print(f"fuzz seed {PARSER_SEED}, {PARSER_CASES} cases (STREAMER_FUZZ_SEED={PARSER_SEED} reproduces)")
    for index, case in enumerate(make_cases(PARSER_SEED, PARSER_CASES)):
        for _, payload in case:
            texts += 1
            where = f"seed {PARSER_SEED}, case {index}: {payload[:200]!r}"
            try:
                msg = parse_client_message(payload)
            except MessageError as exc:
                assert exc.code in codes and str(exc), where
                seen[exc.code] += 1
                continue
            except Exception as exc:  # the point: name what escaped, and where
                pytest.fail(f"{type(exc).__name__} escaped the parser ({exc}); {where}")
            assert isinstance(msg, Start | Finalize | Stop | KeepAlive), where
            assert parse_client_message(msg.to_json()) == msg, where
            seen[msg.type] += 1
    assert texts >= PARSER_CASES
    # the generator reaches every outcome, so a change that makes it trivial fails here
    assert all(seen[k] > 50 for k in ("bad_json", "bad_message", "unsupported_audio", "start", "keepalive")), seen


# ---------------------------------------------------------------- against the running daemon


class FuzzClient:
    """One fuzzing connection at a time: sends actions pipelined, reads (and checks) everything the server
    writes, and reconnects when the server closes.

    Every :data:`SYNC_EVERY` cases it sends a probe (an unknown message type) and waits for its error (or the
    close), so it never leaves more unread than a reading client would: the server's limit on unread results
    (close 1008) is for clients that do not read, which this one does.
    """

    def __init__(self, address: str, sessions: list[str], seed: int) -> None:
        self.address, self.sessions, self.seed = address, sessions, seed
        self.closes: Counter[int | None] = Counter()
        self.received: Counter[str] = Counter()
        self.ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._probe = ("", asyncio.Event())

    async def run(self, cases: list[tuple[int, list[Action]]]) -> None:
        for n, (index, case) in enumerate(cases, 1):
            for kind, payload in case:
                if isinstance(payload, str):
                    payload = payload.replace(SESSION_PLACEHOLDER, self.sessions[-1] if self.sessions else "s")
                await self._send(payload, f"seed {self.seed}, case {index} ({kind})")
            if n % SYNC_EVERY == 0 or n == len(cases):
                await self._sync(f"probe-{index}", f"seed {self.seed}, case {index}")
        await self._close()

    async def _send(self, payload: str | bytes, where: str) -> None:
        for _ in range(2):
            if self.ws is None:
                self.ws = await connect(self.address, max_size=None)
                self._reader = asyncio.create_task(self._read(self.ws, where))
            try:
                await self.ws.send(payload)
            except ConnectionClosed:
                await self._close()  # the server closed (a frame too big): a new connection
                continue
            if isinstance(payload, str) and is_stop(payload):  # as a client does: nothing more on this connection
                await self._sync("probe-stop", where)  # the close, or (no session to stop) the probe's answer
                await self._close()
            return
        raise AssertionError(f"a fresh connection closed at once; {where}")

    async def _sync(self, tag: str, where: str) -> None:
        """Wait until the server has answered everything sent so far (or closed the connection)."""
        if self.ws is None:
            return
        self._probe = (tag, asyncio.Event())
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(json.dumps({"type": tag}))
        try:
            async with asyncio.timeout(60 * TIMEOUT):
                await self._probe[1].wait()
        except TimeoutError:
            raise AssertionError(f"no answer to a probe within 60 s; {where}") from None

    async def _read(self, ws: ClientConnection, where: str) -> None:
        try:
            async for text in ws:
                assert isinstance(text, str), f"the server sent a binary frame; {where}"
                msg = strict_loads(text)
                self.received[msg["type"]] += 1
                if msg["type"] == "ready":
                    self.sessions.append(msg["session"])
                elif msg["type"] == "error" and self._probe[0] and repr(self._probe[0]) in msg["message"]:
                    self.received["error"] -= 1  # the probe's own answer is not a fuzz result
                    self._probe[1].set()
        except ConnectionClosed:
            pass
        finally:
            self._probe[1].set()  # nothing more comes on this connection

    async def _close(self) -> None:
        ws, reader = self.ws, self._reader
        self.ws = self._reader = None
        if ws is None or reader is None:
            return
        await ws.close()
        async with asyncio.timeout(30 * TIMEOUT):
            await reader
        self.closes[ws.close_code] += 1


async def normal_session(address: str, data: bytes, rate: int, stream: str, pace_s: float) -> list[dict[str, Any]]:
    """A well-behaved client: the speech (``pace_s`` between frames), stop, and every message until close."""
    async with connect(address) as ws:
        await ws.send(start_msg(rate, stream=stream, endpointing={"max_segment_s": 1.0}))
        assert (await recv(ws))["type"] == "ready"
        for i in range(0, len(data), 4410):
            await ws.send(data[i : i + 4410])
            await asyncio.sleep(pace_s)
        await ws.send(json.dumps({"type": "stop"}))
        messages, code = await recv_all(ws, timeout_s=120.0)
    assert code == 1000, (code, messages[-3:])
    finals = check_segments([m for m in messages if m["type"] in ("partial", "final")])
    assert any(f["words"] for f in finals) and messages[-1]["type"] == "end", messages
    return finals


@pytest.mark.slow
async def test_fuzz_server_no_1011_no_traceback_and_a_normal_session_gets_its_words(
    start_daemon: StartDaemon, pcm: tuple[bytes, int], caplog: pytest.LogCaptureFixture
) -> None:
    """SERVER_CASES fuzz cases over CONNECTIONS pipelined connections to a running daemon, while a normal
    session streams speech: no close 1011 (or any but 1000 and 1009), nothing logged at ERROR or with a
    traceback, every server message strict JSON, and normal sessions during and after get finals with words."""
    caplog.set_level(logging.WARNING)
    daemon = await start_daemon(server={"idle_timeout_s": 300.0})
    data, rate = pcm
    address = url(daemon, "/v1/listen")
    print(f"fuzz seed {SERVER_SEED}, {SERVER_CASES} cases (STREAMER_FUZZ_SEED={PARSER_SEED} reproduces)")
    cases = list(enumerate(make_cases(SERVER_SEED, SERVER_CASES)))
    sessions: list[str] = []
    clients = [FuzzClient(address, sessions, SERVER_SEED) for _ in range(CONNECTIONS)]
    alongside = asyncio.create_task(normal_session(address, data, rate, "normal", pace_s=0.05))
    async with asyncio.timeout(300 * TIMEOUT):
        await asyncio.gather(*(c.run(cases[i::CONNECTIONS]) for i, c in enumerate(clients)))
        await alongside
    await normal_session(address, data, rate, "after", pace_s=0.0)

    closes = sum((c.closes for c in clients), Counter())
    received = sum((c.received for c in clients), Counter())
    print(f"fuzz: closes {dict(closes)}, received {dict(received)}")
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not problems, f"seed {SERVER_SEED}: " + "\n".join(
        f"{r.levelname} {r.name}: {r.getMessage()}" for r in problems[:5])
    assert set(closes) <= {1000, 1009}, f"seed {SERVER_SEED}: close codes {dict(closes)}"
    assert received["ready"] > 100 and received["error"] > 1000 and received["end"] > 10, received
    assert daemon.metrics.protocol_errors_total.value("internal_error") == 0
