"""Which hosts and browser origins the port answers: the defence against DNS rebinding and cross-site WebSockets.

Browsers let any page open a WebSocket to any address and send the page's ``Origin``; they also let a
page whose name is made to point at 127.0.0.1 (DNS rebinding) talk to this machine under that name,
with that name in ``Host``. So every request's ``Host`` must name this server (``server.allowed_hosts``,
port ignored) and a request that carries ``Origin`` must come from one of the daemon's own pages or
from ``server.allowed_origins``. Requests without ``Origin`` (programs, not browsers) are not
affected by the origin rule.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Authority:
    """A host name or address (lower case, IPv6 without brackets) and a port (None: not given)."""

    host: str
    port: int | None

    @classmethod
    def parse(cls, text: str) -> Authority | None:
        """``name``, ``name:port``, ``[v6]``, ``[v6]:port``; None when ``text`` is none of them."""
        text = text.strip().lower()
        if text.startswith("["):
            host, bracket, rest = text[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                return None
            port_text = rest[1:] if rest else None
        elif text.count(":") > 1:  # a bare IPv6 address (not valid in Host, but unambiguous)
            host, port_text = text, None
        else:
            host, colon, port_text_or_empty = text.partition(":")
            port_text = port_text_or_empty if colon else None
        host = host.rstrip(".")
        if not host or not all(c.isalnum() or c in "-._:" for c in host):
            return None
        if port_text is None:
            return cls(host, None)
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return None
        return cls(host, int(port_text))


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (the defaults that serve this machine only)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name (or "" for every address): it may resolve to anything
        return False


def machine_names() -> set[str]:
    """This machine's host name (and its first label, and that with ``.local`` for mDNS); no DNS lookup."""
    name = socket.gethostname().lower().rstrip(".")
    if not name:
        return set()
    first = name.split(".")[0]
    return {name, first, f"{first}.local"}


class OriginPolicy:
    """Decides whether a request's ``Host`` and ``Origin`` are acceptable.

    Args:
        bind_host: ``server.host`` (``""``, ``0.0.0.0`` or ``::``: every address).
        port: the port the daemon listens on.
        allowed_hosts: ``server.allowed_hosts``, normalized (lower case, no brackets); ``*`` allows any.
        allowed_origins: ``server.allowed_origins``, normalized (lower case, no trailing ``/``); ``*`` any.
    """

    def __init__(self, bind_host: str, port: int, allowed_hosts: list[str], allowed_origins: list[str]) -> None:
        self.port = port
        bind = bind_host.strip().lower().strip("[]")
        self.serves_network = not is_loopback(bind)
        names = set(LOOPBACK_NAMES) | {h for h in allowed_hosts if h != "*"}
        if bind and bind not in ("0.0.0.0", "::"):
            names.add(bind)
        if self.serves_network:
            names |= machine_names()
        self.host_names = frozenset(names)
        self.any_host = "*" in allowed_hosts
        self.any_origin = "*" in allowed_origins
        self.origins = frozenset(allowed_origins)

    def host_problem(self, host_headers: list[str]) -> str | None:
        """None when the request's ``Host`` names this server (or is absent); otherwise the 403 body."""
        if self.any_host or not host_headers:
            return None  # without Host (HTTP/1.0 programs) there is no name to rebind
        if len(host_headers) > 1:
            return "several Host headers in one request; send one\n"
        authority = Authority.parse(host_headers[0])
        if authority is not None and self._is_own_host(authority.host):
            return None
        return (f"this server does not answer to the host name {_shown(host_headers[0])} (a guard against DNS "
                "rebinding): add the name to server.allowed_hosts if clients reach the server under it (e.g. "
                "through a reverse proxy)\n")

    def origin_problem(self, origin: str | None, host_header: str | None) -> str | None:
        """None when the request has no ``Origin`` or an allowed one; otherwise the 403 body."""
        if origin is None or self.any_origin:
            return None
        value = origin.strip().lower().rstrip("/")
        if value in self.origins or self._is_own_origin(value, host_header):
            return None
        return (f"a page from the origin {_shown(origin)} may not use this server: add that origin to "
                "server.allowed_origins to allow it (requests without an Origin header, from programs rather "
                "than browsers, are not affected)\n")

    def _is_own_host(self, host: str) -> bool:
        if host in self.host_names:
            return True
        return self.serves_network and is_ip_address(host)  # addresses cannot be rebound; names can

    def _is_own_origin(self, origin: str, host_header: str | None) -> bool:
        """A page of this server: one of its names on its port, or the very host and port the request reached."""
        url = urlsplit(origin)
        if url.scheme not in DEFAULT_PORTS or not url.netloc or url.path or url.query:
            return False
        page = Authority.parse(url.netloc)
        if page is None:
            return False
        page_port = page.port or DEFAULT_PORTS[url.scheme]
        if page.host in self.host_names and page_port == self.port:
            return True
        # Through a reverse proxy or a port forward, the page and the request share a Host other than ours.
        reached = Authority.parse(host_header) if host_header else None
        if reached is None or not self._is_own_host(reached.host):
            return False
        return reached.host == page.host and (reached.port or DEFAULT_PORTS[url.scheme]) == page_port


def _shown(value: str, limit: int = 200) -> str:
    """``value`` quoted for a message or a log line, cut short (it comes from the client)."""
    return repr(value[:limit] + ("..." if len(value) > limit else ""))
