"""onnxruntime as a third engine in ``streamer bench``: our streaming step exported, run as sherpa-onnx runs it.

The same random-weight encoder that ``bench`` times is exported with ``torch.onnx.export`` and run by
onnxruntime on the CPU execution provider in float32 and in onnxruntime's dynamic int8 (``quantize_dynamic``:
int8 weights for every MatMul with a constant operand, activations quantized per call). ONNX wants tensors in
and out, and the step's state is a dataclass (:class:`~streamer.asr.streaming.EncoderState`), so
:class:`SteadyStep` wraps :meth:`~streamer.asr.streaming.StreamingEncoder.step` for the case the benchmark
times: every stream continues with a full chunk and full caches. Its inputs are the mel chunk and the four
caches, its outputs the encoder frames and the four new caches; the batch axis is dynamic, so one export
serves every batch size. Before anything is timed :func:`max_abs_diff` runs onnxruntime and our step on the
same random chunk and random caches (a cache the export lost shows there).

Exporters: the dynamo exporter (``torch.export``) is tried first; on torch 2.13 it stops at the step's
data-dependent Python branches (``bool(tensor.any())`` in :mod:`streamer.asr`), so the TorchScript exporter
(``dynamo=False``) traces the steady-state path instead. Its own ``aten::unfold`` needs a static length and
builds an ONNX ``Loop``; :func:`_unfold_as_slices` replaces it for the export.

Shape legend (as in :mod:`streamer.asr.streaming`)::

    B streams in the batch   M mel frames (10 ms)   F mel bins   T encoder frames (80 ms)   D encoder width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   dk = D / H
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from streamer.asr import clocks
from streamer.asr.config import ContextSize
from streamer.asr.streaming import EncoderState, StreamingEncoder
from streamer.bench_table import Row, summarize

if TYPE_CHECKING:
    import onnxruntime

CACHE_NAMES = ("mel_tail", "attn_k", "attn_v", "conv_tail")  # the EncoderState tensors a steady step carries
INPUT_NAMES = ("mel", *CACHE_NAMES)
OUTPUT_NAMES = ("out", *(f"new_{name}" for name in CACHE_NAMES))
BATCH_AXIS = {"mel": 0, **{name: EncoderState.BATCH_DIM[name] for name in CACHE_NAMES}}
OPSET = 17
TOLERANCE = 1e-3  # largest |onnxruntime float32 - our step| accepted, over the output and every new cache
CHECK_BATCHES = (1, 3)
STEADY_MEL_SEEN = 1 << 30  # any count past the first window: every cache row holds audio
DTYPES = ("float32", "int8")


def onnx_importable() -> bool:
    """Whether onnxruntime and onnx import here (``--onnx auto``)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except Exception:
        return False
    return True


class SteadyStep(nn.Module):
    """Tensors in, tensors out: one cache-aware step with every stream continuing with a full chunk.

    ``forward(mel (B, F, chunk_mel_frames), mel_tail (B, F, s+1), attn_k (L, B, H, C, dk), attn_v (L, B, H, C, dk),
    conv_tail (L, B, K-1, D))`` returns ``(out (B, R+1, D), new_mel_tail, new_attn_k, new_attn_v, new_conv_tail)``.
    The bookkeeping fields of :class:`EncoderState` (``mel_seen``, ``attn_len``) are fixed at their steady-state
    values: full caches, past the first chunk.
    """

    def __init__(self, encoder: nn.Module, streaming: StreamingEncoder) -> None:
        super().__init__()
        self.encoder = encoder  # registers the weights; the StreamingEncoder only refers to them
        self.streaming = streaming

    def forward(self, mel: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        b = mel.size(0)
        st = self.streaming
        state = EncoderState(
            mel_seen=torch.full((b,), STEADY_MEL_SEEN, dtype=torch.long, device=mel.device),
            attn_len=torch.full((b,), st.cache_frames, dtype=torch.long, device=mel.device),
            **dict(zip(CACHE_NAMES, caches, strict=True)),
        )
        n_new = torch.full((b,), st.chunk_mel_frames, dtype=torch.long, device=mel.device)
        out, _, new = st.step(mel, n_new, state)
        return (out, *(getattr(new, name) for name in CACHE_NAMES))


def random_inputs(streaming: StreamingEncoder, batch: int, seed: int) -> dict[str, Tensor]:
    """A random mel chunk and random (not zero) caches for ``batch`` streams, keyed by :data:`INPUT_NAMES`."""
    g = torch.Generator().manual_seed(seed)
    state = streaming.init_state(batch, device=torch.device("cpu"), dtype=torch.float32)
    mel = torch.randn(batch, streaming.cfg.feat_in, streaming.chunk_mel_frames, generator=g)
    return {"mel": mel, **{n: torch.randn(getattr(state, n).shape, generator=g) for n in CACHE_NAMES}}


@dataclass
class Export:
    """An exported step: where it is and which exporter wrote it (and why the dynamo one did not)."""

    path: Path
    exporter: str  # "dynamo" or "torchscript"
    dynamo_error: str | None = None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Drop the exporters' and quantizer's warnings, logs and prints (graph dumps): the result says what matters."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def export_step(step: SteadyStep, path: Path, exporter: str = "auto") -> Export:
    """Write ``step`` as ONNX with a dynamic batch axis; ``exporter`` is auto, dynamo or torchscript.

    auto tries the dynamo exporter and falls back to the TorchScript one, saying why in the result.
    """
    args = tuple(random_inputs(step.streaming, 2, seed=0).values())
    dynamo_error = None
    if exporter in ("auto", "dynamo"):
        try:
            _export_dynamo(step, args, path)
            return Export(path, "dynamo")
        except Exception as exc:
            if exporter == "dynamo":
                raise
            dynamo_error = _first_cause(exc)
    _export_torchscript(step, args, path)
    return Export(path, "torchscript", dynamo_error)


def _first_cause(exc: Exception) -> str:
    """The line of a failed dynamo export that says why, and where in our code when it names a file."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    why = next((line for line in lines if "data-dependent" in line), lines[0] if lines else type(exc).__name__)
    why = re.sub(r"^<class '[\w.]*?(\w+)'>: ", r"\1: ", why).split(" (unhinted")[0]
    where = re.search(r'raised this error:\s+File "[^"]*?(streamer/[^"]+)", line (\d+)', text)
    return why + (f" at {where[1]}:{where[2]}" if where else "")


def _export_dynamo(step: SteadyStep, args: tuple[Tensor, ...], path: Path) -> None:
    batch = torch.export.Dim("batch")
    shapes = {"mel": {0: batch}, "caches": tuple({BATCH_AXIS[n]: batch} for n in CACHE_NAMES)}
    with _quiet(), torch.no_grad():
        torch.onnx.export(step, args, str(path), dynamo=True, input_names=list(INPUT_NAMES),
                          output_names=list(OUTPUT_NAMES), dynamic_shapes=shapes, opset_version=OPSET,
                          verbose=False, external_data=False)


def _export_torchscript(step: SteadyStep, args: tuple[Tensor, ...], path: Path) -> None:
    axes = {**{n: {a: "batch"} for n, a in BATCH_AXIS.items()},
            **{o: {BATCH_AXIS[i]: "batch"} for i, o in zip(INPUT_NAMES, OUTPUT_NAMES, strict=True)}}
    from torch.onnx import symbolic_helper

    unfold = symbolic_helper.parse_args("v", "i", "i", "i")(_unfold_as_slices)
    torch.onnx.register_custom_op_symbolic("aten::unfold", unfold, OPSET)
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(step, args, str(path), dynamo=False, input_names=list(INPUT_NAMES),
                              output_names=list(OUTPUT_NAMES), dynamic_axes=axes, opset_version=OPSET,
                              do_constant_folding=True)
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::unfold", OPSET)


def _unfold_as_slices(g: Any, x: Any, dim: int, size: int, step: int) -> Any:
    """``x.unfold(dim, size, 1)`` as ``size`` shifted slices stacked on a new last axis.

    Slice ``i`` keeps ``x[i : len - (size - 1 - i)]`` along ``dim`` (negative ends count from the end), so no
    length needs to be known when exporting; for a short chunk that is the work of the depthwise conv it stands for.
    """
    if step != 1:
        raise ValueError(f"unfold with step {step} is not exported (only step 1)")

    def const(value: int) -> Any:
        return g.op("Constant", value_t=torch.tensor([value]))

    parts = []
    for i in range(size):
        end = i - (size - 1) if i < size - 1 else sys.maxsize
        part = g.op("Slice", x, const(i), const(end), const(dim))
        parts.append(g.op("Unsqueeze", part, const(-1)))
    return g.op("Concat", *parts, axis_i=-1)


def quantize_int8(src: Path, dst: Path) -> None:
    """onnxruntime's dynamic int8: QInt8 weights for every MatMul with a constant operand."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])


def open_session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    """A CPU session as a sherpa-onnx user opens one: ``threads`` intra-op threads, sequential execution."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def max_abs_diff(session: onnxruntime.InferenceSession, step: SteadyStep, batch: int, seed: int = 7) -> float:
    """Largest |onnxruntime - our step| over the output and every new cache, on random input and caches."""
    feeds = random_inputs(step.streaming, batch, seed)
    with torch.inference_mode():
        ours = step(*feeds.values())
    theirs = session.run(list(OUTPUT_NAMES), {n: t.numpy() for n, t in feeds.items()})
    return max(float((torch.from_numpy(t) - o).abs().max()) for t, o in zip(theirs, ours, strict=True))


@dataclass
class OnnxEngine:
    """One look-ahead's exported step, its sessions by weight type and their deviation from our step."""

    ctx: ContextSize
    streaming: StreamingEncoder
    params: int
    threads: int
    export: Export
    sessions: dict[str, onnxruntime.InferenceSession] = field(default_factory=dict)
    deviation: dict[str, float] = field(default_factory=dict)  # max over CHECK_BATCHES

    @property
    def is_correct(self) -> bool:
        """Whether float32 onnxruntime equals our step within :data:`TOLERANCE`."""
        return self.deviation.get("float32", float("inf")) < TOLERANCE

    def summary(self) -> str:
        """One line: exporter, and how far each weight type is from our float32 step."""
        ctx = f"[{self.ctx[0]},{self.ctx[1]}]"
        batches = ",".join(map(str, CHECK_BATCHES))
        how = self.export.exporter + (f" (dynamo exporter failed: {self.export.dynamo_error})"
                                      if self.export.dynamo_error else "")
        f32 = self.deviation["float32"]
        verdict = "equals our step" if self.is_correct else "DIFFERS from our step"
        line = (f"onnxruntime {ctx}: exported with {how}; float32 {verdict} within {TOLERANCE:g} "
                f"(max abs diff {f32:.2e} at batch {batches}, output and caches)")
        if "int8" in self.deviation:
            line += f"; int8 deviates by {self.deviation['int8']:.2e} (reported, not checked)"
        return line


def prepare(encoder: nn.Module, ctx: ContextSize, directory: Path, threads: int,
            dtypes: tuple[str, ...] = DTYPES, exporter: str = "auto") -> OnnxEngine:
    """Export ``encoder``'s steady step at ``ctx`` into ``directory``, quantize it, open and check the sessions."""
    streaming = encoder.streaming(ctx)
    step = SteadyStep(encoder, streaming).eval()
    name = f"encoder_step_{ctx[0]}_{ctx[1]}"
    export = export_step(step, directory / f"{name}.onnx", exporter)
    paths = {"float32": export.path}
    if "int8" in dtypes:
        paths["int8"] = directory / f"{name}.int8.onnx"
        quantize_int8(export.path, paths["int8"])
    params = sum(p.numel() for p in encoder.parameters())
    engine = OnnxEngine(ctx, streaming, params, threads, export)
    for dtype, path in paths.items():
        engine.sessions[dtype] = open_session(path, threads)
        engine.deviation[dtype] = max(max_abs_diff(engine.sessions[dtype], step, b) for b in CHECK_BATCHES)
    return engine


def measure_onnx(engine: OnnxEngine, dtype: str, streams: int, steps: int, warmup: int) -> Row:
    """Time ``steps`` steady steps of ``streams`` streams, feeding each step's caches into the next.

    The same schedule as our step in ``bench``: the same random chunk every step, caches starting at zero.
    Inputs and outputs stay onnxruntime values between steps, as a C++ caller keeps them.
    """
    import onnxruntime as ort

    st = engine.streaming
    state = st.init_state(streams, device=torch.device("cpu"), dtype=torch.float32)
    mel = torch.randn(streams, st.cfg.feat_in, st.chunk_mel_frames, generator=torch.Generator().manual_seed(1))
    arrays = [mel.numpy(), *(getattr(state, n).numpy() for n in CACHE_NAMES)]  # kept alive: OrtValues share them
    feeds = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in zip(INPUT_NAMES, arrays, strict=True)}
    session = engine.sessions[dtype]
    names = list(OUTPUT_NAMES)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        outs = session.run_with_ort_values(names, feeds)
        dt = time.perf_counter() - t0
        feeds = {"mel": feeds["mel"], **dict(zip(CACHE_NAMES, outs[1:], strict=True))}
        if i >= warmup:
            times.append(dt)
    chunk_s = st.chunk_mel_frames * clocks.MEL_FRAME_S
    return summarize("onnxruntime", "encoder", dtype, engine.params, engine.ctx, chunk_s, streams, times,
                     engine.threads, max_abs_diff=float(f"{engine.deviation[dtype]:.3g}"))
