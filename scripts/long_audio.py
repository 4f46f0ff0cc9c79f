"""Long-form transcription in one pass: wall time and peak memory of `streamer transcribe` against audio length.

Builds speech files of the given lengths (espeak-ng sentences every few seconds, silence between), runs
`streamer transcribe FILE --attention local --att-context-size L,R --format json` on each as a child process, and
prints one row per length: wall time, real-time factor, the child's peak RSS, and where the last word landed (so
a drift of the timestamps towards the end would show). Run it on a quiet machine; nothing here is asserted.

    .venv/bin/python scripts/long_audio.py --minutes 10 60 180
    .venv/bin/python scripts/long_audio.py --minutes 10 60 --model /tmp/m114.nemo --window 128,128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SENTENCES = [
    "the river runs past the old mill",
    "please call me back tonight",
    "seven green apples fell from the tree",
    "the weather will be cold tomorrow",
    "we met at the station at noon",
]


def speech_clips(folder: Path) -> list[np.ndarray]:
    """Each sentence spoken by espeak-ng, at 16 kHz."""
    clips = []
    for i, text in enumerate(SENTENCES):
        path = folder / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), text], check=True)
        audio, rate = sf.read(path, dtype="float32")
        clips.append(soxr.resample(audio, rate, 16000).astype(np.float32))
    return clips


def write_long_file(path: Path, minutes: float, clips: list[np.ndarray]) -> float:
    """A 16-bit WAV of ``minutes``: a sentence, two seconds of silence, the next ... Returns the last
    sentence's start in seconds."""
    rate, total = 16000, int(minutes * 60 * 16000)
    last_start = 0.0
    with sf.SoundFile(path, "w", samplerate=rate, channels=1, subtype="PCM_16") as out:
        written, i = 0, 0
        while written < total:
            clip = clips[i % len(clips)]
            block = np.concatenate([np.zeros(rate, np.float32), clip, np.zeros(rate, np.float32)])[: total - written]
            if block.size >= rate + clip.size:  # the whole sentence fits
                last_start = (written + rate) / rate
            out.write(block)
            written += block.size
            i += 1
    return last_start


def run_child(args: list[str]) -> tuple[float, int, str]:
    """Run a command; its wall time, peak RSS in bytes and stdout."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.returncode:
            raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{stderr[-2000:]}")
        out.seek(0)
        return wall, usage.ru_maxrss * 1024, out.read().decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[10.0, 60.0])
    parser.add_argument("--model", default=None, help="model spec (default: the bundled model)")
    parser.add_argument("--window", default="70,70", help="local attention window L,R in encoder frames")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clips = speech_clips(Path(tmp))
        for minutes in args.minutes:
            path = Path(tmp) / f"long_{minutes:g}min.wav"
            last_start = write_long_file(path, minutes, clips)
            cmd = [sys.executable, "-m", "streamer", "transcribe", str(path), "--format", "json", "--attention",
                   "local", f"--att-context-size={args.window}", "--progress", "off"]
            if args.model:
                cmd += ["--model", args.model]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            wall, rss, out = run_child(cmd)
            words = json.loads(out)["words"]
            last = max((w["start_s"] for w in words), default=float("nan"))
            rows.append((minutes, wall, minutes * 60 / wall, rss / 2**20, len(words), last_start, last))
            path.unlink()
    print("| audio | wall | RTFx | peak RSS | words | last sentence at | last word at |")
    print("|---|---|---|---|---|---|---|")
    for minutes, wall, rtfx, rss_mb, n, last_start, last in rows:
        print(f"| {minutes:g} min | {wall:.1f} s | {rtfx:.1f} | {rss_mb:.0f} MiB | {n} | {last_start:.1f} s | "
              f"{last:.1f} s |")


if __name__ == "__main__":
    main()
