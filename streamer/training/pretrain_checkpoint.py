"""Checkpoints and ``metrics.json`` of pretraining runs, and reading a pretrained encoder back.

A pretraining checkpoint (``kind: bestrq``) holds the recipe, the whole :class:`~streamer.training.bestrq.
BestRqModel` state (``encoder.*`` with the same keys as a TDT model's encoder, ``head.*``, the frozen
``quantizer.*``), the training-only parameters of the reparametrised first conv, and for ``latest.pt`` the
optimizer, progress and RNG states a resume needs. Apart from the trainer's, so ``train.init_from`` reads
it without importing the pretraining loop.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from streamer.asr.encoder import FastConformerEncoder
from streamer.errors import CheckpointError, ConfigError
from streamer.training.pretrain_recipe import PretrainRecipe, pretrain_recipe_from_dict
from streamer.training.recipe import encoder_config
from streamer.training.speed import InputNormalizedConv2d

PRETRAIN_VERSION = 1
KIND = "bestrq"


@dataclass
class PretrainProgress:
    """Where pretraining stands; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # next batch of `epoch` to train
    audio_seconds: float = 0.0
    train_seconds: float = 0.0
    best_dev_loss: float = float("inf")
    best_step: int = -1
    skipped_files: int = 0  # unreadable audio files the scan left out
    history: list[dict[str, float]] = field(default_factory=list)  # recent log lines


def is_pretrain_checkpoint(state: dict[str, Any]) -> bool:
    """Whether a loaded checkpoint file came from ``streamer pretrain``."""
    return state.get("kind") == KIND


def save_pretrain(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    recipe: PretrainRecipe,
    progress: PretrainProgress,
) -> None:
    """Write a pretraining checkpoint atomically; without ``optimizer`` (``best.pt``) it cannot be resumed."""
    state = {
        "version": PRETRAIN_VERSION,
        "kind": KIND,
        "recipe": recipe.to_dict(),
        "model": model.state_dict(),
        "train_parameters": {
            f"{name}.{p}": getattr(m, p).detach().clone()
            for name, m in model.named_modules()
            if isinstance(m, InputNormalizedConv2d)
            for p in ("weight", "bias")
        },
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "progress": asdict(progress),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_pretrain_file(path: Path) -> dict[str, Any]:
    """The contents of a pretraining checkpoint, checked for kind and version.

    Raises:
        CheckpointError: missing, or not a pretraining checkpoint of this version.
    """
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: holds RNG states
    if not isinstance(state, dict) or not is_pretrain_checkpoint(state):
        raise CheckpointError(f"{path} is not a checkpoint of `streamer pretrain`")
    if state.get("version") != PRETRAIN_VERSION:
        raise CheckpointError(
            f"{path}: pretraining checkpoint version {state.get('version')} is not {PRETRAIN_VERSION}"
        )
    return state


def restore_pretrain(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> PretrainProgress:
    """Load ``latest.pt`` into a freshly built model, its optimizer and the global RNGs; returns the progress."""
    state = load_pretrain_file(path)
    if state["optimizer"] is None:
        raise CheckpointError(f"{path} holds no optimizer state: resume from latest.pt")
    model.load_state_dict(state["model"], strict=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["train_parameters"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    np.random.set_state(state["numpy_rng"])
    return PretrainProgress(**state["progress"])


def pretrained_encoder_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The encoder's weights of a loaded pretraining checkpoint, keyed as in a TDT model (``encoder.*``)."""
    return {k: v for k, v in state["model"].items() if k.startswith("encoder.")}


def load_pretrained_encoder(path: Path) -> tuple[FastConformerEncoder, PretrainRecipe]:
    """The encoder of a pretraining checkpoint (eval mode) and the recipe that made it."""
    state = load_pretrain_file(path)
    recipe = pretrain_recipe_from_dict(state["recipe"], f"the recipe in {path}")
    encoder = FastConformerEncoder(encoder_config(recipe.model.encoder))
    weights = {k.removeprefix("encoder."): v for k, v in pretrained_encoder_state(state).items()}
    encoder.load_state_dict(weights, strict=True)
    return encoder.eval(), recipe


def write_metrics(run_dir: Path, name: str, progress: PretrainProgress, parameters: int) -> None:
    """Rewrite ``metrics.json`` atomically: where the run stands and its last log entry."""
    metrics = {
        "name": name,
        "method": "bestrq",
        "step": progress.step,
        "epoch": progress.epoch,
        "batch_in_epoch": progress.batch_in_epoch,
        "audio_hours": round(progress.audio_seconds / 3600, 3),
        "train_hours": round(progress.train_seconds / 3600, 3),
        "best_dev_loss": None if math.isinf(progress.best_dev_loss) else round(progress.best_dev_loss, 4),
        "best_step": progress.best_step,
        "skipped_files": progress.skipped_files,
        "encoder_parameters": parameters,
        "last": progress.history[-1] if progress.history else None,
    }
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, run_dir / "metrics.json")


def pretrained_encoder_from(path: Path) -> dict[str, torch.Tensor] | None:
    """The encoder weights of ``path`` if it is a ``streamer pretrain`` checkpoint, else None (another kind
    of ``train.init_from``: an exported ``.nemo`` or a TDT run's checkpoint)."""
    if path.suffix != ".pt" or not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: holds RNG states
    if not isinstance(state, dict) or not is_pretrain_checkpoint(state):
        return None
    return pretrained_encoder_state(load_pretrain_file(path))


def load_encoder_into(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> tuple[list[str], list[str]]:
    """Load pretrained ``encoder.*`` weights (the front end ``pre_encode`` and every layer) into a TDT model.

    Returns:
        (the keys loaded, the model's keys left as initialised: prediction network, joint, CTC head, ...).

    Raises:
        ConfigError: the encoders differ (keys or shapes), naming the first differences.
    """
    own = model.state_dict()
    mine = {k for k in own if k.startswith("encoder.")}
    problems = [f"missing {k}" for k in sorted(mine - weights.keys())]
    problems += [f"unexpected {k}" for k in sorted(weights.keys() - mine)]
    problems += [
        f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} here"
        for k, v in weights.items()
        if k in own and v.shape != own[k].shape
    ]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ConfigError(
            f"train.init_from: the encoder pretrained in {source} does not fit this recipe's model.encoder "
            f"(use the same encoder section in both recipes): {shown}"
        )
    model.load_state_dict({**own, **weights}, strict=True)
    return sorted(weights), sorted(k for k in own if k not in weights)
