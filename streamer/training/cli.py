"""The training subcommands of ``streamer``: ``corpus``, ``train``, ``pretrain``, ``eval``, ``export``,
``average`` and ``curves``.

``streamer.cli`` calls :func:`add_training_parsers` with its subparsers; each command sets ``func``.
Heavy imports happen inside the commands, so ``streamer --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from streamer.config_args import add_settings_args, parse_context

TRAIN_EPILOG = """\
examples:
  # start a run (creates runs/<timestamp>_<name>/ with config.yaml, train.log, metrics.json,
  # results.csv and checkpoints/{best,latest}.pt); run it in the background on a shared machine:
  nice -n 5 streamer train --config models/streamer-tdt-small/recipe.yaml > train.out 2>&1 &
  # stop it cleanly (saves latest.pt):  kill -TERM <pid>     # or Ctrl-C in a terminal
  # continue where it stopped, same data order and RNG:
  streamer train --resume runs/20261121-041500_streamer-tdt-small
  # a quick smoke run: override recipe keys with dotted KEY=VALUE (YAML values)
  streamer train --config models/streamer-tdt-small/recipe.yaml --set train.max_steps=20 --set train.threads=2

Threads: 1 torch thread plus 1 data worker suits 2 cores; with 2 threads a busy neighbour process can
slow every step many times over (see the recipe's comments for measured speeds).
"""

PRETRAIN_EPILOG = """\
examples:
  # Best-RQ on a folder of unlabelled audio (searched recursively; wav, flac, mp3, ogg, ...):
  streamer pretrain --config models/streamer-tdt-small/pretrain.yaml --audio /data/audio
  # ... or on a corpus's audio, its transcripts ignored (the recipe's data.corpus_dir):
  streamer pretrain --config models/streamer-tdt-small/pretrain.yaml --set data.corpus_dir=data/corpus-v1
  # continue where it stopped (same clips, data order and RNG):
  streamer pretrain --resume runs/20261206-153000_streamer-tdt-small-bestrq
  # fine-tune: a TDT run whose encoder starts from the pretrained one (same model.encoder section):
  streamer train --config models/streamer-tdt-small/recipe.yaml \\
      --set train.init_from=runs/20261206-153000_streamer-tdt-small-bestrq/checkpoints/best.pt

The run directory is laid out as streamer train's (config.yaml, train.log, metrics.json, results.csv with
loss and masked-code accuracy, checkpoints/{best,latest}.pt) plus clips.jsonl, the audio it trains on.
Unreadable audio files are skipped with a warning and counted (metrics.json: skipped_files).
"""

EVAL_EPILOG = """\
examples:
  streamer eval --model models/streamer-tdt-small/model.nemo --corpus data/corpus-v1 --limit 200
  streamer eval --model runs/20261121-041500_streamer-tdt-small --manifest my_test.jsonl --mode offline
Rows append to --results (CSV); a markdown table (WER per split and look-ahead, then latency) is printed.
"""

EXPORT_EPILOG = """\
examples:
  streamer export runs/20261121-041500_streamer-tdt-small --out models/streamer-tdt-small/model.nemo
  streamer export runs/20261121-051500_streamer-paraformer-small --out models/streamer-paraformer-small/model
The .nemo archive holds NeMo's model_config.yaml, model_weights.ckpt and the tokenizer; NeMo 3.0.0's
ASRModel.restore_from() and streamer's --model both load it. A Paraformer run (model.type: paraformer; NeMo
has no Paraformer) is written as a directory: paraformer.json (every size), model.safetensors,
tokenizer.model and training.json; streamer's --model DIR loads it.
"""

AVERAGE_EPILOG = """\
examples:
  # weight-space interpolation (WiSE-FT): 60% of the way from the shipped model to its fine-tuned run
  streamer average models/streamer-tdt-small/model.nemo=0.4 runs/20261207-031500_streamer-tdt-small=0.6 \\
      --out runs/wise-0.6/model.nemo
  # checkpoint averaging, equal weights:
  streamer average runs/A/checkpoints/best.pt runs/A/checkpoints/latest.pt --out runs/A-avg/model.nemo
Sources: a .nemo, a Paraformer model directory, a run directory (its best.pt) or a run's checkpoints/*.pt,
all of one architecture and one tokenizer. Weights are normalised to sum to 1; the first source gives the
config. The result is read back and checked, and training.json beside it records what went in.
"""

CURVES_EPILOG = """\
examples:
  streamer curves runs/20261206-174807_streamer-tdt-small          # -> runs/.../curves.svg
  streamer curves scratch=runs/A pretrained=runs/B --out bestrq.svg --title "Best-RQ against scratch"
Open the SVG in a browser; hover a validation point for its value. Training redraws RUN/curves.svg after
every validation, so a running job can be watched by reloading that file.
"""


def add_training_parsers(subparsers: Any) -> None:
    """Register ``corpus``, ``train``, ``pretrain``, ``eval``, ``export``, ``average`` and ``curves`` on
    ``streamer``'s subparsers."""
    _add_corpus(subparsers)
    _add_train(subparsers)
    _add_pretrain(subparsers)
    _add_eval(subparsers)
    _add_export(subparsers)
    _add_average(subparsers)
    _add_curves(subparsers)


def _add_corpus(subparsers: Any) -> None:
    from streamer.training.corpus import add_corpus_args  # noqa: PLC0415 - light module

    p = subparsers.add_parser(
        "corpus",
        help="generate the synthetic speech corpus and its tokenizer",
        description="Generate a synthetic English speech corpus with espeak-ng, flite, festival and the neural "
        "Piper and Kokoro voices (one engine held out for testing), augmented with speed and formant warps, "
        "rooms, noise and babble, band limits and codecs, as 16 kHz int16 shards "
        "with JSONL manifests, then train a SentencePiece BPE tokenizer on the training text. Parallel "
        "(--workers), resumable (rerun the same command), with a progress bar.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  nice -n 10 streamer corpus --out data/corpus-v1 --hours 50 --workers 2",
    )
    add_corpus_args(p)
    p.set_defaults(func=_cmd_corpus)


def _cmd_corpus(args: argparse.Namespace) -> int:
    from streamer.training.corpus import build_corpus, splits_from_args  # noqa: PLC0415

    _log_to_stderr()
    specs = splits_from_args(args)
    summary = build_corpus(args.out, specs, args.workers, args.seed, args.shard_utterances, args.vocab_size)
    for name, split in summary["splits"].items():
        print(f"{name}: {split['utterances']} utterances, {split['hours']:.2f} h")
    return 0


def _add_train(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a streaming FastConformer-TDT (or a Paraformer) from a recipe (resumable)",
        description="Train a cache-aware streaming FastConformer encoder with a TDT head (and an optional "
        "auxiliary CTC head) from a recipe YAML: AdamW with warmup and decay, gradient clipping, SpecAugment, "
        "one look-ahead sampled per batch so one model serves them all. With model.type: paraformer the recipe "
        "trains a full-context encoder with a CIF predictor and a non-autoregressive decoder instead. "
        "Each run gets its own directory; "
        "SIGTERM/SIGINT save latest.pt and exit, --resume continues exactly where it stopped.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=TRAIN_EPILOG,
    )
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--config", type=Path, help="recipe YAML (e.g. models/streamer-tdt-small/recipe.yaml)")
    group.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="where new run directories go [%(default)s]")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key for a new run, e.g. train.threads=2 (repeatable)",
    )
    p.set_defaults(func=_cmd_train)


def _overrides(items: list[str]) -> dict[str, Any]:
    import yaml  # noqa: PLC0415

    from streamer.errors import ConfigError  # noqa: PLC0415

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def _cmd_train(args: argparse.Namespace) -> int:
    from streamer.errors import ConfigError  # noqa: PLC0415
    from streamer.training.trainer import train  # noqa: PLC0415

    _log_to_stderr()
    if args.resume is not None and args.set:
        raise ConfigError("--set only applies to new runs; edit RUN_DIR/config.yaml to change a resumed run")
    status, _ = train(args.config, args.resume, args.runs, _overrides(args.set))
    return status


def _add_pretrain(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="self-supervised Best-RQ pretraining of the encoder on unlabelled audio (resumable)",
        description="Pretrain the streaming FastConformer encoder with Best-RQ (Chiu et al. 2022): a frozen "
        "random-projection quantizer turns the normalised, stacked log-mel features into one code per encoder "
        "frame; spans of the input are masked with noise and the encoder learns to predict the codes of the "
        "masked frames (cross-entropy). Input: a folder of audio files or a corpus split without its "
        "transcripts. The encoder then starts a TDT run through train.init_from.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=PRETRAIN_EPILOG,
    )
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--config", type=Path, help="pretraining recipe YAML (models/streamer-tdt-small/pretrain.yaml)")
    group.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="where new run directories go [%(default)s]")
    p.add_argument(
        "--audio",
        type=Path,
        metavar="DIR",
        help="pretrain on the audio files under DIR (recursively) instead of the recipe's data source "
        "(sets data.audio_dir and clears data.corpus_dir)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key for a new run, e.g. train.max_steps=2000 (repeatable)",
    )
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from streamer.errors import ConfigError  # noqa: PLC0415
    from streamer.training.pretrainer import pretrain  # noqa: PLC0415

    _log_to_stderr()
    if args.resume is not None and (args.set or args.audio):
        raise ConfigError("--set and --audio only apply to new runs; a resumed run keeps its clips and recipe")
    overrides = _overrides(args.set)
    if args.audio is not None:
        overrides.setdefault("data", {}).update(audio_dir=str(args.audio), corpus_dir="")
    status, _ = pretrain(args.config, args.resume, args.runs, overrides)
    return status


def _add_eval(subparsers: Any) -> None:

    p = subparsers.add_parser(
        "eval",
        help="word error rate per split, offline and streaming at each look-ahead, and latency",
        description="Evaluate a model on corpus splits or manifests: greedy WER offline (one masked encoder "
        "pass) and streaming (the cache-aware recognizer) at every look-ahead, the algorithmic latency of each "
        "look-ahead and the measured compute per chunk of one stream.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EVAL_EPILOG,
    )
    add_eval_args(p)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from streamer.training.evaluate import cmd_eval  # noqa: PLC0415

    _log_to_stderr()
    return cmd_eval(args)


def _add_export(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a training run's model as a .nemo archive (a Paraformer: a model directory)",
        description="Export a run's best (or latest) checkpoint as a .nemo archive that NeMo 3.0.0 and "
        "streamer load (a Paraformer run: a model directory); it is read back and checked before the command "
        "succeeds.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXPORT_EPILOG,
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a directory made by streamer train")
    p.add_argument("--out", type=Path, required=True, help="the .nemo file to write (a Paraformer: the directory)")
    p.add_argument(
        "--checkpoint", choices=["best", "latest"], default="best", help="which checkpoint of the run [%(default)s]"
    )
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from streamer.asr.model import AsrModel  # noqa: PLC0415
    from streamer.asr.paraformer import WEIGHTS_FILE, ParaformerModel  # noqa: PLC0415
    from streamer.training.recipe import load_recipe  # noqa: PLC0415
    from streamer.training.rundir import AnyModel, export_nemo, export_paraformer  # noqa: PLC0415

    _log_to_stderr()
    model: AnyModel
    loaded: AnyModel
    if load_recipe(args.run_dir / "config.yaml").model.type == "paraformer":
        model = export_paraformer(args.run_dir, args.out, args.checkpoint)
        loaded = ParaformerModel.load(args.out)
        size_mb = (args.out / WEIGHTS_FILE).stat().st_size / 1e6
    else:
        model = export_nemo(args.run_dir, args.out, args.checkpoint)
        loaded = AsrModel.load(str(args.out))
        size_mb = args.out.stat().st_size / 1e6
    _check_written(model, loaded)
    print(f"wrote {args.out} ({size_mb:.1f} MB, {model.num_parameters / 1e6:.2f}M parameters)")
    return 0


def _check_written(model: Any, loaded: Any) -> None:
    """The encoder of the model read back from disk gives what the model in memory gives."""
    import torch  # noqa: PLC0415

    probe = torch.randn(1, 80, 200, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = model.encoder(probe, torch.tensor([200]))[0]
        b = loaded.encoder(probe, torch.tensor([200]))[0]
    torch.testing.assert_close(a, b)


def _add_average(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "average",
        help="average the weights of models of one architecture (WiSE-FT interpolation, checkpoint averaging)",
        description="Write one model whose every weight is the weighted mean of that weight in the given "
        "models: a fine-tuned model and the model it started from (weight-space interpolation, WiSE-FT), or "
        "checkpoints of one run (checkpoint averaging).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=AVERAGE_EPILOG,
    )
    p.add_argument("models", nargs="+", metavar="MODEL[=WEIGHT]", help="the models and their weights [1 each]")
    p.add_argument("--out", type=Path, required=True, help="the .nemo file to write (a Paraformer: the directory)")
    p.set_defaults(func=_cmd_average)


def _cmd_average(args: argparse.Namespace) -> int:
    from streamer.asr.model import AsrModel  # noqa: PLC0415
    from streamer.asr.paraformer import ParaformerModel  # noqa: PLC0415
    from streamer.training.average import average_models, parse_source, write_average  # noqa: PLC0415

    _log_to_stderr()
    sources = [parse_source(spec) for spec in args.models]
    model, record = average_models(sources)
    record_path = write_average(model, record, args.out)
    loaded = ParaformerModel.load(args.out) if isinstance(model, ParaformerModel) else AsrModel.load(str(args.out))
    _check_written(model, loaded)
    shares = ", ".join(f"{p['source']} x {p['weight']:.3g}" for p in record["averaged"])
    print(f"wrote {args.out} ({shares}; {record_path.name} beside it)")
    return 0


def _add_curves(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "curves",
        help="plot training runs' learning curves (loss, dev WER, masked-code accuracy) as an SVG",
        description="Draw the learning curves of one or more run directories (streamer train or pretrain) "
        "into one SVG: the training loss from train.log and each validation metric from results.csv, by "
        "step, one colour per run and one dash pattern per look-ahead.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=CURVES_EPILOG,
    )
    p.add_argument("runs", nargs="+", metavar="[LABEL=]RUN_DIR", help="run directories, each optionally labelled")
    p.add_argument("--out", type=Path, help="the SVG to write [RUN_DIR/curves.svg for one run, else curves.svg]")
    p.add_argument("--title", default="", help="a title above the panels")
    p.set_defaults(func=_cmd_curves)


def _cmd_curves(args: argparse.Namespace) -> int:
    from streamer.errors import ConfigError  # noqa: PLC0415
    from streamer.training.curves import CURVES_FILE, write_curves  # noqa: PLC0415

    runs: list[tuple[str | None, Path]] = []
    for spec in args.runs:
        name, _, path = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
        run = Path(path)
        if not (run / "train.log").is_file() and not (run / "results.csv").is_file():
            raise ConfigError(f"{run}: not a run directory (it has neither train.log nor results.csv)")
        runs.append((name or None, run))
    out = args.out or (runs[0][1] / CURVES_FILE if len(runs) == 1 else Path(CURVES_FILE))
    print(f"wrote {write_curves(runs, out, args.title)}")
    return 0


def _log_to_stderr() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``streamer eval``."""
    parser.add_argument(
        "--model",
        help="a .nemo file, a Hugging Face directory, a name, or a training run directory (its best.pt) "
        "(model.spec; default: the bundled model)",
    )
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda (model.device; default: cpu)")
    parser.add_argument(
        "--manifest",
        type=Path,
        action="append",
        default=[],
        help="a JSONL manifest to evaluate (repeatable); the split is named after the file. "
        "Corpus manifests (audio shards) and NeMo manifests (audio_filepath, text) both work",
    )
    parser.add_argument("--corpus", type=Path, help="a corpus directory: evaluate its --splits")
    parser.add_argument(
        "--splits",
        default="dev,test_seen_voices,test_heldout_engine,everyday",
        help="comma-separated splits of --corpus [%(default)s]",
    )
    parser.add_argument(
        "--att-context",
        action="append",
        default=[],
        type=parse_context,
        metavar="L,R",
        help="look-ahead as LEFT,RIGHT (repeatable); default: model.att_context_size when set, else every one "
        "the model supports",
    )
    parser.add_argument(
        "--mode",
        choices=["offline", "streaming", "both"],
        default="both",
        help="decode offline (one masked pass), streaming (cache-aware chunks), or both",
    )
    parser.add_argument("--limit", type=int, help="utterances per split (default: all)")
    parser.add_argument(
        "--results", type=Path, default=Path("results.csv"), help="CSV to append the rows to [%(default)s]"
    )
    parser.add_argument("--threads", type=int, help="torch threads (model.threads; default: 2)")
    add_settings_args(parser)
