"""The incremental front end for many streams at once, each at its own position in its audio.

:meth:`FilterbankFeatures.step` batches streams only in lockstep (the same number of samples received).
A server's streams never are, and stepping them one by one costs some twenty small tensor operations per
stream per chunk: 24 ms of a 64-stream round of the bundled model, a fifth of the round. Here the cheap,
per-stream part (pre-emphasis, the carried tail, cutting the frames) runs in NumPy, and the spectral part
(window, FFT, magnitude, mel matmul, log) runs once over the frames of every stream together.

The frames equal the offline features as :meth:`FilterbankFeatures.step`'s do: the same float32 operations in
the same order, and the spectral part is :meth:`FilterbankFeatures.log_mel_of_frames` itself. Neither is
bit-identical to the offline pass in general: the mel matmul's sums depend on how many columns BLAS gets
(fewer than 16 take another kernel), which moves a value by one rounding (at most ~1e-6 on these
log-mel magnitudes); the tests hold both to that tolerance. Here the many streams' frames together are
almost always past 16 columns, the offline pass's kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided
from torch import Tensor

from streamer.asr import clocks
from streamer.asr.features import FeatureState, FilterbankFeatures


def step_many(
    featurizer: FilterbankFeatures, chunks: Sequence[np.ndarray], states: Sequence[FeatureState]
) -> tuple[list[Tensor], list[FeatureState]]:
    """Each stream's new samples in, its new mel frames out, like :meth:`FilterbankFeatures.step` per stream.

    Args:
        featurizer: the model's front end (on the CPU).
        chunks: per stream, new samples, float32 in [-1, 1] (1-D).
        states: per stream, a batch-1 state on the CPU.

    Returns:
        ``(frames, states)``: per stream (1, F, k_i) new frames and the new state.
    """
    cfg = featurizer.cfg
    n_fft, hop = cfg.n_fft, cfg.hop_length
    preemph = None if cfg.preemph is None else np.float32(cfg.preemph)
    pieces: list[np.ndarray] = []
    counts: list[int] = []
    new_states: list[FeatureState] = []
    for samples, state in zip(chunks, states, strict=True):
        x = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        if x.size == 0:
            counts.append(0)
            new_states.append(state)
            continue
        received = int(state.num_samples.item())
        emitted = int(state.num_frames.item())
        total = received + x.size
        ready = clocks.num_complete_mel_frames(total, hop, cfg.win_length, n_fft)
        if preemph is None:
            y = x
        else:
            previous = np.empty_like(x)
            previous[0] = state.last_sample.item()
            previous[1:] = x[:-1]
            y = x - preemph * previous
        signal = np.concatenate((state.tail.numpy().reshape(-1), y, np.zeros(n_fft, dtype=np.float32)))
        count = ready - emitted
        if count > 0:
            start = signal[hop * emitted - (received - n_fft // 2) :]
            if start.size < hop * (count - 1) + n_fft:  # as_strided does not check its bounds
                raise AssertionError("features: a frame reaches past the carried signal")
            pieces.append(as_strided(start, (count, n_fft), (hop * start.itemsize, start.itemsize), writeable=False))
        counts.append(max(count, 0))
        tail_end = signal.size - n_fft  # the zeros after the real samples are not carried
        new_states.append(FeatureState(
            tail=torch.from_numpy(signal[tail_end - n_fft : tail_end].reshape(1, n_fft)),
            last_sample=torch.from_numpy(x[-1:]),
            num_samples=torch.from_numpy(np.array([total], dtype=np.int64)),
            num_frames=torch.from_numpy(np.array([ready], dtype=np.int64)),
        ))
    if not pieces:
        empty = torch.zeros(1, cfg.n_mels, 0)
        return [empty for _ in counts], new_states
    frames = torch.from_numpy(np.concatenate(pieces))[None]  # (1, sum k, n_fft)
    with torch.autocast("cpu", enabled=False):
        mel = featurizer.log_mel_of_frames(frames, pad_single_column=True)  # (1, F, sum k)
    return list(mel.split(counts, dim=2)), new_states
