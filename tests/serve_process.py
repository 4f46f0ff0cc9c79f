"""`streamer serve` as a subprocess on loopback, with the bundled default model, for tests of the protocol adapters.

The daemon logs at INFO to a file (a pipe nobody reads would fill up and stall it); a test waits for a log line
(e.g. an adapter saying it is connected) with :meth:`Served.wait_for_log`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

TIMEOUT = float(os.environ.get("STREAMER_TEST_TIMEOUT_FACTOR", "1"))


@dataclass
class Served:
    """A running daemon: its main port, its log and its process."""

    port: int
    log: Path
    proc: asyncio.subprocess.Process

    async def wait_for_log(self, text: str, timeout_s: float = 30.0) -> None:
        async with asyncio.timeout(timeout_s * TIMEOUT):
            while text not in self.log.read_text(errors="replace"):
                if self.proc.returncode is not None:
                    raise AssertionError(f"the daemon exited with {self.proc.returncode}:\n{self.tail()}")
                await asyncio.sleep(0.05)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    async def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, as systemd stops it; returns the exit status."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(timeout_s * TIMEOUT):
            return await self.proc.wait()


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, env: dict[str, str], *args: str) -> AsyncIterator[Served]:
    """Start the daemon (``env`` on top of this process's environment) and wait until it listens."""
    port_file, log_path = tmp_path / "port", tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamer", "--log-level", "INFO", "serve", "--port", "0", "--port-file",
            str(port_file), *args, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=log,
        )
    served = Served(0, log_path, proc)
    try:
        async with asyncio.timeout(120 * TIMEOUT):
            while not port_file.is_file() or not port_file.read_text().strip():
                if proc.returncode is not None:
                    raise AssertionError(f"the daemon exited with {proc.returncode}:\n{served.tail()}")
                await asyncio.sleep(0.05)
        served.port = int(port_file.read_text())
        yield served
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(60 * TIMEOUT):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
