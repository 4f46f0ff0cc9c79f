"""``streamer mic``: live captions of a microphone in the terminal.

By default the recognizer runs in this process (the bundled default model, or ``--model``), fed by
:class:`~streamer.audio.mic.MicrophoneSource` through the daemon's own scheduler and segmenter, so
the partials and finals are the ones ``streamer serve`` would send. With ``--url ws://HOST:PORT``
the microphone is streamed to a running daemon instead (this module then imports no torch),
reconnecting with backoff when the daemon goes away. A dropped connection resumes its session
(protocol: "Resuming a session" in ``streamer/protocol.py``): the last ``RESUME_BUFFER_S`` of audio
are kept, the audio the daemon missed is sent again, and the finals made meanwhile arrive, so the
caption that was open gets its final; the status line says "resumed". When the session cannot be
resumed (the daemon restarted, or ``server.resume_window_s`` passed) it says so and goes on in a new
session. ``--token`` (or ``STREAMER_TOKEN``) is sent as ``Authorization: Bearer`` to a daemon that
needs one, ``--cafile`` trusts a self-signed ``wss://`` certificate; a refused token or an untrusted
certificate ends the program with one line instead of retrying.

On a terminal the open segment's partial is rewritten in place on one line (``\\r`` and clear to end
of line; the part that may still change is dimmed) and finals scroll. When stdout is not a terminal
only finals are printed, one per line; ``--json`` prints every message as one JSON line. Status lines
go to stderr. Ctrl-C (or SIGTERM) ends the open segment, prints its final and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import ssl
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from streamer.asr import clocks
from streamer.config_args import MODEL_FLAGS, Key, add_settings_args, parse_context, settings_from_args
from streamer.engine.factory import load_recognizer
from streamer.errors import AudioError, ConfigError, StreamerError
from streamer.protocol import (
    RESUME_BUFFER_S,
    ClientSession,
    End,
    Error,
    Final,
    Partial,
    Ready,
    ServerMessage,
    Start,
    Warning,
    parse_server_message,
)
from streamer.protocol import listen_url as protocol_listen_url

MIC_RATE_HZ = clocks.SAMPLE_RATE_HZ  # what MicrophoneSource delivers (it resamples from the device's own rate)
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 15.0
RECV_TIMEOUT_S = 10.0  # --url: waiting for "ready", and for "end" after "stop"
CLEAR_LINE = "\r\x1b[K"
NO_MICROPHONE = (
    "no microphone found: PortAudio lists no input device (is one plugged in, is a sound server running, "
    "may this user open /dev/snd?)"
)
DIM, NORMAL = "\x1b[2m", "\x1b[0m"
MIC_FLAGS: dict[str, Key] = {**MODEL_FLAGS, "torch_device": ("model", "device")}  # --device is the microphone

EPILOG = """\
examples:
  streamer mic                                  captions from the default microphone, default model
  streamer mic --list-devices                   what can be captured from
  streamer mic --device 2 --model path/to/model.nemo
  STREAMER_MODEL__ATT_CONTEXT_SIZE='[70,1]' streamer mic    the look-ahead from the environment
  streamer mic --config /etc/streamer/streamer.toml   the daemon's [model] settings, here
  streamer mic --url ws://127.0.0.1:8765        recognize on a running daemon instead (no torch here)
  streamer mic --url wss://box:8765 --token T --cafile cert.pem
"""


class Captions:
    """Writes captions to a terminal or a pipe; see the module docstring.

    Args:
        out: where captions go.
        err: where status lines, warnings and errors go.
        as_json: print every message as one JSON line instead.
        inplace: rewrite partials in place; default: when ``out`` is a terminal.
        width: columns of the terminal (default: asked on every partial, so resizing works).
    """

    def __init__(
        self, out: TextIO, err: TextIO, as_json: bool = False, inplace: bool | None = None, width: int | None = None
    ) -> None:
        self.out, self.err, self.as_json = out, err, as_json
        self.inplace = (not as_json and out.isatty()) if inplace is None else inplace
        self._width = width
        self._partial = ""  # the partial line on screen, as written (escapes included)
        self.finals = 0

    def show(self, msg: ServerMessage) -> None:
        """Print one message from the recognizer or the server."""
        if self.as_json:
            self.out.write(msg.to_json() + "\n")
            self.out.flush()
        elif isinstance(msg, Partial):
            if self.inplace:
                self._partial = self._fit(msg.text, msg.stable)
                self.out.write(CLEAR_LINE + self._partial)
                self.out.flush()
        elif isinstance(msg, Final):
            if msg.text:
                self.out.write((CLEAR_LINE if self.inplace else "") + msg.text + "\n")
                self.out.flush()
            elif self._partial:
                self.out.write(CLEAR_LINE)
                self.out.flush()
            self._partial = ""
        elif isinstance(msg, Warning | Error):
            self.status(f"{msg.type}: {msg.code}: {msg.message}")
        if isinstance(msg, Final):
            self.finals += 1

    def status(self, text: str) -> None:
        """One line on ``err``, without tearing the partial line apart on a shared terminal."""
        if self._partial:
            self.out.write(CLEAR_LINE)
            self.out.flush()
        self.err.write(text + "\n")
        self.err.flush()
        if self._partial:
            self.out.write(self._partial)
            self.out.flush()

    def _fit(self, text: str, stable: str) -> str:
        """The tail of ``text`` that fits on one line (a wrapped line cannot be rewritten), unstable part dimmed."""
        width = (self._width or shutil.get_terminal_size((80, 24)).columns) - 1
        stable_len = len(stable) if text.startswith(stable) else 0
        if len(text) > width:
            cut = len(text) - (width - 1)
            text, stable_len = "…" + text[cut:], max(0, stable_len - cut) + 1
        if stable_len >= len(text):
            return text
        return text[:stable_len] + DIM + text[stable_len:] + NORMAL


# ---------------------------------------------------------------- devices


def print_devices(out: TextIO) -> int:
    """``--list-devices``: one line per capture device; ``*`` marks the default."""
    from streamer.audio.mic import list_devices

    devices = list_devices()
    if not devices:
        raise AudioError(NO_MICROPHONE)
    for d in devices:
        mark = "*" if d.is_default else " "
        out.write(f"{mark} {d.index:3d}  {d.name}  ({d.channels} ch, {d.default_rate_hz} Hz, {d.host_api})\n")
    return 0


def parse_device(text: str | None) -> str | int | None:
    """``--device``: an index or a (sub)string of a device name."""
    return int(text) if text is not None and text.isdigit() else text


def check_microphone() -> None:
    """Fail in one line, before anything slow happens, where no microphone exists at all."""
    from streamer.audio.mic import list_devices

    if not list_devices():
        raise AudioError(NO_MICROPHONE)


# ---------------------------------------------------------------- in process


async def run_local(args: argparse.Namespace, captions: Captions, stop: asyncio.Event) -> int:
    """Recognize the microphone here, with the daemon's scheduler, until ``stop``."""
    from streamer.audio.mic import MicrophoneSource
    from streamer.engine.endpoint import EndpointConfig
    from streamer.engine.scheduler import Scheduler

    model = settings_from_args(args, MIC_FLAGS).model  # a bad setting fails before the microphone opens
    check_microphone()
    captions.status(f"loading model {model.spec} …")
    recognizer = await asyncio.to_thread(load_recognizer, model)

    def publish(stream: str, events: Sequence[Any]) -> None:
        for event in events:
            captions.show(event)

    scheduler = Scheduler(recognizer, publish, max_batch=1, max_wait_ms=0)
    await asyncio.to_thread(scheduler.warm_up)
    channel = scheduler.open("mic", EndpointConfig())

    def on_audio(samples: Any) -> None:
        channel.write(samples)
        scheduler.poke(channel)

    mic = MicrophoneSource(parse_device(args.device), on_audio)
    runner = asyncio.create_task(scheduler.run(), name="scheduler")
    try:
        await mic.start()
        captions.status(f"listening on {mic.device_name!r} ({mic.native_rate_hz} Hz); Ctrl-C to stop")
        await _until_stopped(stop, mic)
        await mic.stop()  # the resampler's tail goes in first
        await scheduler.close(channel, "stop")  # then the last final
    finally:
        await mic.stop()
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    return 0


async def _until_stopped(stop: asyncio.Event, mic: Any) -> None:
    """Wait for ``stop``; raise the microphone's AudioError if it fails first."""
    stopped = asyncio.create_task(stop.wait())
    failed = asyncio.ensure_future(mic.wait())
    try:
        done, _ = await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        if failed in done:
            failed.result()
    finally:
        stopped.cancel()
        failed.cancel()


# ---------------------------------------------------------------- against a daemon


def listen_url(url: str) -> str:
    """:func:`streamer.protocol.listen_url`, with a bad ``--url`` as a :class:`ConfigError`."""
    try:
        return protocol_listen_url(url)
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
                    await _until_stopped(stop, mic)
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
            stopper = asyncio.create_task(_until_stopped(stop, mic))
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
        async with asyncio.timeout(RECV_TIMEOUT_S):
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


# ---------------------------------------------------------------- command line


def add_mic_args(p: argparse.ArgumentParser) -> None:
    """The options of ``streamer mic`` (and of ``clients/mic_demo.py``)."""
    p.add_argument("--list-devices", action="store_true", help="list the capture devices and exit")
    p.add_argument("--device", help="capture device: an index or part of a name (default: the system's)")
    p.add_argument("--url", help="recognize on a running daemon, e.g. ws://127.0.0.1:8765, instead of here (a "
                   "dropped connection resumes its session)")
    p.add_argument("--stream", help="with --url: the stream name, so others can follow /v1/captions?stream=NAME")
    p.add_argument("--token", default=os.environ.get("STREAMER_TOKEN"),
                   help="with --url: access token for a daemon that needs one (default: $STREAMER_TOKEN, "
                   "which unlike a command-line argument other users cannot see in ps)")
    p.add_argument("--cafile", help="with a wss:// --url: trust this PEM certificate (e.g. a self-signed one)")
    model = p.add_argument_group("the recognizer here (without --url): flags override the [model] settings")
    model.add_argument("--model", help="model to load (model.spec; default: the bundled one); a .nemo file, "
                       "directory, name or id")
    model.add_argument("--torch-device", help="torch device for the model, e.g. cuda (model.device; default: cpu)")
    model.add_argument("--threads", type=int, help="torch intra-op threads (model.threads; default: torch's)")
    model.add_argument("--att-context-size", type=parse_context, metavar="L,R", help="look-ahead, e.g. 70,1 "
                       "(model.att_context_size; default: the model's first)")
    model.add_argument("--decoder", choices=("tdt", "rnnt", "ctc"),
                       help="decoding head (model.decoder; default: the model's own)")
    add_settings_args(model)
    p.add_argument("--json", action="store_true", help="print every message as one JSON line")
    p.add_argument("--seconds", type=float, help="stop after this many seconds (default: at Ctrl-C)")


def add_mic_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``streamer mic``."""
    p = sub.add_parser(
        "mic",
        help="live captions of a microphone in the terminal",
        description="Live captions of a microphone in the terminal. The recognizer runs here (the bundled\n"
        "default model, or --model), or on a running daemon with --url, which resumes the session after\n"
        "a dropped connection (re-sending the audio the daemon missed). On a terminal the partial is\n"
        "rewritten in place and finals scroll; when stdout is not a terminal only finals are printed;\n"
        "--json prints every message. Ctrl-C prints the last final and exits.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_mic_args(p)
    p.set_defaults(func=cmd_mic)


def cmd_mic(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``streamer mic``; errors that streamer raises on purpose propagate (the CLI prints them in one line)."""
    out, err = out or sys.stdout, err or sys.stderr
    if args.list_devices:
        return print_devices(out)
    if args.url:
        connect_options(listen_url(args.url), args.token, args.cafile)  # bad options fail before the microphone opens
    elif args.cafile:
        raise ConfigError("--cafile goes with --url wss://HOST:PORT")
    captions = Captions(out, err, as_json=args.json)
    return asyncio.run(_main(args, captions))


async def _main(args: argparse.Namespace, captions: Captions) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if args.seconds:
        loop.call_later(args.seconds, stop.set)
    try:
        run: Callable[..., Any] = run_remote if args.url else run_local
        return int(await run(args, captions, stop))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """``clients/mic_demo.py``: the same as ``streamer mic``, with its own one-line errors."""
    parser = argparse.ArgumentParser(prog="mic_demo", description="Live captions of a microphone in the terminal.",
                                     epilog=EPILOG.replace("streamer mic", "mic_demo.py"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_mic_args(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_mic(args)
    except StreamerError as exc:
        print(f"mic_demo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

