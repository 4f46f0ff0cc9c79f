"""Stage (a) of ``scripts/gpu_check.sh``: the device path gives the CPU's tokens and times, and how far half
precision moves them.

* **Goldens** (``tests/fixtures/nemo``: NeMo 3.0.0's own tokens for small checkpoints): every case of
  ``test_golden_nemo.py``'s token tests, run on the CPU and on the device in float32, streaming (the
  daemon's path: CUDA graphs at batch buckets) and offline; token ids, frames (timestamps) and TDT
  durations must be equal, to each other and to NeMo's.
* **Speech**: the bundled model streams speech (espeak-ng utterances, else the goldens' audio files), all
  streams batched in one recognizer as the daemon batches them (padding to a bucket included), on the
  CPU and on the device.
* **Half precision**: the same goldens and speech with the encoder in float16 and bfloat16; the token
  agreement rate with float32 (1 - token edit distance / tokens) and how many utterances are equal.

On the CPU (``--device cpu``) the "device" run is the bucketed step run without capture, so the stage
still compares two code paths; half precision is skipped there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamer.asr.model import AsrModel
from streamer.asr.precision import check_device, check_dtype, to_precision
from streamer.audio.io import load_audio
from streamer.engine.cuda_graphs import BucketedEncoder
from streamer.engine.recognizer import Recognizer, transcribe_offline

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "nemo"
Tokens = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # ids, frames, durations


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance between two token sequences (insertions, deletions, substitutions)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[len(b)]


def agreement(pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> dict[str, Any]:
    """Token agreement of (reference, hypothesis) pairs: ``1 - edits / reference tokens``, and exact utterances."""
    edits = sum(edit_distance(ref, hyp) for ref, hyp in pairs)
    total = sum(len(ref) for ref, _ in pairs)
    return {"utterances": len(pairs), "exact": sum(list(r) == list(h) for r, h in pairs), "tokens": total,
            "edits": edits, "agreement": None if total == 0 else round(1 - edits / total, 4)}


def on_device(model: AsrModel, device: torch.device, dtype: torch.dtype) -> AsrModel:
    import copy

    return to_precision(copy.deepcopy(model).to_device(device), dtype)  # type: ignore[return-value]


def stream_all(model: AsrModel, audios: Sequence[np.ndarray], kind: str | None, ctx: tuple[int, int] | None,
               buckets: bool, info: dict[str, Any] | None = None) -> list[Tokens]:
    """Every audio as a stream of one recognizer, pushed 100 ms at a time and stepped together (as the daemon
    batches them); ``buckets`` forces the bucketed runner on a CPU recognizer (on CUDA it is there anyway).
    ``info["graphs"]`` says whether CUDA graphs ran (a failed capture falls back to running without)."""
    rec = Recognizer(model, ctx, kind, max_batch=len(audios))  # type: ignore[arg-type]
    if buckets and rec.runner is None:
        rec.runner = BucketedEncoder(rec.streaming, len(audios), use_graphs=False)
    streams = [rec.create_stream() for _ in audios]
    longest = max(len(a) for a in audios)
    for i in range(0, longest, 1600):
        for stream, audio in zip(streams, audios, strict=True):
            if i < len(audio):
                stream.accept_waveform(audio[i : i + 1600])
            else:
                stream.input_finished()
        rec.step(streams)
    for stream in streams:
        stream.input_finished()
    rec.run_to_end(streams)
    if info is not None:
        info["graphs"] = rec.runner is not None and rec.runner.use_graphs
    return [(s.tokens.token_ids, s.tokens.token_frames, s.tokens.token_durations) for s in streams]


def offline(model: AsrModel, audio: np.ndarray, kind: str, ctx: tuple[int, int]) -> Tokens:
    t = transcribe_offline(model, audio, kind, ctx)  # type: ignore[arg-type]
    return t.token_ids, t.token_frames, t.token_durations


def golden_cases(quick: bool) -> list[tuple[str, AsrModel, dict, list[tuple[tuple[int, int], str, str, dict]]]]:
    cases = []
    for root in sorted(p for p in FIXTURES.iterdir() if (p / "golden.pt").exists()) if FIXTURES.exists() else []:
        if quick and root.name != "tdt_streaming":
            continue
        golden = torch.load(root / "golden.pt", weights_only=True)
        items = [((int(c.split(",")[0]), int(c.split(",")[1])), kind, key, want)
                 for c, per_kind in golden["decode_offline"].items() for kind, per_audio in per_kind.items()
                 for key, want in per_audio.items()]
        model = AsrModel.load(str(root / "model.nemo"))
        cases.append((root.name, model, {"root": root}, items[:2] if quick else items))
    return cases


def run_case(model: AsrModel, buckets: bool, audio: np.ndarray, kind: str, ctx: tuple[int, int], mode: str) -> Tokens:
    """One golden case, offline or streaming (one stream)."""
    if mode == "offline":
        return offline(model, audio, kind, ctx)
    return stream_all(model, [audio], kind, ctx, buckets)[0]


def check_goldens(device: torch.device, halves: list[torch.dtype], quick: bool) -> dict[str, Any]:
    """float32 on the device equals the CPU and NeMo, case by case; half precision's agreement with float32."""
    out: dict[str, Any] = {"cases": 0, "device_equals_cpu": 0, "device_equals_nemo": 0, "mismatches": [],
                           "half": {str(d).removeprefix("torch."): [] for d in halves}}
    for name, model, info, items in golden_cases(quick):
        dev = on_device(model, device, torch.float32)
        half = {d: on_device(model, device, d) for d in halves}
        for ctx, kind, key, want in items:
            audio = load_audio(info["root"] / f"{key}.wav", model.config.features.sample_rate)
            modes = ["offline"] + (["streaming"] if model.config.encoder.is_causal else [])
            nemo = (tuple(want["token_ids"]), tuple(want["token_frames"]))
            for mode in modes:
                case = (audio, kind, ctx, mode)
                cpu, got = run_case(model, False, *case), run_case(dev, device.type == "cpu", *case)
                out["cases"] += 1
                out["device_equals_cpu"] += got == cpu
                out["device_equals_nemo"] += got[:2] == nemo
                if got != cpu or got[:2] != nemo:
                    out["mismatches"].append(f"{name} {mode} {ctx} {kind} {key}")
                for d, m in half.items():
                    out["half"][str(d).removeprefix("torch.")].append((cpu[0], run_case(m, False, *case)[0]))
    out["half"] = {k: agreement(v) for k, v in out["half"].items()}
    return out


def speech_clips(workdir: Path, count: int) -> tuple[list[np.ndarray], str]:
    """``count`` espeak-ng utterances, else the goldens' audio files (and where they came from)."""
    from streamer.errors import StreamerError
    from streamer.loadtest_speech import espeak_pool

    try:
        return [load_audio(p) for p in espeak_pool(workdir, count)], "espeak-ng"
    except StreamerError:
        files = sorted(FIXTURES.glob("*/audio_*.wav"))[:count]
        return [load_audio(p) for p in files], "tests/fixtures/nemo/*/audio_*.wav"


def check_speech(device: torch.device, halves: list[torch.dtype], quick: bool, workdir: Path) -> dict[str, Any]:
    """The bundled model streaming batched speech at [70,1]: device float32 against the CPU, halves against it."""
    clips, source = speech_clips(workdir, 3 if quick else 12)
    model = AsrModel.load("streamer-tdt-small")
    ctx = (70, 1)
    cpu = stream_all(model, clips, None, ctx, buckets=False)
    info: dict[str, Any] = {}
    got = stream_all(on_device(model, device, torch.float32), clips, None, ctx, buckets=True, info=info)
    same = sum(a == b for a, b in zip(cpu, got, strict=True))
    out: dict[str, Any] = {"source": source, "streams": len(clips), "device_equals_cpu": same, "half": {},
                           "cuda_graphs": info["graphs"]}
    for d in halves:
        hyp = stream_all(on_device(model, device, d), clips, None, ctx, buckets=True)
        out["half"][str(d).removeprefix("torch.")] = agreement([(c[0], h[0]) for c, h in zip(cpu, hyp, strict=True)])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m streamer.gpu_check_parity", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="one golden model, two cases, three utterances")
    p.add_argument("--json", required=True, help="write the results here")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = check_device(args.device)
    halves = [] if device.type == "cpu" else [check_dtype(n, device) for n in ("float16", "bfloat16")]
    with torch.inference_mode(), tempfile.TemporaryDirectory() as tmp:
        result = {"device": str(device), "goldens": check_goldens(device, halves, args.quick),
                  "speech": check_speech(device, halves, args.quick, Path(tmp))}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    g, s = result["goldens"], result["speech"]
    print(f"goldens: {g['device_equals_cpu']}/{g['cases']} equal the CPU, {g['device_equals_nemo']}/{g['cases']} "
          f"NeMo; speech: {s['device_equals_cpu']}/{s['streams']} streams equal the CPU", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
