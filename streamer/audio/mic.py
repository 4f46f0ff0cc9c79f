"""Microphone capture through sounddevice (PortAudio), handed to the event loop as 16 kHz float32 mono.

The device is opened at its own default rate, which every driver accepts; resampling to the model rate
happens on the loop with soxr's streaming resampler. PortAudio calls `MicrophoneSource._callback` on its
own thread: it only copies the block (PortAudio reuses the buffer) and passes it on with
``loop.call_soon_threadsafe``; it never blocks, logs or touches asyncio otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any, Final, Self

import numpy as np

from streamer.audio.convert import TARGET_RATE_HZ, StreamResampler, to_mono_float32
from streamer.errors import AudioError

logger = logging.getLogger(__name__)

LIST_HINT: Final = "list them with `streamer mic --list-devices`"


@dataclass(frozen=True, slots=True)
class InputDevice:
    """One capture device as PortAudio lists it."""

    index: int
    name: str
    channels: int  # most input channels it offers
    default_rate_hz: int
    host_api: str
    is_default: bool


def _sounddevice() -> ModuleType:
    """Import sounddevice on first use: the import itself fails (OSError) where PortAudio is missing."""
    try:
        import sounddevice
    except OSError as exc:
        raise AudioError(
            "cannot use a microphone: the PortAudio library is missing (install libportaudio2, or use another source)"
        ) from exc
    return sounddevice


def list_devices() -> list[InputDevice]:
    """Every device PortAudio can capture from, in its own order.

    Raises:
        AudioError: PortAudio is not installed.
    """
    sd = _sounddevice()
    try:
        default_index = int(sd.query_devices(kind="input")["index"])
    except sd.PortAudioError:  # no default input device
        default_index = -1
    host_apis = [api["name"] for api in sd.query_hostapis()]
    return [
        InputDevice(
            index=int(info["index"]),
            name=str(info["name"]),
            channels=int(info["max_input_channels"]),
            default_rate_hz=round(info["default_samplerate"]),
            host_api=host_apis[info["hostapi"]],
            is_default=int(info["index"]) == default_index,
        )
        for info in sd.query_devices()
        if info["max_input_channels"] > 0
    ]


def _find_device(sd: ModuleType, device: str | int | None) -> dict[str, Any]:
    """PortAudio's description of the requested input device (None: the default one)."""
    if not any(info["max_input_channels"] > 0 for info in sd.query_devices()):
        raise AudioError(
            "no microphone found: PortAudio lists no input device (is a sound server running, "
            f"and may this user open /dev/snd?); {LIST_HINT}"
        )
    try:
        return dict(sd.query_devices(device, kind="input"))
    except (ValueError, sd.PortAudioError) as exc:  # no match, several matches, bad index, no default
        wanted = "the default microphone" if device is None else f"microphone {device!r}"
        raise AudioError(f"cannot find {wanted} ({exc}); choose one with audio.device ({LIST_HINT})") from exc


class MicrophoneSource:
    """Capture from one input device and call ``on_audio`` on the event loop with 16 kHz float32 mono blocks.

    Use ``async with MicrophoneSource(...) as mic: await mic.wait()``, or `start` and `stop`.

    Args:
        device: a device index, a (sub)string of its name, or None for the system default.
        on_audio: called on the loop thread with each non-empty (S,) float32 block at ``sample_rate``;
            it must not block.
        loop: the loop to deliver to; by default the one running when `start` is called.
        sample_rate: output rate in Hz.
        block_ms: capture block length: the granularity, and the latency PortAudio adds.
    """

    def __init__(
        self,
        device: str | int | None,
        on_audio: Callable[[np.ndarray], object],
        loop: asyncio.AbstractEventLoop | None = None,
        sample_rate: int = TARGET_RATE_HZ,
        block_ms: int = 20,
    ) -> None:
        if block_ms <= 0:
            raise ValueError(f"block_ms must be positive, got {block_ms}")
        self._device, self._on_audio, self._loop = device, on_audio, loop
        self.sample_rate, self.block_ms = sample_rate, block_ms
        self.device_name: str | None = None
        self.native_rate_hz: int | None = None
        self.channels: int | None = None
        self.blocks_received = 0
        self.overflows = 0  # blocks PortAudio flagged with input_overflow: audio lost before we saw it
        self.last_block_at: float | None = None  # loop.time() of the newest block
        self._stream: Any = None
        self._resampler: StreamResampler | None = None
        self._is_running = False  # blocks are wanted
        self._is_stopping = False  # stop() was called: the stream ending is expected
        self._ended: asyncio.Future[None] | None = None

    async def start(self) -> None:
        """Open the device and start capturing.

        Loading PortAudio, querying and opening the device take from milliseconds to a few hundred; that
        runs in a worker thread, off the loop.

        Raises:
            AudioError: PortAudio is missing, no such input device exists, or it cannot be opened.
        """
        if self._stream is not None:
            raise RuntimeError("the microphone is already started")
        self._loop = self._loop or asyncio.get_running_loop()
        self._ended = self._loop.create_future()
        self._is_running, self._is_stopping = True, False  # before the first block can arrive
        try:
            self._stream = await asyncio.to_thread(self._open)
        except BaseException:
            self._is_running = False
            raise
        logger.info(
            "microphone %r open: %d Hz, %d channel(s), %d ms blocks, resampled to %d Hz",
            self.device_name,
            self.native_rate_hz,
            self.channels,
            self.block_ms,
            self.sample_rate,
        )

    def _open(self) -> Any:
        """Find the device, open it at its native rate and start the stream (a worker thread)."""
        sd = _sounddevice()
        info = _find_device(sd, self._device)
        self.device_name = str(info["name"])
        self.native_rate_hz = round(info["default_samplerate"])
        self.channels = self._pick_channels(sd, info)
        self._resampler = StreamResampler(self.native_rate_hz, self.sample_rate)
        stream = None
        try:
            stream = sd.InputStream(
                device=int(info["index"]),
                samplerate=self.native_rate_hz,
                channels=self.channels,
                dtype="float32",
                blocksize=max(1, self.native_rate_hz * self.block_ms // 1000),
                callback=self._callback,
                finished_callback=self._finished_callback,
            )
            stream.start()
        except sd.PortAudioError as exc:
            if stream is not None:
                stream.close(ignore_errors=True)
            raise AudioError(
                f"cannot open microphone {self.device_name!r} at {self.native_rate_hz} Hz: {exc}; "
                f"choose another with audio.device ({LIST_HINT})"
            ) from exc
        return stream

    def _pick_channels(self, sd: ModuleType, info: dict[str, Any]) -> int:
        """Mono if the device allows it, else the fewest channels it accepts (averaged later)."""
        most = int(info["max_input_channels"])
        for channels in sorted({1, min(2, most), most}):
            try:
                sd.check_input_settings(
                    device=int(info["index"]),
                    channels=channels,
                    dtype="float32",
                    samplerate=info["default_samplerate"],
                )
            except sd.PortAudioError:
                continue
            return channels
        raise AudioError(
            f"microphone {info['name']!r} accepts no float32 capture at {info['default_samplerate']:.0f} Hz; "
            f"choose another with audio.device ({LIST_HINT})"
        )

    def _callback(self, indata: np.ndarray, frames: int, time: Any, status: Any) -> None:
        """PortAudio's thread: copy the block and hand it to the loop. Nothing else may happen here."""
        try:
            self._loop.call_soon_threadsafe(self._deliver, indata.copy(), bool(status.input_overflow))  # type: ignore[union-attr]
        except RuntimeError:  # the loop is closed: we are shutting down
            pass

    def _finished_callback(self) -> None:
        """PortAudio's thread: the stream ended, because we stopped it or because the device failed."""
        try:
            self._loop.call_soon_threadsafe(self._on_finished)  # type: ignore[union-attr]
        except RuntimeError:
            pass

    def _deliver(self, block: np.ndarray, overflowed: bool) -> None:
        """On the loop: mix down, resample, pass on."""
        if not self._is_running or self._resampler is None:
            return
        self.blocks_received += 1
        self.last_block_at = self._loop.time()  # type: ignore[union-attr]
        if overflowed:
            self.overflows += 1
        samples = self._resampler.process(to_mono_float32(block, block.shape[1]))
        if samples.size:
            self._on_audio(samples)

    def _on_finished(self) -> None:
        """On the loop: a stream that ends while we still want audio means the device is gone."""
        if self._ended is None or self._ended.done():
            return
        if not self._is_stopping:
            self._is_running = False
            logger.error("microphone %r stopped delivering audio", self.device_name)
            self._ended.set_exception(
                AudioError(
                    f"microphone {self.device_name!r} stopped unexpectedly (unplugged, or the sound server ended)"
                )
            )
        else:
            self._ended.set_result(None)

    async def wait(self) -> None:
        """Wait until `stop` is called. Cancelling is safe and leaves the capture running.

        Raises:
            AudioError: the device stopped by itself.
        """
        if self._ended is None:
            raise RuntimeError("the microphone is not started")
        await asyncio.shield(self._ended)

    async def stop(self) -> None:
        """Stop capturing and deliver the resampler's tail. Safe to call twice; blocks already captured are kept."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        self._is_stopping = True
        # Abort and close block on PortAudio's own thread for a few ms; keep that off the loop. Blocks the
        # callback queued before it returned are delivered first (the loop runs callbacks in order).
        await asyncio.to_thread(_close_stream, stream)
        if self._is_running and self._resampler is not None:
            tail = self._resampler.flush()
            if tail.size:
                self._on_audio(tail)
        self._is_running = False
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)
        logger.info(
            "microphone %r closed after %d blocks, %d overflow(s)",
            self.device_name,
            self.blocks_received,
            self.overflows,
        )

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
        if self._ended is not None and self._ended.done() and not self._ended.cancelled():
            self._ended.exception()  # mark a device failure as retrieved when nobody awaited `wait`


def _close_stream(stream: Any) -> None:
    """Stop at once (pending input is not wanted) and release the device."""
    try:
        stream.abort()
    finally:
        stream.close()
