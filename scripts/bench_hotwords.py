"""What hotwords cost a batched recognizer step: batch 16 with no boosted stream, with one, and with all of them.

Each stream gets espeak-ng speech (a few sentences over and over, each stream at another offset), enough for every
step, fed up front. Two measurements, each case interleaved with the others ``--repeats`` times:

- full steps (features, encoder, greedy decoder) through ``Recognizer.step``: median wall time of a step;
- the decoder alone, replaying the encoder outputs those steps made (recorded once) through ``greedy.step`` from a
  fresh state: wall and CPU time (this thread's) per step. The encoder does not depend on hotwords, so this is
  where their cost is, measured with less noise from a shared machine.

Speed is measured here, never asserted in a test.

    PYTHONPATH=. .venv/bin/python scripts/bench_hotwords.py [--model PATH] [--decoder ctc] [--batch 16] [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr
import torch

from streamer.asr.boosting import Boost, PhraseTree
from streamer.asr.model import AsrModel
from streamer.engine.hotwords import Hotwords, compile_hotwords
from streamer.engine.recognizer import Recognizer, Stream

SENTENCES = ["please turn off the lights in the kitchen", "what is the weather going to be like tomorrow",
             "set a timer for ten minutes", "i will call you back in the afternoon", "call lysander tomorrow"]
PHRASES = ("lysander", "reginald", "archibald", "gertrude", "rosalind", "kitchen lights", "living room",
           "garage door", "matilda", "cornelius")
BUNDLED = Path(__file__).resolve().parents[1] / "models" / "streamer-tdt-small" / "model.nemo"


class Recorder:
    """Wraps the recognizer's greedy decoder: times its steps and keeps their inputs for a replay."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.seconds, self.inputs = inner, 0.0, []

    def step(self, dec_in: torch.Tensor, lengths: torch.Tensor, state: Any, boost: Boost | None = None) -> Any:
        self.inputs.append((dec_in, lengths))
        start = time.perf_counter()
        out = self.inner.step(dec_in, lengths, state, boost)
        self.seconds += time.perf_counter() - start
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def speech(seconds: float, rate: int = 16000) -> np.ndarray:
    """The sentences, 0.5 s apart, repeated to at least ``seconds``."""
    with tempfile.TemporaryDirectory() as folder:
        parts = []
        for i, text in enumerate(SENTENCES):
            path = Path(folder) / f"{i}.wav"
            subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), text], check=True)
            data, sr = sf.read(path, dtype="float32")
            parts += [soxr.resample(data, sr, rate).astype(np.float32), np.zeros(rate // 2, dtype=np.float32)]
    once = np.concatenate(parts)
    return np.tile(once, -(-round(seconds * rate) // once.size))


def streams(rec: Recognizer, audio: np.ndarray, trees: list[PhraseTree | None]) -> list[Stream]:
    out = []
    for b, tree in enumerate(trees):
        stream = rec.create_stream()
        stream.hotwords = tree
        stream.accept_waveform(np.roll(audio, 1601 * b))  # the streams say different things at each step
        out.append(stream)
    return out


def full_steps(rec: Recognizer, audio: np.ndarray, trees: list[PhraseTree | None], steps: int) -> float:
    """Median milliseconds of one whole step."""
    batch = streams(rec, audio, trees)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        rec.step(batch)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def replay(greedy: Any, inputs: list[tuple[torch.Tensor, torch.Tensor]], boost: Boost | None) -> tuple[float, float]:
    """The decoder alone over recorded chunks from a fresh state: milliseconds per step, wall and this thread's CPU."""
    state = greedy.init_state(inputs[0][0].shape[0], inputs[0][0].device)
    wall, cpu = time.perf_counter(), time.thread_time()
    for dec_in, lengths in inputs:
        _, state = greedy.step(dec_in, lengths, state, boost)
    return 1000 * (time.perf_counter() - wall) / len(inputs), 1000 * (time.thread_time() - cpu) / len(inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(BUNDLED))
    parser.add_argument("--decoder", default=None, help="tdt, rnnt or ctc (default: the model's own)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rec = Recognizer(AsrModel.load(args.model), decoder=args.decoder)
    audio = speech((args.steps + 2) * rec.chunk_seconds + 1601 * args.batch / 16000)
    tree = compile_hotwords(rec.model.tokenizer, Hotwords(PHRASES), rec.device).tree
    cases: dict[str, list[PhraseTree | None]] = {
        "no boosted stream": [None] * args.batch,
        "1 boosted stream": [tree] + [None] * (args.batch - 1),
        f"all {args.batch} boosted": [tree] * args.batch,
    }
    greedy = rec.greedy
    recorder = Recorder(greedy)
    rec.greedy = recorder  # type: ignore[assignment]
    full_steps(rec, audio, cases["no boosted stream"], args.steps)  # warm up, and the encoder outputs to replay
    inputs = recorder.inputs
    rec.greedy = greedy
    steps: dict[str, list[float]] = {name: [] for name in cases}
    decoder: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, trees in cases.items():
            steps[name].append(full_steps(rec, audio, trees, args.steps))
            decoder[name].append(replay(greedy, inputs, Boost.of(trees, rec.device)))
    print(f"{args.model} ({rec.kind}), batch {args.batch}, {args.steps} steps x {args.repeats} repeats, "
          f"{len(PHRASES)} phrases per boosted stream, torch threads {torch.get_num_threads()}")
    print("milliseconds per step, median over repeats (min: the least disturbed repeat)")
    print(f"{'case':<22} {'step':>8} {'step min':>9} {'decoder':>8} {'decoder min':>12} {'decoder CPU':>12}")
    for name in cases:
        walls, cpus = [w for w, _ in decoder[name]], [c for _, c in decoder[name]]
        print(f"{name:<22} {statistics.median(steps[name]):8.2f} {min(steps[name]):9.2f} "
              f"{statistics.median(walls):8.2f} {min(walls):12.2f} {statistics.median(cpus):12.2f}")


if __name__ == "__main__":
    main()
