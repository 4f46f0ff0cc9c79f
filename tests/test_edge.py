"""The port's edge against the running daemon: Host and Origin checks, slots for sessions, the handshake cap, HTTP.

The daemon runs in-process with the tiny random model (tests/test_server.py's fixtures), or as `streamer serve`
(tests/test_daemon.py's fixture) where a process limit is needed; clients are real websockets clients and raw
sockets. No test may leave a traceback in the daemon's log.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import resource
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from streamer.errors import ConfigError
from streamer.settings import load_settings
from tests.test_browser import Wire, browser, fake_mic_wav, wait_state  # noqa: F401  (headless Chromium)
from tests.test_daemon import daemon  # noqa: F401  (`streamer serve` in a process)
from tests.test_server import (  # noqa: F401  (fixtures)
    Start,
    check_segments,
    pcm,
    recognizer,
    recv,
    recv_all,
    send_audio,
    start_daemon,
    start_msg,
)

TIMEOUT = float(os.environ.get("STREAMER_TEST_TIMEOUT_FACTOR", "1"))
EVIL = "https://evil.example"
TOKEN = "edge-token-5b1e0c"
UPGRADE = ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
           f"Sec-WebSocket-Key: {base64.b64encode(b'0123456789abcdef').decode()}\r\n")


@pytest.fixture(autouse=True)
def no_traceback_in_the_log(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Whatever a test sends, the daemon logs no traceback and no error."""
    caplog.set_level(logging.INFO)
    yield
    bad = [r for r in caplog.get_records("call") if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


def ws_url(server: Any, path: str, host: str = "127.0.0.1") -> str:
    return f"ws://{host}:{server.port}{path}"


async def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a new TCP connection, half-close nothing, read until the server closes."""

    def run() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10 * TIMEOUT) as s:
            s.sendall(data)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    return await asyncio.to_thread(run)


def responses(raw: bytes, head_only: bool = False) -> list[tuple[int, dict[str, str], bytes]]:
    """The HTTP responses in ``raw``: status, headers (lower-case names), body (by Content-Length).

    With ``head_only`` (answers to HEAD) a body is never read, so any bytes after the headers show up as a
    malformed next response and fail the test.
    """
    out = []
    while raw:
        head, sep, raw = raw.partition(b"\r\n\r\n")
        assert sep, f"an incomplete response: {head!r}"
        status_line, *lines = head.decode("iso-8859-1").split("\r\n")
        assert status_line.startswith("HTTP/1.1 "), f"not a response: {status_line!r}"
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        size = 0 if head_only else int(headers.get("content-length", "0"))
        out.append((int(status_line.split()[1]), headers, raw[:size]))
        raw = raw[size:]
    return out


async def get(port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET",
              host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request (``Host`` as given; the daemon's own address by default) and its one response."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    (answer,) = responses(await exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode()), method == "HEAD")
    return answer


async def refused(uri: str, **kwargs: Any) -> tuple[int, str]:
    """Status and body of a WebSocket upgrade that must be refused."""
    with pytest.raises(InvalidStatus) as info:
        async with asyncio.timeout(10 * TIMEOUT), connect(uri, **kwargs):
            pass
    return info.value.response.status_code, info.value.response.body.decode()


async def session_final(ws: ClientConnection, data: bytes, rate: int) -> list[dict[str, Any]]:
    """Start a session on ``ws``, send ``data``, stop: every message (ready first, end last); close 1000."""
    await ws.send(start_msg(rate))
    ready = await recv(ws)
    assert ready["type"] == "ready", ready
    await send_audio(ws, data)
    await ws.send(json.dumps({"type": "stop"}))
    messages, code = await recv_all(ws)
    assert code == 1000 and messages[-1]["type"] == "end" and check_segments(messages)[-1]["reason"] == "stop"
    return messages


# ---------------------------------------------------------------- origins and hosts


async def test_a_foreign_origin_is_refused_403_on_both_websockets_and_metrics(
    start_daemon: Start, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    """With the defaults, a page from another site gets HTTP 403 before the upgrade on /v1/listen and /v1/captions,
    and on /metrics; the body names the origin and the setting; each is counted, and logged once for the peer."""
    served = await start_daemon()
    for path in ("/v1/listen", "/v1/captions?stream=mic"):
        status, body = await refused(ws_url(served, path), additional_headers={"Origin": EVIL})
        assert status == 403 and "'https://evil.example'" in body and "server.allowed_origins" in body, body
    status, _, body = await get(served.port, "/metrics", {"Origin": EVIL})
    assert status == 403 and b"server.allowed_origins" in body
    assert served.metrics.connections_refused_total.value("origin") == 3
    assert served.metrics.sessions_total.value("listen") == 0 and served.hub.subscriber_count == 0
    logged = [r for r in caplog.records if "may not use this server" in r.getMessage()]
    assert len(logged) == 1 and "127.0.0.1" in logged[0].getMessage()


async def test_own_origins_and_no_origin_are_let_in(start_daemon: Start, pcm: tuple[bytes, int]) -> None:  # noqa: F811
    """The daemon's own page (http://127.0.0.1:PORT, http://localhost:PORT) and a client without Origin get their
    sessions and finals; a page on another port of this machine is another site and is refused."""
    served = await start_daemon()
    data, rate = pcm
    for origin in (f"http://127.0.0.1:{served.port}", f"http://localhost:{served.port}", None):
        headers = {"Origin": origin} if origin else None
        async with connect(ws_url(served, "/v1/listen"), additional_headers=headers) as ws:
            await session_final(ws, data, rate)
        async with connect(ws_url(served, "/v1/captions?stream=x"), additional_headers=headers) as sub:
            await sub.close()
    status, _ = await refused(ws_url(served, "/v1/listen"), additional_headers={"Origin": "http://localhost:3000"})
    assert status == 403
    assert (await get(served.port, "/metrics", {"Origin": f"http://[::1]:{served.port}"}))[0] == 200


async def test_a_foreign_host_is_refused_403_everywhere(start_daemon: Start) -> None:  # noqa: F811
    """DNS rebinding: a request whose Host is another name (evil.example pointed at 127.0.0.1) gets 403 on HTTP
    pages and on the WebSocket upgrade; the daemon's own names (any port: a port forward) are answered."""
    served = await start_daemon()
    port = served.port
    for path in ("/healthz", "/metrics", "/"):
        status, _, body = await get(port, path, host=f"evil.example:{port}")
        assert status == 403 and b"'evil.example:" in body and b"server.allowed_hosts" in body, body
    answer = await exchange(port, f"GET /v1/listen HTTP/1.1\r\nHost: evil.example:{port}\r\n{UPGRADE}\r\n".encode())
    assert responses(answer)[0][0] == 403
    for host in (f"localhost:{port}", "127.0.0.1", "[::1]:1234", "LOCALHOST."):
        assert (await get(port, "/healthz", host=host))[:3:2] == (200, b"ok\n"), host
    assert served.metrics.connections_refused_total.value("host") == 4


async def test_allowed_origins_star_and_a_proxy_name_in_allowed_hosts(
    start_daemon: Start, pcm: tuple[bytes, int]  # noqa: F811
) -> None:
    """allowed_origins = ["*"] lets the foreign origin in; allowed_hosts names a reverse proxy's public name, and
    its page (Origin = the Host the proxy passes on) gets a session without listing the origin."""
    data, rate = pcm
    anyone = await start_daemon(server={"allowed_origins": ["*"]})
    async with connect(ws_url(anyone, "/v1/listen"), additional_headers={"Origin": EVIL}) as ws:
        await session_final(ws, data, rate)
    proxied = await start_daemon(server={"allowed_hosts": ["captions.example.org"]})
    assert (await get(proxied.port, "/healthz", host="captions.example.org"))[0] == 200
    request = (f"GET /v1/listen HTTP/1.1\r\nHost: captions.example.org\r\nOrigin: https://captions.example.org\r\n"
               f"{UPGRADE}\r\n").encode()

    def upgrade_status() -> bytes:
        with socket.create_connection(("127.0.0.1", proxied.port), timeout=10 * TIMEOUT) as s:
            s.sendall(request)
            return s.recv(65536)

    assert (await asyncio.to_thread(upgrade_status)).startswith(b"HTTP/1.1 101 ")
    status, body = await refused(ws_url(proxied, "/v1/listen"), additional_headers={"Origin": EVIL})
    assert status == 403, body


@pytest.mark.slow
async def test_a_page_of_another_daemon_is_refused_until_its_origin_is_allowed(
    start_daemon: Start, browser: Any  # noqa: F811
) -> None:
    """Real Chromium: daemon A's caption page pointed at daemon B (?server=) sends A's origin; B refuses it (403,
    the page says to check allowed_origins) until B lists A's origin in server.allowed_origins."""
    page_host = await start_daemon()
    origin = f"http://127.0.0.1:{page_host.port}"
    strict = await start_daemon()
    for state in ("error", "connected"):
        target = strict if state == "error" else await start_daemon(server={"allowed_origins": [origin]})
        page = await browser.new_page()
        wire = Wire(page)
        await page.goto(f"{origin}/?stream=hall&server=ws://127.0.0.1:{target.port}")
        await wait_state(page, state, wire, seconds=15)
        if state == "error":
            assert "allowed_origins" in await page.locator("#conn").inner_text()
        await page.close()
    assert strict.metrics.connections_refused_total.value("origin") >= 1
    assert target.metrics.connections_refused_total.value("origin") == 0


def test_policy_when_serving_the_network() -> None:
    """Bound to every address: any IP address and this machine's name are hosts; a page is ours only at our
    names on our port or at the very host and port the request reached, never at a foreign address."""
    from streamer.server.origin import Authority, OriginPolicy

    policy = OriginPolicy("0.0.0.0", 8765, [], [])
    name = socket.gethostname().lower()
    for host in ("192.168.1.5:8765", "[fe80::1]:8765", name, "localhost:9"):
        assert policy.host_problem([host]) is None, host
    assert policy.host_problem(["evil.example:8765"]) is not None
    assert policy.host_problem(["a", "b"]) is not None
    assert policy.origin_problem("http://192.168.1.5:8765", "192.168.1.5:8765") is None
    assert policy.origin_problem("http://1.2.3.4:8765", "192.168.1.5:8765") is not None
    assert policy.origin_problem(f"http://{name}:8765", "192.168.1.5:8765") is None
    assert policy.origin_problem("null", "192.168.1.5:8765") is not None
    loopback = OriginPolicy("127.0.0.1", 8765, [], [])
    assert loopback.host_problem(["192.168.1.5:8765"]) is not None and loopback.host_problem([name]) is not None
    assert Authority.parse("[::1]:80") == Authority("::1", 80) and Authority.parse("a:b") is None


def test_bad_allowed_origins_and_hosts_name_the_value(tmp_path: Path) -> None:
    for toml, fragment in (('allowed_origins = ["evil.example"]', "'evil.example' is no origin"),
                           ('allowed_origins = ["https://a.example/page"]', "no path"),
                           ('allowed_hosts = ["http://a.example"]', "without a port or scheme")):
        path = tmp_path / "bad.toml"
        path.write_text(f"[server]\n{toml}\n")
        with pytest.raises(ConfigError, match="server.allowed_") as info:
            load_settings(path)
        assert fragment in str(info.value)


# ---------------------------------------------------------------- slots


async def test_silent_connections_sending_keepalives_lock_nobody_out(
    start_daemon: Start, pcm: tuple[bytes, int]  # noqa: F811
) -> None:
    """max_sessions (16) connections that never send start but keep sending keepalive do not take the sessions'
    places: a real client still gets ready, its finals and end."""
    served = await start_daemon()
    data, rate = pcm
    silent = [await connect(ws_url(served, "/v1/listen")) for _ in range(served.settings.server.max_sessions)]
    try:
        for ws in silent:
            await ws.send(json.dumps({"type": "keepalive"}))
        async with connect(ws_url(served, "/v1/listen")) as real:
            await session_final(real, data, rate)
    finally:
        for ws in silent:
            await ws.close()
    assert served.metrics.sessions_refused_total.value("listen") == 0


async def test_no_start_within_start_timeout_closes_1008_whatever_keepalives_say(
    start_daemon: Start, pcm: tuple[bytes, int]  # noqa: F811
) -> None:
    """A connection that only sends keepalive gets error start_timeout and close 1008 after start_timeout_s;
    a session started before it, still streaming past the deadline, goes on to its end."""
    served = await start_daemon(server={"start_timeout_s": 1.0})
    data, rate = pcm
    async with connect(ws_url(served, "/v1/listen")) as idler, connect(ws_url(served, "/v1/listen")) as talker:
        await talker.send(start_msg(rate))
        assert (await recv(talker))["type"] == "ready"

        async def keep_alive() -> None:
            while True:
                await idler.send(json.dumps({"type": "keepalive"}))
                await asyncio.sleep(0.2)

        pinging = asyncio.create_task(keep_alive())
        try:
            messages, code = await recv_all(idler, timeout_s=15)
        finally:
            pinging.cancel()
        assert code == 1008 and len(messages) == 1 and messages[0]["code"] == "start_timeout", messages
        assert "server.start_timeout_s" in messages[0]["message"]
        await send_audio(talker, data)  # well past the idler's deadline
        await talker.send(json.dumps({"type": "stop"}))
        rest, code = await recv_all(talker)
        assert code == 1000 and rest[-1]["type"] == "end"
    assert served.metrics.protocol_errors_total.value("start_timeout") == 1


async def test_connections_awaiting_start_are_capped_apart_from_sessions(
    start_daemon: Start, pcm: tuple[bytes, int]  # noqa: F811
) -> None:
    """With max_pending_connections = 2, a third connection that has not started gets server_busy and 1013 while
    two wait; once one of them starts a session, a new connection is let in again."""
    served = await start_daemon(server={"max_pending_connections": 2})
    data, rate = pcm
    async with connect(ws_url(served, "/v1/listen")) as first, connect(ws_url(served, "/v1/listen")) as second:
        async with asyncio.timeout(10 * TIMEOUT):
            while len(served.server.sessions) < 2:
                await asyncio.sleep(0.01)
        async with connect(ws_url(served, "/v1/listen")) as third:
            messages, code = await recv_all(third)
        assert code == 1013 and [m["code"] for m in messages] == ["server_busy"]
        assert "2 connections waiting for their 'start'" in messages[0]["message"]
        await first.send(start_msg(rate))
        assert (await recv(first))["type"] == "ready"
        async with connect(ws_url(served, "/v1/listen")) as fourth:
            await session_final(fourth, data, rate)
        await second.close()
    assert served.metrics.sessions_refused_total.value("listen") == 1


def hold_open(port: int, count: int, head: bytes) -> list[socket.socket]:
    """``count`` connections that each sent ``head`` (an unfinished request) and wait."""
    out = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10 * TIMEOUT)
        s.sendall(head)
        out.append(s)
    return out


def read_to_close(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


async def test_unfinished_handshakes_are_capped_and_time_out(start_daemon: Start) -> None:  # noqa: F811
    """With max_handshakes = 2, two connections still sending their headers hold both places: a third is closed
    at once, without an answer; they are closed after start_timeout_s, and requests are answered again."""
    served = await start_daemon(server={"max_handshakes": 2, "start_timeout_s": 1.0})
    port = served.port
    slow = await asyncio.to_thread(hold_open, port, 2, b"GET /v1/listen HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    try:
        async with asyncio.timeout(10 * TIMEOUT):
            while served.server.gate.in_handshake < 2:
                await asyncio.sleep(0.01)
        (third,) = await asyncio.to_thread(hold_open, port, 1, b"GET /healthz HTTP/1.1\r\n")
        assert await asyncio.to_thread(read_to_close, third) == b""
        third.close()
        for s in slow:  # the open timeout (start_timeout_s) closes them without an answer
            assert await asyncio.to_thread(read_to_close, s) == b""
    finally:
        for s in slow:
            s.close()
    assert (await get(port, "/healthz"))[:3:2] == (200, b"ok\n")
    assert served.metrics.connections_refused_total.value("handshakes") == 1


async def test_a_request_head_over_32_kib_gets_431(start_daemon: Start) -> None:  # noqa: F811
    served = await start_daemon()
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Filler: " + b"a" * 4000 + b"\r\n"
    (s,) = await asyncio.to_thread(hold_open, served.port, 1, head * 9)
    with s:
        (answer,) = responses(await asyncio.to_thread(read_to_close, s))
    assert answer[0] == 431 and answer[1]["connection"] == "close"
    assert served.metrics.connections_refused_total.value("request_too_large") == 1


async def test_running_out_of_file_descriptors_is_logged_once(daemon: Any, tiny_nemo: Path) -> None:  # noqa: F811
    """`streamer serve` with a file-descriptor limit a little above what it holds: a flood of connections makes
    accept() fail, which is logged once, not as a traceback per attempt; once they close it serves again."""
    running = await daemon()
    pid = running.proc.pid
    open_fds = len(os.listdir(f"/proc/{pid}/fd"))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds + 16, open_fds + 16))
    flood = await asyncio.to_thread(hold_open, running.port, 100, b"GET / HTTP/1.1\r\n")
    try:
        await asyncio.sleep(2.5)  # asyncio retries accept() every second
    finally:
        for s in flood:
            s.close()
    async with asyncio.timeout(20 * TIMEOUT):
        while True:
            try:
                if (await get(running.port, "/healthz"))[0] == 200:
                    break
            except (ConnectionError, AssertionError, ValueError):
                await asyncio.sleep(0.5)
    metrics = (await get(running.port, "/metrics"))[2].decode()
    failures = [line for line in metrics.splitlines() if line.startswith("streamer_accept_errors_total ")]
    assert failures and float(failures[0].split()[1]) > 1, failures  # the flood did run the process out
    code, err = await running.stop()
    assert code == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.count("cannot accept connections") == 1, err[-3000:]


# ---------------------------------------------------------------- HTTP answers


async def test_head_gets_the_headers_of_get_and_no_body(start_daemon: Start) -> None:  # noqa: F811
    served = await start_daemon()
    for path in ("/healthz", "/readyz", "/", "/metrics", "/nope"):
        status, headers, body = await get(served.port, path)
        head_status, head_headers, _ = await get(served.port, path, method="HEAD")  # a body would fail to parse
        assert head_status == status, path
        if path == "/metrics":  # rendered per request: process CPU, memory and request counters move in between
            assert abs(int(head_headers["content-length"]) - len(body)) <= 0.02 * len(body), path
        else:
            assert head_headers["content-length"] == str(len(body)), path
        assert head_headers["content-type"] == headers["content-type"]
    status, headers, _ = await get(served.port, "/v1/listen", method="HEAD")
    assert status == 405 and int(headers["content-length"]) > 0


async def test_pipelined_requests_get_the_first_answer_and_a_clean_close(start_daemon: Start) -> None:  # noqa: F811
    """Two GETs in one write: the first is answered (Connection: close), then the connection ends; the client
    sends the second again on a new connection, as HTTP/1.1 clients do. A WebSocket upgrade followed by bytes
    before its answer gets 400."""
    served = await start_daemon()
    port = served.port
    one = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    two = f"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    (answer,) = responses(await exchange(port, one + two))
    assert answer[0] == 200 and answer[2] == b"ok\n" and answer[1]["connection"] == "close"
    upgrade = f"GET /v1/listen HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{UPGRADE}\r\n".encode()
    (answer,) = responses(await exchange(port, upgrade + b"\x81\x05hello"))
    assert answer[0] == 400 and b"wait for the answer" in answer[2]
    assert (await get(port, "/readyz"))[0] == 200


async def test_several_tokens_in_one_request_get_400(start_daemon: Start) -> None:  # noqa: F811
    """?token= twice, two Authorization headers, or one of each: 400 (ambiguous), even when one of them is right,
    counted as one ambiguous refusal each; one right token still gets in."""
    served = await start_daemon(server={"auth_tokens": [TOKEN]})
    port = served.port
    cases = [
        (f"/metrics?token=guess1&token=guess2&token={TOKEN}", {}),
        ("/metrics", {"Authorization": "Bearer guess"}),  # a second header is added below
        (f"/metrics?token={TOKEN}", {"Authorization": f"Bearer {TOKEN}"}),
    ]
    for i, (path, headers) in enumerate(cases):
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"] + [f"{k}: {v}" for k, v in headers.items()]
        if i == 1:
            lines.append(f"Authorization: Bearer {TOKEN}")
        (answer,) = responses(await exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode()))
        assert answer[0] == 400 and b"exactly one" in answer[2], (path, answer)
    status, body = await refused(ws_url(served, f"/v1/listen?token=x&token={TOKEN}"))
    assert status == 400 and "more than one token" in body
    assert served.metrics.auth_failures_total.value("ambiguous") == 4
    assert served.metrics.auth_failures_total.value("invalid") == 0
    async with connect(ws_url(served, f"/v1/listen?token={TOKEN}")) as ws:
        await ws.send(start_msg(16000))
        assert (await recv(ws))["type"] == "ready"


def test_the_unit_gives_room_for_every_default_cap() -> None:
    """systemd/streamer.service sets LimitNOFILE= above the sockets the default caps allow plus 512 for the process."""
    from streamer.settings import ServerSettings

    unit = (Path(__file__).parents[1] / "systemd" / "streamer.service").read_text()
    (line,) = [line for line in unit.splitlines() if line.startswith("LimitNOFILE=")]
    s = ServerSettings()
    sockets = s.max_sessions + s.max_subscribers + s.max_pending_connections + s.max_handshakes
    assert int(line.split("=")[1]) >= sockets + 512
