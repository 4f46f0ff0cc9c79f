"""``streamer bench --device cuda``: the streaming encoder step on a GPU, per batch size and precision.

The same measurement as the CPU rows of :mod:`streamer.bench` (a steady-state [L,R] step of the 114M
configuration with full caches, random weights), taken the way the daemon runs it on a GPU: new mel
frames come from the CPU through pinned memory, the step is replayed as a CUDA graph of the batch's
bucket (:class:`~streamer.engine.cuda_graphs.BucketedEncoder`, ``--cuda-graphs off`` for the plain step),
and each timed step ends with ``torch.cuda.synchronize()``, so the times are wall-clock latency per step.
The model is built once per precision and reused for every batch size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from streamer.asr import clocks
from streamer.bench_model import LARGE_DECODER, LARGE_STREAMING, calibrate_emission


def build_large(device: Any, dtype: Any, with_decoder: bool) -> tuple[Any, Any, int, int]:
    """The bench's 114M encoder (seed 0) on ``device`` in ``dtype``, and its TDT decoder in float32 when asked:
    ``(encoder, greedy or None, encoder parameters, decoder parameters)``."""
    import torch

    from streamer.asr.config import EncoderConfig, TransducerConfig
    from streamer.asr.encoder import FastConformerEncoder

    torch.manual_seed(0)
    cfg = EncoderConfig(**LARGE_STREAMING)
    with torch.device(device):
        enc = FastConformerEncoder(cfg).eval()
        params, dec_params = sum(p.numel() for p in enc.parameters()), 0
        greedy = None
        if with_decoder:
            from streamer.asr.transducer import GreedyTransducerDecoder, RNNTDecoder, RNNTJoint

            tcfg = TransducerConfig(**LARGE_DECODER)
            dec, joint = RNNTDecoder(tcfg).eval(), RNNTJoint(tcfg, cfg.d_model).eval()
            dec_params = sum(p.numel() for p in dec.parameters()) + sum(p.numel() for p in joint.parameters())
            greedy = GreedyTransducerDecoder(dec, joint)
    if dtype is torch.float32 and torch.device(device).type == "cuda":
        from streamer.asr.precision import exact_float32_on_cuda

        exact_float32_on_cuda()  # as the daemon runs float32
    if greedy is not None:  # any buffer made from CPU data
        greedy.decoder.to(device)
        greedy.joint.to(device)
    return enc.to(device=device, dtype=dtype), greedy, params, dec_params


def measure_device(
    encoder: Any, greedy: Any, params: int, ctx: tuple[int, int], streams: int, steps: int, warmup: int,
    dtype_name: str, graphs: bool, tokens_per_s: float = 4.0,
) -> dict[str, Any]:
    """p50/p95 per step and RTFx of ``streams`` streams continuing with full chunks; a row for
    :func:`streamer.bench.summarize` (its arguments, as a dict)."""
    import torch

    from streamer.engine.cuda_graphs import BucketedEncoder

    device = next(encoder.parameters()).device
    streaming = encoder.streaming(ctx)
    state = streaming.init_state(streams)
    state = replace(state, attn_len=torch.full((streams,), streaming.cache_frames, device=device),
                    mel_seen=torch.full((streams,), 10_000, device=device))
    chunk = streaming.chunk_mel_frames
    mel = torch.randn(streams, encoder.cfg.feat_in, chunk, generator=torch.Generator().manual_seed(1))
    n_new = torch.full((streams,), chunk)
    # graphs on the CPU (tests): the same bucketed step, run without capture
    runner = BucketedEncoder(streaming, streams, use_graphs=device.type == "cuda") if graphs else None

    def encode(state: Any) -> tuple[Any, Any, Any]:
        if runner is not None:
            return runner.step(mel, n_new, [state])
        out, out_len, new = streaming.step(mel.to(device, streaming.dtype), n_new.to(device), state)
        return out.float(), out_len, new

    decode: Callable[[Any, Any], None] | None = None
    if greedy is not None:
        with torch.inference_mode():
            probe, probe_len, _ = encode(state)
        if tokens_per_s > 0:
            frame_s = clocks.encoder_frame_s(clocks.MEL_FRAME_S, encoder.cfg.subsampling_factor)
            calibrate_emission(greedy, probe, probe_len, tokens_per_s * frame_s)
        dstate = [greedy.init_state(streams, device)]

        def decode(out: Any, out_len: Any) -> None:
            _, dstate[0] = greedy.step(out, out_len, dstate[0])

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + steps):  # the first step of a bucket captures its graph (untimed warm-up)
            sync()
            t0 = time.perf_counter()
            out, out_len, state = encode(state)
            if decode is not None:
                decode(out, out_len)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    impl = "streamer/" + ("eager" if runner is None else "graphs" if runner.use_graphs else "buckets")
    return {"impl": impl, "scope": "encoder+tdt" if greedy is not None else "encoder", "dtype": dtype_name,
            "params": params, "ctx": ctx, "chunk_s": chunk * clocks.MEL_FRAME_S, "streams": streams,
            "times": times, "threads": torch.get_num_threads()}


def cuda_rows(args: Any, contexts: list[tuple[int, int]], streams_list: list[int], dtypes: list[str],
              graph_modes: list[bool]) -> Iterator[dict[str, Any]]:
    """Measure every (precision, look-ahead, batch, graphs) on the device ``args.device``, yielding each
    measurement (:func:`measure_device`'s dict plus ``device``). Encoder+TDT rows (float32 decoder) come unless
    ``args.no_decoder``.

    Raises:
        ConfigError: the device cannot run here, or a precision it cannot run (int8 is the CPU's).
    """
    import torch

    from streamer.asr.precision import DTYPES, check_device, check_dtype
    from streamer.errors import ConfigError

    device = check_device(args.device)
    for name in dtypes:
        if name not in DTYPES:
            raise ConfigError(f"--dtypes {name}: on {device} use float32, float16 or bfloat16")
        encoder, greedy, params, dec_params = build_large(device, check_dtype(name, device), not args.no_decoder)
        for ctx in contexts:
            for n in streams_list:
                for graphs in graph_modes:
                    yield {**measure_device(encoder, None, params, ctx, n, args.steps, args.warmup, name, graphs),
                           "device": str(device)}
                    if greedy is not None:
                        yield {**measure_device(encoder, greedy, params + dec_params, ctx, n, args.steps,
                                                args.warmup, name, graphs, args.tokens_per_s), "device": str(device)}
        del encoder, greedy
        if device.type == "cuda":
            torch.cuda.empty_cache()
