"""Where a listening server is: its bound port and the URL to print (shared by every port the daemon opens)."""

from __future__ import annotations

from typing import Any


def bound_port(server: Any) -> int:
    """The port an asyncio or websockets server is bound to (the free one the OS chose for port 0)."""
    if server is None:
        raise RuntimeError("the server is not started")
    return int(server.sockets[0].getsockname()[1])


def url(scheme: str, host: str, port: int) -> str:
    """``scheme://host:port``, an IPv6 host in brackets."""
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"
