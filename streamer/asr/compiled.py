"""The offline encoder under ``torch.compile`` (``model.compile``): one compiled graph per length bucket.

An utterance of M mel frames is padded up to the smallest bucket that holds it and goes through
:meth:`~streamer.asr.encoder.FastConformerEncoder.encode` with every mask applied (``always_mask``), so one
shape per bucket and batch size gets compiled and no branch depends on the data. Padding changes no valid
frame: the subsampling convolutions zero the rows past each length before every convolution, attention gives
padded keys a -10000 score (its softmax weight is exactly 0.0 in float32), the conformer convolution zeroes
padded frames before its depthwise convolution, and batch norm (eval) and the feed-forward blocks work frame
by frame. What does change is float rounding: longer rows in the attention softmax and the position
projection, and inductor's fused kernels in another order than eager's, a few 1e-6 relative; the tests show
the tokens are the same. Inputs longer than the largest bucket run eagerly (their subsampling goes in windows,
:data:`~streamer.asr.encoder.SUBSAMPLING_WINDOW_MEL_FRAMES`).

Modes (``model.compile``): ``off`` (eager, the default), ``offline`` (buckets, ``dynamic=False``),
``offline-dynamic`` (no padding, one graph with symbolic lengths, ``dynamic=True``) and ``offline-graphs``
(buckets replayed as CUDA graphs, ``mode="reduce-overhead"``; CUDA only). The first input of each bucket pays
the compile (tens of seconds on a CPU; see README, section Benchmark, for when it pays). Local-attention
encoders (``rel_pos_local_attn``) always run eagerly: their banded attention writes through ``as_strided``
views, which torch.compile refuses to trace.
"""

from __future__ import annotations

import bisect
import logging
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from streamer.asr.config import ContextSize
from streamer.asr.subsampling import subsampled_length
from streamer.errors import ConfigError

if TYPE_CHECKING:
    from streamer.asr.encoder import FastConformerEncoder

log = logging.getLogger(__name__)

CompileMode = Literal["off", "offline", "offline-dynamic", "offline-graphs"]
COMPILE_MODES: tuple[str, ...] = ("off", "offline", "offline-dynamic", "offline-graphs")
# Bucket lengths in seconds of audio; each holds that many seconds plus the one extra mel frame a centred STFT
# gives (a 20.0 s file is 2001 frames), so whole-second utterances fill their bucket exactly.
DEFAULT_BUCKETS_S: tuple[float, ...] = (5.0, 10.0, 15.0, 20.0, 30.0, 40.0)
MEL_FRAMES_PER_S = 100  # 10 ms hop
RECOMPILE_LIMIT = 64  # dynamo's compiled variants per function: buckets x batch sizes x models


def bucket_mel_frames(buckets_s: Sequence[float]) -> list[int]:
    """Bucket lengths in mel frames (sorted, distinct) for ``buckets_s`` seconds.

    Raises:
        ConfigError: a bucket is not a positive length.
    """
    if not buckets_s or any(not s > 0 for s in buckets_s):
        raise ConfigError(f"compile buckets must be positive lengths in seconds, got {list(buckets_s)}")
    return sorted({round(s * MEL_FRAMES_PER_S) + 1 for s in buckets_s})


class CompiledOffline:
    """``encoder.compiled_offline``: runs inputs that fit a bucket through the compiled ``encode``.

    Args:
        encoder: the model's encoder (its weights are shared, not copied).
        mode: ``offline``, ``offline-dynamic`` or ``offline-graphs`` (see the module docstring).
        buckets_s: bucket lengths in seconds; the largest is also the longest input compiled in dynamic mode.
    """

    def __init__(self, encoder: FastConformerEncoder, mode: CompileMode,
                 buckets_s: Sequence[float] = DEFAULT_BUCKETS_S) -> None:
        if mode not in COMPILE_MODES[1:]:
            raise ConfigError(f"model.compile: {mode!r} is not one of {', '.join(COMPILE_MODES)}")
        device = next(encoder.parameters()).device
        if mode == "offline-graphs" and device.type != "cuda":
            raise ConfigError("model.compile=offline-graphs replays CUDA graphs: it needs model.device=cuda "
                              "(on the CPU use offline)")
        self.encoder = encoder
        self.mode = mode
        self.buckets = bucket_mel_frames(buckets_s)
        self.shapes_seen: set[tuple[int, ...]] = set()
        self.warned_local = False
        _import_inductor()
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self._fn = torch.compile(self._encode, dynamic=mode == "offline-dynamic",
                                 mode="reduce-overhead" if mode == "offline-graphs" else None)

    def _encode(self, mel: Tensor, lengths: Tensor, ctx: ContextSize) -> tuple[Tensor, Tensor]:
        return self.encoder.encode(mel, lengths, ctx, always_mask=True)

    def bucket_for(self, mel_frames: int) -> int | None:
        """The padded length of an input of ``mel_frames`` (itself in dynamic mode); None: over the largest."""
        i = bisect.bisect_left(self.buckets, mel_frames)
        if i == len(self.buckets):
            return None
        return mel_frames if self.mode == "offline-dynamic" else self.buckets[i]

    def __call__(self, mel: Tensor, lengths: Tensor, ctx: ContextSize) -> tuple[Tensor, Tensor] | None:
        """``encoder.forward``'s result for ``mel`` (B, F, M), or None (run it eagerly) when M is over the largest
        bucket or the encoder uses local attention."""
        if self.encoder.cfg.is_local_attention:
            if not self.warned_local:
                log.warning("model.compile=%s: local attention runs eagerly (its banded attention writes through "
                            "strided views, which torch.compile cannot trace)", self.mode)
                self.warned_local = True
            return None
        m = mel.size(2)
        bucket = self.bucket_for(m)
        if bucket is None:
            return None
        padded = F.pad(mel, (0, bucket - m)) if bucket > m else mel
        self.shapes_seen.add(tuple(padded.shape))
        if self.mode == "offline-graphs":
            torch.compiler.cudagraph_mark_step_begin()
        out, out_len = self._fn(padded, lengths, ctx)
        cfg = self.encoder.cfg
        t = int(subsampled_length(m, cfg.subsampling_factor, cfg.causal_downsampling))
        out = out[:, :t]
        # a CUDA graph's output lives in its pool and is overwritten by the next replay: hand out a copy
        return (out.clone(), out_len.clone()) if self.mode == "offline-graphs" else (out, out_len)


def _import_inductor() -> None:
    """Import inductor now, without its import-time DeprecationWarning (torch.utils.mkldnn, which inductor
    imports, decorates with the deprecated ``torch.jit.script_method``): not ours to fix, and an error where
    warnings are errors (the tests)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script_method` is deprecated", DeprecationWarning)
        import torch._inductor.compile_fx  # noqa: F401


def compile_offline(encoder: FastConformerEncoder, mode: str,
                    buckets_s: Sequence[float] = DEFAULT_BUCKETS_S) -> CompiledOffline | None:
    """Set ``encoder.compiled_offline`` for ``mode`` (``off``: back to eager); returns the runner (None for off).

    Raises:
        ConfigError: an unknown mode, ``offline-graphs`` off CUDA, or a bucket that is no positive length.
    """
    if mode == "off":
        encoder.compiled_offline = None
        return None
    runner = CompiledOffline(encoder, mode, buckets_s)  # type: ignore[arg-type]
    encoder.compiled_offline = runner
    return runner
