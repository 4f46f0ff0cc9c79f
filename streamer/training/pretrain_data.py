"""Unlabelled audio for pretraining: clips from a folder of audio files or a corpus split, and their features.

* A folder is searched recursively for files with one of ``data.extensions``; each is decoded once with
  :func:`streamer.audio.io.load_audio` (what ``streamer transcribe`` reads) to check it and learn its length
  at 16 kHz. A file that does not decode is skipped with a warning and counted; a folder with no usable file
  is an error. The clip list goes into the run directory (``clips.jsonl``), so a resumed run trains on
  exactly the clips it started with even if the folder changed.
* A corpus split (``data.corpus_dir``) gives its manifest's utterances; the transcripts are never read.
* Either way, audio longer than ``max_duration_s`` is cut into consecutive clips of at most that length
  (a tail shorter than ``min_duration_s`` is dropped), and ``dev_clips`` clips drawn by seed are held out.
* Clips are :class:`~streamer.training.data.Utterance` objects without text, so the TDT pipeline's batch
  plan, loader and features (:mod:`streamer.training.data`) serve pretraining unchanged.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

from streamer.asr import clocks
from streamer.asr.config import FeatureConfig
from streamer.audio.io import load_audio
from streamer.errors import AudioError, ConfigError
from streamer.training.data import BatchFeaturizer, Utterance, read_manifest
from streamer.training.pretrain_recipe import PretrainDataSection

logger = logging.getLogger(__name__)
RATE = clocks.SAMPLE_RATE_HZ


@dataclass
class ClipSet:
    """The clips of a run and what the scan skipped."""

    train: list[Utterance]
    dev: list[Utterance]
    from_files: bool
    skipped: list[str] = field(default_factory=list)  # "path: reason" of each unreadable file


def find_audio_files(folder: Path, extensions: list[str]) -> list[Path]:
    """Audio files under ``folder`` (recursively, sorted), by extension (case-insensitive).

    Raises:
        ConfigError: ``folder`` is not a directory, or holds no file with one of ``extensions``.
    """
    if not folder.is_dir():
        raise ConfigError(f"data.audio_dir: {folder} is not a directory")
    wanted = {"." + e.lower().lstrip(".") for e in extensions}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in wanted)
    if not files:
        raise ConfigError(f"data.audio_dir: no audio files ({', '.join(sorted(wanted))}) under {folder}")
    return files


def split_long(clip_id: str, audio: str, offset: int, num_samples: int, cfg: PretrainDataSection) -> list[Utterance]:
    """Consecutive clips of at most ``max_duration_s``; the last is kept when at least ``min_duration_s`` long."""
    longest = int(cfg.max_duration_s * RATE)
    shortest = int(cfg.min_duration_s * RATE)
    out = []
    for k, start in enumerate(range(0, num_samples, longest)):
        n = min(longest, num_samples - start)
        if n >= shortest:
            out.append(Utterance(f"{clip_id}#{k}", audio, offset + start, n, "", ()))
    return out


def scan_folder(folder: Path, cfg: PretrainDataSection) -> tuple[list[Utterance], list[str]]:
    """Clips of every readable file under ``folder`` and the ``"path: reason"`` of each skipped one."""
    clips: list[Utterance] = []
    skipped: list[str] = []
    files = find_audio_files(folder, cfg.extensions)
    for path in tqdm(files, desc="reading audio", unit="file", mininterval=5.0, disable=len(files) < 200):
        try:
            samples = load_audio(path)
        except AudioError as exc:
            logger.warning("skipped: %s", exc)
            skipped.append(f"{path}: {exc}")
            continue
        clips += split_long(str(path.relative_to(folder)), str(path.resolve()), 0, samples.size, cfg)
    if skipped:
        logger.warning("%d of %d audio files could not be read and were skipped", len(skipped), len(files))
    if not clips:
        raise ConfigError(
            f"data.audio_dir: none of the {len(files)} audio files under {folder} gave a clip of at least "
            f"data.min_duration_s {cfg.min_duration_s} s ({len(skipped)} unreadable)"
        )
    return clips, skipped


def corpus_clips(corpus: Path, cfg: PretrainDataSection) -> list[Utterance]:
    """Clips of a corpus split's utterances (shard paths relative to the corpus; no text)."""
    clips: list[Utterance] = []
    for entry in read_manifest(corpus, cfg.corpus_split):
        clips += split_long(entry["id"], entry["audio"], entry["offset"], entry["num_samples"], cfg)
    if not clips:
        raise ConfigError(f"data.corpus_dir: no utterance of {corpus}/{cfg.corpus_split} is long enough")
    return clips


def load_clips(cfg: PretrainDataSection, seed: int, run_dir: Path) -> ClipSet:
    """The run's clips, split into train and dev; saved to (or, on a resume, read from) ``run_dir/clips.jsonl``.

    Raises:
        ConfigError: no usable audio, or no more clips than ``data.dev_clips``.
    """
    index = run_dir / "clips.jsonl"
    skipped: list[str] = []
    if index.is_file():
        clips = [Utterance(**{**json.loads(line), "tokens": ()}) for line in index.read_text().splitlines()]
    elif cfg.audio_dir:
        clips, skipped = scan_folder(Path(cfg.audio_dir), cfg)
    else:
        clips = corpus_clips(Path(cfg.corpus_dir), cfg)
    if not index.is_file():
        keys = ("id", "audio", "offset", "num_samples", "text")
        index.write_text("".join(json.dumps({k: getattr(c, k) for k in keys}) + "\n" for c in clips))
    if len(clips) <= cfg.dev_clips:
        raise ConfigError(f"{len(clips)} clips of audio: pretraining needs more than data.dev_clips {cfg.dev_clips}")
    order = list(range(len(clips)))
    random.Random(f"{seed}:dev").shuffle(order)
    dev = set(order[: cfg.dev_clips])
    return ClipSet(
        train=[c for i, c in enumerate(clips) if i not in dev],
        dev=[clips[i] for i in sorted(dev)],
        from_files=bool(cfg.audio_dir),
        skipped=skipped,
    )


class ClipFeaturizer(BatchFeaturizer):
    """:class:`BatchFeaturizer` whose clips may come from audio files (any rate, resampled to 16 kHz)."""

    def __init__(self, corpus_dir: Path, features: FeatureConfig, dither: float, from_files: bool) -> None:
        super().__init__(corpus_dir, features, dither)
        self.from_files = from_files
        self._rates: dict[str, int] = {}

    def waveform(self, utt: Utterance) -> np.ndarray:
        """(S,) float32 samples of a clip: a region of a file, or of a corpus shard."""
        if not self.from_files:
            return super().waveform(utt)
        rate = self._rates.get(utt.audio)
        if rate is None:
            rate = self._rates[utt.audio] = int(sf.info(utt.audio).samplerate)
        start = utt.offset * rate // RATE
        count = -(-utt.num_samples * rate // RATE) + 1
        try:
            data, _ = sf.read(utt.audio, start=start, frames=count, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as exc:
            raise AudioError(f"cannot read {utt.audio} (it was readable when the run started): {exc}") from exc
        mono = data.mean(axis=1, dtype=np.float32)
        if rate != RATE and mono.size:
            mono = soxr.resample(mono, rate, RATE, quality="HQ")
        out = np.zeros(utt.num_samples, dtype=np.float32)
        n = min(out.size, mono.size)
        out[:n] = mono[:n]
        return out
