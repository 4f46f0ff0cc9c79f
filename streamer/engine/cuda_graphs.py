"""The encoder step at fixed batch buckets: pad a batch to the next bucket, run it, slice the real rows out.

On a GPU a cache-aware step of a few encoder frames is hundreds of small kernels, and launching them
from Python costs more than running them. A CUDA graph records them once per shape and replays them in
one call, but a graph has fixed input addresses and shapes. :class:`BucketedEncoder` therefore keeps,
per bucket size (1, 2, 4, ... up to the largest batch asked for), static input buffers and the graph
that :func:`~streamer.asr.fixed_step.fixed_shape_step` was captured into. A step of ``n`` streams:

1. copies the new mel frames into a pinned host buffer and from there to the device without blocking
   (``non_blocking``; an event guards the host buffer's reuse), and the streams' states into the first
   ``n`` rows of the bucket's state buffers;
2. replays the bucket's graph (or, without graphs, e.g. on the CPU, calls the same function on the same
   buffers: the path the tests run);
3. returns copies of the first ``n`` rows of the outputs (a replay overwrites them), the encoder output
   in float32 for the decoders.

The rows past ``n`` keep whatever they last held (zeros at first: a stream with no audio, whose
attention is fully masked with a finite fill, so no NaN ever appears). Every operation of the step works
row by row, so they cannot reach a real row; the tests fill them with NaN to show it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from streamer.asr.fixed_step import fixed_shape_step
from streamer.asr.state import stack
from streamer.asr.streaming import EncoderState, StreamingEncoder

logger = logging.getLogger(__name__)

Outputs = tuple[Tensor, Tensor, EncoderState]


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two from 1 up to the first that holds ``max_batch`` streams: ``(1, 2, 4, 8)`` for 5 to 8."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    sizes = [1]
    while sizes[-1] < max_batch:
        sizes.append(sizes[-1] * 2)
    return tuple(sizes)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` streams.

    Raises:
        ValueError: ``n`` is below 1 or above the largest bucket.
    """
    for size in buckets:
        if size >= n >= 1:
            return size
    raise ValueError(f"no bucket holds {n} streams (buckets: {', '.join(map(str, buckets))})")


@dataclass
class Bucket:
    """One bucket's static inputs (``size`` rows each) and, with graphs, its graph and static outputs."""

    size: int
    mel: Tensor  # (b, F, M) float32 on the device
    n_new: Tensor  # (b,) int64
    state: EncoderState  # batch b, the encoder's dtype
    graph: torch.cuda.CUDAGraph | None = None
    outputs: Outputs | None = None


class BucketedEncoder:
    """Runs :meth:`StreamingEncoder.step`'s maths at fixed batch buckets, replaying CUDA graphs on a GPU.

    Args:
        streaming: the encoder at one look-ahead; its device and dtype are the buffers'.
        max_batch: the largest batch to expect; larger ones run in pieces of the largest bucket.
        use_graphs: capture and replay CUDA graphs (default: on a CUDA device); False runs the same
            padded step directly (the CPU path, and ``engine.cuda_graphs = false``).

    Not thread-safe: one inference thread calls it, as it calls the :class:`Recognizer`.
    """

    def __init__(self, streaming: StreamingEncoder, max_batch: int, use_graphs: bool | None = None) -> None:
        self.streaming = streaming
        self.device = streaming.device
        is_cuda = self.device.type == "cuda"
        self.use_graphs = is_cuda if use_graphs is None else use_graphs
        if self.use_graphs and not is_cuda:
            raise ValueError("CUDA graphs need the encoder on a CUDA device")
        self.buckets = bucket_sizes(max_batch)
        self.mel_frames = streaming.chunk_mel_frames  # M: the widest chunk a step takes
        self.n_mels = streaming.cfg.feat_in
        self._buckets: dict[int, Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._host_mel: Tensor | None = None  # pinned staging (rows, F, M) float32, grown on demand
        self._host_n: Tensor | None = None
        self._copied: torch.cuda.Event | None = None  # the last host-to-device copy out of the staging

    @torch.inference_mode()
    def prepare(self, up_to: int | None = None) -> None:
        """Build (and with graphs capture) every bucket up to ``up_to`` streams (default: all), so that no
        step pays for a capture later; ``streamer serve`` calls it before it reports ready."""
        for size in self.buckets:
            if up_to is None or size <= bucket_for(min(up_to, self.buckets[-1]), self.buckets):
                self._bucket(size)

    @torch.inference_mode()
    def step(self, mel: Tensor, n_new: Tensor, states: Sequence[EncoderState]) -> Outputs:
        """One encoder step for ``n`` streams: the same results as ``streaming.step(mel, n_new, stack(states))``.

        Args:
            mel: (n, F, m) new mel frames on the CPU, left-aligned, ``m <= streaming.chunk_mel_frames``.
            n_new: (n,) int64 on the CPU: real frames per stream, within each stream's chunk schedule.
            states: the streams' states on the encoder's device, in batch order (their batches add up to n).

        Returns:
            ``(out (n, R+1, D) float32, out_len (n,), state of batch n)``, owned by the caller.

        Raises:
            ValueError: the mel frames are wider than a chunk, or ``n_new`` disagrees with them.
        """
        n = mel.size(0)
        if n < 1 or mel.size(2) > self.mel_frames or n_new.shape != (n,) or int(n_new.max()) > mel.size(2):
            raise ValueError(f"step() takes (n, F, <= {self.mel_frames}) mel frames and n real-frame counts "
                             f"within them; got mel {tuple(mel.shape)} and n_new {tuple(n_new.shape)}")
        largest = self.buckets[-1]
        if n > largest:
            return self._in_pieces(mel, n_new, stack(states), largest)
        bucket = self._bucket(bucket_for(n, self.buckets))
        self._load(bucket, mel, n_new, states)
        if bucket.graph is not None and bucket.outputs is not None:
            bucket.graph.replay()
            outputs = bucket.outputs
        else:
            outputs = fixed_shape_step(self.streaming, bucket.mel, bucket.n_new, bucket.state)
        return self._rows(outputs, n, copy=bucket.graph is not None or n < bucket.size)

    def _in_pieces(self, mel: Tensor, n_new: Tensor, state: EncoderState, piece: int) -> Outputs:
        """A batch larger than the largest bucket, as several steps of at most ``piece`` streams."""
        parts = []
        for i in range(0, mel.size(0), piece):
            size = min(piece, mel.size(0) - i)
            rows = replace(state, **{f.name: getattr(state, f.name).narrow(EncoderState.BATCH_DIM[f.name], i, size)
                                     for f in fields(EncoderState)})
            parts.append(self.step(mel[i : i + size], n_new[i : i + size], [rows]))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), stack([p[2] for p in parts])

    def _bucket(self, size: int) -> Bucket:
        bucket = self._buckets.get(size)
        if bucket is None:
            bucket = Bucket(
                size,
                torch.zeros(size, self.n_mels, self.mel_frames, device=self.device),
                torch.zeros(size, dtype=torch.long, device=self.device),
                self.streaming.init_state(size),
            )
            if self.use_graphs:
                self._capture(bucket)
            self._buckets[size] = bucket
        return bucket

    def _capture(self, bucket: Bucket) -> None:
        """Record the bucket's step into a CUDA graph (after two warm-up runs on a side stream, as CUDA
        graphs need); on failure, log why and run every bucket without graphs from then on."""
        args = (self.streaming, bucket.mel, bucket.n_new, bucket.state)
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    fixed_shape_step(*args)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                bucket.outputs = fixed_shape_step(*args)
            bucket.graph = graph
        except RuntimeError as exc:
            logger.warning("CUDA graph capture of the %d-stream encoder step failed (%s); running it without "
                           "graphs (engine.cuda_graphs = false silences this)", bucket.size, exc)
            self.use_graphs = False
            for other in self._buckets.values():
                other.graph, other.outputs = None, None
            bucket.graph, bucket.outputs = None, None

    def _load(self, bucket: Bucket, mel: Tensor, n_new: Tensor, states: Sequence[EncoderState]) -> None:
        """Copy the real rows into the bucket's first ``n`` rows; the rest keep what they hold."""
        n, m = mel.size(0), mel.size(2)
        if self.device.type == "cuda":
            host_mel, host_n = self._staging(n)
            host_mel[:, :, :m].copy_(mel)
            host_mel[:, :, m:].zero_()
            host_n.copy_(n_new)
            bucket.mel[:n].copy_(host_mel, non_blocking=True)
            bucket.n_new[:n].copy_(host_n, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            bucket.mel[:n, :, :m].copy_(mel)
            bucket.mel[:n, :, m:].zero_()
            bucket.n_new[:n].copy_(n_new)
        for f in fields(EncoderState):
            dim = EncoderState.BATCH_DIM[f.name]
            parts = [getattr(s, f.name) for s in states]
            # One cat into fresh memory, then one copy: cat straight into the (strided) rows would copy the
            # parts one kernel each.
            rows = parts[0] if len(parts) == 1 else torch.cat(parts, dim)
            getattr(bucket.state, f.name).narrow(dim, 0, n).copy_(rows)

    def _staging(self, n: int) -> tuple[Tensor, Tensor]:
        """The first ``n`` rows of the pinned host buffers, once the previous copy out of them is done."""
        if self._copied is not None:
            self._copied.synchronize()
        if self._host_mel is None or self._host_mel.size(0) < n:
            rows = bucket_for(n, self.buckets)
            self._host_mel = torch.zeros(rows, self.n_mels, self.mel_frames, pin_memory=True)
            self._host_n = torch.zeros(rows, dtype=torch.long, pin_memory=True)
        assert self._host_n is not None
        return self._host_mel[:n], self._host_n[:n]

    @staticmethod
    def _rows(outputs: Outputs, n: int, copy: bool) -> Outputs:
        """The first ``n`` rows of a step's outputs; copies when the buffers will be reused."""
        out, out_len, state = outputs

        def rows(t: Tensor, dim: int) -> Tensor:
            part = t.narrow(dim, 0, n)
            return part.clone() if copy else part

        new_state = replace(state, **{f.name: rows(getattr(state, f.name), EncoderState.BATCH_DIM[f.name])
                                      for f in fields(EncoderState)})
        out = out[:n].float() if out.dtype != torch.float32 else rows(out, 0)
        return out, rows(out_len, 0), new_state
