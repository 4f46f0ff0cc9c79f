"""Command line: ``streamer transcribe | bench | ...``.

``main(argv) -> int`` is the console script and what tests call. Errors that streamer raises on
purpose print one line (``streamer: error: ...``) and exit 2; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from streamer import __version__
from streamer.errors import ConfigError, StreamerError

logger = logging.getLogger("streamer")

DEFAULT_MODEL = "streamer-tdt-small"

EPILOG = """\
examples:
  streamer transcribe hello.wav                         default model, offline, plain text
  streamer transcribe a.wav b.flac --format json        one JSON object per file per line
  streamer transcribe talk.mp3 --mode streaming --att-context-size 70,1
  streamer transcribe talk.mp3 --format srt > talk.srt   subtitles from the word times
  streamer transcribe x.wav --model nvidia/stt_en_fastconformer_hybrid_large_streaming_multi --decoder ctc
  streamer bench                                        latency and real-time factor table
  streamer loadtest --streams 1,2,4,8 --att-context-size 70,1   live streams this box holds

--model takes a .nemo file, a Hugging Face model directory (config.json + model.safetensors),
a name from models/registry.toml, or a Hugging Face id (downloaded once, then cached).
"""


def parse_context(text: str) -> tuple[int, int]:
    """'70,1' or '[70,1]' -> (70, 1)."""
    try:
        left, right = (int(v) for v in text.strip("[]() ").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LEFT,RIGHT such as 70,1; got {text!r}") from None
    return left, right


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help=f"model to load (default: the bundled {DEFAULT_MODEL}); see the examples below",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamer",
        description="Real-time speech recognition: cache-aware streaming FastConformer with TDT, "
        "RNNT and CTC decoding, NeMo-compatible.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"streamer {__version__}")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default) or ERROR")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "transcribe",
        help="recognize audio files (WAV, FLAC, MP3, Ogg; any rate and channel count)",
        description="Recognize audio files. Offline mode runs the encoder once over the whole file; "
        "streaming mode runs it chunk by chunk with caches, exactly as the daemon does, and gives "
        "the same result as offline mode with the same --att-context-size.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t.add_argument("files", nargs="+", metavar="FILE", help="audio files")
    add_model_args(t)
    t.add_argument("--mode", choices=("offline", "streaming"), default="offline")
    t.add_argument(
        "--att-context-size",
        type=parse_context,
        default=None,
        metavar="L,R",
        help="attention context [left,right] in 80 ms encoder frames; R is the look-ahead "
        "(70,13 = 1.04 s, 70,6 = 480 ms, 70,1 = 80 ms, 70,0 = none). Default: the model's first",
    )
    t.add_argument("--decoder", choices=("tdt", "rnnt", "ctc"), default=None,
                   help="decoding head (default: the model's transducer, else CTC)")
    t.add_argument("--format", choices=("text", "json", "srt", "vtt"), default="text",
                   help="text: one line per file; json: one JSON object per file per line; "
                   "srt/vtt: subtitles from the word times (one file, or several with --output-dir)")
    t.add_argument("--output-dir", default=None, metavar="DIR",
                   help="write FILE's result to DIR/<name>.<txt|json|srt|vtt> instead of stdout")
    t.set_defaults(func=cmd_transcribe)

    from streamer.bench import add_bench_parser
    from streamer.loadtest import add_loadtest_parser
    from streamer.mic_demo import add_mic_parser
    from streamer.service import add_serve_parser
    from streamer.settings import add_config_parser

    add_serve_parser(sub)
    add_mic_parser(sub)
    add_config_parser(sub)
    add_bench_parser(sub)
    add_loadtest_parser(sub)
    from streamer.training.cli import add_training_parsers

    add_training_parsers(sub)
    return parser


def load_model(spec: str | None, device: str = "cpu", threads: int | None = None):
    """Load a model by spec (None = the bundled default), with a clear error when it is missing."""
    import torch

    from streamer.asr.model import AsrModel

    if threads:
        torch.set_num_threads(threads)
    model = AsrModel.load(spec or DEFAULT_MODEL)
    return model.to_device(device)


def cmd_transcribe(args: argparse.Namespace) -> int:
    from streamer.audio.io import load_audio
    from streamer.engine.recognizer import transcribe_offline, transcribe_streaming

    for f in args.files:  # fail fast, before loading a model, on files that do not exist
        if not os.path.exists(f):
            raise StreamerError(f"{f}: no such file")
    if args.format in ("srt", "vtt") and len(args.files) > 1 and not args.output_dir:
        raise ConfigError(f"--format {args.format} with several files needs --output-dir DIR")
    model = load_model(args.model, args.device, args.threads)
    kind = model.check_decoder(args.decoder)
    ctx = model.check_context(args.att_context_size)
    run = transcribe_streaming if args.mode == "streaming" else transcribe_offline
    sr = model.config.features.sample_rate
    for f in args.files:
        audio = load_audio(f, sr)
        result = run(model, audio, kind, ctx)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(levelname)s %(name)s: %(message)s"
        if os.environ.get("JOURNAL_STREAM")
        else "%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (StreamerError, ConfigError) as exc:
        if args.debug:
            raise
        print(f"streamer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
