"""``streamer eval``: word error rate per split, offline and streaming at every look-ahead, and latency.

Besides WER and CER every row has the token accuracy (``1 - `` the token error rate over the model's own
tokenizer pieces, at least 0) and the sequence accuracy (the share of utterances whose words are all right),
and offline rows the offline speed (audio seconds per compute second, batched). A Paraformer model
(:mod:`streamer.asr.paraformer`) is full context and non-autoregressive: it has offline rows only.

* Offline: one encoder pass per batch under the ``chunked_limited`` mask of a look-ahead, then batched
  greedy decoding.
* Streaming: the real cache-aware path, :class:`~streamer.engine.recognizer.Recognizer`, many streams
  stepped together.
* Latency of a look-ahead ``[left, R]``: the encoder emits ``R + 1`` frames (80 ms each) per chunk, so the
  first audio of a chunk waits ``(R + 1) * 80`` ms for the chunk to fill (``R * 80`` ms of that is
  look-ahead past the chunk's first frame), plus the measured compute of one chunk for a single stream.

Results append to a CSV and print as a markdown table for the model card.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from streamer.asr import clocks
from streamer.asr.config import ContextSize
from streamer.asr.model import AsrModel
from streamer.asr.paraformer import ParaformerModel
from streamer.asr.tokenizer import Tokenizer
from streamer.config_args import MODEL_FLAGS, Key, settings_from_args
from streamer.engine.factory import load_model
from streamer.engine.recognizer import Recognizer
from streamer.errors import ConfigError
from streamer.settings import ModelSettings
from streamer.training.rundir import AnyModel, model_from_run

DEFAULT_EVAL_THREADS = 2  # neither --threads nor model.threads: a small machine's share
EVAL_FLAGS: dict[str, Key] = {"model": MODEL_FLAGS["model"], "threads": MODEL_FLAGS["threads"],
                              "device": ("model", "device")}  # --att-context is a list: cmd_eval reads it

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Word error rate


def normalize_words(text: str) -> list[str]:
    """Lowercase words of letters, digits and apostrophes (punctuation dropped)."""
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Levenshtein distance between two word sequences (substitutions, insertions, deletions cost 1)."""
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        current = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h))
        previous = current
    return previous[-1]


def word_error_rate(refs: Iterable[str], hyps: Iterable[str]) -> tuple[float, int, int]:
    """Corpus WER: (total word errors / total reference words, errors, reference words)."""
    errors = words = 0
    for ref, hyp in zip(refs, hyps, strict=True):
        r = normalize_words(ref)
        errors += edit_distance(r, normalize_words(hyp))
        words += len(r)
    return (errors / words if words else 0.0), errors, words


def sequence_accuracy(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """The share of utterances whose normalised words equal the reference's."""
    if not refs:
        return 0.0
    return sum(normalize_words(r) == normalize_words(h) for r, h in zip(refs, hyps, strict=True)) / len(refs)


def token_accuracy(refs: Sequence[str], hyps: Sequence[str], tokenizer: Tokenizer) -> float:
    """``1 - `` the token error rate (edit distance over the tokenizer's pieces of the normalised words, divided
    by the reference's pieces), at least 0."""
    errors = tokens = 0
    for ref, hyp in zip(refs, hyps, strict=True):
        r = [str(t) for t in tokenizer.encode(" ".join(normalize_words(ref)))]
        errors += edit_distance(r, [str(t) for t in tokenizer.encode(" ".join(normalize_words(hyp)))])
        tokens += len(r)
    return max(0.0, 1.0 - errors / tokens) if tokens else 0.0


def character_error_rate(refs: Iterable[str], hyps: Iterable[str]) -> float:
    """Corpus CER over the normalised words joined by single spaces (a space is a character too).

    Beside WER it tells misspelt words (a letter or two wrong, low CER) from missed ones (high CER).
    """
    errors = chars = 0
    for ref, hyp in zip(refs, hyps, strict=True):
        r = " ".join(normalize_words(ref))
        errors += edit_distance(r, " ".join(normalize_words(hyp)))
        chars += len(r)
    return errors / chars if chars else 0.0


# --------------------------------------------------------------------------------------------------
# Decoding


@torch.inference_mode()
def decode_offline(model: AnyModel, mel: Tensor, mel_lengths: Tensor, ctx: ContextSize) -> list[str]:
    """Greedy transcripts of a batch of features (B, F, M) with one masked encoder pass (a Paraformer: full
    context, ``ctx`` unused)."""
    if isinstance(model, ParaformerModel):
        assert model.tokenizer is not None
        return [model.tokenizer.decode(s.token_ids, strip_special=True) for s in model.decode(mel, mel_lengths)]
    enc, enc_len = model.encoder(mel, mel_lengths, ctx)
    kind = model.check_decoder(None)
    greedy = model.greedy_decoder(kind)
    state = greedy.init_state(enc.size(0))
    inputs = model.ctc_log_probs(enc) if kind == "ctc" else enc
    spans, _ = greedy.step(inputs, enc_len, state)  # type: ignore[arg-type]
    assert model.tokenizer is not None
    return [model.tokenizer.decode(s.token_ids, strip_special=True) for s in spans]


def _batched_audio(audios: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
    longest = max(len(a) for a in audios)
    out = torch.zeros(len(audios), longest)
    for i, a in enumerate(audios):
        out[i, : len(a)] = torch.from_numpy(np.asarray(a, dtype=np.float32))
    return out, torch.tensor([len(a) for a in audios])


def transcribe_offline_batch(
    model: AnyModel, audios: Sequence[np.ndarray], ctx: ContextSize, batch_seconds: float = 120.0
) -> list[str]:
    """Offline greedy transcripts of many utterances, batched by length."""
    order = sorted(range(len(audios)), key=lambda i: len(audios[i]))
    out: dict[int, str] = {}
    group: list[int] = []
    for i in [*order, None]:
        if i is not None and (not group or (len(group) + 1) * len(audios[i]) <= batch_seconds * clocks.SAMPLE_RATE_HZ):
            group.append(i)
            continue
        if group:
            audio, lengths = _batched_audio([audios[j] for j in group])
            with torch.inference_mode():
                mel, mel_len = model.preprocessor(audio, lengths)
            for j, text in zip(group, decode_offline(model, mel, mel_len, ctx), strict=True):
                out[j] = text
        group = [i] if i is not None else []
    return [out[i] for i in range(len(audios))]


def transcribe_streaming_batch(
    model: AsrModel, audios: Sequence[np.ndarray], ctx: ContextSize, streams_per_batch: int = 32
) -> list[str]:
    """Transcripts through the cache-aware streaming recognizer, ``streams_per_batch`` streams at a time."""
    rec = Recognizer(model, ctx)
    out = []
    for start in range(0, len(audios), streams_per_batch):
        streams = []
        for audio in audios[start : start + streams_per_batch]:
            stream = rec.create_stream()
            stream.accept_waveform(np.asarray(audio, dtype=np.float32))
            stream.input_finished()
            streams.append(stream)
        rec.run_to_end(streams)
        out.extend(s.transcript().text for s in streams)
    return out


def chunk_compute_ms(model: AsrModel, audio: np.ndarray, ctx: ContextSize) -> tuple[float, float]:
    """(mean compute per chunk in ms, real-time factor) of one stream fed chunk by chunk."""
    rec = Recognizer(model, ctx)
    stream = rec.create_stream()
    chunk = int(rec.chunk_seconds * clocks.SAMPLE_RATE_HZ)
    steps, busy = 0, 0.0
    for i in range(0, len(audio), chunk):
        start = time.perf_counter()
        stream.accept_waveform(np.asarray(audio[i : i + chunk], dtype=np.float32))
        while stream.is_ready:
            rec.step([stream])
            steps += 1
        busy += time.perf_counter() - start
    start = time.perf_counter()
    stream.input_finished()
    rec.run_to_end([stream])
    busy += time.perf_counter() - start
    return 1000.0 * busy / max(steps, 1), (len(audio) / clocks.SAMPLE_RATE_HZ) / max(busy, 1e-9)


# --------------------------------------------------------------------------------------------------
# Manifests and the evaluation loop


@dataclass(frozen=True)
class ResultRow:
    """One line of results.csv."""

    model: str
    split: str
    mode: str  # offline | streaming
    att_context: str
    lookahead_ms: float
    chunk_ms: float
    utterances: int
    words: int
    wer_percent: float
    compute_ms_per_chunk: float
    rtf: float  # audio seconds per compute second: one stream (streaming rows), batched (offline rows)
    cer_percent: float = 0.0
    token_accuracy_percent: float = 0.0
    sequence_accuracy_percent: float = 0.0


def read_eval_manifest(path: Path, limit: int | None) -> tuple[list[np.ndarray], list[str]]:
    """Audio and transcripts of a corpus manifest (``audio``/``offset``/``num_samples``, paths relative to
    its directory) or a NeMo manifest (``audio_filepath``, ``text``)."""
    import soundfile  # noqa: PLC0415 - only needed for NeMo-style manifests

    audios, texts = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        if "audio_filepath" in entry:
            audio, rate = soundfile.read(entry["audio_filepath"], dtype="float32", always_2d=True)
            if rate != clocks.SAMPLE_RATE_HZ:
                raise ValueError(f"{entry['audio_filepath']}: {rate} Hz; evaluation needs 16 kHz audio")
            audios.append(audio.mean(axis=1))
        else:
            shard = np.load(path.parent / entry["audio"], mmap_mode="r")
            samples = shard[entry["offset"] : entry["offset"] + entry["num_samples"]]
            audios.append(samples.astype(np.float32) / 32768.0)
        texts.append(entry["text"])
        if limit is not None and len(texts) >= limit:
            break
    return audios, texts


def evaluate(
    model: AnyModel,
    manifests: dict[str, Path],
    contexts: Sequence[ContextSize],
    model_name: str,
    limit: int | None = None,
    modes: Sequence[str] = ("offline", "streaming"),
    latency_utterances: int = 3,
) -> list[ResultRow]:
    """WER of every split in every mode and look-ahead; compute per chunk from the first utterances.

    Raises:
        ConfigError: streaming asked of a Paraformer model.
    """
    if isinstance(model, ParaformerModel):
        if "offline" not in modes:
            raise ConfigError("a Paraformer model is full context and non-autoregressive: evaluate it with --mode "
                              "offline (or both, which gives its offline rows)")
        modes, contexts = ("offline",), [model.check_context(None)]
    assert model.tokenizer is not None
    rows = []
    frame_ms = 1000.0 * model.config.frame_shift_s  # one encoder frame
    for split, path in manifests.items():
        audios, texts = read_eval_manifest(path, limit)
        logger.info("%s: %d utterances", split, len(texts))
        for ctx in contexts:
            for mode in modes:
                start = time.perf_counter()
                if mode == "offline":
                    hyps = transcribe_offline_batch(model, audios, ctx)
                else:
                    assert isinstance(model, AsrModel)
                    hyps = transcribe_streaming_batch(model, audios, ctx)
                decode_s = time.perf_counter() - start
                wer, _, words = word_error_rate(texts, hyps)
                cer = character_error_rate(texts, hyps)
                compute_ms, rtf = 0.0, sum(len(a) for a in audios) / clocks.SAMPLE_RATE_HZ / max(decode_s, 1e-9)
                if mode == "streaming":
                    assert isinstance(model, AsrModel)
                    timings = [chunk_compute_ms(model, a, ctx) for a in audios[:latency_utterances]]
                    compute_ms = float(np.mean([t[0] for t in timings]))
                    rtf = float(np.mean([t[1] for t in timings]))
                rows.append(
                    ResultRow(
                        model=model_name,
                        split=split,
                        mode=mode,
                        att_context=f"[{ctx[0]},{ctx[1]}]",
                        lookahead_ms=ctx[1] * frame_ms,
                        chunk_ms=(ctx[1] + 1) * frame_ms,
                        utterances=len(texts),
                        words=words,
                        wer_percent=round(100 * wer, 2),
                        compute_ms_per_chunk=round(compute_ms, 2),
                        rtf=round(rtf, 1),
                        cer_percent=round(100 * cer, 2),
                        token_accuracy_percent=round(100 * token_accuracy(texts, hyps, model.tokenizer), 2),
                        sequence_accuracy_percent=round(100 * sequence_accuracy(texts, hyps), 2),
                    )
                )
                logger.info(
                    "%s %s %s: WER %.2f%%, CER %.2f%% (%.1f s)",
                    split, mode, ctx, 100 * wer, 100 * cer, time.perf_counter() - start,
                )
    return rows


def results_file_problem(path: Path) -> str | None:
    """Why rows cannot be appended to ``path`` (its header is not this version's columns), or None."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    fields = list(ResultRow.__dataclass_fields__)
    with path.open(newline="") as f:
        header = next(csv.reader(f), [])
    if header == fields:
        return None
    columns = ",".join(header)
    return f"{path} has the columns {columns}, not this version's {','.join(fields)}: give --results a new file"


def write_results(rows: Sequence[ResultRow], path: Path) -> None:
    """Append rows to a CSV (with a header when the file is new).

    A file written with other columns (an older ``streamer`` wrote no ``cer_percent``) is not appended to:
    its rows would land under the wrong headings.
    """
    fields = list(ResultRow.__dataclass_fields__)
    problem = results_file_problem(path)
    if problem:
        raise ValueError(problem)
    is_new = not path.exists() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if is_new:
            writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def markdown_table(rows: Sequence[ResultRow]) -> str:
    """WER per split (rows) and mode/look-ahead (columns), then latency per look-ahead."""
    columns = sorted({(r.mode, r.att_context, r.lookahead_ms) for r in rows}, key=lambda c: (c[0], -c[2]))
    splits = list(dict.fromkeys(r.split for r in rows))
    wer = {(r.split, r.mode, r.att_context): r.wer_percent for r in rows}
    head = "| split | " + " | ".join(f"{m} {c} ({'full context' if la < 0 else f'{la:.0f} ms'})"
                                     for m, c, la in columns) + " |"
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    for split in splits:
        cells = [f"{wer[(split, m, c)]:.2f}%" if (split, m, c) in wer else "-" for m, c, _ in columns]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| split | mode | look-ahead | token accuracy | sequence accuracy | CER | speed (audio s / compute s) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.split} | {r.mode} | {r.att_context} | {r.token_accuracy_percent:.2f}% | "
        f"{r.sequence_accuracy_percent:.2f}% | {r.cer_percent:.2f}% | {r.rtf:.0f}x |"
        for r in rows
    ]
    stream = {r.att_context: r for r in rows if r.mode == "streaming"}
    if stream:
        lines += [
            "",
            "| look-ahead | chunk | algorithmic latency | compute per chunk (1 stream) | RTF (1 stream) |",
            "|---|---|---|---|---|",
        ]
        for ctx, r in sorted(stream.items(), key=lambda kv: -kv[1].lookahead_ms):
            lines.append(
                f"| {ctx} {r.lookahead_ms:.0f} ms | {r.chunk_ms:.0f} ms | {r.chunk_ms:.0f} ms | "
                f"{r.compute_ms_per_chunk:.1f} ms | {r.rtf:.0f}x |"
            )
    return "\n".join(lines)


def load_eval_model(model: ModelSettings) -> tuple[AnyModel, str]:
    """The model of ``model.spec`` (a checkpoint spec or a run directory) on ``model.device``, and its name."""
    path = Path(model.spec)
    if path.is_dir() and (path / "checkpoints").is_dir():
        return model_from_run(path, "best").to_device(model.device), path.name
    return load_model(model), path.stem if path.exists() else model.spec


def cmd_eval(args: argparse.Namespace) -> int:
    """Run ``streamer eval``: the model, its threads and look-ahead from the flags, else the [model] settings."""
    settings = settings_from_args(args, EVAL_FLAGS).model
    torch.set_num_threads(settings.threads or DEFAULT_EVAL_THREADS)
    problem = results_file_problem(args.results)
    if problem:
        raise SystemExit(f"streamer eval: {problem}")
    model, name = load_eval_model(settings)
    manifests = {m.stem: m for m in args.manifest}
    if args.corpus:
        for split in filter(None, args.splits.split(",")):
            manifests[split] = args.corpus / f"{split}.jsonl"
    if not manifests:
        raise SystemExit("streamer eval: give --manifest FILE or --corpus DIR")
    contexts = list(args.att_context) or ([settings.att_context_size] if settings.att_context_size else [])
    if not contexts:
        contexts = list(model.config.encoder.att_context_sizes)
    modes = ("offline", "streaming") if args.mode == "both" else (args.mode,)
    rows = evaluate(model, manifests, contexts, name, args.limit, modes)  # type: ignore[arg-type]
    write_results(rows, args.results)
    print(markdown_table(rows))
    return 0


def rows_as_dicts(rows: Sequence[ResultRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
