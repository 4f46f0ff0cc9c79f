"""systemd's sd_notify protocol in the standard library: one datagram per call, a no-op outside systemd.

``NOTIFY_SOCKET`` is read once and removed from the environment (:func:`take_notify_socket`) so child
processes do not inherit it. See ``systemd/README.md`` for what the daemon sends when.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable

_socket_path: str | None = None


def take_notify_socket() -> str | None:
    """Pop ``NOTIFY_SOCKET`` from the environment and remember it for :func:`notify`."""
    global _socket_path
    _socket_path = os.environ.pop("NOTIFY_SOCKET", None) or _socket_path
    return _socket_path


def notify(*lines: str) -> bool:
    """Send ``READY=1``, ``STOPPING=1``, ``WATCHDOG=1``, ``STATUS=...`` lines; False when not under systemd."""
    path = take_notify_socket()
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path  # "@name": abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall("\n".join(lines).encode())
    return True


def watchdog_interval_s() -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds, or None when the watchdog is off or meant for another process."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


async def watchdog(is_healthy: Callable[[], bool], interval_s: float) -> None:
    """Send ``WATCHDOG=1`` every ``interval_s`` while ``is_healthy()``; a stuck loop sends nothing. Cancel to stop."""
    while True:
        if is_healthy():
            notify("WATCHDOG=1")
        await asyncio.sleep(interval_s)
