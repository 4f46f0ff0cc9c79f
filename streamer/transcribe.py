"""``streamer transcribe``: recognize audio files, offline or chunk by chunk as the daemon does.

The model comes from the same ``[model]`` settings as every other command (``--config``, ``--set``,
``STREAMER_MODEL__...``); ``--model``, ``--device``, ``--dtype``, ``--threads``, ``--att-context-size`` and
``--decoder`` override them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from streamer.config_args import (
    DEFAULT_MODEL,
    MODEL_FLAGS,
    DefaultsHelpFormatter,
    Key,
    add_settings_args,
    parse_context,
    settings_from_args,
)
from streamer.engine.factory import load_model
from streamer.errors import ConfigError, StreamerError

if TYPE_CHECKING:
    from streamer.asr.config import ContextSize
    from streamer.asr.model import AsrModel
    from streamer.asr.paraformer import ParaformerModel
    from streamer.engine.recognizer import Progress

TRANSCRIBE_FLAGS: dict[str, Key] = {**MODEL_FLAGS, "device": ("model", "device"), "dtype": ("model", "dtype"),
                                     "compile": ("model", "compile")}


def add_transcribe_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``streamer transcribe``."""
    t = sub.add_parser(
        "transcribe",
        help="recognize audio files (WAV, FLAC, MP3, Ogg; any rate and channel count)",
        description="Recognize audio files. Offline mode runs the encoder once over the whole file; "
        "streaming mode runs it chunk by chunk with caches, exactly as the daemon does, and gives "
        "the same result as offline mode with the same --att-context-size. The model flags override "
        "the [model] settings (--config, STREAMER_MODEL__<KEY>, --set), as for streamer serve.",
        formatter_class=DefaultsHelpFormatter,
    )
    t.add_argument("files", nargs="+", metavar="FILE", help="audio files")
    t.add_argument(
        "--model",
        default=None,
        help=f"model to load (model.spec; default: the bundled {DEFAULT_MODEL}); see the examples below",
    )
    t.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (model.device; default: cpu)")
    t.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="encoder precision (model.dtype; default: float32); half precision on CUDA only")
    t.add_argument("--threads", type=int, default=None, help="torch intra-op threads (model.threads; default: torch's)")
    t.add_argument("--compile", choices=("off", "offline", "offline-dynamic", "offline-graphs"), default=None,
                   help="torch.compile the offline encoder (model.compile; default: off): offline pads each file to "
                        "a length bucket (5 to 40 s) compiled on first use, longer files run eagerly; "
                        "offline-dynamic compiles one graph for all lengths; offline-graphs adds CUDA graphs "
                        "(CUDA only). Same tokens; pays only for many files of similar length (README, Benchmark)")
    t.add_argument("--mode", choices=("offline", "streaming", "buffered"), default="offline",
                   help="offline: one encoder pass; streaming: the cache-aware step the daemon runs; buffered: "
                   "NeMo's buffered streaming (what the daemon runs for a full-context model), see --buffer")
    t.add_argument("--buffer", type=parse_buffer, default=(10.0, 1.6, 1.6), metavar="LEFT,CHUNK,RIGHT",
                   help="with --mode buffered: seconds of left context, chunk and look-ahead (engine.buffer_*_s)")
    t.add_argument(
        "--att-context-size",
        type=parse_context,
        default=None,
        metavar="L,R",
        help="attention context [left,right] in 80 ms encoder frames; R is the look-ahead "
        "(70,13 = 1.04 s, 70,6 = 480 ms, 70,1 = 80 ms, 70,0 = none) (model.att_context_size; default: the "
        "model's first)",
    )
    t.add_argument(
        "--attention",
        choices=("model", "full", "local"),
        default="model",
        help="self-attention: the checkpoint's own (model), full context (full), or a sliding window of "
        "--att-context-size L,R frames each way (local; default window 128,128 as on NVIDIA's cards): "
        "memory and time then grow linearly, so an hour-long file goes through in one pass (offline mode)",
    )
    t.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress bar on stderr for files of a minute or more (auto: when stderr is a terminal)")
    t.add_argument("--decoder", choices=("tdt", "rnnt", "ctc"), default=None,
                   help="decoding head (model.decoder; default: the model's transducer, else CTC)")
    t.add_argument("--format", choices=("text", "json", "srt", "vtt"), default="text",
                   help="text: one line per file; json: one JSON object per file per line; "
                   "srt/vtt: subtitles from the word times (one file, or several with --output-dir)")
    t.add_argument("--output-dir", default=None, metavar="DIR",
                   help="write FILE's result to DIR/<name>.<txt|json|srt|vtt> instead of stdout")
    add_settings_args(t)
    t.set_defaults(func=cmd_transcribe)


def parse_buffer(text: str) -> tuple[float, float, float]:
    """``LEFT,CHUNK,RIGHT`` seconds."""
    try:
        left, chunk, right = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LEFT,CHUNK,RIGHT seconds, e.g. 10,1.6,1.6; got {text!r}") from None
    return left, chunk, right


LOCAL_WINDOW_DEFAULT = (128, 128)  # NVIDIA's long-audio setting for the parakeet cards
PROGRESS_MIN_S = 60.0


def switch_attention(model: AsrModel | ParaformerModel, attention: str, ctx: ContextSize | None) -> ContextSize:
    """Apply ``--attention`` to a loaded model; returns the context (or window) to run with."""
    if attention == "local":
        model.change_attention("rel_pos_local_attn", ctx or LOCAL_WINDOW_DEFAULT)
        return model.check_context(None)
    if attention == "full" and model.config.encoder.is_local_attention:
        model.change_attention("rel_pos", ctx)
        return model.check_context(None)
    return model.check_context(ctx)


@contextlib.contextmanager
def progress_bar(name: str, seconds: float, mode: str) -> Iterator[Progress | None]:
    """A tqdm bar on stderr over encoder layers and decoded frames, for long files (see ``--progress``)."""
    show = mode == "on" or (mode == "auto" and seconds >= PROGRESS_MIN_S and sys.stderr.isatty())
    if not show:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=100, desc=f"{os.path.basename(name)} ({seconds / 60:.1f} min)", unit="%",
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix} [{elapsed}<{remaining}]",
              file=sys.stderr) as bar:
        def update(stage: str, done: int, total: int) -> None:
            # the encoder is most of the work offline: its layers take the first 90%
            share = 90.0 * done / total if stage == "encoder" else 90.0 + 10.0 * done / max(total, 1)
            bar.set_postfix_str(f"{stage} {done}/{total}", refresh=False)
            bar.update(share - bar.n)

        yield update


def cmd_transcribe(args: argparse.Namespace) -> int:
    """Run ``streamer transcribe``: one result per file, printed or written to ``--output-dir``."""
    from streamer.asr.model import AsrModel
    from streamer.audio.io import load_audio
    from streamer.engine.recognizer import transcribe_offline, transcribe_streaming

    for f in args.files:  # fail fast, before loading a model, on files that do not exist
        if not os.path.exists(f):
            raise StreamerError(f"{f}: no such file")
    if args.format in ("srt", "vtt") and len(args.files) > 1 and not args.output_dir:
        raise ConfigError(f"--format {args.format} with several files needs --output-dir DIR")
    settings = settings_from_args(args, TRANSCRIBE_FLAGS).model
    model = load_model(settings)
    kind = model.check_decoder(settings.decoder)
    ctx = switch_attention(model, args.attention, settings.att_context_size)
    if args.mode == "streaming" and model.config.encoder.is_local_attention:
        raise ConfigError("--mode streaming needs a cache-aware model; local attention is for offline mode")
    if args.mode == "streaming" and model.config.model_class == "Paraformer":
        raise ConfigError("--mode streaming needs a cache-aware model; a Paraformer is full context and "
                          "non-autoregressive: use --mode offline (or buffered)")
    sr = model.config.features.sample_rate
    for f in args.files:
        audio = load_audio(f, sr)
        if args.mode == "streaming":
            assert isinstance(model, AsrModel)
            result = transcribe_streaming(model, audio, kind, ctx)
        elif args.mode == "buffered" and not isinstance(model, AsrModel):
            from streamer.engine.buffered_paraformer import transcribe_buffered_paraformer

            result = transcribe_buffered_paraformer(model, audio, *args.buffer)
        elif args.mode == "buffered":
            from streamer.engine.buffered import transcribe_buffered

            result = transcribe_buffered(model, audio, kind, *args.buffer)
        else:
            with progress_bar(f, len(audio) / sr, args.progress) as progress:
                result = transcribe_offline(model, audio, kind, ctx, progress)
        if args.format == "json":
            obj = {"file": f, **result.to_json(), "duration_s": round(len(audio) / sr, 3),
                   "mode": args.mode, "decoder": kind, "att_context_size": list(ctx)}
            out = json.dumps(obj, ensure_ascii=False)
        elif args.format in ("srt", "vtt"):
            from streamer.subtitles import build_cues, to_srt, to_vtt

            cues = build_cues(result.words)
            out = (to_srt if args.format == "srt" else to_vtt)(cues).rstrip("\n")
        else:
            out = result.text if len(args.files) == 1 or args.output_dir else f"{f}: {result.text}"
        if args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            ext = "txt" if args.format == "text" else args.format
            stem = os.path.splitext(os.path.basename(f))[0]
            with open(os.path.join(args.output_dir, f"{stem}.{ext}"), "w", encoding="utf-8") as fh:
                fh.write(out + "\n")
        else:
            print(out, flush=True)
    return 0
