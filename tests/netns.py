"""Hosts on one machine for multi-host tests: Linux network namespaces joined by a bridge.

A :class:`Network` is a "switch" namespace holding a bridge, and one namespace per host (:meth:`Network.add_host`)
with loopback up and one veth pair to the bridge, its end named ``eth0`` and given an address in :data:`SUBNET`.
Programs run on a host through ``ip netns exec`` (:meth:`Network.spawn`; the process keeps its pid, so a test can
``kill -9`` it). The test process reaches a host's network by making its sockets inside that host's namespace
(:meth:`Host.run`, :meth:`Host.connect`: a short-lived thread enters the namespace with ``setns``, makes the
socket and ends; a socket belongs to the namespace it was made in, whichever thread uses it), so one asyncio loop
can be a client on one host and read a load balancer's loopback-only stats page on another.

Nothing is added to the test machine's own namespace (no address, link or route): :data:`SUBNET` cannot clash
with its networks, and no packet of a test leaves the namespaces. Names carry the test process's pid and a random
tag, so parallel runs and the leftovers of a killed run never clash. :meth:`Network.close` (also on a failed test:
use it as a context manager or in a fixture's finalizer) stops every program it started (SIGTERM, then SIGKILL),
kills whatever else still runs in its namespaces, and deletes them; the veth pairs and the bridge go with them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from streamer.errors import StreamerError

logger = logging.getLogger(__name__)

SUBNET = ipaddress.ip_network("10.231.0.0/24")  # private, and only ever inside the namespaces
FIRST_HOST_OFFSET = 10  # hosts get .10, .11, ...
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
IP_TIMEOUT_S = 15.0  # one `ip` command
STOP_GRACE_S = 10.0  # after SIGTERM, how long a program may take to exit before SIGKILL

T = TypeVar("T")


class NetnsError(StreamerError):
    """A namespace, link or address could not be made or removed."""


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be used here (for ``pytest.skip``), or None when they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root for `ip netns` (CI runs as root)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` (apt install iproute2; setup.sh does)"
    probe = f"smh{os.getpid()}probe{secrets.token_hex(2)}"
    steps = (["netns", "add", probe], ["-n", probe, "link", "add", "name", "va", "type", "veth", "peer", "name", "vb"],
             ["netns", "exec", probe, "true"])
    try:
        for args in steps:
            done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
            if done.returncode != 0:
                return f"`ip {' '.join(args)}` fails here: {done.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=IP_TIMEOUT_S)
    return None


def ip(*args: str) -> str:
    """Run ``ip ARGS``; its output.

    Raises:
        NetnsError: it failed (the message has its stderr).
    """
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if done.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done.stdout


def in_namespace(netns: str, action: Callable[[], T]) -> T:
    """``action()`` called on a new thread that first enters network namespace ``netns``; its result.

    Only that thread changes namespace (CLONE_NEWNET is per thread), and it ends right after, so the rest of
    the process stays where it was; what ``action`` makes (a socket) stays in ``netns``.

    Raises:
        NetnsError: the namespace cannot be entered.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    outcome: dict[str, T] = {}
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with open(NETNS_DIR / netns, "rb") as handle:
                if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise NetnsError(f"cannot enter network namespace {netns}: {os.strerror(code)}")
            outcome["value"] = action()
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome["value"]


@dataclass(frozen=True)
class Host:
    """One host: its role name, its namespace and its address on the bridge."""

    name: str
    netns: str
    address: str

    def command(self, *args: str) -> list[str]:
        """``args`` as a command line that runs on this host."""
        return ["ip", "netns", "exec", self.netns, *args]

    def run(self, action: Callable[[], T]) -> T:
        """``action()`` on this host's network (blocking: from async code, ``asyncio.to_thread(host.run, ...)``)."""
        return in_namespace(self.netns, action)

    def connect(self, address: str, port: int, timeout_s: float) -> socket.socket:
        """A TCP connection from this host to ``address:port`` (blocking), e.g. for ``websockets.connect(sock=)``.

        Raises:
            OSError: it was refused or timed out.
        """
        return self.run(lambda: socket.create_connection((address, port), timeout=timeout_s))


class Network:
    """A bridge and hosts on it; every program started here and every namespace made is removed by :meth:`close`.

    Args:
        tag: the start of every namespace name (default: ``smh<pid>x<random>``).
    """

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or f"smh{os.getpid()}x{secrets.token_hex(3)}"
        self.switch = f"{self.tag}-switch"
        self.hosts: dict[str, Host] = {}
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            self._add_namespace(self.switch)
            ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            ip("-n", self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def add_host(self, name: str) -> Host:
        """A new host ``name`` on the bridge, with the next free address of :data:`SUBNET`."""
        if name in self.hosts:
            raise NetnsError(f"there is a host {name!r} already")
        index = len(self.hosts)
        address = str(SUBNET.network_address + FIRST_HOST_OFFSET + index)
        host = Host(name, f"{self.tag}-{name}", address)
        self._add_namespace(host.netns)
        port = f"p{index}"  # the bridge's end, named inside the switch namespace only
        ip("link", "add", "eth0", "netns", host.netns, "type", "veth", "peer", "name", port, "netns", self.switch)
        ip("-n", self.switch, "link", "set", port, "master", "br0")
        ip("-n", self.switch, "link", "set", port, "up")
        ip("-n", host.netns, "addr", "add", f"{address}/{SUBNET.prefixlen}", "dev", "eth0")
        ip("-n", host.netns, "link", "set", "eth0", "up")
        self.hosts[name] = host
        return host

    def spawn(self, host: Host, args: Sequence[str], log: Path, env: Mapping[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        """Start ``args`` on ``host``, its output appended to ``log``; ``env`` on top of this process's environment."""
        with log.open("ab") as out:
            proc = subprocess.Popen(host.command(*args), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        """Stop the programs (in reverse order of start), then delete the namespaces; safe to call twice.

        Raises:
            NetnsError: a namespace could not be deleted (after trying all of them).
        """
        for proc in reversed(self.procs):  # the last started first: clients of a broker stop before it
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    logger.warning("pid %d did not stop on SIGTERM within %g s: SIGKILL", proc.pid, STOP_GRACE_S)
                    proc.kill()
                    proc.wait()
        problems = []
        for name in reversed(self.namespaces):
            self._kill_all_in(name)
            try:
                ip("netns", "del", name)
            except NetnsError as exc:
                problems.append(str(exc))
        self.namespaces.clear()
        if problems:
            raise NetnsError("; ".join(problems))

    def _kill_all_in(self, netns: str) -> None:
        """SIGKILL what still runs in ``netns`` (children of the programs started here)."""
        with contextlib.suppress(NetnsError):
            for pid in ip("netns", "pids", netns).split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)

