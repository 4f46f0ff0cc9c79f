"""The capture device of ``streamer mic``: listing, choosing and checking it, and waiting on it.

The capture itself is :class:`streamer.audio.mic.MicrophoneSource`, imported only where a microphone opens.
"""

from __future__ import annotations

import asyncio
from typing import Any, TextIO

from streamer.errors import AudioError

NO_MICROPHONE = (
    "no microphone found: PortAudio lists no input device (is one plugged in, is a sound server running, "
    "may this user open /dev/snd?)"
)


def print_devices(out: TextIO) -> int:
    """``--list-devices``: one line per capture device; ``*`` marks the default."""
    from streamer.audio.mic import list_devices

    devices = list_devices()
    if not devices:
        raise AudioError(NO_MICROPHONE)
    for d in devices:
        mark = "*" if d.is_default else " "
        out.write(f"{mark} {d.index:3d}  {d.name}  ({d.channels} ch, {d.default_rate_hz} Hz, {d.host_api})\n")
    return 0


def parse_device(text: str | None) -> str | int | None:
    """``--device``: an index or a (sub)string of a device name."""
    return int(text) if text is not None and text.isdigit() else text


def check_microphone() -> None:
    """Fail in one line, before anything slow happens, where no microphone exists at all."""
    from streamer.audio.mic import list_devices

    if not list_devices():
        raise AudioError(NO_MICROPHONE)


async def until_stopped(stop: asyncio.Event, mic: Any) -> None:
    """Wait for ``stop``; raise the microphone's AudioError if it fails first."""
    stopped = asyncio.create_task(stop.wait())
    failed = asyncio.ensure_future(mic.wait())
    try:
        done, _ = await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        if failed in done:
            failed.result()
    finally:
        stopped.cancel()
        failed.cancel()
