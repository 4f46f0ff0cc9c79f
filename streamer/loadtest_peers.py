"""The processes and relays ``streamer loadtest`` works with: the daemon it starts, a mosquitto broker,
a TCP relay whose connections can be cut, an MQTT subscriber that counts finals, and /proc probes.

Everything listens on and connects to 127.0.0.1 only, and every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from streamer.errors import StreamerError

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
STOP_TIMEOUT_S = 30.0  # the daemon flushes open segments within 20 s (service.FLUSH_TIMEOUT_S)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def http_get(url: str, token: str | None = None, timeout_s: float = 5.0) -> tuple[int, str]:
    """GET ``url``; returns the status and body (0 and the reason when nothing answers)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode(errors="replace")
    except (OSError, TimeoutError) as exc:
        return 0, str(exc)


def read_metrics(http_base: str, token: str | None = None) -> dict[str, float]:
    """The daemon's unlabelled ``/metrics`` series by name ({} when it does not answer)."""
    status, body = http_get(f"{http_base}/metrics", token)
    if status != 200:
        return {}
    out: dict[str, float] = {}
    for line in body.splitlines():
        name, _, value = line.partition(" ")
        if line.startswith("#") or "{" in name or not value:
            continue
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


class ProcessProbe:
    """CPU time and resident memory of a local process, read from /proc (Linux)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._ticks_per_s = os.sysconf("SC_CLK_TCK")

    def sample(self) -> tuple[float | None, float | None]:
        """CPU seconds so far and RSS in MiB (None where unknown); blocking, brief."""
        return self.cpu_s(), self.rss_mb()

    def cpu_s(self) -> float | None:
        """User plus system CPU seconds so far; None when the process is gone."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces; fields after it are fixed
        return (int(fields[11]) + int(fields[12])) / self._ticks_per_s  # utime, stime (fields 14, 15)

    def rss_mb(self) -> float | None:
        """Resident set size (VmRSS) in MiB; None when the process is gone."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return None


class MetricsProbe:
    """CPU time and resident memory of a remote daemon from the standard ``process_*`` series of its /metrics."""

    def __init__(self, http_base: str, token: str | None) -> None:
        self.http_base, self.token = http_base, token

    def sample(self) -> tuple[float | None, float | None]:
        """CPU seconds so far and RSS in MiB (None where the daemon does not say); blocking (an HTTP GET)."""
        metrics = read_metrics(self.http_base, self.token)
        rss = metrics.get("process_resident_memory_bytes")
        return metrics.get("process_cpu_seconds_total"), None if rss is None else rss / 2**20


class DaemonProcess:
    """``streamer serve`` as a subprocess on a free loopback port; its stdout and stderr go to ``log``.

    Args:
        workdir: where the port file and the log go.
        serve_args: arguments after ``streamer serve`` (model, look-ahead, ``--set``).
    """

    def __init__(self, workdir: Path, serve_args: list[str]) -> None:
        self.workdir, self.serve_args = workdir, serve_args
        self.log = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def http_base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout_s: float) -> None:
        """Start the daemon and return once ``/readyz`` says ready (blocking: run it in a thread).

        Raises:
            StreamerError: it exited, or was not ready within ``timeout_s`` (with the end of its log).
        """
        port_file = self.workdir / "daemon.port"
        port_file.unlink(missing_ok=True)
        command = [sys.executable, "-m", "streamer", "--log-level", "WARNING", "serve", "--host", LOOPBACK,
                   "--port", "0", "--port-file", str(port_file), *self.serve_args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # a subprocess's port file and readiness can only be polled
            if self.proc.poll() is not None:
                raise StreamerError(f"the daemon exited with {self.proc.returncode}:\n{tail(self.log)}")
            if not self.port and port_file.exists() and port_file.read_text().strip():
                self.port = int(port_file.read_text())
            if self.port and http_get(f"{self.http_base}/readyz", timeout_s=1.0)[0] == 200:
                return
            time.sleep(0.1)
        self.stop()
        raise StreamerError(f"the daemon was not ready within {timeout_s:.0f} s (raise --start-timeout-s if the "
                            f"model loads slowly):\n{tail(self.log)}")

    def stop(self) -> int | None:
        """SIGTERM and wait (kill past the flush deadline); returns the exit status (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_lines(self, is_traceback: bool) -> list[str]:
        """The exception line of each Python traceback in the daemon's log (``is_traceback``), or the lines it
        logged at ERROR or CRITICAL level."""
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        out = []
        for i, line in enumerate(lines):
            if not is_traceback and (" ERROR " in line or " CRITICAL " in line):
                out.append(line)
            elif is_traceback and line.startswith("Traceback (most recent call last)"):
                rest = [x for x in lines[i + 1:] if x and not x.startswith((" ", "\t", "Traceback"))]
                out.append(rest[0] if rest else line)
        return out


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


class Broker:
    """A mosquitto process on a fixed loopback port that survives restarts; persistence is on, so a
    subscriber's persistent session (and the QoS 1 messages queued for it) outlives a restart."""

    def __init__(self, directory: Path) -> None:
        if shutil.which("mosquitto") is None:
            raise StreamerError("the soak needs mosquitto for MQTT (apt install mosquitto), or pass --no-mqtt")
        self.directory, self.port = directory, free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self, timeout_s: float = 10.0) -> None:
        """Start and return once the port accepts connections (blocking)."""
        config = self.directory / "mosquitto.conf"
        lines = [f"listener {self.port} {LOOPBACK}", "allow_anonymous true", "persistence true",
                 f"persistence_location {self.directory}/", f"log_dest file {self.directory / 'mosquitto.log'}"]
        if os.geteuid() == 0:  # as root mosquitto switches to user "mosquitto", who may not read the directory
            lines.append("user root")
        config.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(["mosquitto", "-c", str(config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StreamerError(f"mosquitto exited with {self.proc.returncode}; see {self.directory}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, self.port), timeout=0.2):
                return
            time.sleep(0.02)
        raise StreamerError(f"mosquitto did not listen on port {self.port} within {timeout_s:.0f} s")

    def stop(self) -> None:
        """SIGTERM (it saves its persistent state), kill after 5 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self, downtime_s: float) -> None:
        """Stop, stay down ``downtime_s``, start again on the same port (blocking)."""
        self.stop()
        time.sleep(downtime_s)
        self.start()
        self.restarts += 1


class Relay:
    """A TCP relay from a loopback port to ``target_host:target_port``; :meth:`cut` aborts every relayed connection on
    both sides, so neither end gets a WebSocket close frame (as when a network link dies)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host, self.target_port, self.port = target_host, target_port, 0
        self.cuts = 0
        self._transports: list[asyncio.BaseTransport] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()

    def cut(self) -> None:
        """Abort both sides of every relayed connection."""
        for transport in self._transports:
            transport.abort()
        self._transports.clear()
        self.cuts += 1

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._transports += [writer.transport, up_writer.transport]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


class MqttTally:
    """Subscribes to every stream's final topic with QoS 1 in a persistent session (so finals published
    while it reconnects after a broker restart are queued for it) and counts each final it receives."""

    def __init__(self, port: int, topic: str) -> None:
        self.port, self.topic = port, topic
        self.seen: Counter[tuple[str, int, float, float]] = Counter()  # (stream, segment, start, end) -> times
        self.subscribed = asyncio.Event()
        self.errors: list[str] = []
        self._identifier = f"streamer-loadtest-{os.getpid()}"

    async def run(self, stop: asyncio.Event) -> None:
        """Receive until ``stop`` is set, reconnecting after broker restarts. Cancelling is safe."""
        import aiomqtt

        while not stop.is_set():
            try:
                async with aiomqtt.Client(LOOPBACK, self.port, identifier=self._identifier, clean_session=False,
                                          keepalive=10) as client:
                    await client.subscribe(self.topic, qos=1)
                    self.subscribed.set()
                    receiving = asyncio.create_task(self._receive(client))
                    stopping = asyncio.create_task(stop.wait())
                    done, _ = await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    for task in (receiving, stopping):
                        task.cancel()
                    if receiving in done:
                        receiving.result()  # raises the MqttError that ended the connection
            except aiomqtt.MqttError:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await stop.wait()

    async def _receive(self, client: object) -> None:
        async for message in client.messages:  # type: ignore[attr-defined]
            try:
                final = json.loads(message.payload)
                key = (str(final["stream"]), int(final["segment"]), float(final["start"]), float(final["end"]))
            except (ValueError, KeyError, TypeError) as exc:
                self.errors.append(f"MQTT: a final that is not a final's JSON on {message.topic}: {exc}")
                continue
            self.seen[key] += 1
