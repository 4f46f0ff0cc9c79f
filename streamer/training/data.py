"""Training data: corpus manifests -> length-bucketed batches of log-mel features and token targets.

Every random choice is a function of ``(seed, epoch, batch index)``, so a resumed run sees exactly the
batches (and SpecAugment masks) it would have seen without the interruption, whatever the worker count.

* Utterances come from a corpus directory made by :mod:`streamer.training.corpus` (int16 shards,
  ``<split>.jsonl`` manifests); a split still being generated is read from its finished shards.
* Batches hold utterances of similar length, at most ``max_batch_mel_frames`` *padded* mel frames
  (batch size x longest utterance), so the compute per step is about constant. The first
  ``curriculum_epochs`` epochs run short batches first; later epochs shuffle the batch order.
* Features are our NeMo log-mel :class:`~streamer.asr.features.Preprocessor`, not normalised (NeMo's
  streaming models use ``normalize: NA``: per-utterance statistics do not exist while streaming), with
  NeMo's training dither added to the waveform.
* SpecAugment follows NeMo's ``SpecAugment``: ``freq_masks`` bands of up to ``freq_width`` mel bins and
  ``time_masks`` spans of up to ``time_width`` (a fraction of the utterance when < 1, else frames), set to
  ``mask_value``.

Shape legend:
    B utterances   S audio samples (16 kHz)   F mel bins   M mel frames (10 ms)   U target tokens
"""

from __future__ import annotations

import json
import logging
import random
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from streamer.asr import clocks
from streamer.asr.config import FeatureConfig
from streamer.asr.features import Preprocessor
from streamer.asr.tokenizer import Tokenizer
from streamer.errors import ConfigError
from streamer.training.recipe import BatchingConfig, SpecAugmentConfig

logger = logging.getLogger(__name__)
INT16_SCALE = 1.0 / 32768.0


@dataclass(frozen=True, slots=True)
class Utterance:
    """One manifest entry with its tokens."""

    id: str
    audio: str  # shard path relative to the corpus directory
    offset: int  # first sample in the shard
    num_samples: int
    text: str
    tokens: tuple[int, ...]

    @property
    def num_mel_frames(self) -> int:
        return self.num_samples // 160


# --------------------------------------------------------------------------------------------------
# Manifests


def read_manifest(corpus_dir: Path, split: str) -> list[dict[str, Any]]:
    """Entries of ``<split>.jsonl``, or of the finished shards while the split is being generated."""
    path = corpus_dir / f"{split}.jsonl"
    if path.is_file():
        lines = path.read_text().splitlines()
    else:
        lines = []
        for shard in sorted((corpus_dir / split).glob("shard-*.jsonl")):
            lines.extend(shard.read_text().splitlines())
    if not lines:
        raise ConfigError(f"no utterances for split {split!r} in {corpus_dir} (run `streamer corpus` first)")
    return [json.loads(line) for line in lines if line.strip()]


def load_utterances(
    corpus_dir: Path,
    split: str,
    tokenizer: Tokenizer,
    min_duration_s: float = 0.3,
    max_duration_s: float = 20.0,
    limit: int | None = None,
) -> list[Utterance]:
    """Tokenized utterances of one split, filtered by duration; ``limit`` keeps the first ``limit``."""
    out = []
    for entry in read_manifest(corpus_dir, split):
        seconds = entry["num_samples"] / clocks.SAMPLE_RATE_HZ
        if not min_duration_s <= seconds <= max_duration_s or not entry["text"].strip():
            continue
        tokens = tuple(tokenizer.encode(entry["text"]))
        out.append(Utterance(entry["id"], entry["audio"], entry["offset"], entry["num_samples"], entry["text"], tokens))
        if limit is not None and len(out) >= limit:
            break
    return out


def extra_utterances(
    corpus_dir: Path,
    split: str,
    tokenizer: Tokenizer,
    hours: float = 0.0,
    min_duration_s: float = 0.3,
    max_duration_s: float = 20.0,
) -> list[Utterance]:
    """The utterances of another corpus's split, to train beside the main corpus's.

    Their audio paths are made absolute (the featurizer reads paths relative to the main corpus, and an
    absolute one replaces that root) and their ids carry the corpus's name, so two corpora never share one.
    ``hours`` > 0 keeps the first this many hours.
    """
    utts = load_utterances(corpus_dir, split, tokenizer, min_duration_s, max_duration_s)
    if hours > 0:
        utts = first_hours(utts, hours)
    root = corpus_dir.resolve()
    return [replace(u, id=f"{root.name}/{u.id}", audio=str(root / u.audio)) for u in utts]


def first_hours(utterances: Sequence[Utterance], hours: float) -> list[Utterance]:
    """The leading utterances of a manifest that together last ``hours`` (the last one may pass it)."""
    out, samples = [], 0
    limit = hours * 3600 * clocks.SAMPLE_RATE_HZ
    for utt in utterances:
        if samples >= limit:
            break
        out.append(utt)
        samples += utt.num_samples
    return out


# --------------------------------------------------------------------------------------------------
# Batch plan


def plan_epoch(utterances: Sequence[Utterance], cfg: BatchingConfig, seed: int, epoch: int) -> list[list[int]]:
    """Indices of every batch of one epoch, in the order they are trained.

    Utterances are sorted by length (with ``length_jitter`` relative noise drawn per epoch) and packed
    greedily, so a batch holds similar lengths and at most ``max_batch_mel_frames`` padded frames.
    """
    rng = random.Random(f"{seed}:{epoch}")
    keys = [u.num_mel_frames * (1.0 + cfg.length_jitter * rng.random()) for u in utterances]
    order = sorted(range(len(utterances)), key=keys.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        frames = utterances[i].num_mel_frames
        new_longest = max(longest, frames)
        too_big = (len(current) + 1) * new_longest > cfg.max_batch_mel_frames
        if current and (too_big or len(current) >= cfg.max_batch_utterances):
            batches.append(current)
            current, new_longest = [], frames
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    if epoch >= cfg.curriculum_epochs:
        rng.shuffle(batches)
    return batches


# --------------------------------------------------------------------------------------------------
# Features and SpecAugment


@dataclass(frozen=True)
class Batch:
    """One training batch. Shapes use the legend in the module docstring."""

    mel: Tensor  # (B, F, M) float32 log-mel
    mel_lengths: Tensor  # (B,) int64
    targets: Tensor  # (B, U) int64, padded with 0
    target_lengths: Tensor  # (B,) int64
    ids: tuple[str, ...]
    texts: tuple[str, ...]

    @property
    def audio_seconds(self) -> float:
        return float(self.mel_lengths.sum()) * clocks.MEL_FRAME_S


def spec_augment(mel: Tensor, lengths: Tensor, cfg: SpecAugmentConfig, generator: torch.Generator) -> Tensor:
    """A copy of ``mel`` (B, F, M) with frequency bands and time spans set to ``mask_value``.

    Like NeMo: each frequency mask starts uniformly in ``[0, F - freq_width]`` and is ``[0, freq_width)``
    bins wide; each time mask is ``[0, width)`` frames wide with ``width = max(1, time_width * length)``
    (or ``time_width`` frames when >= 1) and starts uniformly in ``[0, length - width]``.
    """
    b, f, m = mel.shape
    out = mel.clone()
    if cfg.freq_masks:
        start = torch.randint(0, max(1, f - cfg.freq_width + 1), (b, cfg.freq_masks), generator=generator)
        width = torch.randint(0, cfg.freq_width, (b, cfg.freq_masks), generator=generator)
        bins = torch.arange(f)[None, None, :]
        hit = (bins >= start[..., None]) & (bins < (start + width)[..., None])  # (B, masks, F)
        out.masked_fill_(hit.any(1)[:, :, None], cfg.mask_value)
    if cfg.time_masks:
        lengths = lengths.cpu()
        if cfg.time_width < 1:
            max_width = (lengths.double() * cfg.time_width).long().clamp(min=1)  # (B,)
        else:
            max_width = torch.full_like(lengths, int(cfg.time_width))
        u = torch.rand(b, cfg.time_masks, 2, generator=generator, dtype=torch.float64)
        width = (u[..., 0] * max_width[:, None]).long()  # uniform in [0, max_width)
        start = (u[..., 1] * (lengths - max_width + 1).clamp(min=1)[:, None]).long()
        frames = torch.arange(m)[None, None, :]
        hit = (frames >= start[..., None]) & (frames < (start + width)[..., None])  # (B, masks, M)
        out.masked_fill_(hit.any(1)[:, None, :], cfg.mask_value)
    return out


class BatchFeaturizer:
    """Loads the audio of a batch and turns it into a :class:`Batch` (runs in a DataLoader worker)."""

    def __init__(self, corpus_dir: Path, features: FeatureConfig, dither: float = 1e-5) -> None:
        self.corpus_dir = corpus_dir
        self.preprocessor = Preprocessor(features)
        self.dither = dither
        self._shards: dict[str, np.ndarray] = {}

    def _samples(self, utt: Utterance) -> np.ndarray:
        shard = self._shards.get(utt.audio)
        if shard is None:
            shard = np.load(self.corpus_dir / utt.audio, mmap_mode="r")
            self._shards[utt.audio] = shard
        return shard[utt.offset : utt.offset + utt.num_samples]

    def waveform(self, utt: Utterance) -> np.ndarray:
        """(S,) float32 samples of ``utt`` in [-1, 1) (a subclass may read them from elsewhere)."""
        return self._samples(utt).astype(np.float32) * INT16_SCALE

    @torch.no_grad()
    def __call__(self, utts: Sequence[Utterance], generator: torch.Generator | None = None) -> Batch:
        """Features and targets of ``utts``; with a ``generator``, NeMo's training dither is added.

        SpecAugment is applied by the trainer (it starts at a given step).
        """
        longest = max(u.num_samples for u in utts)
        audio = torch.zeros(len(utts), longest)  # (B, S)
        for i, u in enumerate(utts):
            audio[i, : u.num_samples] = torch.from_numpy(self.waveform(u))
        lengths = torch.tensor([u.num_samples for u in utts])
        if self.dither > 0 and generator is not None:
            audio += self.dither * torch.randn(audio.shape, generator=generator)
        mel, mel_lengths = self.preprocessor(audio, lengths)  # (B, F, M)
        longest_tokens = max(1, max(len(u.tokens) for u in utts))
        targets = torch.zeros(len(utts), longest_tokens, dtype=torch.long)
        for i, u in enumerate(utts):
            targets[i, : len(u.tokens)] = torch.tensor(u.tokens, dtype=torch.long)
        return Batch(
            mel=mel,
            mel_lengths=mel_lengths,
            targets=targets,
            target_lengths=torch.tensor([len(u.tokens) for u in utts]),
            ids=tuple(u.id for u in utts),
            texts=tuple(u.text for u in utts),
        )


class EpochBatches(Dataset):
    """The batches of one epoch from batch ``start`` on, as a map-style dataset (one item = one batch)."""

    def __init__(
        self,
        utterances: Sequence[Utterance],
        plan: list[list[int]],
        featurizer: BatchFeaturizer,
        seed: int,
        epoch: int,
        start: int = 0,
    ) -> None:
        self.utterances, self.plan, self.featurizer = utterances, plan, featurizer
        self.seed, self.epoch, self.start = seed, epoch, start

    def __len__(self) -> int:
        return max(0, len(self.plan) - self.start)

    def __getitem__(self, i: int) -> tuple[int, Batch]:
        index = self.start + i
        g = torch.Generator().manual_seed(batch_seed(self.seed, self.epoch, index))
        utts = [self.utterances[j] for j in self.plan[index]]
        return index, self.featurizer(utts, g)


def batch_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 100_003 + index) % (2**63 - 1)


def epoch_loader(dataset: EpochBatches, workers: int) -> DataLoader:
    """A DataLoader that yields ``(batch_index, Batch)`` in plan order; ``workers`` 0 runs in-process."""
    return DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
        collate_fn=_identity,
        worker_init_fn=_ignore_stop_signals if workers else None,
    )


def _identity(item: Any) -> Any:
    return item


def _ignore_stop_signals(_worker_id: int) -> None:
    """Workers leave SIGINT/SIGTERM to the trainer, which finishes its step, saves and shuts them down.

    Ctrl-C reaches the whole process group and ``pkill``/``systemctl stop`` may signal every process: a
    worker that died of it made PyTorch raise in the middle of the training step, losing the last
    checkpoint interval.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def eval_batches(
    utterances: Sequence[Utterance], featurizer: BatchFeaturizer, max_batch_mel_frames: int
) -> Iterator[Batch]:
    """Unaugmented batches of ``utterances`` grouped by length (for validation)."""
    cfg = BatchingConfig(max_batch_mel_frames=max_batch_mel_frames, curriculum_epochs=1 << 30, length_jitter=0.0)
    for indices in plan_epoch(utterances, cfg, seed=0, epoch=0):
        yield featurizer([utterances[i] for i in indices])
