"""Command line: ``streamer transcribe | serve | mic | bench | ...``: parse and dispatch, nothing else.

Each command's module registers its subparser (``add_*_parser``) and its ``func``; the shared
``--config``/``--set`` flags and ``parse_context`` live in :mod:`streamer.config_args`, model loading
in :mod:`streamer.engine.factory`. ``main(argv) -> int`` is the console script and what tests call.
Errors that streamer raises on purpose print one line (``streamer: error: ...``) and exit 2;
``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from streamer import __version__
from streamer.errors import ConfigError, StreamerError

logger = logging.getLogger("streamer")

EPILOG = """\
examples:
  streamer transcribe hello.wav                         default model, offline, plain text
  streamer transcribe a.wav b.flac --format json        one JSON object per file per line
  streamer transcribe talk.mp3 --mode streaming --att-context-size 70,1
  streamer transcribe talk.mp3 --format srt > talk.srt   subtitles from the word times
  streamer transcribe x.wav --model nvidia/stt_en_fastconformer_hybrid_large_streaming_multi --decoder ctc
  streamer bench                                        latency and real-time factor table
  streamer loadtest --streams 1,2,4,8 --att-context-size 70,1   live streams this box holds
  streamer convert model.nemo model-hf/ --verify         .nemo <-> Hugging Face transformers directory

--model takes a .nemo file, a Hugging Face model directory (config.json + model.safetensors),
a name from models/registry.toml, or a Hugging Face id (downloaded once, then cached).
Every command that loads a model reads the same [model] settings: --config FILE, --set
model.KEY=VALUE and STREAMER_MODEL__<KEY> variables, with its own flags winning (see
configs/default.toml), e.g. STREAMER_MODEL__ATT_CONTEXT_SIZE='[70,1]' streamer transcribe x.wav
"""


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

    from streamer.bench import add_bench_parser
    from streamer.convert_command import add_convert_parser
    from streamer.loadtest_cli import add_loadtest_parser
    from streamer.mic_command import add_mic_parser
    from streamer.service import add_serve_parser
    from streamer.settings import add_config_parser
    from streamer.transcribe import add_transcribe_parser

    add_transcribe_parser(sub)
    add_serve_parser(sub)
    add_mic_parser(sub)
    add_config_parser(sub)
    add_bench_parser(sub)
    add_loadtest_parser(sub)
    add_convert_parser(sub)
    from streamer.training.cli import add_training_parsers

    add_training_parsers(sub)
    return parser


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
