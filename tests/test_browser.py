"""The caption page (clients/web/index.html) in headless Debian Chromium driven by Playwright (test-rig.md §4).

A fake microphone fed from a speech WAV streams through getUserMedia and the AudioWorklet to the real
daemon (tiny random model: the words are garbage, but tokens flow); captions appear and finals arrive;
a second page in viewer mode shows the same finals; the page reconnects after the daemon restarts;
the downloads are well-formed. Screenshots go to each test's tmp_path.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect

from tests.test_daemon import daemon  # noqa: F401  (the fixture that starts `streamer serve`)
from tests.test_resume import collect
from tests.test_server import Start, recognizer, start_daemon  # noqa: F401  (the in-process daemon)

pytestmark = pytest.mark.slow
TIMEOUT = float(os.environ.get("STREAMER_TEST_TIMEOUT_FACTOR", "1"))
CHROMIUM = os.environ.get("STREAMER_CHROMIUM", "/usr/bin/chromium")
PAGE = Path(__file__).parents[1] / "clients" / "web" / "index.html"
STREAM = "webtest"
# Records every text the connection indicator shows (a later retry may replace a text before it is read).
CONN_LOG = """
window.connLog = [];
document.addEventListener("DOMContentLoaded", () => new MutationObserver(
    () => window.connLog.push(document.getElementById("conn").textContent)
).observe(document.getElementById("conn"), {childList: true, characterData: true, subtree: true}));
"""


def chromium_args(wav: Path) -> list[str]:
    """Flags for a quiet headless Chromium (test-rig.md §4) whose microphone plays ``wav`` once."""
    return [
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}%noloop",
    ]  # fmt: skip


@pytest.fixture
def fake_mic_wav(speech_wav: Path, tmp_path: Path) -> Path:
    """The speech twice, with silence before (the fake device starts before the worklet listens) and after."""
    data, rate = sf.read(speech_wav, dtype="float32")
    pause = np.zeros(rate // 2, dtype=np.float32)
    path = tmp_path / "fake-mic.wav"
    sf.write(path, np.concatenate([pause, data, pause, data, pause]), rate, subtype="PCM_16")
    return path


@pytest.fixture
async def browser(fake_mic_wav: Path) -> AsyncIterator[Any]:
    """A fresh headless Chromium (Debian's, not a downloaded one) with the fake microphone."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found (apt install chromium)")
    async_api = pytest.importorskip("playwright.async_api")
    async with async_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=chromium_args(fake_mic_wav))
        try:
            yield browser
        finally:
            await browser.close()


class Wire:
    """What a page sent and received on its WebSockets, and what it logged (for failure messages)."""

    def __init__(self, page: Any) -> None:
        self.sent_text: list[dict[str, Any]] = []
        self.sent_bytes: list[bytes] = []
        self.received: list[dict[str, Any]] = []
        self.sockets: list[str] = []
        self.console: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        page.on("websocket", self._on_socket)

    def _on_socket(self, ws: Any) -> None:
        self.sockets.append(ws.url)
        ws.on("framesent", self._sent)
        ws.on("framereceived", lambda payload: self.received.append(json.loads(payload)))

    def _sent(self, payload: str | bytes) -> None:
        if isinstance(payload, bytes):
            self.sent_bytes.append(payload)
        else:
            self.sent_text.append(json.loads(payload))

    def finals(self) -> list[str]:
        return [m["text"] for m in self.received if m["type"] == "final" and m["text"]]

    def types(self) -> list[str]:
        return [m["type"] for m in self.received]


async def page_finals(page: Any) -> list[str]:
    return list(await page.locator("#captions .final").all_inner_texts())


async def wait_state(page: Any, state: str, wire: Wire, seconds: float = 30) -> None:
    """Wait until the connection indicator shows ``state``."""
    try:
        await page.wait_for_selector(f'#conn[data-state="{state}"]', timeout=seconds * 1000 * TIMEOUT)
    except Exception as exc:
        text = await page.locator("#conn").inner_text()
        notice = await page.locator("#notice").inner_text()
        raise AssertionError(f"indicator never showed {state!r}: {text!r}, notice {notice!r}\n"
                             + "\n".join(wire.console[-20:])) from exc


async def start_speaker(opener: Any, url: str, conn_log: bool = False) -> tuple[Any, Wire]:
    """A new page (of a browser or a context) at ``url`` whose microphone is started and connected; with
    ``conn_log`` the page's status texts are kept in ``window.connLog``."""
    page = await opener.new_page()
    wire = Wire(page)
    if conn_log:
        await page.add_init_script(CONN_LOG)
    await page.goto(url)
    await page.get_by_role("button", name="Start microphone").click()
    await wait_state(page, "connected", wire)
    return page, wire


async def test_page_captions_the_fake_microphone_and_a_viewer_sees_the_same(
    daemon: Any, browser: Any, tmp_path: Path  # noqa: F811
) -> None:
    """Speaker page: start, native-rate s16le to /v1/listen, partials then finals in place; viewer page: same finals."""
    running = await daemon("--set", "endpointing.max_segment_s=2")
    base = f"http://127.0.0.1:{running.port}"
    context = await browser.new_context(viewport={"width": 1100, "height": 700})
    viewer = await context.new_page()
    viewer_wire = Wire(viewer)
    await viewer.goto(f"{base}/?stream={STREAM}")
    await wait_state(viewer, "connected", viewer_wire)
    page, wire = await start_speaker(context, f"{base}/?name={STREAM}")
    # the screenshot shows finals and, most likely, a partial in progress
    await page.wait_for_function("(n => n >= 3 || n >= 1 && document.querySelector('#partial').textContent)"
                                 "(document.querySelectorAll('#captions .final').length)", timeout=60_000 * TIMEOUT)
    await page.screenshot(path=tmp_path / "captions.png")

    start = wire.sent_text[0]
    rate = await page.evaluate("speaker.rate")
    assert start == {"type": "start", "sample_rate": rate, "encoding": "pcm_s16le", "channels": 1, "stream": STREAM,
                     "live": True}
    assert 8000 <= rate <= 48000
    assert wire.sent_bytes and all(len(b) == 2 * round(rate * 0.05) for b in wire.sent_bytes[:-1])
    assert not any(b.startswith(b"RIFF") for b in wire.sent_bytes)
    assert wire.types()[0] == "ready" and "partial" in wire.types()

    await page.get_by_role("button", name="Stop").click()  # the last final, then "end"
    await wait_state(page, "stopped", wire)
    assert wire.types()[-1] == "end"
    finals = wire.finals()
    assert len(finals) >= 2 and await page_finals(page) == finals
    assert await page.locator("#partial").inner_text() == ""
    await viewer.wait_for_function(f"document.querySelectorAll('#captions .final').length >= {len(finals)}",
                                   timeout=10_000 * TIMEOUT)
    assert await page_finals(viewer) == finals
    assert viewer_wire.finals() == finals
    await viewer.screenshot(path=tmp_path / "viewer.png")

    async with page.expect_download() as download_info:
        await page.get_by_role("button", name="Download subtitles as SRT").click()
    download = await download_info.value
    srt = Path(await download.path()).read_text()
    assert re.fullmatch(rf"captions-{STREAM}-\d{{8}}-\d{{4}}\.srt", download.suggested_filename)
    assert re.match(r"1\n\d\d:\d\d:\d\d,\d\d\d --> \d\d:\d\d:\d\d,\d\d\d\n\S", srt), srt
    code, stderr = await running.stop()
    assert code == 0, stderr
    await context.close()


async def test_page_reconnects_after_the_daemon_restarts(daemon: Any, browser: Any) -> None:  # noqa: F811
    """The daemon goes away (close 1001): the page shows it, retries with backoff, and streams to the new one."""
    first = await daemon()
    page, wire = await start_speaker(browser, f"http://127.0.0.1:{first.port}/?name={STREAM}", conn_log=True)
    code, stderr = await first.stop()
    assert code == 0, stderr
    await wait_state(page, "reconnecting", wire, seconds=10)
    assert any("the server restarted; retrying in" in text for text in await page.evaluate("window.connLog"))
    sent_before = len(wire.sent_bytes)
    second = await daemon("--port", str(first.port))
    await wait_state(page, "connected", wire)
    assert [m["type"] for m in wire.sent_text].count("start") >= 2
    async with asyncio.timeout(10 * TIMEOUT):
        while len(wire.sent_bytes) <= sent_before:  # audio flows to the new session (the backlog first)
            await asyncio.sleep(0.1)
    await page.get_by_role("button", name="Stop").click()
    await wait_state(page, "stopped", wire)
    code, stderr = await second.stop()
    assert code == 0, stderr


async def test_page_resumes_its_session_after_the_connection_drops(
    start_daemon: Start, browser: Any  # noqa: F811
) -> None:
    """The speaker's connection is cut mid-segment (a relay drops it, no close frame): the page reconnects, resumes
    the same session, shows "resumed", re-sends what the server missed; every final arrives once, the open
    segment's too, the same ones a viewer sees, and the server's end counts every sample the page captured."""
    from tests.test_resume import Proxy

    running = await start_daemon(endpointing={"max_segment_s": 2.0})
    captions = f"ws://127.0.0.1:{running.port}/v1/captions?stream={STREAM}"
    async with Proxy(running.port) as proxy, connect(captions) as viewer:
        seen: list[dict[str, Any]] = []
        watching = asyncio.create_task(collect(viewer, seen))
        page, wire = await start_speaker(
            browser, f"http://127.0.0.1:{running.port}/?name={STREAM}&server=ws://127.0.0.1:{proxy.port}", conn_log=True
        )
        await page.wait_for_function("document.querySelector('#partial').textContent && "
                                     "document.querySelectorAll('#captions .final').length >= 1",
                                     timeout=30_000 * TIMEOUT)
        finals_before = len(wire.finals())
        await proxy.outage(0.5)  # mid-segment (a partial is showing): audio sent meanwhile is lost, then the cut
        assert proxy.lost_bytes > 10000
        async with asyncio.timeout(20 * TIMEOUT):
            while not any(t.startswith("resumed") for t in await page.evaluate("window.connLog")):
                await asyncio.sleep(0.05)
        await asyncio.sleep(4)  # the rest of the fake microphone's speech
        await page.get_by_role("button", name="Stop").click()
        await wait_state(page, "stopped", wire)
        await asyncio.sleep(0.3)  # the viewer's last final
        watching.cancel()
        shown = await page_finals(page)
        notice = await page.locator("#notice").inner_text()
        health = await page.evaluate("speaker.health")
        captured = await page.evaluate("speaker.captured")
    starts = [m for m in wire.sent_text if m["type"] == "start"]
    readies = [m for m in wire.received if m["type"] == "ready"]
    assert proxy.connections == 2 and [r["resumed"] for r in readies] == [False, True], wire.sent_text
    on_first = wire.received[: next(i for i, m in enumerate(wire.received) if m.get("resumed"))]
    assert starts[1]["resume"] == {"session": readies[0]["session"], "token": readies[0]["resume_token"],
                                   "next_segment": len([m for m in on_first if m["type"] == "final"])}
    assert starts[1]["resume"]["next_segment"] >= finals_before
    finals = [m for m in wire.received if m["type"] == "final"]
    assert [f["segment"] for f in finals] == list(range(len(finals))) and len(finals) > finals_before
    assert "disconnect" not in [f["reason"] for f in finals] and finals[-1]["reason"] == "stop"
    assert [f for f in seen if f["type"] == "final"] == finals  # the viewer saw each final once, the same
    assert shown == wire.finals()
    end = wire.received[-1]
    assert end["type"] == "end" and end["segments"] == len(finals)
    assert end["audio_s"] == pytest.approx(captured / starts[0]["sample_rate"], abs=0.002) and end["dropped_s"] == 0
    assert health == {"serverShortS": 0, "serverDroppedS": 0} and not notice, notice
    assert not [line for line in wire.console if line.startswith("pageerror")], wire.console


async def test_page_says_when_the_server_received_less_audio_than_it_sent(browser: Any) -> None:
    """A server whose `end` counts less audio than the page sent, and some dropped: the page says so."""
    from websockets.asyncio.server import ServerConnection, serve

    received: list[int] = []

    async def handler(ws: ServerConnection) -> None:
        start = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "ready", "session": "s1", "stream": "fake", "model": "fake",
                                  "protocol_version": 1, "att_context_size": [70, 1],
                                  "sample_rate": start["sample_rate"], "chunk_s": 0.08, "endpointing": {}}))
        n = 0
        async for message in ws:
            if isinstance(message, bytes):
                n += len(message)
                continue
            received.append(n)
            heard = n / 2 / start["sample_rate"] - 1.0  # as if a second of it never arrived
            await ws.send(json.dumps({"type": "end", "stream": "fake", "segments": 0, "audio_s": round(heard, 3),
                                      "dropped_s": 0.5}))
            await ws.close()
            return

    def page_over_http(connection: ServerConnection, request: Any) -> Any:  # a worklet needs an http origin
        if request.path != "/v1/listen":
            response = connection.respond(200, PAGE.read_text())
            response.headers["Content-Type"] = "text/html; charset=utf-8"
            return response
        return None

    async with serve(handler, "127.0.0.1", 0, process_request=page_over_http) as server:
        port = server.sockets[0].getsockname()[1]
        page, wire = await start_speaker(browser, f"http://127.0.0.1:{port}/")
        async with asyncio.timeout(10 * TIMEOUT):
            while sum(map(len, wire.sent_bytes)) < 2 * 44100 * 1.5:  # 1.5 s at the rate it sends, or more
                await asyncio.sleep(0.1)
        await page.get_by_role("button", name="Stop").click()
        await wait_state(page, "stopped", wire)
        notice = await page.locator("#notice").inner_text()
        health = await page.evaluate("speaker.health")
    rate = wire.sent_text[0]["sample_rate"]
    sent_s = received[0] / 2 / rate
    assert f"the server received {sent_s - 1:.1f} s of the {sent_s:.1f} s sent" in notice, notice
    assert "the server fell behind and skipped 0.5 s" in notice, notice
    assert health == {"serverShortS": pytest.approx(1.0, abs=0.01), "serverDroppedS": 0.5}


async def test_subtitles_text_size_and_contrast_from_the_keyboard(browser: Any, tmp_path: Path) -> None:
    """Finals with word times become SRT/VTT cues of at most two 42-character lines; controls work by keyboard."""
    page = await browser.new_page()
    wire = Wire(page)
    await page.goto(PAGE.as_uri() + "?stream=demo&server=ws://127.0.0.1:9")  # a viewer that never connects
    words = "the quick brown fox jumps over the lazy dog and then runs far away into the deep dark woods".split()
    final = {"type": "final", "stream": "demo", "segment": 0, "start": 1.0, "end": 1.0 + 0.4 * len(words),
             "text": " ".join(words), "confidence": 0.9, "eou": False, "reason": "silence", "token_ids": [],
             "words": [{"word": w, "start": 1.0 + 0.4 * i, "end": 1.3 + 0.4 * i, "confidence": 0.9}
                       for i, w in enumerate(words)]}
    await page.evaluate("(m) => { onResult(m, 0); onResult({...m, segment: 1, start: 9, end: 9.5, text: 'yes.', "
                        "words: [{word: 'yes.', start: 9, end: 9.5}]}, 0); }", final)
    srt = await page.evaluate("toSrt()")
    assert srt == (
        "1\n00:00:01,000 --> 00:00:07,700\n"
        "the quick brown fox jumps over the lazy\ndog and then runs far away into the deep\n\n"
        "2\n00:00:07,800 --> 00:00:08,800\ndark woods\n\n"  # 7 s at most per cue; then 1 s at least
        "3\n00:00:09,000 --> 00:00:10,000\nyes.\n"
    )
    vtt = await page.evaluate("toVtt()")
    assert vtt == "WEBVTT\n\n" + re.sub(r"(?m)^\d+\n", "", srt).replace(",", ".")
    assert await page.evaluate("toTxt()") == " ".join(words) + "\nyes.\n"

    await page.focus("#contrast")
    await page.keyboard.press("Space")
    assert await page.get_attribute("#contrast", "aria-pressed") == "true"
    assert "contrast" in (await page.get_attribute("body", "class") or "")
    size = await page.evaluate("getComputedStyle(document.documentElement).getPropertyValue('--caption-size')")
    await page.focus("#larger")
    await page.keyboard.press("Enter")
    assert await page.evaluate("getComputedStyle(document.documentElement).getPropertyValue('--caption-size')") != size
    await page.evaluate("onResult({type: 'partial', stream: 'demo', segment: 2, start: 10, end: 12, "
                        "text: 'and the next one is in progress', stable: 'and the next one'}, 0)")
    await page.screenshot(path=tmp_path / "contrast.png")
    async with page.expect_download() as download_info:
        await page.focus("#dl-vtt")
        await page.keyboard.press("Enter")
    assert Path(await (await download_info.value).path()).read_text() == vtt
    assert not [line for line in wire.console if line.startswith("pageerror")], wire.console


async def test_page_passes_its_token_on_and_says_when_it_is_refused(
    start_daemon: Start, browser: Any  # noqa: F811
) -> None:
    """?token= goes on to the WebSocket (the share link hides it); a wrong or missing token says so and backs off."""
    running = await start_daemon(server={"auth_tokens": ["page-token"]})
    base = f"http://127.0.0.1:{running.port}"
    speaker = await browser.new_page()
    await speaker.goto(f"{base}/?name=desk&token=page-token")
    link = speaker.locator("#share a")
    assert await link.get_attribute("href") == f"{base}/?stream=desk&token=page-token"
    assert "page-token" not in await link.inner_text()

    viewer = await browser.new_page()
    wire = Wire(viewer)
    await viewer.goto(f"{base}/?stream=desk&token=page-token")
    await wait_state(viewer, "connected", wire)
    assert wire.sockets == [f"ws://127.0.0.1:{running.port}/v1/captions?stream=desk&token=page-token"]

    for query, text in (("token=wrong", "refused (check the token); retrying in"),
                        ("", "refused: this server needs ?token=… in the page address; retrying in")):
        refused = await browser.new_page()
        wire = Wire(refused)
        await refused.goto(f"{base}/?stream=desk&{query}")
        await wait_state(refused, "error", wire, seconds=10)
        assert (await refused.locator("#conn").inner_text()).startswith(text)
        await asyncio.sleep(2)
        assert 1 <= len(wire.sockets) <= 4, wire.sockets  # 0.5, 1, 2 s ceilings: backing off, not hammering
        await refused.close()
    assert running.metrics.auth_failures_total.value("invalid") >= 2
    assert not [line for line in wire.console if line.startswith("pageerror")], wire.console


def test_page_is_self_contained() -> None:
    """The daemon serves only index.html: no external script, style or worklet file may be referenced."""
    html = PAGE.read_text()
    assert not re.search(r"<script[^>]+src=|<link[^>]+stylesheet|addModule\(['\"]", html)
