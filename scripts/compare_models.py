#!/usr/bin/env python3
"""Side-by-side evaluation of models on the same corpus splits: the table a model card needs.

Runs ``streamer eval`` once per model (a fresh process each, so threads and memory do not carry over),
keeps each model's rows in ``OUT/<name>.csv``, and prints a markdown table per ``--metric`` (default: WER
with CER in brackets; also token accuracy, sequence accuracy and speed) of every model per corpus, split and
decoding mode, the difference against the first model, and how many rows the last model wins.
``--by-engine`` also scores each TTS engine of a split on its own (the manifest's ``engine`` field), which is
how a corpus that mixes espeak-ng, flite, Piper and Kokoro shows which voices a model hears.

    .venv/bin/python scripts/compare_models.py \\
        --model current=models/streamer-tdt-small/model.nemo --model candidate=runs/<run> \\
        --corpus data/corpus-v1 --corpus data/corpus-v2 --by-engine \\
        --offline 70,13 --streaming 70,1 --limit 400 --out eval-compare
    .venv/bin/python scripts/compare_models.py ... --metric wer --metric token-accuracy --metric speed

Rerunning with the same --out reuses the CSVs already there (delete one to evaluate that model again).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

SPLITS = "dev,test_seen_voices,test_heldout_engine,everyday"


class Metric:
    """A column of `streamer eval`'s CSV as a table: its cell, and which way is better."""

    def __init__(self, column: str, title: str, higher_is_better: bool, cell: str = "{:.1f}%",
                 extra: str = "") -> None:
        self.column, self.title, self.higher_is_better, self.cell, self.extra = (
            column, title, higher_is_better, cell, extra)

    def format(self, row: dict[str, str]) -> str:
        text = self.cell.format(float(row[self.column]))
        return f"{text} ({float(row[self.extra]):.1f}%)" if self.extra else text


METRICS = {
    "wer": Metric("wer_percent", "WER, CER in brackets", False, extra="cer_percent"),
    "token-accuracy": Metric("token_accuracy_percent", "token accuracy (tokens right, aligned)", True),
    "sequence-accuracy": Metric("sequence_accuracy_percent", "sequence accuracy (utterances exactly right)", True),
    "speed": Metric("rtf", "speed: audio seconds per compute second", True, cell="{:.0f}x"),
}


def engine_manifests(corpus: Path, split: str, limit: int | None) -> list[str]:
    """Write ``<split>@<engine>.jsonl`` beside the split's manifest (the first `limit` lines of the split,
    grouped by engine) and return their split names. Audio paths stay relative to the corpus directory."""
    lines = (corpus / f"{split}.jsonl").read_text().splitlines()
    lines = [line for line in lines if line.strip()][:limit]
    groups: dict[str, list[str]] = defaultdict(list)
    for line in lines:
        groups[json.loads(line).get("engine", "unknown")].append(line)
    if len(groups) < 2:
        return []
    names = []
    for engine, group in sorted(groups.items()):
        name = f"{split}@{engine}"
        (corpus / f"{name}.jsonl").write_text("\n".join(group) + "\n")
        names.append(name)
    return names


def run_eval(spec: str, source: Path, splits: list[str], mode: str, ctx: str, limit: int | None,
             threads: int, results: Path) -> None:
    """One `streamer eval` process: the splits of a corpus directory, or one manifest file."""
    where = ["--manifest", str(source)] if source.is_file() else ["--corpus", str(source), "--splits", ",".join(splits)]
    cmd = [sys.executable, "-m", "streamer", "eval", "--model", spec, *where, "--mode", mode, "--att-context", ctx,
           "--threads", str(threads), "--results", str(results)]
    if limit:
        cmd += ["--limit", str(limit)]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def read_rows(path: Path) -> dict[tuple[str, str, str, str], dict[str, str]]:
    """Rows of one model's CSV keyed by (corpus, split, mode, look-ahead asked for)."""
    out = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            # keyed by the look-ahead asked for: a full-context model (Paraformer) answers with its own
            out[(row["corpus"], row["split"], row["mode"], row["asked"])] = row
    return out


def print_table(metric: Metric, names: list[str], tables: dict[str, dict]) -> None:
    """One markdown table of `metric`: a row per (corpus, split, mode), a column per model, and the last
    model's difference from the first with its count of better and worse rows."""
    keys = list(tables[names[0]])
    head = "| corpus | split | mode | " + " | ".join(names)
    head += f" | {names[-1]} - {names[0]} |" if len(names) > 1 else " |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    wins = losses = 0
    for key in keys:
        cells, values = [], []
        for n in names:
            row = tables[n].get(key)
            if row is None:
                cells.append("-")
                continue
            values.append(float(row[metric.column]))
            cells.append(metric.format(row))
        line = f"| {key[0]} | {key[1]} ({tables[names[0]][key]['utterances']}) | {key[2]} {key[3]} | "
        line += " | ".join(cells)
        if len(names) > 1 and len(values) == len(names):
            delta = values[-1] - values[0]
            better = delta > 0 if metric.higher_is_better else delta < 0
            wins += better
            losses += delta != 0 and not better
            line += f" | {delta:+.1f} |"
        else:
            line += " | - |" if len(names) > 1 else " |"
        print(line)
    if len(names) > 1:
        print(f"\n{names[-1]} against {names[0]}: better on {wins}, worse on {losses} of {len(keys)} rows "
              f"({metric.title}; the utterance count of each split in brackets after its name)")


def pick_minimax(names: list[str], tables: dict[str, dict], min_utterances: int) -> str:
    """Of every model after the first, the one whose worst WER difference from the first (over the rows of at
    least `min_utterances` utterances) is lowest; ties go to the lower mean difference."""
    base = tables[names[0]]
    keys = [k for k, row in base.items() if int(row["utterances"]) >= min_utterances]
    if not keys:
        raise SystemExit(f"--pick-to: no row has {min_utterances} utterances or more")

    def score(name: str) -> tuple[float, float]:
        if any(k not in tables[name] for k in keys):
            return float("inf"), float("inf")  # a model not evaluated on every row cannot be shown to win
        deltas = [float(tables[name][k]["wer_percent"]) - float(base[k]["wer_percent"]) for k in keys]
        return max(deltas), sum(deltas) / len(deltas)

    return min(names[1:], key=score)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", action="append", required=True, metavar="NAME=SPEC",
                   help="a model to evaluate (repeatable; the first is the baseline, the last the candidate)")
    p.add_argument("--corpus", action="append", default=[], type=Path, help="corpus directory (repeatable)")
    p.add_argument("--manifest", action="append", default=[], type=Path,
                   help="a manifest file to evaluate as it is, e.g. scripts/human_clips.py's (repeatable)")
    p.add_argument("--splits", default=SPLITS, help=f"comma-separated splits [{SPLITS}]")
    p.add_argument("--by-engine", action="store_true", help="also score each TTS engine of a split on its own")
    p.add_argument("--offline", action="append", default=[], metavar="L,R", help="offline look-ahead (repeatable)")
    p.add_argument("--streaming", action="append", default=[], metavar="L,R",
                   help="streaming look-ahead (repeatable)")
    p.add_argument("--limit", type=int, default=0, help="utterances per split (0: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--metric", action="append", choices=sorted(METRICS), default=[],
                   help="a table of this metric (repeatable; default: wer)")
    p.add_argument("--out", type=Path, default=Path("eval-compare"), help="folder for the per-model CSVs")
    p.add_argument("--pick-to", type=Path, metavar="FILE",
                   help="write to FILE the name of the model, of those after the first, whose worst WER row "
                   "against the first is best (rows of --pick-min-utterances or more; ties: the lower mean)")
    p.add_argument("--pick-min-utterances", type=int, default=50, metavar="N", help="[%(default)s]")
    args = p.parse_args()
    models = [m.split("=", 1) for m in args.model]
    if any(len(m) != 2 for m in models):
        p.error("write --model NAME=SPEC")
    runs = [("offline", c) for c in args.offline or ["70,13"]] + [("streaming", c) for c in args.streaming]
    args.out.mkdir(parents=True, exist_ok=True)
    limit = args.limit or None

    if not args.corpus and not args.manifest:
        p.error("give --corpus DIR or --manifest FILE")
    split_names: dict[Path, list[str]] = {m: [m.stem] for m in args.manifest}
    for corpus in args.corpus:
        names = [s for s in args.splits.split(",") if s]
        if args.by_engine:
            names += [e for s in list(names) for e in engine_manifests(corpus, s, limit)]
        split_names[corpus] = names

    tables: dict[str, dict] = {}
    for name, spec in models:
        merged = args.out / f"{name}.csv"
        if not merged.exists():
            rows = []
            for corpus, names in split_names.items():
                for mode, ctx in runs:
                    part = args.out / f".{name}.part.csv"
                    part.unlink(missing_ok=True)
                    run_eval(spec, corpus, names, mode, ctx, limit, args.threads, part)
                    with part.open() as f:
                        where = corpus.parent.name if corpus.is_file() else corpus.name
                        rows += [dict(r, corpus=where, asked=ctx) for r in csv.DictReader(f)]
                    part.unlink()
            with merged.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        tables[name] = read_rows(merged)

    for i, metric in enumerate(args.metric or ["wer"]):
        if i:
            print()
        print_table(METRICS[metric], [n for n, _ in models], tables)
    if args.pick_to:
        if len(models) < 2:
            p.error("--pick-to needs a baseline and at least one other model")
        name = pick_minimax([n for n, _ in models], tables, args.pick_min_utterances)
        args.pick_to.write_text(name + "\n")
        print(f"\npicked {name} (its worst WER row against {models[0][0]} is the best)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
