"""systemd: sd_notify against a real AF_UNIX datagram NOTIFY_SOCKET, and the unit file through systemd-analyze."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamer.server import sdnotify

UNIT = Path(__file__).parents[1] / "systemd" / "streamer.service"
TIMEOUT = float(os.environ.get("STREAMER_TEST_TIMEOUT_FACTOR", "1"))


@pytest.fixture(autouse=True)
def no_remembered_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdnotify, "_socket_path", None)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket bound in tmp_path, announced in NOTIFY_SOCKET as systemd would."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5 * TIMEOUT)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_notify_sends_the_lines_and_pops_the_variable(notify_socket: socket.socket) -> None:
    """READY=1 with a STATUS arrives as one datagram; NOTIFY_SOCKET is gone from the environment after."""
    assert sdnotify.take_notify_socket() is not None
    assert "NOTIFY_SOCKET" not in os.environ  # children do not inherit it
    assert sdnotify.notify("READY=1", "STATUS=listening on 127.0.0.1:8765")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=listening on 127.0.0.1:8765"
    assert sdnotify.notify("STOPPING=1")
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_notify_is_a_no_op_outside_systemd() -> None:
    """Without NOTIFY_SOCKET, notify returns False and does nothing."""
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.watchdog_interval_s() is None


def test_abstract_socket_from_a_child_process() -> None:
    """NOTIFY_SOCKET=@name (abstract namespace) works from a real child process."""
    name = f"streamer-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10 * TIMEOUT)
        code = "import os; from streamer.server import sdnotify; sdnotify.notify('READY=1', f'MAINPID={os.getpid()}')"
        child = subprocess.run([sys.executable, "-c", code], env={**os.environ, "NOTIFY_SOCKET": "@" + name},
                               check=True, timeout=60 * TIMEOUT)
        assert child.returncode == 0
        message = sock.recv(4096).decode()
    assert message.startswith("READY=1\nMAINPID=") and int(message.split("=")[-1]) > 0


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """Half of WATCHDOG_USEC, and only for the process WATCHDOG_PID names."""
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sdnotify.watchdog_interval_s() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval_s() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert sdnotify.watchdog_interval_s() is None


async def test_watchdog_pings_only_while_healthy(notify_socket: socket.socket) -> None:
    """WATCHDOG=1 every interval while healthy; none while the health check fails."""
    loop = asyncio.get_running_loop()
    notify_socket.setblocking(False)
    healthy = True
    task = asyncio.create_task(sdnotify.watchdog(lambda: healthy, 0.05))
    try:
        for _ in range(3):
            async with asyncio.timeout(5 * TIMEOUT):
                assert await loop.sock_recv(notify_socket, 4096) == b"WATCHDOG=1"
        healthy = False
        await asyncio.sleep(0.06)
        while True:  # drain a ping sent just before the switch
            try:
                notify_socket.recv(4096)
            except BlockingIOError:
                break
        await asyncio.sleep(0.2)
        with pytest.raises(BlockingIOError):
            notify_socket.recv(4096)
    finally:
        task.cancel()


def _unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this Python (verify fails when the binary does not exist)."""
    lines = []
    for line in UNIT.read_text().splitlines():
        if line.startswith("ExecStart="):
            args = line.split("=", 1)[1].split()[1:]
            line = f"ExecStart={sys.executable} -m streamer {' '.join(args)}"
        lines.append(line)
    path = tmp_path / "streamer.service"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    """systemd-analyze verify prints nothing (it exits 0 even for unknown keys, so stderr must be empty)."""
    result = subprocess.run(["systemd-analyze", "verify", str(_unit_for_this_machine(tmp_path))],
                            capture_output=True, text=True, timeout=60 * TIMEOUT)
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_hardening_and_required_lines(tmp_path: Path) -> None:
    """Exposure stays at most 6.0 ("medium"); the unit is Type=notify with a watchdog; nothing hides /dev/snd."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=60", str(_unit_for_this_machine(tmp_path))],
        capture_output=True, text=True, timeout=60 * TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-2000:]
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "SupplementaryGroups=audio",
                 "StateDirectory=", "CacheDirectory=", "ConfigurationDirectory=", "NoNewPrivileges=yes"):
        assert f"\n{line}" in text
    assert "\nPrivateDevices=" not in text and "\nDevicePolicy=" not in text
    for line in text.splitlines():  # systemd has no trailing comments
        assert "#" not in line or line.startswith("#"), line
