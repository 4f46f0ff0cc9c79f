"""``streamer convert --verify``: the converted model must compute what its source computes.

Both models are loaded as streamer loads any model (:meth:`AsrModel.load`) and fed the same generated
audio: the config and tokenizer, the log-mel features, the offline encoder output at every attention
context, the cache-aware streaming chunks (causal models), the decoders' logits teacher-forced on the same
tokens, and the greedy tokens (offline, and streaming for causal models) are compared.

Tolerances. The two models run the same code on the same machine on the *same* inputs (the source's
features, encoder output and tokens) with weights that must be equal bit for bit, so encoder outputs,
streaming chunks, logits, token ids, frames and durations must be exactly equal: a tolerance would hide
real damage (one weight of the EOU fixture moved by 1e-3 changes its encoder output by only 7e-6).
Features must be equal when the mel filterbanks are (ours equal NeMo's bit for bit); when a .nemo stored
a different one (an older librosa), up to `FEATURE_ATOL`, and the filterbank row shows by how much.

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from streamer.asr.checkpoint import FEATURE_BUFFER_KEYS
from streamer.asr.config import ContextSize
from streamer.asr.convert_transformers import transformers_rows
from streamer.asr.model import AsrModel
from streamer.asr.verifyreport import FEATURE_ATOL, SENTENCE, Report, Row, head_logits, max_abs_diff
from streamer.engine.recognizer import Transcript, transcribe_offline, transcribe_streaming

BUFFER_ATOL = 1e-6  # two filterbanks from different librosa versions; larger means a different front end


# ---------------------------------------------------------------------------------------------------
# Audio


def synthetic_speech(sample_rate: int, seconds: float = 3.5) -> np.ndarray:
    """Deterministic speech-like audio: voiced harmonics under moving formants, noise bursts, pauses."""
    rng = np.random.default_rng(20240519)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 120.0 + 40.0 * np.sin(2 * np.pi * 0.7 * t)  # Hz, a slow intonation contour
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    formant_hz = 500.0 + 1500.0 * (0.5 + 0.5 * np.sin(2 * np.pi * 1.9 * t))
    voiced = sum(np.sin(k * phase) * np.exp(-(((k * f0 - formant_hz) / 400.0) ** 2)) for k in range(1, 30))
    syllables = (np.sin(2 * np.pi * 3.1 * t) > -0.2).astype(np.float64)  # about three syllables a second
    noise = rng.normal(0.0, 1.0, t.size) * (np.sin(2 * np.pi * 1.3 * t + 1.0) > 0.85)
    audio = voiced * syllables + 0.3 * noise + 0.003 * rng.normal(0.0, 1.0, t.size)
    return (0.6 * audio / np.abs(audio).max()).astype(np.float32)


def verify_audio(sample_rate: int) -> tuple[np.ndarray, str]:
    """A few seconds of audio at ``sample_rate``: espeak-ng speaking `SENTENCE` if it is installed.

    Returns:
        The samples and a description of where they came from.
    """
    espeak = shutil.which("espeak-ng")
    if espeak is not None:
        from streamer.audio.io import load_audio  # noqa: PLC0415

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "sentence.wav"
            try:
                subprocess.run(
                    [espeak, "-v", "en-us", "-w", str(path), SENTENCE], check=True, timeout=60, capture_output=True
                )
                audio = load_audio(path, sample_rate)
                return audio, f"espeak-ng: {SENTENCE!r} ({audio.size / sample_rate:.2f} s)"
            except (OSError, subprocess.SubprocessError):
                pass
    audio = synthetic_speech(sample_rate)
    return audio, f"synthetic speech-like signal, espeak-ng unavailable ({audio.size / sample_rate:.2f} s)"


# ---------------------------------------------------------------------------------------------------
# Comparisons


def _config_row(a: AsrModel, b: AsrModel) -> Row:
    names = [f.name for f in dataclasses.fields(a.config) if f.name != "extra"]
    differ = [n for n in names if getattr(a.config, n) != getattr(b.config, n)]
    return Row("config", float(len(differ)), 0.0, f"differ: {', '.join(differ)}" if differ else "")


def _tokenizer_row(a: AsrModel, b: AsrModel) -> Row:
    pa = a.tokenizer.pieces if a.tokenizer else ()
    pb = b.tokenizer.pieces if b.tokenizer else ()
    if len(pa) != len(pb):
        return Row("tokenizer pieces", math.inf, 0.0, f"{len(pa)} vs {len(pb)} pieces")
    return Row("tokenizer pieces", float(sum(x != y for x, y in zip(pa, pb, strict=True))), 0.0, f"{len(pa)} pieces")


def _token_row(check: str, ta: Transcript, tb: Transcript) -> Row:
    fields = ("token_ids", "token_frames", "token_durations")
    got = [(list(getattr(ta, f)), list(getattr(tb, f))) for f in fields]
    differ = [f for f, (x, y) in zip(fields, got, strict=True) if x != y]
    note = f"{len(ta.token_ids)} tokens" + (f"; differ: {', '.join(differ)}" if differ else "")
    return Row(check, float(bool(differ)), 0.0, note)


def _ctx_name(ctx: ContextSize) -> str:
    return f"{ctx[0]},{ctx[1]}"


def _front_end_rows(a: AsrModel, b: AsrModel, audio: np.ndarray) -> tuple[list[Row], Tensor, Tensor]:
    state_a, state_b = a.state_dict(), b.state_dict()
    buffers = max(max_abs_diff(state_a[k], state_b[k]) for k in FEATURE_BUFFER_KEYS)
    x = torch.from_numpy(audio)[None]
    n = torch.tensor([x.size(1)])
    feats_a, len_a = a.preprocessor(x, n)
    feats_b, len_b = b.preprocessor(x, n)
    diff = max_abs_diff(feats_a, feats_b) if torch.equal(len_a, len_b) else math.inf
    rows = [
        Row("mel filterbank, window", buffers, BUFFER_ATOL),
        Row("features", diff, 0.0 if buffers == 0.0 else FEATURE_ATOL, f"{int(len_a[0])} frames"),
    ]
    return rows, feats_a, len_a


def _encoder_rows(a: AsrModel, b: AsrModel, feats: Tensor, length: Tensor, ctx: ContextSize) -> list[Row]:
    enc_a, n_a = a.encoder(feats, length, ctx)
    enc_b, n_b = b.encoder(feats, length, ctx)
    diff = max_abs_diff(enc_a, enc_b) if torch.equal(n_a, n_b) else math.inf
    rows = [Row(f"encoder offline {_ctx_name(ctx)}", diff, 0.0, f"{int(n_a[0])} frames")]
    if a.config.encoder.is_causal and b.config.encoder.is_causal:
        chunks_a = streaming_chunks(a, feats[:, :, : int(length[0])], ctx)
        chunks_b = streaming_chunks(b, feats[:, :, : int(length[0])], ctx)
        diff = max_abs_diff(torch.cat(chunks_a), torch.cat(chunks_b)) if len(chunks_a) == len(chunks_b) else math.inf
        rows.append(Row(f"encoder streaming {_ctx_name(ctx)}", diff, 0.0, f"{len(chunks_a)} chunks"))
    return rows


def streaming_chunks(model: AsrModel, feats: Tensor, ctx: ContextSize) -> list[Tensor]:
    """The cache-aware encoder's output chunk by chunk for ``feats (1, F, M)`` (each ``(T_chunk, D)``)."""
    plan = model.encoder.streaming(ctx)
    state, pos, chunks = plan.init_state(1), 0, []
    while pos < feats.size(2):
        n = min(int(plan.chunk_frames(state)[0]), feats.size(2) - pos)
        out, out_len, state = plan.step(feats[:, :, pos : pos + n], torch.tensor([n]), state)
        chunks.append(out[0, : int(out_len[0])])
        pos += n
    return chunks


def _head_rows(a: AsrModel, b: AsrModel, audio: np.ndarray, feats: Tensor, length: Tensor) -> list[Row]:
    rows = []
    streaming = a.config.encoder.is_causal and b.config.encoder.is_causal
    for kind in (k for k in a.decoder_kinds if k in b.decoder_kinds):
        for ctx in a.config.encoder.att_context_sizes:
            name = f"{kind} {_ctx_name(ctx)}"
            ta = transcribe_offline(a, audio, kind, ctx)
            rows.append(_token_row(f"tokens offline {name}", ta, transcribe_offline(b, audio, kind, ctx)))
            enc, _ = a.encoder(feats, length, ctx)
            logits = (head_logits(m, kind, enc, list(ta.token_ids)) for m in (a, b))
            rows.append(Row(f"logits {name}", max_abs_diff(*logits), 0.0))
            if streaming:
                got = (transcribe_streaming(m, audio, kind, ctx) for m in (a, b))
                rows.append(_token_row(f"tokens streaming {name}", *got))
    return rows


def compare_models(a: AsrModel, b: AsrModel, audio: np.ndarray) -> list[Row]:
    """Every comparison of the converted model ``b`` with its source ``a`` on ``audio``."""
    rows = [_config_row(a, b), _tokenizer_row(a, b)]
    with torch.inference_mode():
        front, feats, length = _front_end_rows(a, b, audio)
        rows += front
        for ctx in a.config.encoder.att_context_sizes:
            rows += _encoder_rows(a, b, feats, length, ctx)
        rows += _head_rows(a, b, audio, feats, length)
    return rows


def verify(src: Path, dst: Path, audio: tuple[np.ndarray, str] | None = None) -> Report:
    """Compare the model at ``dst`` with the one at ``src``; with transformers, also its own classes.

    Args:
        src: the source model (``.nemo`` file or HF directory).
        dst: the converted model.
        audio: samples at the source's rate and their description (default: `verify_audio`).
    """
    a, b = AsrModel.load(str(src)), AsrModel.load(str(dst))
    samples, description = audio or verify_audio(a.config.features.sample_rate)
    report = Report(description, compare_models(a, b, samples))
    hf_dir, model = (src, a) if src.is_dir() else (dst, b)
    rows, note = transformers_rows(hf_dir, model, samples)
    report.rows += rows
    report.notes.append(note)
    return report
