"""``streamer mic`` (and ``clients/mic_demo.py``): live captions of a microphone in the terminal.

By default the recognizer runs in this process (the bundled default model, or ``--model``), fed by
:class:`~streamer.audio.mic.MicrophoneSource` through the daemon's own scheduler and segmenter, so
the partials and finals are the ones ``streamer serve`` would send. With ``--url ws://HOST:PORT``
the microphone is streamed to a running daemon instead (:mod:`streamer.mic_remote`; no torch is
imported then), reconnecting with backoff when the daemon goes away and resuming its session.
``--token`` (or ``STREAMER_TOKEN``) is sent as ``Authorization: Bearer`` to a daemon that needs one,
``--cafile`` trusts a self-signed ``wss://`` certificate.

Captions are printed by :class:`~streamer.terminal_captions.Captions`: on a terminal the partial is
rewritten in place and finals scroll; when stdout is not a terminal only finals are printed; ``--json``
prints every message as one JSON line. Status lines go to stderr. Ctrl-C (or SIGTERM) ends the open
segment, prints its final and exits 0. The capture device is chosen and checked in
:mod:`streamer.mic_devices`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from streamer.config_args import MODEL_FLAGS, Key, add_settings_args, parse_context, settings_from_args
from streamer.engine.factory import load_recognizer
from streamer.errors import ConfigError, StreamerError
from streamer.mic_devices import check_microphone, parse_device, print_devices, until_stopped
from streamer.mic_remote import connect_options, listen_url, run_remote
from streamer.terminal_captions import Captions

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
        await until_stopped(stop, mic)
        await mic.stop()  # the resampler's tail goes in first
        await scheduler.close(channel, "stop")  # then the last final
    finally:
        await mic.stop()
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    return 0


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

