"""The multi-host test's cluster (tests/test_multihost.py), each part on its own host of a :class:`tests.netns.Network`.

Hosts: ``store`` (redis-server, the [cluster] lease store), ``broker`` (mosquitto, the results bus), ``lb`` (HAProxy
running the shipped deploy/haproxy/haproxy.cfg with the replicas' addresses), ``asr1``..``asr3`` (``streamer serve``
with the bundled model, [cluster] and [admission] with the agent port on), and ``client``, whose network the test's
own connections use. Every program listens on its shipped or default port (8765, 8766, 8080, 6379, 1883): each host
has its own addresses, so nothing clashes with the test machine's services. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect

from tests.netns import Host, Network
from tests.serve_process import TIMEOUT

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "streamer-tdt-small" / "model.nemo"
SHIPPED_HAPROXY = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
DAEMON_PORT, AGENT_PORT, LB_PORT, STATS_PORT = 8765, 8766, 8080, 8404  # as in the shipped haproxy.cfg
REDIS_PORT, MQTT_PORT = 6379, 1883
REPLICAS = ("asr1", "asr2", "asr3")
LEASE_TTL_S = 2.0  # a killed replica's stream names are free this long after its last renewal
DRAIN_TIMEOUT_S = 60.0
WAIT_S = 60.0 * TIMEOUT  # the bound of every wait for a result, a state or a program
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def render_haproxy(shipped: str, servers: list[tuple[str, str]]) -> str:
    """The shipped file with these ``(name, address)`` replicas and quicker checks; each substitution must hit."""
    def sub(pattern: str, replacement: str, text: str) -> str:
        out, count = re.subn(pattern, replacement, text, flags=re.M)
        assert count == 1, f"the shipped haproxy.cfg has no line matching {pattern!r}"
        return out

    for line in (f"    bind :{LB_PORT}", f"    bind 127.0.0.1:{STATS_PORT}"):
        assert line in shipped.splitlines(), f"the shipped haproxy.cfg lost {line.strip()!r}"
    text = sub(rf"agent-check agent-port {AGENT_PORT} agent-inter 2s", "agent-check agent-port "
               f"{AGENT_PORT} agent-inter 300ms", shipped)
    text = sub(r"check inter 2s fall 2 rise 2", "check inter 300ms fall 1 rise 1", text)
    lines = "".join(f"    server {name} {address}:{DAEMON_PORT}\n" for name, address in servers)
    return sub(r"(^    server streamer\d .*\n)+", lines, text)


@dataclass
class Replica:
    """One ``streamer serve`` on its host; ``proc`` is None until started."""

    name: str
    host: Host
    folder: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.folder / "serve.log"

    def url(self, path: str) -> str:
        return f"ws://{self.host.address}:{DAEMON_PORT}{path}"

    @property
    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def wait_for_log(self, text: str, timeout_s: float = WAIT_S) -> None:
        """Wait until the log has ``text``; fail if the daemon exits first."""
        async with asyncio.timeout(timeout_s):
            while text not in self.log_text():
                assert self.is_running, f"{self.name} exited with {self.proc and self.proc.poll()}:\n" \
                                        f"{self.log_text()[-3000:]}"
                await asyncio.sleep(0.05)

    async def wait_exit(self) -> int:
        assert self.proc is not None
        async with asyncio.timeout(WAIT_S):
            while self.proc.poll() is None:
                await asyncio.sleep(0.05)
        return self.proc.returncode


class Cluster:
    """The hosts and programs; :meth:`start` brings them up, ``network.close()`` takes everything down.

    Args:
        network: where the hosts go.
        folder: configurations and logs.
        replica_env: more settings for every replica (``STREAMER_...`` variables).
    """

    def __init__(self, network: Network, folder: Path, replica_env: dict[str, str] | None = None) -> None:
        self.network, self.folder, self.replica_env = network, folder, replica_env or {}
        self.store, self.broker = network.add_host("store"), network.add_host("broker")
        self.lb, self.client = network.add_host("lb"), network.add_host("client")
        self.replicas = [Replica(name, network.add_host(name), folder / name) for name in REPLICAS]
        self.haproxy: subprocess.Popen[bytes] | None = None

    @property
    def lb_url(self) -> str:
        return f"ws://{self.lb.address}:{LB_PORT}"

    async def start(self) -> None:
        """Store, broker, the three replicas, then HAProxy; returns once HAProxy has every replica UP."""
        redis_dir = self.folder / "redis"
        redis_dir.mkdir()
        self.network.spawn(self.store, ["redis-server", "--bind", self.store.address, "--port", str(REDIS_PORT),
                                        "--protected-mode", "no", "--save", "", "--appendonly", "no",
                                        "--dir", str(redis_dir)], self.folder / "redis.log")
        config = self.folder / "mosquitto.conf"
        config.write_text(f"listener {MQTT_PORT} {self.broker.address}\nallow_anonymous true\npersistence false\n"
                          "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
                          "log_type subscribe\nuser root\n")  # as root, it would switch to user mosquitto
        self.network.spawn(self.broker, ["mosquitto", "-c", str(config)], self.folder / "mosquitto.log")
        await self.wait_listening(self.store.address, REDIS_PORT)
        await self.wait_listening(self.broker.address, MQTT_PORT)
        for replica in self.replicas:
            replica.folder.mkdir()
            self.start_replica(replica)
        for replica in self.replicas:
            await self.wait_replica_ready(replica)
        self.start_haproxy()
        await self.wait_states({name: True for name in REPLICAS})

    def start_replica(self, replica: Replica) -> None:
        env = {"STREAMER_STATE__DIR": "", "STREAMER_MQTT__ENABLED": "true",
               "STREAMER_MQTT__HOST": self.broker.address, "STREAMER_MQTT__PORT": str(MQTT_PORT),
               "STREAMER_CLUSTER__ENABLED": "true", "STREAMER_CLUSTER__NODE_ID": replica.name,
               "STREAMER_CLUSTER__STORE_URL": f"redis://{self.store.address}:{REDIS_PORT}/0",
               "STREAMER_CLUSTER__LEASE_TTL_S": str(LEASE_TTL_S), **self.replica_env}
        port_file = replica.folder / "port"
        port_file.unlink(missing_ok=True)
        args = [sys.executable, "-m", "streamer", "--log-level", "INFO", "serve", "--model", str(MODEL),
                "--host", replica.host.address, "--port", str(DAEMON_PORT), "--port-file", str(port_file),
                "--set", f"admission.agent_port={AGENT_PORT}", "--set", "admission.capacity_streams=4",
                "--set", f"admission.drain_timeout_s={DRAIN_TIMEOUT_S:g}"]
        replica.proc = self.network.spawn(replica.host, args, replica.log, env)

    async def wait_replica_ready(self, replica: Replica) -> None:
        """Listening, and subscribed to the results bus (so it relays other replicas' results from now on)."""
        await replica.wait_for_log(f"ready: listening on http://{replica.host.address}:{DAEMON_PORT}",
                                   2 * WAIT_S)  # loading the model on a busy machine
        await replica.wait_for_log("results bus: subscribed")

    async def restart_exited(self) -> list[str]:
        """Start again every replica that is not running (after a drain or a kill); the names restarted."""
        restarted = [r for r in self.replicas if not r.is_running]
        for replica in restarted:
            replica.log.rename(replica.folder / f"serve-{len(list(replica.folder.glob('serve*.log')))}.log")
            self.start_replica(replica)
        for replica in restarted:
            await self.wait_replica_ready(replica)
        await self.wait_states({name: True for name in REPLICAS})
        return [r.name for r in restarted]

    def start_haproxy(self) -> None:
        path = self.folder / "haproxy.cfg"
        path.write_text(render_haproxy(SHIPPED_HAPROXY.read_text(), [(r.name, r.host.address) for r in self.replicas]))
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(path)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        self.haproxy = self.network.spawn(self.lb, ["haproxy", "-db", "-f", str(path)], self.folder / "haproxy.log")

    async def wait_listening(self, address: str, port: int) -> None:
        """Until a TCP connection from the client host to ``address:port`` succeeds."""
        async with asyncio.timeout(WAIT_S):
            while True:
                try:
                    sock = await asyncio.to_thread(self.client.connect, address, port, 1.0)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                sock.close()
                return

    async def ws(self, url: str) -> ClientConnection:
        """A WebSocket from the client host to ``url`` (``ws://ADDRESS:PORT/PATH``)."""
        match = re.fullmatch(r"ws://([\d.]+):(\d+)(/.*)", url)
        assert match, url
        sock = await asyncio.to_thread(self.client.connect, match[1], int(match[2]), 10.0 * TIMEOUT)
        return await connect(url, sock=sock, open_timeout=20 * TIMEOUT, close_timeout=5)

    async def get(self, host: Host, url: str) -> tuple[int, str]:
        """HTTP GET from ``host``: status and body."""
        def fetch() -> tuple[int, str]:
            try:
                with NO_PROXY.open(url, timeout=10 * TIMEOUT) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as exc:
                with exc:
                    return exc.code, exc.read().decode()

        return await asyncio.to_thread(host.run, fetch)

    async def server_states(self) -> dict[str, str]:
        """``{replica: status}`` from HAProxy's stats (UP, DOWN, DRAIN, ...), read on the lb host's loopback."""
        try:
            _, body = await self.get(self.lb, f"http://127.0.0.1:{STATS_PORT}/stats;csv")
        except (urllib.error.URLError, OSError):  # not listening yet
            return {}
        rows = csv.DictReader(io.StringIO(body.lstrip("# ")))
        return {row["svname"]: row["status"] for row in rows if row["pxname"] == "streamer"
                and row["svname"] not in ("BACKEND", "FRONTEND")}

    async def wait_states(self, up: dict[str, bool]) -> None:
        """Until HAProxy has each named replica UP (True) or out of rotation (False: DRAIN, DOWN, MAINT)."""
        async with asyncio.timeout(WAIT_S):
            while True:
                assert self.haproxy is not None and self.haproxy.poll() is None, "haproxy exited"
                states = await self.server_states()
                if all(states.get(name, "").startswith("UP") == want for name, want in up.items()):
                    return
                await asyncio.sleep(0.1)

    async def active_sessions(self, replica: Replica) -> float:
        """``streamer_sessions_active`` of a running replica, read from the client host."""
        _, body = await self.get(self.client, f"http://{replica.host.address}:{DAEMON_PORT}/metrics")
        match = re.search(r"^streamer_sessions_active (\S+)$", body, flags=re.M)
        assert match, f"no streamer_sessions_active in {replica.name}'s /metrics"
        return float(match.group(1))

    async def sessions_by_replica(self) -> dict[str, float]:
        return {r.name: await self.active_sessions(r) for r in self.replicas if r.is_running}

    async def holder(self) -> Replica:
        """The one running replica with an open session (the test opens one at a time through HAProxy)."""
        by_name = {r.name: r for r in self.replicas}
        async with asyncio.timeout(WAIT_S):
            while True:
                holding = [name for name, count in (await self.sessions_by_replica()).items() if count]
                if len(holding) == 1:
                    return by_name[holding[0]]
                await asyncio.sleep(0.05)

    def kill(self, replica: Replica, sig: signal.Signals) -> None:
        assert replica.proc is not None and replica.is_running
        replica.proc.send_signal(sig)
