"""Weight averaging: one model whose every weight is a weighted mean of the same weight in several models.

``streamer average`` builds it. With two models, a fine-tuned one and the one it was fine-tuned from, this is
weight-space interpolation ("WiSE-FT", Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): part
of the way from the old weights to the new keeps most of what the fine-tuning gained on the new data and
gives back most of what it lost on the old. With several checkpoints of one run it is checkpoint averaging.
Both only make sense for models of one architecture and one tokenizer, which share an origin (one run, or a
run and the model it started from); two independently trained models average to noise.

A source is an exported ``.nemo``, a Paraformer model directory, a run directory (its ``best.pt``) or a
run's ``checkpoints/*.pt``. The result is written the way ``streamer export`` writes a run's model: a
``.nemo`` (TDT/RNNT/CTC) or a Paraformer model directory, with a ``training.json`` that records what went in.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streamer.asr.model import AsrModel
from streamer.asr.paraformer import ParaformerModel
from streamer.errors import ConfigError
from streamer.training.rundir import TRAINING_RECORD, AnyModel, checkpoint_path, read_warm_start

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """One model to average and its weight (any non-negative number; the weights are normalised)."""

    path: Path
    weight: float


def parse_source(spec: str) -> Source:
    """``PATH`` (weight 1) or ``PATH=WEIGHT``; the last ``=`` splits, so paths may hold one."""
    path, sep, weight = spec.rpartition("=")
    if not sep:
        return Source(Path(spec), 1.0)
    try:
        value = float(weight)
    except ValueError:
        raise ConfigError(f"{spec!r}: the weight after '=' must be a number, e.g. {path or 'model.nemo'}=0.5") from None
    if not value >= 0.0 or value == float("inf"):
        raise ConfigError(f"{spec!r}: a weight must be a finite number >= 0")
    return Source(Path(path), value)


def load_source(path: Path) -> tuple[AnyModel, dict[str, Any], Path]:
    """A model to average, its training record (``training.json`` or a checkpoint's progress) and the file
    it came from (a run directory's ``best.pt``)."""
    if path.is_dir() and (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        path = checkpoint_path(path, "best")  # a run directory: its best checkpoint, as streamer eval reads it
        if not path.is_file():
            raise ConfigError(f"{path.parent.parent} has no checkpoint yet")
    if not path.exists():
        raise ConfigError(f"{path} does not exist (give a .nemo, a Paraformer model directory, a run directory "
                          "or a run's checkpoints/*.pt)")
    model, record = read_warm_start(path)
    return model.eval(), record, path


def average_state_dicts(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """The weighted mean of each floating-point tensor (weights normalised to sum to 1), computed in float64
    and stored in the first state's dtype. Other tensors (integer counters) must agree or come from the first.

    Raises:
        ConfigError: the states hold different names or shapes, or the weights do not add up to more than 0.
    """
    if len(states) != len(weights) or not states:
        raise ConfigError("give one weight for each model, and at least one model")
    total = sum(weights)
    if not total > 0.0:
        raise ConfigError("the weights add up to 0: give at least one model a weight above 0")
    share = [w / total for w in weights]
    names = list(states[0])
    for i, state in enumerate(states[1:], start=2):
        if set(state) != set(names):
            extra, missing = sorted(set(state) - set(names)), sorted(set(names) - set(state))
            raise ConfigError(f"model {i} has other weights than model 1 (extra: {extra[:3]}, missing: "
                              f"{missing[:3]}): only models of one architecture average")
    out: dict[str, torch.Tensor] = {}
    for name in names:
        tensors = [state[name] for state in states]
        first = tensors[0]
        for i, t in enumerate(tensors[1:], start=2):
            if t.shape != first.shape:
                raise ConfigError(f"{name}: model {i} has shape {tuple(t.shape)}, model 1 {tuple(first.shape)}: "
                                  "only models of one architecture average")
        if first.is_floating_point():
            mean = sum((s * t.detach().to(torch.float64) for s, t in zip(share, tensors, strict=True)),
                       torch.zeros(first.shape, dtype=torch.float64))
            out[name] = mean.to(first.dtype)
        else:
            if any(not torch.equal(t, first) for t in tensors[1:]):
                log.info("%s: not a floating-point tensor and not equal in every model: model 1's is kept", name)
            out[name] = first.detach().clone()
    return out


def _kind(model: AnyModel) -> str:
    return "Paraformer" if isinstance(model, ParaformerModel) else "TDT/RNNT/CTC"


def _check_compatible(models: list[AnyModel], paths: list[Path]) -> None:
    first = models[0]
    for model, path in zip(models[1:], paths[1:], strict=True):
        if type(model) is not type(first):
            raise ConfigError(f"{path} holds a {_kind(model)} model, {paths[0]} a {_kind(first)} one: "
                              "only models of one kind average")
        if model.config != first.config:
            raise ConfigError(f"{path} and {paths[0]} are configured differently: only models of one "
                              "architecture average")
        a, b = first.tokenizer, model.tokenizer
        if a is None or b is None or a.model_bytes != b.model_bytes:
            raise ConfigError(f"{path} and {paths[0]} have different tokenizers: their output layers mean "
                              "different pieces, so their weights cannot be averaged")


def average_models(sources: list[Source]) -> tuple[AnyModel, dict[str, Any]]:
    """The averaged model (eval mode, the first source's config and tokenizer) and its training record."""
    if not sources:
        raise ConfigError("give at least one model to average")
    loaded = [load_source(s.path) for s in sources]
    models = [model for model, _, _ in loaded]
    _check_compatible(models, [s.path for s in sources])
    state = average_state_dicts([m.state_dict() for m in models], [s.weight for s in sources])
    result = models[0]
    result.load_state_dict(state, strict=True)
    total = sum(s.weight for s in sources)
    parts = [
        {"source": str(path), "weight": round(s.weight / total, 6), "step": record.get("step")}
        for s, (_, record, path) in zip(sources, loaded, strict=True)
    ]
    records = [record for _, record, _ in loaded]
    steps = [p["step"] for p in parts if isinstance(p["step"], int)]
    hours = [r["hours_seen"] for r in records if isinstance(r.get("hours_seen"), int | float)]
    hours += [r["audio_seconds"] / 3600 for r in records
              if "hours_seen" not in r and isinstance(r.get("audio_seconds"), int | float)]
    record: dict[str, Any] = {"averaged": parts}
    if steps:
        record["step"] = max(steps)  # where training of the newest ingredient stands: a later run counts on
    if hours:
        record["hours_seen"] = round(max(hours), 2)
    return result.eval(), record


def write_average(model: AnyModel, record: dict[str, Any], out: Path) -> Path:
    """Write the averaged model as ``streamer export`` would, and its ``training.json``; the record's path."""
    if isinstance(model, ParaformerModel):
        model.save(out)
        record_path = out / TRAINING_RECORD
    else:
        assert isinstance(model, AsrModel)
        if out.suffix != ".nemo":
            raise ConfigError(f"--out {out}: a TDT/RNNT/CTC model is written as a .nemo file")
        model.save(str(out))
        record_path = out.parent / TRAINING_RECORD
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record_path
