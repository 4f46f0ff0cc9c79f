"""Tokens and TLS on the daemon's port, against real clients on loopback: 401s, token sources, wss://.

The daemon runs in-process with the tiny random model (tests/test_server.py's fixtures); TLS uses a
self-signed certificate made with openssl at test time; ws_client.py runs as a program.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from streamer import settings as settings_module
from streamer.cli import main as streamer_main
from streamer.errors import ConfigError
from streamer.mic_remote import Uplink, _session, connect_options, run_remote
from streamer.protocol import Start as StartMessage
from streamer.server.auth import TokenAuth, exposure_warnings
from streamer.service import Daemon
from streamer.settings import Settings
from streamer.terminal_captions import Captions
from tests.test_clients import FileMic, file_mics, finish, mic_args, start_client, without_importtime  # noqa: F401
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
TOKEN, OLD_TOKEN = "test-token-7f3a9c", "old-token-91c2d4"


def ws_url(daemon: Any, path: str, scheme: str = "ws") -> str:
    return f"{scheme}://127.0.0.1:{daemon.port}{path}"


async def refusal(uri: str, **kwargs: Any) -> tuple[int, str, str]:
    """Status, ``WWW-Authenticate`` and body of a WebSocket upgrade that must be refused."""
    with pytest.raises(InvalidStatus) as info:
        async with asyncio.timeout(10 * TIMEOUT), connect(uri, **kwargs):
            pass
    response = info.value.response
    return response.status_code, response.headers.get("WWW-Authenticate", ""), response.body.decode()


async def http(daemon: Any, path: str, headers: dict[str, str] | None = None,
               context: ssl.SSLContext | None = None) -> tuple[int, str, str]:
    """GET over http (or https with ``context``): status, ``WWW-Authenticate``, body."""
    scheme = "https" if context else "http"

    def get() -> tuple[int, str, str]:
        request = urllib.request.Request(f"{scheme}://127.0.0.1:{daemon.port}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10 * TIMEOUT, context=context) as r:
                return r.status, r.headers.get("WWW-Authenticate", ""), r.read().decode()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.headers.get("WWW-Authenticate", ""), e.read().decode()

    return await asyncio.to_thread(get)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A certificate for CN=localhost and IP 127.0.0.1, and its key (EC P-256: quick to make)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not on PATH (apt install openssl)")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-days", "2", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.fixture
def no_streamer_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No STREAMER_ setting from the environment and no /etc/streamer/streamer.toml reach `streamer serve`."""
    for var in list(os.environ):
        if var.startswith("STREAMER_") and not var.startswith("STREAMER_TEST_"):
            monkeypatch.delenv(var)
    monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_PATH", Path("/nonexistent/streamer.toml"))


# ---------------------------------------------------------------- refusals


async def test_no_token_or_a_wrong_one_gets_401_before_the_upgrade(
    start_daemon: Start, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    """/v1/listen and /v1/captions: no token is 401 "missing", a wrong one 401 "invalid"; logged without it."""
    daemon = await start_daemon(server={"auth_tokens": [TOKEN]})
    with caplog.at_level(logging.WARNING, logger="streamer.server.websocket"):
        for path in ("/v1/listen", "/v1/captions?stream=room"):
            status, challenge, body = await refusal(ws_url(daemon, path))
            assert (status, challenge) == (401, 'Bearer realm="streamer"') and body.startswith("missing token")
        status, challenge, body = await refusal(ws_url(daemon, "/v1/listen"), additional_headers=bearer("nope-1"))
        assert (status, body) == (401, "invalid token\n") and 'error="invalid_token"' in challenge
        status, _, body = await refusal(ws_url(daemon, "/v1/captions?stream=room&token=nope-2"))
        assert (status, body) == (401, "invalid token\n")
        status, _, body = await refusal(ws_url(daemon, "/v1/listen"), additional_headers={"Authorization": TOKEN})
        assert status == 401 and body.startswith("missing token")  # no "Bearer": not a token
        status, _, _ = await refusal(ws_url(daemon, f"/v1/listen?token={TOKEN}x"))
        assert status == 401
    failures = daemon.metrics.auth_failures_total
    assert (failures.value("missing"), failures.value("invalid")) == (3, 3)
    assert "refused /v1/listen from 127.0.0.1: missing token" in caplog.text
    assert "refused /v1/captions from 127.0.0.1: invalid token" in caplog.text
    assert "nope" not in caplog.text and TOKEN not in caplog.text


async def test_bearer_header_and_query_token_are_let_in(start_daemon: Start, pcm: tuple[bytes, int]) -> None:  # noqa: F811
    """The header opens a /v1/listen session, ?token= a /v1/captions subscription; both see the same finals."""
    daemon = await start_daemon(server={"auth_tokens": [OLD_TOKEN, TOKEN]})
    data, rate = pcm
    captions = ws_url(daemon, f"/v1/captions?stream=room&token={TOKEN}")
    async with connect(captions) as sub, connect(ws_url(daemon, "/v1/listen"), additional_headers=bearer(TOKEN)) as ws:
        await ws.send(start_msg(rate, stream="room", endpointing={"max_segment_s": 1.0}))
        assert (await recv(ws))["type"] == "ready"
        await send_audio(ws, data)
        await ws.send(json.dumps({"type": "stop"}))
        sent, code = await recv_all(ws)
        expected = check_segments(sent)
        got: list[dict[str, Any]] = []
        while len([m for m in got if m["type"] == "final"]) < len(expected):
            got.append(await recv(sub))
    assert code == 1000 and expected and check_segments(got) == expected
    assert daemon.metrics.auth_failures_total.value("missing") == 0


async def test_debug_logging_never_shows_a_token(start_daemon: Start, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """--log-level debug must not write tokens (websockets logs request lines and headers at DEBUG)."""
    caplog.set_level(logging.DEBUG)
    daemon = await start_daemon(server={"auth_tokens": [TOKEN]})
    async with connect(ws_url(daemon, f"/v1/captions?stream=room&token={TOKEN}")):
        pass
    async with connect(ws_url(daemon, "/v1/listen"), additional_headers=bearer(TOKEN)) as ws:
        await ws.send(json.dumps({"type": "keepalive"}))
    assert "/v1/captions" in caplog.text or "captions" in caplog.text.lower()
    assert TOKEN not in caplog.text


async def test_tokens_from_the_file_and_the_setting_are_both_accepted(start_daemon: Start, tmp_path: Path) -> None:  # noqa: F811
    """auth_token_file (blank lines, comments, spaces around) adds to auth_tokens; a comment is no token."""
    tokens = tmp_path / "tokens"
    tokens.write_text("# rotated on Monday\n\n  file-token-1  \nfile-token-2\n")
    daemon = await start_daemon(server={"auth_tokens": [OLD_TOKEN], "auth_token_file": str(tokens)})
    for token in (OLD_TOKEN, "file-token-1", "file-token-2"):
        async with connect(ws_url(daemon, "/v1/listen"), additional_headers=bearer(token)) as ws:
            await ws.send(start_msg(16000))
            assert (await recv(ws))["type"] == "ready"
    for wrong in ("#", "rotated", "file-token-3"):
        assert (await refusal(ws_url(daemon, "/v1/listen"), additional_headers=bearer(wrong)))[0] == 401


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "server.auth_token_file: cannot read {path}"),
        ("# only a comment\n\n", "server.auth_token_file: {path} holds no token"),
        ("good-token\nhas a space\n", "server.auth_token_file: {path} line 2: the token has a space"),
    ],
)
async def test_token_file_problems_stop_startup(
    recognizer: Any, tmp_path: Path, content: str | None, message: str  # noqa: F811
) -> None:
    """A missing, empty or malformed token file is a ConfigError at startup, never an open server."""
    path = tmp_path / "tokens"
    if content is not None:
        path.write_text(content)
    daemon = Daemon(Settings(server={"port": 0, "auth_token_file": str(path)}), recognizer)
    with pytest.raises(ConfigError) as info:
        await daemon.start()
    assert message.format(path=path) in str(info.value)
    assert "good-token" not in str(info.value) and daemon.server is None  # nothing was bound


async def test_health_stays_open_while_metrics_needs_the_token(start_daemon: Start) -> None:  # noqa: F811
    """/, /healthz and /readyz answer without a token; /metrics is 401 without one and counts the refusals."""
    daemon = await start_daemon(server={"auth_tokens": [TOKEN]})
    assert (await http(daemon, "/healthz"))[::2] == (200, "ok\n")
    assert (await http(daemon, "/readyz"))[::2] == (200, "ready\n")
    assert (await http(daemon, "/"))[0] == 200
    status, challenge, body = await http(daemon, "/metrics")
    assert (status, challenge) == (401, 'Bearer realm="streamer"') and "missing token" in body
    assert (await http(daemon, "/metrics", bearer("wrong")))[0] == 401
    assert (await http(daemon, f"/metrics?token={TOKEN}"))[0] == 200
    status, _, body = await http(daemon, "/metrics", bearer(TOKEN))
    assert status == 200
    # Read as Prometheus reads it: the text format writes a count of 1 as "1.0" (prometheus_client) or "1".
    failures = {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.name == "streamer_auth_failures_total"
    }
    assert failures["missing"] == 1 and failures["invalid"] == 1


async def test_without_tokens_everything_stays_open(start_daemon: Start) -> None:  # noqa: F811
    """No tokens configured: the port works as before, a token sent anyway is ignored."""
    daemon = await start_daemon()
    assert not daemon.server.auth.is_enabled
    assert (await http(daemon, "/metrics"))[0] == 200
    async with connect(ws_url(daemon, "/v1/listen?token=anything")) as ws:
        await ws.send(start_msg(16000))
        assert (await recv(ws))["type"] == "ready"


def test_exposure_warnings() -> None:
    """A non-loopback host without tokens warns that anyone can use it; with tokens but no TLS, about clear text."""
    none, some = TokenAuth(), TokenAuth([TOKEN])
    for host in ("127.0.0.1", "::1", "localhost", "127.0.1.1"):
        assert exposure_warnings(host, none, has_tls=False) == []
    for host in ("0.0.0.0", "::", "192.168.1.20", "box.example", ""):
        (warning,) = exposure_warnings(host, none, has_tls=True)
        assert "anyone who can reach the port" in warning and "server.auth_tokens" in warning
    (warning,) = exposure_warnings("0.0.0.0", some, has_tls=False)
    assert "clear text" in warning and "server.tls_cert" in warning
    assert exposure_warnings("0.0.0.0", some, has_tls=True) == []


# ---------------------------------------------------------------- clients


async def test_mic_url_stops_with_one_clear_line_on_401(
    start_daemon: Start, file_mics: list[FileMic]  # noqa: F811
) -> None:
    """`streamer mic --url` gets ConfigError (one attempt, no retry loop) naming the 401 and --token; a good token
    connects."""
    daemon = await start_daemon(server={"auth_tokens": [TOKEN]})
    url = ws_url(daemon, "/v1/listen")
    for token, reason in ((None, "HTTP 401: missing token"), ("wrong", "HTTP 401: invalid token")):
        args = mic_args("--url", url, *(["--token", token] if token else []))
        with pytest.raises(ConfigError) as info:
            async with asyncio.timeout(10 * TIMEOUT):
                await run_remote(args, Captions(io.StringIO(), io.StringIO()), asyncio.Event())
        assert reason in str(info.value) and "--token or STREAMER_TOKEN" in str(info.value)
        assert "\n" not in str(info.value)
    assert daemon.metrics.auth_failures_total.value("missing") == daemon.metrics.auth_failures_total.value(
        "invalid") == 1
    err, stop = io.StringIO(), asyncio.Event()
    running = asyncio.create_task(run_remote(mic_args("--url", url, "--token", TOKEN), Captions(io.StringIO(), err),
                                             stop))
    async with asyncio.timeout(10 * TIMEOUT):
        while "connected: stream" not in err.getvalue():
            await asyncio.sleep(0.01)
    stop.set()
    async with asyncio.timeout(10 * TIMEOUT):
        assert await running == 0
    with pytest.raises(ConfigError, match="--cafile needs a wss:// URL"):
        connect_options(url, TOKEN, "/etc/ssl/certs/ca-certificates.crt")


async def test_ws_client_token_and_cafile_over_wss(
    start_daemon: Start, self_signed: tuple[Path, Path], speech_wav: Path  # noqa: F811
) -> None:
    """ws_client.py on wss://: --token, STREAMER_TOKEN and --cafile work; a 401 or an untrusted cert is one line."""
    cert, key = self_signed
    daemon = await start_daemon(server={"auth_tokens": [TOKEN], "tls_cert": str(cert), "tls_key": str(key)})
    url = f"wss://127.0.0.1:{daemon.port}"
    rc, out, err = await finish(await start_client("ws_client.py", str(speech_wav), "--url", url, "--json",
                                                    "--token", TOKEN, "--cafile", str(cert)))
    assert rc == 0, without_importtime(err)
    kinds = [json.loads(line)["type"] for line in out.splitlines()]
    assert kinds[0] == "ready" and "final" in kinds and kinds[-1] == "end"

    env = {**os.environ, "STREAMER_TOKEN": TOKEN}
    rc, out, err = await finish(await start_client("ws_client.py", str(speech_wav), "--url", url,
                                                    "--cafile", str(cert), env=env))
    assert rc == 0 and out, without_importtime(err)

    for args, expected in (
        (["--token", "wrong", "--cafile", str(cert)], "ws_client: error: the server refused the connection "
         "(HTTP 401: invalid token); give its token with --token or STREAMER_TOKEN"),
        (["--token", TOKEN], "the server's certificate is not trusted (--cafile FILE trusts a self-signed one)"),
    ):
        rc, out, err = await finish(await start_client("ws_client.py", str(speech_wav), "--url", url, *args))
        lines = without_importtime(err).strip().splitlines()
        assert rc == 1 and out == "" and len(lines) == 1, lines
        assert expected in lines[0]
    assert daemon.metrics.auth_failures_total.value("invalid") == 1


# ---------------------------------------------------------------- TLS


async def test_wss_session_gets_ready_and_a_final(
    start_daemon: Start, pcm: tuple[bytes, int], self_signed: tuple[Path, Path]  # noqa: F811
) -> None:
    """With tls_cert/tls_key: a wss:// client trusting the certificate gets ready and finals; others are stopped."""
    cert, key = self_signed
    daemon = await start_daemon(server={"tls_cert": str(cert), "tls_key": str(key)})
    assert daemon.server.url == f"https://127.0.0.1:{daemon.port}"
    trust = ssl.create_default_context(cafile=cert)
    data, rate = pcm
    async with connect(ws_url(daemon, "/v1/listen", "wss"), ssl=trust) as ws:
        await ws.send(start_msg(rate, stream="secure"))
        ready = await recv(ws)
        assert ready["type"] == "ready" and ready["stream"] == "secure"
        await send_audio(ws, data)
        await ws.send(json.dumps({"type": "stop"}))
        messages, code = await recv_all(ws)
    assert code == 1000 and messages[-1]["type"] == "end"
    assert check_segments(messages)[-1]["reason"] == "stop"
    assert (await http(daemon, "/healthz", context=trust))[::2] == (200, "ok\n")
    with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not trust it is stopped by TLS
        async with asyncio.timeout(10 * TIMEOUT), connect(ws_url(daemon, "/v1/listen", "wss")):
            pass
    url = ws_url(daemon, "/v1/listen", "wss")  # `streamer mic --url` says so in one line instead of retrying
    captions = Captions(io.StringIO(), io.StringIO())
    with pytest.raises(ConfigError, match="certificate is not trusted .*--cafile FILE trusts a self-signed one"):
        uplink = Uplink(StartMessage(16000, "pcm_f32le"))
        await _session(url, uplink, captions, asyncio.Event(), None, connect_options(url, None, None))


@pytest.mark.parametrize(
    ("cert", "key", "message"),
    [
        ("missing.pem", "key", "server.tls_cert: cannot read {dir}/missing.pem: No such file or directory"),
        ("cert", "missing.pem", "server.tls_key: cannot read {dir}/missing.pem"),
        ("junk", "key", "server.tls_cert: {dir}/junk holds no PEM certificate"),
        ("cert", "cert", "server.tls_key: {dir}/cert.pem is not the unencrypted PEM private key of server.tls_cert"),
    ],
)
async def test_tls_files_that_do_not_load_stop_startup(
    recognizer: Any, self_signed: tuple[Path, Path], cert: str, key: str, message: str  # noqa: F811
) -> None:
    """A TLS file that is missing, not PEM, or a key that is not the certificate's: ConfigError naming both."""
    real = {"cert": self_signed[0], "key": self_signed[1]}
    folder = self_signed[0].parent
    (folder / "junk").write_text("not a certificate\n")
    paths = [str(real.get(name, folder / name)) for name in (cert, key)]
    daemon = Daemon(Settings(server={"port": 0, "tls_cert": paths[0], "tls_key": paths[1]}), recognizer)
    with pytest.raises(ConfigError) as info:
        await daemon.start()
    assert message.format(dir=folder) in str(info.value)
    assert daemon.server is None


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("server.tls_cert=/etc/streamer/cert.pem", "server.tls_cert is set but server.tls_key is not"),
        ("server.auth_token_file=/nonexistent/tokens", "server.auth_token_file: cannot read /nonexistent/tokens"),
    ],
)
def test_serve_refuses_to_start_with_one_line(
    no_streamer_env: None, capsys: pytest.CaptureFixture[str], setting: str, message: str
) -> None:
    """`streamer serve` with half a TLS setup or a missing token file: exit 2 and one line, before any model loads."""
    assert streamer_main(["serve", "--port", "0", "--model", "/nonexistent/model.nemo", "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err.startswith("streamer: error: ") and message in err and err.count("\n") == 1, err
