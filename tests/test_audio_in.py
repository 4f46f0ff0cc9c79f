"""Audio in: the ring buffer, PCM conversion, the file source, and the microphone through a virtual PulseAudio mic."""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from streamer.audio.convert import PcmConverter, to_mono_float32
from streamer.audio.filesrc import FileSource
from streamer.audio.io import load_audio
from streamer.audio.mic import MicrophoneSource, list_devices
from streamer.audio.ring import RingBuffer
from streamer.errors import AudioError
from tests.fixtures_realpeers import TIMEOUT_FACTOR, VirtualMic, pulseaudio_mic, skip_without_pulseaudio

# ---------------------------------------------------------------------------------------------- ring


def test_ring_is_fifo_across_the_wrap() -> None:
    """Samples come out in the order they went in, whatever the read and write sizes."""
    ring = RingBuffer(8)
    ring.write(np.arange(6))
    np.testing.assert_array_equal(ring.read(4), [0, 1, 2, 3])
    assert ring.write(np.arange(6, 12)) == 0  # 2 + 6 = 8 fit exactly, wrapping at the end of the array
    assert len(ring) == 8
    np.testing.assert_array_equal(ring.read(3), [4, 5, 6])
    np.testing.assert_array_equal(ring.read_all(), [7, 8, 9, 10, 11])
    assert len(ring) == 0 and ring.read(5).size == 0


def test_ring_overwrites_the_oldest_and_counts_the_loss() -> None:
    """A full ring keeps the newest samples; each write reports what it dropped and the total adds up."""
    ring = RingBuffer(10)
    assert ring.write(np.arange(7)) == 0
    assert ring.write(np.arange(7, 13)) == 3  # 0, 1, 2 are gone
    np.testing.assert_array_equal(ring.read_all(), np.arange(3, 13))
    ring.write(np.arange(4))
    assert ring.write(np.arange(100, 125)) == 4 + 15  # the 4 unread samples and the head of the oversized block
    np.testing.assert_array_equal(ring.read_all(), np.arange(115, 125))
    assert ring.dropped_total == 3 + 19
    assert ring.written_total == 7 + 6 + 4 + 25


def test_ring_matches_a_reference_deque() -> None:
    """Random writes and reads give the same samples and drop counts as a bounded deque."""
    rng = np.random.default_rng(0)
    ring, reference, dropped = RingBuffer(97), collections.deque(maxlen=97), 0
    for _ in range(2000):
        if rng.random() < 0.55:
            block = rng.standard_normal(int(rng.integers(0, 130))).astype(np.float32)
            expected_drop = max(0, len(reference) + block.size - 97)
            reference.extend(block.tolist())
            assert ring.write(block) == expected_drop
            dropped += expected_drop
        else:
            n = int(rng.integers(0, 60))
            expected = [reference.popleft() for _ in range(min(n, len(reference)))]
            np.testing.assert_array_equal(ring.read(n), np.asarray(expected, dtype=np.float32))
        assert len(ring) == len(reference)
    assert ring.dropped_total == dropped


def test_ring_rejects_bad_sizes() -> None:
    """A capacity below one sample and a negative read are programming errors."""
    with pytest.raises(ValueError, match="capacity"):
        RingBuffer(0)
    with pytest.raises(ValueError, match="negative"):
        RingBuffer(4).read(-1)


# ----------------------------------------------------------------------------------------- converter


def _pcm(samples: np.ndarray, encoding: str) -> bytes:
    """(S, C) float samples in [-1, 1) as interleaved little-endian PCM."""
    if encoding == "pcm_s16le":
        return np.round(samples * 32767).astype("<i2").tobytes()
    return samples.astype("<f4").tobytes()


def _decoded(samples: np.ndarray, encoding: str) -> np.ndarray:
    """The mono float32 signal the converter should see before resampling: the PCM's own values, averaged."""
    raw = np.frombuffer(_pcm(samples, encoding), dtype="<i2" if encoding == "pcm_s16le" else "<f4")
    return to_mono_float32(raw, samples.shape[1])


def _convert_in_pieces(converter: PcmConverter, data: bytes, piece_sizes: list[int]) -> np.ndarray:
    out, offset = [], 0
    for size in piece_sizes:
        out.append(converter.convert(data[offset : offset + size]))
        offset += size
    out.append(converter.convert(data[offset:]))
    out.append(converter.flush())
    return np.concatenate(out)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
@pytest.mark.parametrize("encoding", ["pcm_s16le", "pcm_f32le"])
@pytest.mark.parametrize("channels", [1, 2])
def test_chunked_conversion_equals_one_pass(rate: int, encoding: str, channels: int) -> None:
    """Frames cut anywhere (whole sample frames) give exactly one soxr pass over the mixed-down signal."""
    rng = np.random.default_rng(rate + channels)
    samples = (0.3 * rng.standard_normal((rate * 7 // 10, channels))).clip(-1, 0.99).astype(np.float32)
    data = _pcm(samples, encoding)
    frame_bytes = (2 if encoding == "pcm_s16le" else 4) * channels
    cuts = [int(n) * frame_bytes for n in rng.integers(0, 1500, size=12)]  # includes empty and tiny frames
    chunked = _convert_in_pieces(PcmConverter(rate, encoding, channels), data, cuts)
    mono = _decoded(samples, encoding)
    expected = mono if rate == 16000 else soxr.resample(mono, rate, 16000, quality="HQ")
    assert chunked.dtype == np.float32
    assert chunked.size == expected.size == round(samples.shape[0] * 16000 / rate)
    np.testing.assert_array_equal(chunked, expected)


def test_s16le_scaling_and_stereo_mixdown() -> None:
    """int16 full scale maps to [-1, 1) and two channels are averaged, sample for sample at 16 kHz."""
    left = np.array([-32768, 32767, 0, 16384], dtype="<i2")
    right = np.array([-32768, -32767, 100, 0], dtype="<i2")
    frame = np.stack([left, right], axis=1).tobytes()
    out = PcmConverter(16000, "pcm_s16le", 2).convert(frame)
    expected = (left.astype(np.float32) / 32768 + right.astype(np.float32) / 32768) / 2
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-7)
    assert out[0] == -1.0


@pytest.mark.parametrize(
    ("encoding", "channels"), [("pcm_s16le", 1), ("pcm_s16le", 2), ("pcm_f32le", 1), ("pcm_f32le", 3)]
)
def test_frames_may_end_anywhere_in_a_sample(encoding: str, channels: int) -> None:
    """Audio is a byte stream: cut at random byte offsets (mid-sample, mid-frame), it converts exactly as whole."""
    rng = np.random.default_rng(1)
    samples = (0.2 * rng.standard_normal((4410, channels))).astype(np.float32)
    data = _pcm(samples, encoding)
    clean = PcmConverter(44100, encoding, channels)
    expected = np.concatenate([clean.convert(data), clean.flush()])
    cuts = np.sort(rng.choice(np.arange(1, len(data)), size=200, replace=False))
    assert any(c % (channels * 2) for c in cuts)  # some cuts really fall inside a sample frame
    converter = PcmConverter(44100, encoding, channels)
    pieces = [converter.convert(data[a:b]) for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    assert converter.incomplete_bytes == 0
    np.testing.assert_array_equal(np.concatenate([*pieces, converter.flush()]), expected)


def test_an_incomplete_last_sample_frame_is_counted() -> None:
    """The bytes of a sample frame that never completes are told (incomplete_bytes), not decoded."""
    converter = PcmConverter(16000, "pcm_s16le", 2)
    out = converter.convert(np.arange(10, dtype="<i2").tobytes() + b"\x01\x02\x03")  # 5 frames + 3 bytes
    assert out.size == 5 and converter.incomplete_bytes == 3
    assert converter.convert(b"\x04").size == 1 and converter.incomplete_bytes == 0  # the 4th byte completes it
    converter.convert(b"\x05")
    assert converter.drop_incomplete() == 1 and converter.incomplete_bytes == 0


def test_float_samples_beyond_full_scale_are_clipped_and_counted() -> None:
    """pcm_f32le of 1e20 (a client sending raw int16 values as floats, say) is clipped to [-1, 1]: never inf later."""
    samples = np.array([0.5, 1e20, -3.0, 1.0, -1.0], dtype="<f4")
    converter = PcmConverter(16000, "pcm_f32le", 1)
    out = converter.convert(samples.tobytes())
    np.testing.assert_array_equal(out, np.array([0.5, 1.0, -1.0, 1.0, -1.0], dtype=np.float32))
    assert converter.clipped_samples == 2


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_floats_are_rejected_without_a_trace(bad: float) -> None:
    """NaN and infinite float samples raise; the converter goes on as if the frame never came."""
    good = np.linspace(-0.5, 0.5, 2400, dtype=np.float32).reshape(-1, 1)
    poisoned = good.copy()
    poisoned[100, 0] = bad
    converter, clean = PcmConverter(48000, "pcm_f32le", 1), PcmConverter(48000, "pcm_f32le", 1)
    with pytest.raises(AudioError, match="1 NaN or infinite sample"):
        converter.convert(_pcm(poisoned, "pcm_f32le"))
    out = np.concatenate([converter.convert(_pcm(good, "pcm_f32le")), converter.flush()])
    expected = np.concatenate([clean.convert(_pcm(good, "pcm_f32le")), clean.flush()])
    np.testing.assert_array_equal(out, expected)


def test_empty_frames_give_empty_output() -> None:
    """An empty frame is harmless: no samples out, nothing changed."""
    converter = PcmConverter(22050, "pcm_s16le", 2)
    out = converter.convert(b"")
    assert out.dtype == np.float32 and out.size == 0
    assert converter.flush().size == 0


@pytest.mark.parametrize(
    ("rate", "encoding", "channels", "message"),
    [
        (16000, "mulaw", 1, "unsupported encoding 'mulaw'; use one of 'pcm_s16le', 'pcm_f32le'"),
        (7999, "pcm_s16le", 1, "unsupported sample rate 7999 Hz; use an integer from 8000 to 48000"),
        (48001, "pcm_s16le", 1, "unsupported sample rate 48001 Hz"),
        (16000.5, "pcm_s16le", 1, "unsupported sample rate 16000.5 Hz"),
        (16000, "pcm_f32le", 0, "unsupported channel count 0; use 1 to 8"),
        (16000, "pcm_f32le", 9, "unsupported channel count 9"),
    ],
)
def test_unsupported_formats_are_clear_errors(rate: int, encoding: str, channels: int, message: str) -> None:
    """Encodings, rates and channel counts outside what the protocol allows are refused with the allowed range."""
    with pytest.raises(AudioError) as info:
        PcmConverter(rate, encoding, channels)
    assert message in str(info.value)


def test_to_mono_float32_for_mic_blocks() -> None:
    """A (S, C) float block is averaged to a new (S,) float32 array; int16 is scaled."""
    block = np.array([[0.5, -0.5], [1.0, 0.0]], dtype=np.float32)
    mono = to_mono_float32(block, 2)
    np.testing.assert_array_equal(mono, [0.0, 0.5])
    single = np.array([[0.25], [0.75]], dtype=np.float32)
    mono1 = to_mono_float32(single, 1)
    single[0, 0] = 9.0
    np.testing.assert_array_equal(mono1, [0.25, 0.75])  # a copy: PortAudio reuses its buffer
    np.testing.assert_array_equal(to_mono_float32(np.array([16384, -16384], dtype=np.int16), 1), [0.5, -0.5])



@pytest.mark.parametrize(
    ("encoding", "pcm", "expected"),
    [  # as WAV files store them: 8-bit unsigned around 128, 32-bit signed
        ("pcm_u8", bytes([128, 192, 64, 0, 255, 128]), [0.0, 0.5, -0.5, -1.0, 127 / 128, 0.0]),
        ("pcm_s32le", np.array([0, 1 << 30, -(1 << 30), -(1 << 31), (1 << 31) - 1, 0], "<i4").tobytes(),
         [0.0, 0.5, -0.5, -1.0, 1.0, 0.0]),
    ],
)
def test_8_and_32_bit_integer_pcm_is_scaled_like_16_bit(encoding: str, pcm: bytes, expected: list[float]) -> None:
    """Wyoming's sample widths 1 and 4: unsigned 8-bit and signed 32-bit samples decode to [-1, 1], stereo
    averaged to mono; a frame cut mid-sample waits for the rest as with 16-bit audio."""
    mono = PcmConverter(16000, encoding, 1)
    np.testing.assert_allclose(np.concatenate([mono.convert(pcm[:5]), mono.convert(pcm[5:])]), expected, atol=1e-7)
    stereo = PcmConverter(16000, encoding, 2).convert(pcm)
    np.testing.assert_allclose(stereo, np.mean(np.reshape(expected, (-1, 2)), axis=1), atol=1e-7)


# --------------------------------------------------------------------------------------- file source


@pytest.fixture
def half_second_wav(tmp_path: Path) -> Path:
    """0.5 s of a 440 Hz tone at 44.1 kHz stereo."""
    t = np.arange(22050) / 44100
    tone = (0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    path = tmp_path / "tone.wav"
    sf.write(path, np.stack([tone, tone], axis=1), 44100, subtype="FLOAT")
    return path


async def test_file_source_yields_the_whole_file_in_blocks(half_second_wav: Path) -> None:
    """Blocks of block_ms at 16 kHz (the last one shorter) add up to load_audio's samples."""
    blocks = [block async for block in FileSource(half_second_wav, block_ms=30)]
    assert [b.size for b in blocks] == [480] * 16 + [320]
    assert all(b.dtype == np.float32 for b in blocks)
    np.testing.assert_array_equal(np.concatenate(blocks), load_audio(half_second_wav))


async def test_file_source_paces_only_when_asked(half_second_wav: Path) -> None:
    """realtime=False takes no notice of the clock; realtime=True releases no block before its audio is due."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    async for _ in FileSource(half_second_wav, realtime=False):
        pass
    assert loop.time() - started < 0.4  # 0.5 s of audio; pacing would take at least that

    started, released = loop.time(), 0
    async for block in FileSource(half_second_wav, realtime=True, block_ms=100):
        released += block.size
        assert loop.time() - started >= released / 16000 - 0.015  # the block's last sample has "been spoken"
    assert loop.time() - started >= 0.48


async def test_file_source_missing_file_is_an_audio_error(tmp_path: Path) -> None:
    """A missing file raises AudioError naming it when iteration starts."""
    with pytest.raises(AudioError, match="no such file"):
        async for _ in FileSource(tmp_path / "absent.wav"):
            pass


# -------------------------------------------------------------------------------------- microphone


def _align(recorded: np.ndarray, reference: np.ndarray) -> tuple[int, float]:
    """Offset of ``reference`` inside ``recorded`` (samples) and the normalised correlation there."""
    size = 1 << int(np.ceil(np.log2(recorded.size + reference.size)))
    xcorr = np.fft.irfft(np.fft.rfft(recorded, size) * np.conj(np.fft.rfft(reference, size)), size)
    offset = int(np.argmax(xcorr[: recorded.size - reference.size + 1]))
    segment = recorded[offset : offset + reference.size].astype(np.float64)
    corr = float(segment @ reference / (np.linalg.norm(segment) * np.linalg.norm(reference) + 1e-12))
    return offset, corr


async def _wait_for_samples(blocks: list[np.ndarray], samples: int) -> None:
    """Wait (bounded) until the microphone has delivered ``samples``; the mic runs in real time."""
    async with asyncio.timeout(10 * TIMEOUT_FACTOR):
        while sum(b.size for b in blocks) < samples:
            await asyncio.sleep(0.02)


@pytest.mark.audio
def test_list_devices_shows_the_virtual_mic(virtual_mic: VirtualMic) -> None:
    """PortAudio's input devices include the ALSA `pulse` device, with channels and a native rate."""
    devices = {device.name: device for device in list_devices()}
    assert virtual_mic.device in devices
    pulse = devices[virtual_mic.device]
    assert pulse.channels >= 1 and 8000 <= pulse.default_rate_hz <= 192000
    assert sum(device.is_default for device in devices.values()) == 1


@pytest.mark.audio
async def test_microphone_records_what_paplay_plays(virtual_mic: VirtualMic, speech_wav: Path) -> None:
    """Speech played into the sink comes out of MicrophoneSource at 16 kHz, intact and not early."""
    blocks: list[np.ndarray] = []
    async with MicrophoneSource(virtual_mic.device, blocks.append) as mic:
        await _wait_for_samples(blocks, 1)  # the stream is flowing (gotcha 2: play only after this)
        before_play = sum(b.size for b in blocks)
        await asyncio.to_thread(virtual_mic.play, speech_wav)
        await _wait_for_samples(blocks, sum(b.size for b in blocks) + 8000)  # the pipeline's latency, and more
    recorded = np.concatenate(blocks)
    reference = load_audio(speech_wav)
    offset, corr = _align(recorded, reference)
    lag_s = (offset - before_play) / 16000
    rms = float(np.sqrt(np.mean(recorded[offset : offset + reference.size] ** 2)))
    print(f"virtual mic: native {mic.native_rate_hz} Hz, {mic.channels} ch, corr={corr:.4f} lag={lag_s:+.3f}s")
    assert mic.native_rate_hz is not None and mic.blocks_received > 0
    assert corr > 0.9
    assert lag_s >= 0
    assert rms > 0.01


@pytest.mark.audio
async def test_idle_microphone_delivers_silence_and_stops(virtual_mic: VirtualMic) -> None:
    """With nothing playing the mic gives zeros at 16 kHz, and after stop() nothing more arrives."""
    blocks: list[np.ndarray] = []
    mic = MicrophoneSource(virtual_mic.device, blocks.append, block_ms=20)
    await mic.start()
    waiter = asyncio.create_task(mic.wait())
    try:
        await _wait_for_samples(blocks, 4800)
    finally:
        await mic.stop()
    async with asyncio.timeout(2 * TIMEOUT_FACTOR):
        await waiter  # returns (no AudioError): the stream ended because we stopped it
    received = sum(b.size for b in blocks)
    await asyncio.sleep(0.1)
    assert sum(b.size for b in blocks) == received
    audio = np.concatenate(blocks)
    assert audio.dtype == np.float32 and np.abs(audio).max() < 1e-3
    await mic.stop()  # twice is fine


@pytest.mark.audio
async def test_unknown_device_is_a_clear_error(virtual_mic: VirtualMic) -> None:
    """A device name that matches nothing says so and how to list devices."""
    with pytest.raises(AudioError, match=r"cannot find microphone 'no-such-mic'.*--list-devices"):
        async with MicrophoneSource("no-such-mic", lambda block: None):
            pass


def test_no_input_device_at_all_is_a_clear_error(tmp_path: Path) -> None:
    """Where PortAudio lists no input device, opening the default mic says no microphone was found."""
    pytest.importorskip("sounddevice", exc_type=OSError)
    # No sound server; an empty ALSA configuration would be surer, but alsa-lib aborts on one.
    env = {**os.environ, "PULSE_SERVER": f"unix:{tmp_path}/none"}
    code = (
        "import asyncio\n"
        "from streamer.audio.mic import MicrophoneSource, list_devices\n"
        "from streamer.errors import AudioError\n"
        "async def main():\n"
        "    if list_devices():\n"
        "        print('machine has input devices')\n"
        "        return\n"
        "    try:\n"
        "        await MicrophoneSource(None, print).start()\n"
        "    except AudioError as exc:\n"
        "        print(exc)\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30 * TIMEOUT_FACTOR
    )
    assert done.returncode == 0, done.stderr
    if done.stdout.startswith("machine has input devices"):
        pytest.skip("this machine has real capture devices, so 'no microphone' cannot be arranged")
    assert done.stdout.startswith("no microphone found"), done.stdout
    assert "streamer mic --list-devices" in done.stdout


def test_audio_in_imports_neither_torch_nor_sounddevice() -> None:
    """Layer rule: streamer.audio never imports torch; sounddevice loads only when a microphone opens."""
    code = (
        "import sys, streamer.audio.ring, streamer.audio.convert, streamer.audio.mic, streamer.audio.filesrc\n"
        "print(sorted({'torch', 'sounddevice'} & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60 * TIMEOUT_FACTOR)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.audio
async def test_losing_the_sound_server_is_an_audio_error(tmp_path: Path) -> None:
    """When the sound server dies under an open mic, wait() raises AudioError (the daemon then exits for a restart).

    Runs in a child process with its own PulseAudio, so the session's virtual mic is untouched.
    """
    skip_without_pulseaudio()
    code = (
        "import asyncio, sys\n"
        "from streamer.audio.mic import MicrophoneSource\n"
        "async def main():\n"
        "    first = asyncio.Event()\n"
        "    async with MicrophoneSource('pulse', lambda block: first.set()) as mic:\n"
        "        await first.wait()\n"
        "        print('capturing', flush=True)\n"
        "        try:\n"
        "            await mic.wait()\n"
        "        except Exception as exc:\n"
        "            print(type(exc).__name__, exc, flush=True)\n"
        "asyncio.run(main())\n"
    )
    with pulseaudio_mic(tmp_path) as mic:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, env=mic.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        try:
            async with asyncio.timeout(15 * TIMEOUT_FACTOR):
                assert await child.stdout.readline() == b"capturing\n"  # type: ignore[union-attr]
                mic.server.kill()
                line = (await child.stdout.readline()).decode()  # type: ignore[union-attr]
                assert await child.wait() == 0
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
    assert line.startswith("AudioError microphone 'pulse' stopped unexpectedly"), line
