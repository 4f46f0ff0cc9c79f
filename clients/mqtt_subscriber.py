#!/usr/bin/env python3
"""Print the captions and status that a streamer daemon publishes to an MQTT broker.

    python clients/mqtt_subscriber.py                                # this machine's daemon, broker on localhost
    python clients/mqtt_subscriber.py --host broker.lan --device kitchen-pi
    python clients/mqtt_subscriber.py --device + --json              # every device, one JSON line per message

It subscribes to ``<prefix>/<device>/#`` (the daemon's ``mqtt.prefix``, default ``streamer``, and
``mqtt.device_id``, default the daemon's host name) and prints:

- ``<device> status: online`` / ``offline`` from the retained ``<prefix>/<device>/status``;
- ``<device>/<stream>: text`` for each final (``.../<stream>/final``, QoS 1);
- on a terminal, the latest partial (``.../<stream>/partial``) rewritten in place on one line.

The payloads are the WebSocket's JSON (``streamer.protocol``). The subscriber reconnects with
backoff when the broker goes away. Needs aiomqtt and ``streamer.protocol`` (no torch).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import ssl
import sys

import aiomqtt

from streamer.protocol import Final, MessageError, Partial, parse_server_message

CLEAR_LINE = "\r\x1b[K"
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 15.0


class Printer:
    """Turns (topic, payload) into lines; partials in place on a terminal."""

    def __init__(self, prefix: str, as_json: bool) -> None:
        self.levels = len(prefix.strip("/").split("/"))
        self.as_json = as_json
        self.inplace = sys.stdout.isatty() and not as_json
        self.partial = False
        self.finals = 0

    def __call__(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")[self.levels :]  # [device, "status"] or [device, stream, kind]
        text = payload.decode("utf-8", errors="replace")
        if self.as_json:
            body = text if parts[-1:] == ["status"] else json.loads(text)
            print(json.dumps({"topic": topic, "payload": body}, ensure_ascii=False), flush=True)
            self.finals += parts[-1:] == ["final"]
            return
        if len(parts) == 2 and parts[1] == "status":
            self.line(f"{parts[0]} status: {text}")
            return
        if len(parts) != 3:
            return
        try:
            msg = parse_server_message(text)
        except MessageError as exc:
            self.line(f"{topic}: unreadable payload ({exc})", err=True)
            return
        if isinstance(msg, Final):
            self.finals += 1
            if msg.text:
                self.line(f"{parts[0]}/{parts[1]}: {msg.text}")
        elif isinstance(msg, Partial) and self.inplace:
            line = f"{parts[0]}/{parts[1]}: {msg.text}"
            width = shutil.get_terminal_size().columns - 1
            print(CLEAR_LINE + (line if len(line) <= width else "…" + line[-(width - 1) :]), end="", flush=True)
            self.partial = True

    def line(self, text: str, err: bool = False) -> None:
        if self.partial:
            print(CLEAR_LINE, end="", flush=True)
            self.partial = False
        print(text, file=sys.stderr if err else sys.stdout, flush=True)


async def subscribe(args: argparse.Namespace, show: Printer) -> None:
    """Print messages until ``--max-finals`` finals were printed (or forever), reconnecting with backoff."""
    topic = f"{args.prefix.strip('/')}/{args.device}/#"
    tls = ssl.create_default_context(cafile=args.ca_file) if args.tls or args.ca_file else None
    password = args.password or os.environ.get("MQTT_PASSWORD")
    attempt = 0
    while True:
        try:
            async with aiomqtt.Client(args.host, args.port, username=args.username, password=password,
                                      tls_context=tls, timeout=10) as client:
                await client.subscribe(topic, qos=1)
                show.line(f"subscribed to {topic} on {args.host}:{args.port}", err=True)
                attempt = 0
                async for message in client.messages:
                    payload = message.payload
                    show(str(message.topic), bytes(payload) if isinstance(payload, bytes | bytearray)
                         else str(payload).encode())
                    if args.max_finals and show.finals >= args.max_finals:
                        return
        except aiomqtt.MqttError as exc:
            delay = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2**attempt) * random.uniform(0.5, 1.0)
            attempt += 1
            show.line(f"broker {args.host}:{args.port}: {exc}; retrying in {delay:.1f} s", err=True)
            await asyncio.sleep(delay)


async def run(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await subscribe(args, Printer(args.prefix, args.json))
    except asyncio.CancelledError:
        pass  # Ctrl-C: a normal way to end
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None,
                                epilog="see the module docstring for examples")
    p.add_argument("--host", default="localhost", help="broker (default: %(default)s)")
    p.add_argument("--port", type=int, help="broker port (default: 1883, or 8883 with TLS)")
    p.add_argument("--prefix", default="streamer", help="the daemon's mqtt.prefix (default: %(default)s)")
    p.add_argument("--device", default=socket.gethostname(),
                   help="the daemon's mqtt.device_id, or + for all (default: this host, %(default)s)")
    p.add_argument("--username", help="broker user name")
    p.add_argument("--password", help="broker password (better: the MQTT_PASSWORD environment variable)")
    p.add_argument("--tls", action="store_true", help="connect with TLS, verifying the broker")
    p.add_argument("--ca-file", help="CA certificate(s) for TLS (default: the system's)")
    p.add_argument("--json", action="store_true", help="print {topic, payload} per message, one JSON line each")
    p.add_argument("--max-finals", type=int, default=0, help="exit after this many finals (default: never)")
    args = p.parse_args(argv)
    if args.port is None:
        args.port = 8883 if args.tls or args.ca_file else 1883
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
