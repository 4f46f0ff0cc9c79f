"""Real peers for adapter tests (``test-rig.md`` §1-§2): a mosquitto broker and a PulseAudio virtual microphone.

Registered as a pytest plugin (``pytest_plugins = ["tests.fixtures_realpeers"]`` in ``tests/conftest.py``).
Each fixture skips, saying why, where its program is not installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Scales every bound a test waits under, for slow machines (python-websockets' convention).
TIMEOUT_FACTOR = float(os.environ.get("STREAMER_TEST_TIMEOUT_FACTOR", "1"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, deadline_s: float) -> None:
    """Return once ``port`` accepts connections; fail with the program's log if it exits or never does."""
    deadline = time.monotonic() + deadline_s * TIMEOUT_FACTOR
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mosquitto exited with {proc.returncode}:\n{_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    pytest.fail(f"mosquitto did not listen on port {port} within {deadline_s} s:\n{_tail(log)}")


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


@dataclass
class Mosquitto:
    """A mosquitto process owned by the test, on a fixed loopback port it keeps across restarts.

    ``extra_config`` lines are appended to the generated configuration (e.g. a password file); with
    ``anonymous=False`` clients must log in; with ``persistent=True`` retained messages and persistent
    sessions survive `restart`, as they would on a production broker with persistence on.
    """

    directory: Path
    port: int = field(default_factory=free_port)
    extra_config: str = ""
    anonymous: bool = True
    persistent: bool = False
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        """The broker's log file (``log_type all``)."""
        return self.directory / "mosquitto.log"

    def _write_config(self) -> Path:
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'true' if self.anonymous else 'false'}",
            f"persistence {'true' if self.persistent else 'false'}",
            f"persistence_location {self.directory}/",
            f"log_dest file {self.log}",
            "log_type all",
        ]
        if os.geteuid() == 0:  # as root, mosquitto switches to user "mosquitto", who cannot read tmp_path
            lines.append("user root")
        path = self.directory / "mosquitto.conf"
        path.write_text("\n".join([*lines, self.extra_config, ""]))
        return path

    def start(self) -> None:
        """Start the broker and wait until it accepts connections (about 20 ms)."""
        assert self.proc is None or self.proc.poll() is not None, "mosquitto is already running"
        config = self._write_config()
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _wait_for_port(self.port, self.proc, self.log, deadline_s=5.0)

    def stop(self) -> None:
        """Stop the broker as an admin would (SIGTERM: it closes connections and saves persistent state)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5 * TIMEOUT_FACTOR)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self, downtime_s: float = 0.0) -> None:
        """Stop, stay down for ``downtime_s``, start again on the same port."""
        self.stop()
        time.sleep(downtime_s)
        self.start()


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Make started brokers: ``mosquitto_factory(extra_config=..., anonymous=..., persistent=...)``."""
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed (apt install mosquitto)")
    brokers: list[Mosquitto] = []

    def make(**kwargs: object) -> Mosquitto:
        directory = tmp_path / f"mosquitto{len(brokers)}"
        directory.mkdir()
        broker = Mosquitto(directory, **kwargs)  # type: ignore[arg-type]
        brokers.append(broker)
        broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def mosquitto_broker(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """An anonymous mosquitto on a free loopback port, restartable on that port."""
    return mosquitto_factory()


@dataclass(frozen=True)
class VirtualMic:
    """A PulseAudio null sink whose monitor is the default source: what `play` plays, the mic hears."""

    env: dict[str, str]  # environment for PulseAudio clients of this server (PULSE_SERVER, PULSE_SOURCE, ...)
    server: subprocess.Popen[bytes]
    device: str = "pulse"  # the sounddevice (ALSA) device that reaches the PulseAudio server
    sink: str = "virtmic_sink"
    source: str = "virtmic"

    def play(self, wav: Path) -> None:
        """Play a sound file into the sink and return when it has been played."""
        subprocess.run(["paplay", f"--device={self.sink}", str(wav)], env=self.env, check=True, timeout=60)


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def skip_without_pulseaudio() -> None:
    """Skip the calling test where the PulseAudio programs or PortAudio are missing."""
    for program in ("pulseaudio", "pactl", "pacat", "paplay"):
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed (apt install pulseaudio pulseaudio-utils)")
    try:
        import sounddevice  # noqa: F401
    except OSError as exc:
        pytest.skip(f"sounddevice cannot load PortAudio ({exc}); apt install libportaudio2")


@contextlib.contextmanager
def pulseaudio_mic(runtime: Path) -> Iterator[VirtualMic]:
    """A private PulseAudio server with a null sink, its monitor as source, and a silence feeder.

    Its runtime files live in ``runtime``; it is stopped on exit. This process's environment is left alone:
    clients get the server through ``VirtualMic.env``.
    """
    runtime.chmod(0o700)
    native = runtime / "native"
    env = {
        **os.environ,
        "XDG_RUNTIME_DIR": str(runtime),
        "HOME": str(runtime),
        "PULSE_RUNTIME_PATH": str(runtime / "pulse"),
        "PULSE_SERVER": f"unix:{native}",
        "PULSE_SOURCE": "virtmic",
        "PULSE_SINK": "virtmic_sink",
    }
    log_path = runtime / "pulseaudio.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [
                "pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--use-pid-file=no",
                "--log-target=stderr", "--log-level=warning",
                f"--load=module-native-protocol-unix auth-anonymous=1 socket={native}",
                "--load=module-null-sink sink_name=virtmic_sink rate=16000 channels=1",
                "--load=module-remap-source source_name=virtmic master=virtmic_sink.monitor",
                "--load=module-always-sink",
            ],
            env=env, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    feeder: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 10 * TIMEOUT_FACTOR
        while subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"PulseAudio did not start:\n{_tail(log_path)}")
            time.sleep(0.1)
        # An idle null-sink monitor delivers no data at all; a silent stream makes it behave like a real mic.
        feeder = subprocess.Popen(
            ["pacat", "--playback", "--device=virtmic_sink", "--raw", "--format=s16le", "--rate=16000",
             "--channels=1", "/dev/zero"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        yield VirtualMic(env=env, server=server)
    finally:
        _stop(feeder)
        _stop(server)


_PULSE_VARS = ("PULSE_SERVER", "PULSE_SOURCE", "PULSE_SINK")


@pytest.fixture(scope="session")
def virtual_mic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VirtualMic]:
    """One private PulseAudio server for the session, and PortAudio in this process rescanned to see it."""
    skip_without_pulseaudio()
    import sounddevice as sd

    saved = {name: os.environ.get(name) for name in _PULSE_VARS}
    rescanned = False
    try:
        with pulseaudio_mic(tmp_path_factory.mktemp("pulse")) as mic:
            os.environ.update({name: mic.env[name] for name in _PULSE_VARS})  # before PortAudio rescans
            sd._terminate()  # PortAudio lists devices once; rescan now that the server is up
            sd._initialize()
            rescanned = True
            yield mic
            sd._terminate()  # release the server's devices before it goes
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if rescanned:
            sd._initialize()  # later users see the machine's own devices again
