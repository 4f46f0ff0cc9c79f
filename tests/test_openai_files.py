"""``POST /v1/audio/transcriptions`` against ``streamer serve``: the ``openai`` SDK as the peer, then raw HTTP for
bad input (what the SDK would never send), each answered in OpenAI's error shape while the daemon goes on."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import soundfile as sf
from openai import AsyncOpenAI, OpenAI
from websockets.asyncio.client import connect

from tests.openai_peers import FIRST, KEY, SECOND, TIMEOUT, Served, check_words, needs_model, serve, two_sentences

pytestmark = [pytest.mark.slow, needs_model]

MAX_UPLOAD = 2_000_000
IDLE_S = 2


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tmp_path_factory.mktemp("openai-files"), f"server.max_upload_bytes={MAX_UPLOAD}",
               f"server.idle_timeout_s={IDLE_S}") as served:
        yield served


@pytest.fixture(scope="module")
def audio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return two_sentences(tmp_path_factory.mktemp("openai-audio"))


def client(daemon: Served, key: str = KEY) -> OpenAI:
    return OpenAI(api_key=key, base_url=f"{daemon.http}/v1", max_retries=0, timeout=120 * TIMEOUT)


def test_json_text_and_verbose_json_carry_the_spoken_words(daemon: Served, audio: Path) -> None:
    """One file, two sentences: json's text, text, and verbose_json's segments (one per sentence) and words."""
    sdk = client(daemon)
    duration_s = sf.info(str(audio)).duration
    with audio.open("rb") as f:
        result = sdk.audio.transcriptions.create(file=f, model="whisper-1")
    check_words([f"{FIRST} {SECOND}"], [result.text])
    assert result.usage is not None and result.usage.seconds == pytest.approx(duration_s, abs=0.01)
    text = sdk.audio.transcriptions.create(file=audio, model="whisper-1", response_format="text")
    assert text.strip() == result.text
    verbose = sdk.audio.transcriptions.create(file=audio, model="gpt-4o-transcribe", language="en",
                                              response_format="verbose_json",
                                              timestamp_granularities=["word", "segment"])
    assert verbose.language == "en" and verbose.duration == pytest.approx(duration_s, abs=0.01)
    assert verbose.segments is not None and verbose.words is not None and len(verbose.segments) == 2
    check_words([FIRST, SECOND], [s.text for s in verbose.segments])
    assert verbose.segments[1].start > verbose.segments[0].end + 1.0  # the 1.5 s pause between them
    assert [w.word for w in verbose.words] == verbose.text.split()
    times = [t for w in verbose.words for t in (w.start, w.end)]
    assert times == sorted(times) and 0 <= times[0] and times[-1] <= duration_s
    only_words = sdk.audio.transcriptions.create(file=audio, model="x", response_format="verbose_json",
                                                 timestamp_granularities=["word"])
    assert only_words.segments is None and only_words.words == verbose.words


def test_subtitles_as_srt_and_vtt(daemon: Served, audio: Path) -> None:
    sdk = client(daemon)
    srt = sdk.audio.transcriptions.create(file=audio, model="whisper-1", response_format="srt")
    vtt = sdk.audio.transcriptions.create(file=audio, model="whisper-1", response_format="vtt")
    cue = re.compile(r"(\d\d:\d\d:\d\d[,.]\d\d\d) --> (\d\d:\d\d:\d\d[,.]\d\d\d)")
    assert srt.startswith("1\n") and vtt.startswith("WEBVTT\n") and len(cue.findall(srt)) >= 2
    assert cue.findall(srt) == [(a.replace(".", ","), b.replace(".", ",")) for a, b in cue.findall(vtt)]
    spoken = " ".join(line for line in srt.splitlines() if line and not line.isdigit() and "-->" not in line)
    check_words([f"{FIRST} {SECOND}"], [spoken])


def test_a_stream_of_deltas_adds_up_to_the_done_text(daemon: Served, audio: Path) -> None:
    """stream=true: server-sent transcript.text.delta events as recognition goes, then transcript.text.done."""
    events = list(client(daemon).audio.transcriptions.create(file=audio, model="gpt-4o-transcribe", stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    done = events[-1]
    assert done.type == "transcript.text.done" and len(deltas) >= 2 and "".join(deltas) == done.text
    check_words([f"{FIRST} {SECOND}"], [done.text])


async def test_flac_and_ogg_uploads_show_on_the_caption_stream(daemon: Served, audio: Path, tmp_path: Path) -> None:
    """Other formats decode too; ``?stream=NAME`` names the session's stream, which /v1/captions shows."""
    data, rate = sf.read(str(audio), dtype="int16")
    sdk = AsyncOpenAI(api_key=KEY, base_url=f"{daemon.http}/v1", max_retries=0, timeout=120 * TIMEOUT)
    headers = {"Authorization": f"Bearer {KEY}"}
    for fmt, suffix in (("FLAC", "flac"), ("OGG", "ogg")):
        path = tmp_path / f"two.{suffix}"
        sf.write(path, data, rate, format=fmt)
        async with connect(f"{daemon.ws}/v1/captions?stream=oa-{suffix}", additional_headers=headers) as viewer:
            result = await sdk.audio.transcriptions.create(file=path, model="whisper-1",
                                                           extra_query={"stream": f"oa-{suffix}"})
            finals: list[dict[str, Any]] = []
            async with asyncio.timeout(30 * TIMEOUT):
                while len(finals) < 2:
                    message = json.loads(await viewer.recv())
                    if message["type"] == "final":
                        finals.append(message)
        check_words([f"{FIRST} {SECOND}"], [result.text])
        assert " ".join(f["text"] for f in finals) == result.text and {f["stream"] for f in finals} == {f"oa-{suffix}"}


# ---------------------------------------------------------------------------------------------- bad input


def form(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type."""
    boundary = "streamer-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\n'
              f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
              for k, (name, data) in files.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(daemon: Served, body: bytes, content_type: str | None, key: str | None = KEY,
         path: str = "/v1/audio/transcriptions") -> tuple[int, dict[str, Any] | str]:
    """One raw POST; the status and the body (JSON when it is)."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60 * TIMEOUT)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content_type:
        headers["Content-Type"] = content_type
    conn.request("POST", path, body=body, headers=headers)
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    is_json = response.getheader("Content-Type", "").startswith("application/json")
    return response.status, json.loads(text) if is_json else text


def raw(daemon: Served, head: str, body_parts: list[bytes], pause_s: float = 0.0) -> tuple[int, str]:
    """A hand-written request (head, then body pieces); the answer's status and body."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30 * TIMEOUT) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        try:
            for part in body_parts:
                sock.sendall(part)
        except OSError:
            pass  # the server answered and stopped reading; its answer is still there to read
        time.sleep(pause_s)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2].decode()


def head(length: str, extra: str = "") -> str:
    return (f"POST /v1/audio/transcriptions HTTP/1.1\nHost: 127.0.0.1\nAuthorization: Bearer {KEY}\n"
            f"Content-Type: multipart/form-data; boundary=b\n{length}\n{extra}")


def test_bad_requests_get_openai_errors_and_the_daemon_goes_on(daemon: Served, audio: Path) -> None:
    wav = audio.read_bytes()
    cases: list[tuple[str, tuple[int, dict[str, Any] | str], int, str | None, str]] = [
        ("no file", post(daemon, *form({"model": "whisper-1"}, {})), 400, "file", "'file' field"),
        ("file as a text field", post(daemon, *form({"file": "speech.wav"}, {})), 400, "file", "curl -F file=@"),
        ("not audio", post(daemon, *form({}, {"file": ("notes.txt", b"hello, this is text" * 50)})), 400, "file",
         "notes.txt"),
        ("bad response_format", post(daemon, *form({"response_format": "xml"}, {"file": ("a.wav", wav)})), 400,
         "response_format", "xml"),
        ("bad stream", post(daemon, *form({"stream": "maybe"}, {"file": ("a.wav", wav)})), 400, "stream", "maybe"),
        ("bad granularity", post(daemon, *form({"timestamp_granularities[]": "char"}, {"file": ("a.wav", wav)})),
         400, "timestamp_granularities", "char"),
        ("JSON body", post(daemon, b'{"file": 1}', "application/json"), 400, None, "multipart/form-data"),
        ("form cut short", post(daemon, form({}, {"file": ("a.wav", wav)})[0][:-30], form({}, {})[1]), 400, None,
         "closing boundary"),
        ("too large", post(daemon, *form({}, {"file": ("big.wav", bytes(MAX_UPLOAD + 1))})), 413, None,
         str(MAX_UPLOAD)),
    ]
    for name, (status, body), want_status, param, words in cases:
        assert status == want_status, (name, body)
        assert isinstance(body, dict), (name, body)
        error = body["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, (name, error)
        assert words in error["message"], (name, error)
    # chunked past the limit: refused while it comes; the length of a stalled body: 408 after idle_timeout_s
    chunk = b"%x\r\n%s\r\n" % (500_000, bytes(500_000))
    status, text = raw(daemon, head("Transfer-Encoding: chunked"), [chunk] * 6)
    assert status == 413 and str(MAX_UPLOAD) in text
    status, text = raw(daemon, head("Content-Length: 10000"), [b"--b\r\n"], pause_s=IDLE_S + 1)
    assert status == 408 and "idle_timeout_s" in text
    status, text = raw(daemon, head("Content-Length: 5", "Transfer-Encoding: chunked\n"), [b"0\r\n\r\n"])
    assert status == 400 and "both" in text
    # the credentials: none, a wrong key (the SDK says AuthenticationError), and the method
    assert post(daemon, *form({}, {"file": ("a.wav", wav)}), key=None)[0] == 401
    with pytest.raises(openai.AuthenticationError):
        client(daemon, key="wrong").audio.transcriptions.create(file=audio, model="whisper-1")
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    conn.request("GET", "/v1/audio/transcriptions", headers={"Authorization": f"Bearer {KEY}"})
    assert conn.getresponse().status == 405
    conn.close()
    with pytest.raises(openai.APIStatusError) as too_large:  # as the SDK sees it
        client(daemon).audio.transcriptions.create(file=("big.wav", bytes(MAX_UPLOAD + 1)), model="whisper-1")
    assert too_large.value.status_code == 413
    # an empty recording is no error, and after all this the daemon still hears speech
    silence = io.BytesIO()
    sf.write(silence, np.zeros(0, dtype=np.int16), 16000, format="WAV")
    empty = post(daemon, *form({}, {"file": ("empty.wav", silence.getvalue())}))
    assert empty[0] == 200 and isinstance(empty[1], dict) and empty[1]["text"] == ""
    check_words([f"{FIRST} {SECOND}"], [client(daemon).audio.transcriptions.create(file=audio, model="x").text])
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    metrics = conn.getresponse().read().decode()
    assert 'streamer_protocol_errors_total{code="missing_required_parameter"} 2.0' in metrics
    assert 'streamer_protocol_errors_total{code="request_too_large"}' in metrics
