"""Training run directories: making one, saving and restoring its checkpoints, reading them back as models.

A run directory (``runs/<YYYYmmdd-HHMMSS>_<name>/``) holds ``config.yaml`` and ``checkpoints/best.pt``
and ``latest.pt``. Writing and reading checkpoints live here, apart from the training loop
(:mod:`streamer.training.trainer`), so that ``streamer eval`` and ``streamer export`` load a run without
importing the loop, and the trainer, which evaluates with :mod:`streamer.training.evaluate`, forms no
import circle with it.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamer.asr.checkpoint import Checkpoint
from streamer.asr.model import AsrModel
from streamer.asr.nemofile import save_nemo
from streamer.asr.paraformer import ParaformerModel
from streamer.asr.tokenizer import Tokenizer
from streamer.errors import CheckpointError, ConfigError
from streamer.training.recipe import Recipe, model_config, paraformer_config, recipe_from_dict
from streamer.training.speed import InputNormalizedConv2d
from streamer.training.tdt_loss import TransducerLoss

CHECKPOINT_VERSION = 1
TRAINING_RECORD = "training.json"  # written beside an exported .nemo: how far its training went

AnyModel = AsrModel | ParaformerModel  # what a recipe's model.type builds


def model_of_recipe(recipe: Recipe, tokenizer: Tokenizer) -> AnyModel:
    """A freshly initialised (training mode) model of the recipe's ``model.type``."""
    if recipe.model.type == "paraformer":
        return ParaformerModel(paraformer_config(recipe, tokenizer.vocab_size), tokenizer)
    return AsrModel(model_config(recipe, tokenizer.vocab_size), tokenizer)


def new_run_dir(root: Path, name: str) -> Path:
    """``root/<YYYYmmdd-HHMMSS>_<name>`` (created)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 100):  # two runs started in the same second get -2, -3, ...
        run = root / (f"{stamp}_{name}" if attempt == 1 else f"{stamp}-{attempt}_{name}")
        try:
            (run / "checkpoints").mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            continue
        return run
    raise FileExistsError(f"no free run directory for {stamp}_{name} in {root}")


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # next batch of `epoch` to train
    audio_seconds: float = 0.0
    train_seconds: float = 0.0
    best_wer: float = float("inf")
    best_step: int = -1
    history: list[dict[str, float]] = field(default_factory=list)  # recent log lines
    warm_start_step: int = -1  # the step this run's weights came in at (train.init_from); -1: none
    warm_start_from: str = ""


def save_checkpoint(
    path: Path,
    model: AnyModel,
    tokenizer_model: bytes,
    optimizer: torch.optim.Optimizer | None,
    recipe: Recipe,
    progress: Progress,
    loss_fn: TransducerLoss | None,
) -> None:
    """Write a training checkpoint atomically (a temporary file renamed over ``path``).

    Without ``optimizer`` and ``loss_fn`` (``best.pt``) it holds the weights and where training stood, but
    cannot be resumed from.
    """
    state = {
        "version": CHECKPOINT_VERSION,
        "recipe": recipe.to_dict(),
        "tokenizer_model": tokenizer_model,
        "model": model.state_dict(),
        # The reparametrised convs' own parameters, so a resume continues bit for bit.
        "train_parameters": {
            f"{name}.{p}": getattr(m, p).detach().clone()
            for name, m in model.named_modules()
            if isinstance(m, InputNormalizedConv2d)
            for p in ("weight", "bias")
        },
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "progress": progress.__dict__,
        "loss_rng": loss_fn.state_dict() if loss_fn is not None else None,
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def restore_checkpoint(
    path: Path, model: AnyModel, optimizer: torch.optim.Optimizer, loss_fn: TransducerLoss
) -> Progress:
    """Load ``latest.pt`` back into a freshly built model, its optimizer, the loss's and the global RNGs.

    Returns where training stood, so the loop continues exactly where it stopped.
    """
    state = load_checkpoint_file(path)
    model.load_state_dict(state["model"], strict=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.get("train_parameters", {}).items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    loss_fn.load_state_dict(state["loss_rng"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    np.random.set_state(state["numpy_rng"])
    return Progress(**state["progress"])


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """The contents of a run checkpoint, checked for its format version."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; nothing to resume or export")
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: holds RNG states
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')} is not {CHECKPOINT_VERSION}")
    return state


def checkpoint_path(run_dir: Path, which: str) -> Path:
    """A run's ``best.pt`` (else ``latest.pt``, before the first validation) or its ``latest.pt``."""
    path = run_dir / "checkpoints" / f"{which}.pt"
    if which == "best" and not path.is_file():
        path = run_dir / "checkpoints" / "latest.pt"
    return path


def load_run(run_dir: Path, which: str = "best") -> tuple[AnyModel, bytes]:
    """The model (eval mode) and serialized tokenizer of a run's ``best.pt`` (else ``latest.pt``)."""
    state = load_checkpoint_file(checkpoint_path(run_dir, which))
    recipe = recipe_from_dict(state["recipe"])
    tokenizer = Tokenizer.from_bytes(state["tokenizer_model"])
    model = model_of_recipe(recipe, tokenizer)
    model.load_state_dict(state["model"], strict=True)
    return model.eval(), state["tokenizer_model"]


def model_from_run(run_dir: Path, which: str = "best") -> AnyModel:
    """The model of a run's ``best.pt`` (else ``latest.pt``), in eval mode."""
    return load_run(run_dir, which)[0]


def export_paraformer(run_dir: Path, out: Path, which: str = "best") -> ParaformerModel:
    """Write a Paraformer run's model as a model directory (:meth:`ParaformerModel.save`) with ``training.json``."""
    model = model_from_run(run_dir, which)
    if not isinstance(model, ParaformerModel):
        raise ConfigError(f"{run_dir} trained a {model.config.model_class}, not a Paraformer: export it to a .nemo")
    model.save(out)
    _write_training_record(run_dir, checkpoint_path(run_dir, which), out / TRAINING_RECORD)
    return model


def _write_training_record(run_dir: Path, path: Path, out: Path) -> None:
    progress = load_checkpoint_file(path)["progress"]
    record = {
        key: progress[key] for key in ("step", "epoch", "audio_seconds", "train_seconds", "best_wer", "best_step")
    }
    record.update(run=run_dir.name, checkpoint=path.name, hours_seen=round(progress["audio_seconds"] / 3600, 2))
    out.write_text(json.dumps(record, indent=2) + "\n")


def export_nemo(run_dir: Path, out: Path, which: str = "best") -> AsrModel:
    """Write a run's model as a ``.nemo`` that NeMo 3.0.0 and :meth:`AsrModel.load` read."""
    path = checkpoint_path(run_dir, which)
    model, tokenizer_model = load_run(run_dir, which)
    if not isinstance(model, AsrModel):
        raise ConfigError(f"{run_dir} trained a Paraformer, which NeMo has no .nemo for: export it to a directory "
                          "(streamer export RUN --out DIR)")
    ckpt = Checkpoint(
        config=model.config,
        state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
        tokenizer_model=tokenizer_model,
        raw_config={},
        source=str(run_dir),
    )
    save_nemo(out, ckpt, regenerate_config=True)
    _write_training_record(run_dir, path, out.parent / TRAINING_RECORD)
    return model


def read_warm_start(path: Path) -> tuple[AnyModel, dict[str, Any]]:
    """Weights (and tokenizer) to start a run from, and the training record that came with them.

    ``path`` is a ``.nemo`` or a Paraformer model directory (its ``training.json``, if any, gives the step
    count) or a run's ``checkpoints/*.pt``.
    """
    if path.is_dir() and (path / "paraformer.json").is_file():
        record_path = path / TRAINING_RECORD
        return ParaformerModel.load(path), json.loads(record_path.read_text()) if record_path.is_file() else {}
    if not path.is_file():
        raise ConfigError(f"train.init_from: {path} does not exist")
    if path.suffix == ".pt":
        state = load_checkpoint_file(path)
        recipe = recipe_from_dict(state["recipe"])
        tokenizer = Tokenizer.from_bytes(state["tokenizer_model"])
        model = model_of_recipe(recipe, tokenizer)
        model.load_state_dict(state["model"], strict=True)
        return model, dict(state["progress"])
    model = AsrModel.load(str(path))
    record_path = path.parent / TRAINING_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    return model, record
