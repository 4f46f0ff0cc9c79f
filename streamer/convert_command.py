"""``streamer convert SRC DST``: a ``.nemo`` file to a Hugging Face directory or back, optionally verified.

The work is in :mod:`streamer.asr.convert`; ``--verify`` runs :func:`streamer.asr.convertverify.verify`
and exits 1 when the converted model computes something else than its source.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streamer.config_args import DefaultsHelpFormatter

EPILOG = """\
examples:
  streamer convert model.nemo model-hf/ --verify       .nemo -> transformers directory, then compare
  streamer convert model-hf/ model.nemo --verify       transformers directory -> .nemo
  streamer convert model.nemo model-hf/ --force        replace an existing model-hf/

What maps to what (transformers model_type):
  offline FastConformer + TDT / RNNT / CTC (Parakeet)   parakeet_tdt / parakeet_rnnt / parakeet_ctc
  cache-aware streaming FastConformer + RNNT            nemotron_asr_streaming (EOU models too)
Hybrid RNNT+CTC models, cache-aware TDT or CTC models and BatchNorm streaming encoders have no
transformers class: they are refused with the reason. The HF directory holds config.json,
generation_config.json, processor_config.json, model.safetensors, tokenizer.json,
tokenizer_config.json and tokenizer.model.

--verify loads both models as `streamer transcribe` would, feeds them the same audio (espeak-ng
speaking a sentence, or a synthetic signal without espeak-ng) and prints the largest difference of
features, encoder outputs (offline and, for streaming models, chunk by chunk), logits and tokens;
with transformers installed it also runs transformers' own class on the HF directory.
Exit status: 0 converted (and verified), 1 verification found a mismatch, 2 an error.
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
    """Defaults after each flag's help; the examples and the mapping table keep their lines."""


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``streamer convert``."""
    c = sub.add_parser(
        "convert",
        help="convert a model between .nemo and a Hugging Face transformers directory",
        description="Convert a model between a NeMo .nemo file and a Hugging Face transformers directory\n"
        "(Parakeet CTC/RNNT/TDT, Nemotron streaming RNNT). The direction follows SRC: a .nemo file\n"
        "becomes a directory, a directory (with config.json) a .nemo file. DST appears whole or not at all.",
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    c.add_argument("src", metavar="SRC", help="a .nemo file or a Hugging Face model directory")
    c.add_argument("dst", metavar="DST", help="where to write the other format")
    c.add_argument("--to", choices=("nemo", "hf"), default=None,
                   help="the format to write (default: the other one than SRC's); a check, not a switch")
    c.add_argument("--verify", action="store_true", default=None,
                   help="load SRC and DST and compare features, encoder outputs, logits and tokens")
    c.add_argument("--force", action="store_true", default=None, help="replace DST if it exists")
    c.set_defaults(func=cmd_convert)


def _say(message: str) -> None:
    print(f"streamer convert: {message}", file=sys.stderr, flush=True)


def cmd_convert(args: argparse.Namespace) -> int:
    """Run ``streamer convert``; returns the exit status."""
    from streamer.asr.convert import convert  # noqa: PLC0415 - torch loads only when the command runs

    src, dst = Path(args.src), Path(args.dst)
    written = convert(src, dst, to=args.to, force=args.force, say=_say)
    _say(f"done: {dst} ({'Hugging Face directory' if written == 'hf' else '.nemo file'})")
    if not args.verify:
        return 0
    from streamer.asr.convertverify import verify  # noqa: PLC0415

    _say(f"verifying {dst} against {src}")
    report = verify(src, dst)
    print(report.table())
    if not report.ok:
        bad = [row.check for row in report.rows if not row.ok]
        _say(f"MISMATCH in {len(bad)} check(s): {', '.join(bad)}")
        return 1
    _say("verified: the converted model computes what the source computes")
    return 0
