"""``streamer bench``: per-chunk latency and real-time factor of cache-aware streaming.

Measures our encoder step (and the full step with greedy decoding) for a configuration shaped like
NVIDIA's 114M-parameter streaming FastConformer (17 layers, d_model 512, 8 heads, random weights),
at several look-aheads and batch sizes, and NeMo 3.0.0's ``cache_aware_stream_step`` on the same
configuration side by side when NeMo can be imported (here or in ``--nemo-python``), and the same
model's step exported to ONNX and run by onnxruntime when it can be imported (:mod:`streamer.bench_onnx`).
Speed is only ever reported, never asserted: compare ratios from one run, the machines are shared and noisy.
The model measured (and ``--save-model``) is :mod:`streamer.bench_model`'s.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from streamer.asr import clocks
from streamer.asr.config import EncoderConfig
from streamer.bench_model import LARGE_DECODER, calibrate_emission, encoder_settings, random_encoder, save_large_model
from streamer.bench_table import Row, format_table, row_of, summarize
from streamer.config_args import DefaultsHelpFormatter, add_settings_args, parse_context
from streamer.config_args import settings_from_args as load_settings_from_args
from streamer.errors import ConfigError

DEFAULT_CONTEXTS = "70,1;70,13"


def measure_streamer(ctx, streams, steps, warmup, dtype_name, with_decoder, tokens_per_s=4.0, encoder=None) -> Row:
    """Our steady-state step: full caches, every stream continuing with a full chunk.

    ``encoder``: overrides of the 114M configuration (``--encoder-set``)."""
    import torch

    from streamer.asr.config import TransducerConfig

    dtype = torch.float32 if dtype_name == "int8" else getattr(torch, dtype_name)
    enc = random_encoder(encoder)
    enc_cfg = enc.cfg
    params = sum(p.numel() for p in enc.parameters())
    greedy = None
    if with_decoder:
        from streamer.asr.transducer import GreedyTransducerDecoder, RNNTDecoder, RNNTJoint

        tcfg = TransducerConfig(**LARGE_DECODER)
        dec, joint = RNNTDecoder(tcfg).eval(), RNNTJoint(tcfg, enc_cfg.d_model).eval()
        params += sum(p.numel() for p in dec.parameters()) + sum(p.numel() for p in joint.parameters())
        greedy = GreedyTransducerDecoder(dec, joint)
    enc = enc.to(dtype)
    if dtype_name == "int8":
        from streamer.asr.quantize import quantize_linears_int8

        enc = quantize_linears_int8(enc)
    streaming = enc.streaming(ctx)
    state = streaming.init_state(streams)
    state = replace(state, attn_len=torch.full((streams,), streaming.cache_frames),
                    mel_seen=torch.full((streams,), 10_000))
    chunk = streaming.chunk_mel_frames
    mel = torch.randn(streams, enc_cfg.feat_in, chunk, generator=torch.Generator().manual_seed(1)).to(dtype)
    n_new = torch.full((streams,), chunk)
    if greedy is not None and tokens_per_s > 0:
        with torch.inference_mode():  # one untimed step, also the first of the warm-up
            probe, probe_len, state = streaming.step(mel, n_new, state)
        frame_s = clocks.encoder_frame_s(clocks.MEL_FRAME_S, enc_cfg.subsampling_factor)
        calibrate_emission(greedy, probe.float(), probe_len, tokens_per_s * frame_s)
    dstate = greedy.init_state(streams) if greedy else None
    times = []
    with torch.inference_mode():
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            out, out_len, state = streaming.step(mel, n_new, state)
            if greedy is not None:
                _, dstate = greedy.step(out.float(), out_len, dstate)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt)
    chunk_s = chunk * clocks.MEL_FRAME_S
    scope = "encoder+tdt" if with_decoder else "encoder"
    return summarize("streamer", scope, dtype_name, params, ctx, chunk_s, streams, times,
                     torch.get_num_threads())


def measure_nemo(ctx, streams, steps, warmup, encoder=None) -> Row:
    """NeMo 3.0.0's ``cache_aware_stream_step`` on the same configuration (random weights)."""
    import torch
    from nemo.collections.asr.modules import ConformerEncoder

    torch.manual_seed(0)
    c = encoder_settings(encoder)
    enc = ConformerEncoder(
        feat_in=c["feat_in"], n_layers=c["n_layers"], d_model=c["d_model"], n_heads=c["n_heads"],
        ff_expansion_factor=c["ff_expansion_factor"], subsampling="dw_striding",
        subsampling_factor=c["subsampling_factor"], subsampling_conv_channels=c["subsampling_conv_channels"],
        causal_downsampling=True, self_attention_model="rel_pos", xscaling=True, untie_biases=True,
        conv_kernel_size=c["conv_kernel_size"], conv_norm_type="layer_norm", conv_context_size="causal",
        att_context_size=[list(x) for x in c["att_context_sizes"]], att_context_style="chunked_limited",
        dropout=0.0, dropout_pre_encoder=0.0, dropout_emb=0.0, dropout_att=0.0,
    ).eval()
    params = sum(p.numel() for p in enc.parameters())
    enc.set_default_att_context_size(list(ctx))
    enc.setup_streaming_params()
    cfg = enc.streaming_cfg
    cache_ch, cache_t, cache_len = enc.get_initial_cache_state(batch_size=streams)
    later = cfg.chunk_size[1] + cfg.pre_encode_cache_size[1]
    x = torch.randn(streams, c["feat_in"], later, generator=torch.Generator().manual_seed(1))
    x_len = torch.full((streams,), later)
    cache_len = torch.full_like(cache_len, cfg.last_channel_cache_size)
    times = []
    with torch.inference_mode():
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            out = enc.cache_aware_stream_step(
                processed_signal=x, processed_signal_length=x_len, cache_last_channel=cache_ch,
                cache_last_time=cache_t, cache_last_channel_len=cache_len, keep_all_outputs=False,
                drop_extra_pre_encoded=cfg.drop_extra_pre_encoded,
            )
            cache_ch, cache_t, cache_len = out[2], out[3], out[4]
            dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt)
    chunk_s = cfg.chunk_size[1] * clocks.MEL_FRAME_S
    return summarize("nemo", "encoder", "float32", params, ctx, chunk_s, streams, times,
                     torch.get_num_threads())


def nemo_importable() -> bool:
    try:
        import nemo  # noqa: F401
    except Exception:
        return False
    return True


def run_nemo_worker(python: str, ctx, streams, steps, warmup, threads, encoder=None) -> Row:
    """Run :func:`measure_nemo` under another interpreter (the NeMo venv) and read its JSON row."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [python, "-m", "streamer.bench", "--nemo-worker", f"{ctx[0]},{ctx[1]}", str(streams), str(steps),
           str(warmup), str(threads), json.dumps(encoder or {})]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"NeMo worker failed: {proc.stderr.strip().splitlines()[-1:]}")
    return Row(**json.loads(proc.stdout.strip().splitlines()[-1]))


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``streamer bench``."""
    p = sub.add_parser(
        "bench",
        help="measure per-chunk latency and real-time factor (prints a table)",
        description="Cache-aware streaming benchmark on a 114M-parameter FastConformer configuration "
        "(17 layers, d_model 512, 8 heads, random weights): per-chunk latency p50/p95 and real-time "
        "factor (audio seconds per compute second, all streams together), with NeMo 3.0.0 side by "
        "side when it can be imported here or with --nemo-python, and the same model's step in onnxruntime "
        "(float32 and dynamic int8) when onnxruntime and onnx can be imported.",
        formatter_class=DefaultsHelpFormatter,
    )
    add_bench_args(p)
    p.set_defaults(func=cmd_bench)


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """The options of ``streamer bench`` (and of ``python -m streamer.bench``)."""
    p.add_argument("--att-context-sizes", default=None,
                   help="look-aheads to measure, ';'-separated (default: model.att_context_size when set, "
                   f"else {DEFAULT_CONTEXTS})")
    p.add_argument("--streams", default="1,8,32", help="batch sizes (concurrent streams)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: model.threads when set, else all cores)")
    p.add_argument("--dtypes", default=None,
                   help="our weight types: float32, bfloat16, int8 (int8 weights, bf16 activations); on CUDA "
                        "float32, float16, bfloat16 (default: float32,int8 on the CPU, all three on CUDA)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: model.device); CUDA rows time the step as the daemon runs "
                        "it there: pinned copies and CUDA graphs per batch bucket, see --cuda-graphs")
    p.add_argument("--cuda-graphs", choices=("on", "off", "both"), default="on",
                   help="on CUDA: replay the step as CUDA graphs (on), run it op by op (off), or both side by side")
    p.add_argument("--no-decoder", action="store_true", help="skip the encoder+TDT rows")
    p.add_argument("--tokens-per-s", type=float, default=4.0,
                   help="labels per second of audio the random-weight decoder is biased to emit, about "
                        "the rate of English speech with a 1024-piece vocabulary; 0 leaves the random "
                        "joint alone, which emits max_symbols (10) labels on every frame: the worst case")
    p.add_argument("--nemo", choices=("auto", "off"), default="auto",
                   help="auto: include NeMo when importable here or via --nemo-python")
    p.add_argument("--nemo-python", default=os.environ.get("STREAMER_NEMO_PYTHON"),
                   help="python of a venv with nemo_toolkit[asr]==3.0.0 (env STREAMER_NEMO_PYTHON)")
    p.add_argument("--onnx", choices=("auto", "off"), default="auto",
                   help="auto: export the same model's step to ONNX and time it in onnxruntime (float32 and "
                        "dynamic int8) when onnxruntime and onnx can be imported")
    p.add_argument("--onnx-dir", type=Path, default=None,
                   help="keep the exported .onnx files here (default: a temporary folder, removed afterwards)")
    p.add_argument("--encoder-set", action="append", default=[], metavar="KEY=VALUE",
                   help="change one setting of the 114M encoder configuration, e.g. n_layers=6 (repeatable; "
                        "KEY a field of EncoderConfig, VALUE a Python literal)")
    p.add_argument("--probe-wav", default=None,
                   help="with --save-model on a machine without espeak-ng: speech to pace the decoder on")
    p.add_argument("--offline", action="store_true",
                   help="instead: offline RTFx of a parakeet-tdt-0.6b-shaped model (random weights) on a batch of "
                        "long utterances (--offline-batch, --utterance-s), features and decoding included")
    p.add_argument("--offline-batch", type=int, default=64, help="with --offline: utterances per batch")
    p.add_argument("--utterance-s", type=float, default=20.0, help="with --offline: seconds per utterance")
    p.add_argument("--offline-layers", type=int, default=None,
                   help="with --offline: encoder layers instead of the model's 24 (a quick run)")
    p.add_argument("--offline-compile", default="off", metavar="MODES",
                   help="with --offline: also time the torch.compile'd encoder (model.compile) on the same model and "
                        "inputs, each right after the eager row: offline (length buckets), offline-dynamic, "
                        "offline-graphs (CUDA graphs, CUDA only), comma-separated, or all; first_call_s shows "
                        "each row's compile plus one batch")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--save-model", metavar="PATH.nemo",
                   help="instead of measuring, write this 114M configuration as a .nemo with random weights, "
                        "a 1024-piece tokenizer and the decoder paced by --tokens-per-s, for `streamer loadtest "
                        "--model PATH.nemo` (sizing a box for NVIDIA's large streaming model)")
    add_settings_args(p)


def parse_contexts(text: str | None, setting: tuple[int, int] | None) -> list[tuple[int, int]]:
    """``--att-context-sizes`` ("70,1;70,13"); without it ``model.att_context_size`` when set, else the defaults.

    Raises:
        ConfigError: a look-ahead is not LEFT,RIGHT.
    """
    if text is None and setting is not None:
        return [setting]
    try:
        return [parse_context(c) for c in (text or DEFAULT_CONTEXTS).split(";") if c]
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"--att-context-sizes: {exc}") from None


def parse_encoder_overrides(items: list[str]) -> dict[str, Any]:
    """``--encoder-set KEY=VALUE`` items as a dict of :class:`EncoderConfig` fields.

    Raises:
        ConfigError: an item is not KEY=VALUE, names no encoder setting or has no literal value.
    """
    known = {f.name for f in fields(EncoderConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise ConfigError(f"--encoder-set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        try:
            out[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise ConfigError(f"--encoder-set {item!r}: {text!r} is not a Python literal (e.g. 6, 'layer_norm', "
                              "((70, 1),))") from None
    try:
        EncoderConfig(**encoder_settings(out))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--encoder-set: {exc}") from None
    return out


@contextlib.contextmanager
def onnx_workdir(path: Path | None) -> Iterator[Path]:
    """``--onnx-dir`` (created, kept) or a temporary folder removed afterwards."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="streamer-onnx-") as tmp:
        yield Path(tmp)


def ratios(rows: list[Row], impl: str) -> str:
    """Our float32 encoder step against ``impl``'s float32 rows of the same look-ahead and batch size."""
    out = []
    for r in rows:
        if r.impl == impl and r.dtype == "float32":
            ours = [o for o in rows if o.impl == "streamer" and o.scope == "encoder" and o.dtype == "float32"
                    and o.att_context_size == r.att_context_size and o.streams == r.streams]
            if ours:
                out.append(f"[{r.att_context_size}] x{r.streams}: latency {r.p50_ms / ours[0].p50_ms:.1f}x, "
                           f"throughput {ours[0].rtfx_total / r.rtfx_total:.1f}x")
    return "; ".join(out)


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    if args.save_model:
        print(save_large_model(args.save_model, args.tokens_per_s or 4.0, args.probe_wav))
        return 0
    model = load_settings_from_args(args, {"device": ("model", "device")}).model  # bench builds its own model
    contexts = parse_contexts(args.att_context_sizes, model.att_context_size)
    streams_list = [int(s) for s in args.streams.split(",") if s]
    overrides = parse_encoder_overrides(args.encoder_set)
    threads = args.threads or model.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    on_cuda = model.device.startswith("cuda")
    use_nemo = args.nemo == "auto" and not on_cuda and (nemo_importable() or bool(args.nemo_python))
    from streamer import bench_onnx

    use_onnx = args.onnx == "auto" and not on_cuda and not args.offline and bench_onnx.onnx_importable()
    rows: list[Row] = []
    notes: list[str] = []
    status = 0

    def emit(row: Row) -> None:
        rows.append(row)
        if args.format == "json":
            print(json.dumps(asdict(row)), flush=True)
        else:
            print(f"  measured {row.impl} {row.scope} {row.dtype} [{row.att_context_size}] x{row.streams}: "
                  f"p50 {row.p50_ms} ms", file=sys.stderr, flush=True)

    if args.offline:
        from streamer.bench_offline import offline_rows

        for r in offline_rows(args, model.device, (args.dtypes or "float32").split(",")):
            emit(row_of(r))
        contexts = []  # measured
    elif on_cuda:
        from streamer.bench_gpu import cuda_rows

        args.device = model.device
        modes = {"on": [True], "off": [False], "both": [True, False]}[args.cuda_graphs]
        for r in cuda_rows(args, contexts, streams_list, (args.dtypes or "float32,float16,bfloat16").split(","),
                           modes):
            emit(row_of(r))
        contexts = []  # measured
    with onnx_workdir(args.onnx_dir if use_onnx else None) as onnx_dir:
        for ctx in contexts:
            engine = None
            if use_onnx:
                engine = bench_onnx.prepare(random_encoder(overrides), ctx, onnx_dir, threads)
                notes.append(engine.summary())
                print(f"  {notes[-1]}", file=sys.stderr, flush=True)
                if not engine.is_correct:
                    status, engine = 1, None  # a wrong export is not timed; the exit status says so
            for n in streams_list:
                for dt in (args.dtypes or "float32,int8").split(","):
                    emit(measure_streamer(ctx, n, args.steps, args.warmup, dt, with_decoder=False, encoder=overrides))
                if not args.no_decoder:
                    emit(measure_streamer(ctx, n, args.steps, args.warmup, "float32", with_decoder=True,
                                         tokens_per_s=args.tokens_per_s, encoder=overrides))
                if use_nemo:
                    if nemo_importable():
                        emit(measure_nemo(ctx, n, args.steps, args.warmup, overrides))
                    else:
                        emit(run_nemo_worker(args.nemo_python, ctx, n, args.steps, args.warmup, threads, overrides))
                if engine is not None:
                    for dt in engine.sessions:
                        emit(bench_onnx.measure_onnx(engine, dt, n, args.steps, args.warmup))
    if args.format == "table":
        print(format_table(rows))
        if not use_nemo:
            print("(NeMo not importable: pass --nemo-python /path/to/nemo-venv/bin/python for side-by-side rows)")
        if args.onnx == "auto" and not use_onnx:
            print("(onnxruntime not importable: pip install 'streamer[onnx]' for onnxruntime rows)")
        print("\n".join(notes))
        for impl, name in (("nemo", "NeMo"), ("onnxruntime", "onnxruntime")):
            if line := ratios(rows, impl):
                print(f"streamer vs {name} (float32 encoder step, same run; above 1x streamer is faster): {line}")
    return status


def _nemo_worker(argv: list[str]) -> None:
    import torch

    ctx = tuple(int(v) for v in argv[0].split(","))
    streams, steps, warmup, threads = (int(v) for v in argv[1:5])
    encoder = json.loads(argv[5]) if len(argv) > 5 else None
    torch.set_num_threads(threads)
    row = measure_nemo(ctx, streams, steps, warmup, encoder)
    print(json.dumps(asdict(row)))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--nemo-worker":
        _nemo_worker(sys.argv[2:])
    else:
        parser = argparse.ArgumentParser(prog="python -m streamer.bench", description="the same as streamer bench")
        add_bench_args(parser)
        sys.exit(cmd_bench(parser.parse_args()))
