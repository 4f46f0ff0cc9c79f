"""The multi-host harness itself (tests/netns.py): hosts reach each other over the bridge, the test machine's own
namespace gets no address or route, and closing removes every namespace and kills every program started in them,
children included, also when the test failed inside."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns import SUBNET, NetnsError, Network, unavailable_reason

ECHO = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
while True:
    conn, _ = server.accept()
    with conn:
        conn.sendall(conn.recv(100).upper())
"""


@pytest.fixture(scope="module")
def netns_ok() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=15, check=True).stdout


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


def test_hosts_talk_over_the_bridge_and_the_machine_gets_no_address(netns_ok: None, tmp_path: Path) -> None:
    with Network() as network:
        server, client = network.add_host("server"), network.add_host("client")
        assert server.address != client.address and {server.address, client.address} <= set(map(str, SUBNET))
        network.spawn(server, [sys.executable, "-c", ECHO, server.address, "7000"], tmp_path / "echo.log")
        for _ in range(200):  # until the echo server listens (at most 10 s)
            try:
                sock = client.connect(server.address, 7000, 1.0)
                break
            except OSError:
                time.sleep(0.05)
        else:
            pytest.fail(f"the echo server never answered:\n{(tmp_path / 'echo.log').read_text()}")
        with sock:
            sock.sendall(b"over the bridge")
            assert sock.recv(100) == b"OVER THE BRIDGE"
            assert sock.getsockname()[0] == client.address  # it left from the client host's address
        root = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True, timeout=15, check=True).stdout
        prefix = str(SUBNET.network_address).rsplit(".", 1)[0] + "."
        assert f"inet {prefix}" not in root  # nothing of the subnet in this machine's namespace
        assert network.tag in namespaces()
        with pytest.raises(NetnsError, match="already"):
            network.add_host("server")
    assert network.tag not in namespaces()


def test_close_after_a_failure_kills_programs_and_their_children(netns_ok: None, tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    with pytest.raises(RuntimeError, match="the test failed"), Network() as network:
        host = network.add_host("box")
        parent = network.spawn(host, ["sh", "-c", f"sleep 600 & echo $! > {pid_file}; wait"], tmp_path / "sh.log")
        for _ in range(200):
            if pid_file.is_file() and pid_file.read_text().strip():
                break
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert alive(parent.pid) and alive(child)
        raise RuntimeError("the test failed")
    assert parent.poll() is not None and not alive(child)
    assert network.tag not in namespaces()
    network.close()  # twice is harmless


def test_unique_names_let_two_networks_use_the_same_addresses(netns_ok: None) -> None:
    with Network() as one, Network() as two:
        a, b = one.add_host("x"), two.add_host("x")
        assert a.address == b.address and a.netns != b.netns
        with a.run(lambda: socket.create_server((a.address, 7001))), \
                b.run(lambda: socket.create_server((b.address, 7001))):
            pass  # the same address and port twice: two separate networks
