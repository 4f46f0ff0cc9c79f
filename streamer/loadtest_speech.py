"""Speech for ``streamer loadtest``: utterances made with espeak-ng (sentences, voices and speeds vary), or
the user's files, arranged into one track per client with pauses longer than the silence rule.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
from pathlib import Path

import numpy as np

from streamer.errors import ConfigError, StreamerError
from streamer.loadtest_client import SAMPLE_RATE_HZ

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus")
SENTENCES = (
    "turn on the kitchen lights and set a timer for ten minutes",
    "the quick brown fox jumps over the lazy dog near the river bank",
    "please remind me to call my sister tomorrow morning at nine",
    "what is the weather going to be like this weekend in the mountains",
    "the meeting has been moved to thursday afternoon in room four",
    "open the garage door and switch off the heating downstairs",
    "a cup of coffee with milk and no sugar would be lovely thank you",
    "the train to the city leaves from platform two every twenty minutes",
    "read me the latest news about the football match last night",
    "our new office is on the third floor next to the library",
    "she sold seven hundred apples at the market before noon",
    "add eggs bread butter and fresh tomatoes to the shopping list",
)
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us+f3", "en-gb+m3", "en-us+f2")


def espeak_pool(directory: Path, count: int) -> list[Path]:
    """Write ``count`` different utterances (sentence, voice and speed vary) as WAV files with espeak-ng."""
    out = []
    for c in range(count):
        path = directory / f"utterance{c:03d}.wav"
        voice = VOICES[(c // len(SENTENCES) + c) % len(VOICES)]
        speed = str(140 + (c * 7) % 50)  # words per minute
        command = ["espeak-ng", "-w", str(path), "-v", voice, "-s", speed, SENTENCES[c % len(SENTENCES)]]
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=30)
        except FileNotFoundError:
            raise StreamerError("espeak-ng makes the default speech: install it (apt install espeak-ng) or give "
                                "speech files with --audio") from None
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise StreamerError(f"espeak-ng failed ({exc}); give speech files with --audio instead") from exc
        out.append(path)
    return out


def audio_files(specs: list[str]) -> list[Path]:
    """Files named, and the audio files inside folders named, in order."""
    out: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            out += sorted(p for p in path.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
        elif path.is_file():
            out.append(path)
        else:
            raise ConfigError(f"--audio {spec}: no such file or folder")
    if not out:
        raise ConfigError(f"--audio {' '.join(specs)}: no audio files ({', '.join(AUDIO_SUFFIXES)}) there")
    return out


def load_s16(path: Path) -> np.ndarray:
    from streamer.audio.io import load_audio

    samples = load_audio(path, SAMPLE_RATE_HZ)
    return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")


def make_tracks(clips: list[np.ndarray], count: int, rng: random.Random, gap_s: tuple[float, float]) -> list[bytes]:
    """One s16le track per client: four clips in a client-specific order, with pauses of random length between
    them (longer than the trailing-silence rule, so segments end by silence), rotated to a random start."""
    tracks = []
    for i in range(count):
        parts = []
        for j in range(min(4, len(clips))):
            parts.append(clips[(i * 5 + j * 7) % len(clips)])
            parts.append(np.zeros(round(rng.uniform(*gap_s) * SAMPLE_RATE_HZ), dtype="<i2"))
        track = np.concatenate(parts)
        track = np.roll(track, -rng.randrange(len(track)))
        tracks.append(track.tobytes())
    return tracks


async def load_tracks(args: argparse.Namespace, workdir: Path, count: int, rng: random.Random) -> list[bytes]:
    if args.audio:
        paths = audio_files(args.audio)
        clips = [await asyncio.to_thread(load_s16, p) for p in paths]
        return [np.roll(clips[i % len(clips)], -rng.randrange(len(clips[i % len(clips)]))).tobytes()
                for i in range(count)]
    paths = await asyncio.to_thread(espeak_pool, workdir, min(max(4, 2 * count), 48))
    clips = [await asyncio.to_thread(load_s16, p) for p in paths]
    return make_tracks(clips, count, rng, (1.3, 2.5))
