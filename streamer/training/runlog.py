"""What a run writes about itself: ``train.log``, the periodic log line, ``results.csv`` and ``metrics.json``.

``metrics.json`` is rewritten atomically after every log line, validation and save, so a dashboard or a
person can read where a run stands at any moment; ``results.csv`` gains one row per validation.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TypeVar

import numpy as np
import yaml
from tqdm import tqdm

from streamer.errors import ConfigError
from streamer.training.curves import CURVES_FILE, write_curves
from streamer.training.rundir import Progress, new_run_dir
from streamer.training.step import StepResult

logger = logging.getLogger(__name__)

HISTORY_ENTRIES = 200  # log lines kept in Progress.history (and so in every checkpoint)


class _Recipe(Protocol):
    name: str

    def with_updates(self: R, updates: dict[str, Any]) -> R: ...

    def to_dict(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=_Recipe)
B = TypeVar("B")


def open_run(command: str, config: Path | None, resume: Path | None, runs_root: Path,
             overrides: dict[str, Any] | None, load: Callable[[Path], R]) -> tuple[R, Path]:
    """The recipe and run directory of ``streamer train`` / ``pretrain``: a resumed run's own ``config.yaml``, or
    ``config`` (with ``overrides``) written into a new timestamped run directory.

    Raises:
        ConfigError: ``resume`` is no run directory, or neither was given.
    """
    if resume is not None:
        if not (resume / "config.yaml").is_file():
            raise ConfigError(f"{resume} is not a run directory (no config.yaml)")
        return load(resume / "config.yaml"), resume
    if config is None:
        raise ConfigError(f"streamer {command} needs --config RECIPE or --resume RUN_DIR")
    recipe = load(config)
    if overrides:
        recipe = recipe.with_updates(overrides)
    run_dir = new_run_dir(runs_root, recipe.name)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    return recipe, run_dir


@contextlib.contextmanager
def logging_to(run_dir: Path) -> Iterator[None]:
    """The ``streamer`` loggers also write ``run_dir/train.log`` inside the block."""
    handler = attach_log(run_dir)
    try:
        logging.getLogger("streamer.training").info("run directory %s", run_dir)
        yield
    finally:
        logging.getLogger("streamer").removeHandler(handler)
        handler.close()


class StopFlag:
    """Set by SIGTERM/SIGINT; the training loop stops after the current step."""

    def __init__(self) -> None:
        self.is_set = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        logging.getLogger("streamer.training").info("received %s: stopping after this step", name)
        self.is_set = True

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Cadence:
    """When a training loop logs (every ``log_every_steps``), validates (every ``val_every_steps`` and at the last
    step: a cooldown ends there, and best.pt must be able to hold it) and saves ``latest.pt`` (every
    ``checkpoint_every_s``). ``clear_window`` empties the loop's window of steps after each log line."""

    log_every_steps: int
    val_every_steps: int
    max_steps: int
    checkpoint_every_s: float
    clear_window: Callable[[], None]
    window_start: float = field(default_factory=time.monotonic)
    last_save: float = field(default_factory=time.monotonic)

    def after_step(self, step: int, log: Callable[[float], None], validate: Callable[[], None],
                   save: Callable[[], None]) -> None:
        """``log(seconds since the window began)``, ``validate()`` and ``save()`` when step ``step`` calls for them."""
        if step % self.log_every_steps == 0:
            log(time.monotonic() - self.window_start)
            self.clear_window()
            self.window_start = time.monotonic()
        if step % self.val_every_steps == 0 or step == self.max_steps:
            validate()
            self.window_start = time.monotonic()
        if time.monotonic() - self.last_save > self.checkpoint_every_s:
            save()
            self.last_save = time.monotonic()


def step_bar(initial: int, total: int) -> tqdm:
    """The training loops' progress bar in steps (refreshed twice a second on a terminal, else every 30 s)."""
    return tqdm(initial=initial, total=total, unit="step", dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 30.0, smoothing=0.05)


def next_batch(batches: Iterator[B], stop: StopFlag) -> B | None:
    """The next batch, or None when a stop (Ctrl-C also reaches the data worker, which then exits) ended it."""
    try:
        return next(batches)
    except RuntimeError:
        if stop.is_set:
            return None
        raise


def attach_log(run_dir: Path) -> logging.Handler:
    """Copy the ``streamer`` loggers' INFO and above into ``run_dir/train.log``; remove the handler when done."""
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("streamer").addHandler(handler)
    logging.getLogger("streamer").setLevel(logging.INFO)
    return handler


def log_window(progress: Progress, window: list[StepResult], seconds: float, lr: float) -> dict[str, float]:
    """Average the steps since the last log line, log them, and keep the entry in ``progress.history``.

    Args:
        progress: where training stands (after the window's last step).
        window: the steps since the last log line.
        seconds: their wall-clock time, for the audio seconds trained per second.
        lr: the learning rate of the last step.
    """
    audio = sum(r.audio_s for r in window)
    names = list(dict.fromkeys(name for r in window for name in r.parts))  # in the order the loss names them
    parts = {name: float(np.mean([r.parts[name] for r in window if name in r.parts])) for name in names}
    entry = {
        "step": progress.step,
        "epoch": progress.epoch,
        "loss": float(np.mean([r.loss for r in window])),
        **{f"{name}_loss": value for name, value in parts.items()},  # transducer_loss, ctc_loss; ce_loss, ...
        "grad_norm": float(np.mean([r.grad_norm for r in window])),
        "lr": lr,
        "audio_s_per_s": audio / max(seconds, 1e-9),
        "audio_hours": progress.audio_seconds / 3600,
    }
    progress.history = [*progress.history[-(HISTORY_ENTRIES - 1) :], entry]
    logger.info(
        "step %d epoch %d loss %.4f (%s) grad %.2f lr %.2e %.0f audio s/s %.2f h",
        progress.step,
        progress.epoch,
        entry["loss"],
        " ".join(f"{name} {value:.4f}" for name, value in parts.items()),
        entry["grad_norm"],
        entry["lr"],
        entry["audio_s_per_s"],
        entry["audio_hours"],
    )
    return entry


def log_validation(run_dir: Path, progress: Progress, wers: dict[str, float], seconds: float) -> None:
    """Append a validation's row to ``results.csv`` and log it (WERs as fractions, written as percent)."""
    last = progress.history[-1] if progress.history else {}
    row = {
        "step": progress.step,
        "epoch": progress.epoch,
        "audio_hours": round(progress.audio_seconds / 3600, 3),
        "train_hours": round(progress.train_seconds / 3600, 3),
        "lr": last.get("lr", 0.0),
        "train_loss": round(last.get("loss", float("nan")), 4),
        **{k: round(100 * v, 2) for k, v in wers.items()},
    }
    append_result(run_dir, row)
    logger.info(
        "validation at step %d: %s (best %.2f%% at step %d; %.0f s)",
        progress.step,
        ", ".join(f"{k} {100 * v:.2f}%" for k, v in wers.items()),
        100 * progress.best_wer,
        progress.best_step,
        seconds,
    )


def append_result(run_dir: Path, row: dict[str, Any]) -> None:
    """Append ``row`` to ``results.csv``, writing the header first when the file is new."""
    path = run_dir / "results.csv"
    is_new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if is_new:
            writer.writeheader()
        writer.writerow(row)


def draw_curves(run_dir: Path) -> None:
    """Redraw ``curves.svg`` (:mod:`streamer.training.curves`) from the run's logs; a failure is a warning,
    never the end of a run (whatever goes wrong in the drawing)."""
    try:
        write_curves([(None, run_dir)], run_dir / CURVES_FILE)
    except Exception as exc:  # noqa: BLE001 - a plot must not stop training
        logger.warning("could not draw %s: %s", run_dir / CURVES_FILE, exc)


def write_metrics(run_dir: Path, name: str, progress: Progress, parameters: int) -> None:
    """Rewrite ``metrics.json`` atomically: where the run stands and its last log entry."""
    metrics = {
        "name": name,
        "step": progress.step,
        "epoch": progress.epoch,
        "batch_in_epoch": progress.batch_in_epoch,
        "audio_hours": round(progress.audio_seconds / 3600, 3),
        "train_hours": round(progress.train_seconds / 3600, 3),
        "best_wer_percent": None if math.isinf(progress.best_wer) else round(100 * progress.best_wer, 2),
        "best_step": progress.best_step,
        "parameters": parameters,
        "last": progress.history[-1] if progress.history else None,
    }
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, run_dir / "metrics.json")
