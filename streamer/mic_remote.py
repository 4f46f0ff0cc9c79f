"""``streamer mic --url``: the microphone streamed to a running daemon, reconnecting with backoff and resuming the
session after a dropped connection (protocol: "Resuming a session" in :mod:`streamer.protocol`). Imports no torch.

The last ``RESUME_BUFFER_S`` of audio are kept (:class:`streamer.client.ClientSession`), the audio the daemon missed
is sent again, and the finals made meanwhile arrive, so the caption that was open gets its final; the status line
says "resumed". When the session cannot be resumed (the daemon restarted, or ``server.resume_window_s`` passed) it
says so and goes on in a new session. A refused token or an untrusted certificate ends the program with one line
instead of retrying.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import ssl
from typing import Any

from streamer.asr import clocks
from streamer.client import RESUME_BUFFER_S, ClientSession
from streamer.client import listen_url as client_listen_url
from streamer.errors import ConfigError
from streamer.mic_devices import check_microphone, parse_device, until_stopped
from streamer.protocol import End, Error, Final, Ready, Start, parse_server_message
from streamer.terminal_captions import Captions

MIC_RATE_HZ = clocks.SAMPLE_RATE_HZ  # what MicrophoneSource delivers (it resamples from the device's own rate)
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 15.0
RECV_TIMEOUT_S = 10.0  # --url: waiting for "end" after "stop"
# --url: waiting for "ready"; a resume on another replica of a cluster may wait for the old one's stream lease to
# lapse (cluster.lease_ttl_s)
READY_TIMEOUT_S = 30.0


def listen_url(url: str) -> str:
    """:func:`streamer.client.listen_url`, with a bad ``--url`` as a :class:`ConfigError`."""
    try:
        return client_listen_url(url)
    except ValueError as exc:
        raise ConfigError(f"--url {exc}") from None


def connect_options(url: str, token: str | None, cafile: str | None) -> dict[str, Any]:
    """Keyword arguments for websockets' ``connect``: the token as a Bearer header, a CA for ``wss://``.

    Raises:
        ConfigError: ``cafile`` with a ``ws://`` URL, or a ``cafile`` that does not load.
    """
    options: dict[str, Any] = {}
    if token:
        options["additional_headers"] = {"Authorization": f"Bearer {token}"}
    if cafile:
        if not url.startswith("wss://"):
            raise ConfigError(f"--cafile needs a wss:// URL, not {url}")
        try:
            options["ssl"] = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"--cafile {cafile}: cannot load it as a PEM certificate ({exc})") from exc
    return options


class Uplink:
    """The microphone's audio on its way to the daemon, kept across connections to resume the session.

    Args:
        start: the ``start`` message of every connection (a resume is added when there is a session).
    """

    def __init__(self, start: Start) -> None:
        self.session = ClientSession(start, RESUME_BUFFER_S)
        self.captured = asyncio.Event()  # new audio, or the microphone stopped
        self.is_mic_done = False
        self.readies = 0  # connections that got as far as "ready"

    def add(self, samples: Any) -> None:
        """``MicrophoneSource``'s ``on_audio`` (on the loop thread): keep a block, connected or not."""
        self.session.audio.add(samples.astype("<f4").tobytes())
        self.captured.set()

    def finish(self) -> None:
        """The microphone stopped: `send` ends with ``stop`` once everything is sent."""
        self.is_mic_done = True
        self.captured.set()

    async def send(self, ws: Any) -> None:
        """Send the audio the session lacks, then live audio; ``stop`` after `finish`. Cancelling loses
        nothing: what is not sent stays buffered. One task at a time."""
        await self.session.send_audio(ws, self.captured, lambda: self.is_mic_done)


async def run_remote(args: argparse.Namespace, captions: Captions, stop: asyncio.Event) -> int:
    """Stream the microphone to ``--url`` and print what comes back; reconnect with backoff until ``stop``."""
    from streamer.audio.mic import MicrophoneSource

    url = listen_url(args.url)
    options = connect_options(url, args.token, args.cafile)
    check_microphone()
    uplink = Uplink(Start(MIC_RATE_HZ, "pcm_f32le", stream=args.stream, live=True))  # a microphone cannot wait
    mic = MicrophoneSource(parse_device(args.device), uplink.add)
    await mic.start()
    captions.status(f"listening on {mic.device_name!r}; sending to {url}; Ctrl-C to stop")
    attempt = 0
    try:
        while True:
            readies = uplink.readies
            result = await _session(url, uplink, captions, stop, mic, options)
            if result is not None:
                return result
            if uplink.readies > readies:  # it was connected: back off from the start (within the resume window)
                attempt = 0
            delay = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2**attempt) * random.uniform(0.5, 1.0)
            attempt += 1
            captions.status(f"retrying in {delay:.1f} s")
            try:
                async with asyncio.timeout(delay):
                    await until_stopped(stop, mic)
                return 0
            except TimeoutError:
                pass
    finally:
        await mic.stop()


async def _session(
    url: str, uplink: Uplink, captions: Captions, stop: asyncio.Event, mic: Any, options: dict[str, Any]
) -> int | None:
    """One connection: start (resuming the session if there is one), audio until ``stop``, the last final.
    Returns None when it failed or the session ended without ``stop`` (retry).

    Raises:
        ConfigError: the daemon refused the token (HTTP 401) or its certificate is not trusted: retrying
            cannot help.
    """
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

    try:
        async with connect(url, open_timeout=RECV_TIMEOUT_S, close_timeout=2, compression=None, **options) as ws:
            ready = await _start(ws, uplink, captions)
            if not isinstance(ready, Ready):
                return ready
            sender = asyncio.create_task(uplink.send(ws))
            receiver = asyncio.create_task(_receive(ws, captions, uplink.session))
            stopper = asyncio.create_task(until_stopped(stop, mic))
            tasks = {sender, receiver, stopper}
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                if stopper not in done:  # the connection broke, or the server ended the session
                    why = "closed before 'end'"
                    for task in done:
                        if isinstance(exc := task.exception(), ConnectionClosed):
                            why = str(exc)
                        elif exc is not None:
                            raise exc
                    if uplink.session.ready is None:
                        captions.status(f"the session on {url} ended")
                    else:  # the next connection resumes it
                        captions.status(f"connection to {url} lost ({why})")
                    return None
                stopper.result()  # the microphone failed: its AudioError
                await mic.stop()  # the resampler's tail goes in first
                uplink.finish()
                async with asyncio.timeout(RECV_TIMEOUT_S):
                    await sender  # the rest of the audio, then "stop"
                    await receiver  # the last final, then "end"
                return 0
            finally:
                for task in tasks:
                    task.cancel()
    except InvalidURI as exc:
        raise ConfigError(f"--url: {exc}") from exc
    except InvalidStatus as exc:
        if exc.response.status_code != 401:
            captions.status(f"{url} refused the connection (HTTP {exc.response.status_code})")
            return None
        lines = (exc.response.body or b"").decode("utf-8", "replace").strip().splitlines()
        reason = lines[0][:200] if lines else "no reason given"
        raise ConfigError(f"{url} refused the connection (HTTP 401: {reason}); give its token with --token "
                          "or STREAMER_TOKEN") from exc
    except ssl.SSLCertVerificationError as exc:
        raise ConfigError(f"{url}: the server's certificate is not trusted ({exc.verify_message or exc}); "
                          "--cafile FILE trusts a self-signed one") from exc
    except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake) as exc:
        captions.status(f"connection to {url} failed or lost ({exc or type(exc).__name__})")
        return None


async def _start(ws: Any, uplink: Uplink, captions: Captions) -> Ready | int | None:
    """Send ``start`` and wait for ``ready``; an error instead gives the session's result (None: retry).

    After ``resume_failed`` the server starts a new session from the same ``start``: its ``ready`` follows.
    """
    start = uplink.session.start_message()
    await ws.send(start.to_json())
    while True:
        async with asyncio.timeout(READY_TIMEOUT_S):
            msg = parse_server_message(await ws.recv())
        if isinstance(msg, Ready):
            break
        if isinstance(msg, Error):
            captions.show(msg)
            if msg.code != "resume_failed":
                return None if msg.code in ("stream_in_use", "server_busy", "not_ready") else 1
    uplink.readies += 1
    lost = uplink.session.on_ready(msg)
    if msg.resumed:
        how = f" (resumed at {msg.audio_s or 0:.2f} s)"
    elif start.resume is not None:
        how = " (a new session: the old one could not be resumed)"
    else:
        how = ""
    captions.status(f"connected: stream {msg.stream}, model {msg.model}{how}")
    if lost:
        captions.status(f"{lost / MIC_RATE_HZ:.1f} s of audio were lost while disconnected")
    return msg


async def _receive(ws: Any, captions: Captions, session: ClientSession) -> None:
    """Show what the server sends until ``end``; count the finals (a resume asks for the rest)."""
    async for raw in ws:
        msg = parse_server_message(raw)
        captions.show(msg)
        if isinstance(msg, Final):
            session.on_final(msg)
        elif isinstance(msg, End):
            session.on_end()
            return
