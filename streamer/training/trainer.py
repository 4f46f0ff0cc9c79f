"""``streamer train``: train a streaming FastConformer-TDT (or a Paraformer) from a recipe, resumably, on a small
CPU machine.

A run lives in ``runs/<timestamp>_<name>/``::

    config.yaml               the resolved recipe
    train.log                 the log (also on stderr)
    metrics.json              where the run stands: step, epoch, hours of audio seen, best WER, last losses
    results.csv               one row per validation
    checkpoints/latest.pt     everything needed to resume (model, optimizer, step, data position, RNG)
    checkpoints/best.pt       the weights with the lowest dev WER so far

Multi-lookahead training (NeMo's ``att_context_size`` list): every batch samples one look-ahead, so one
model serves them all. Everything random about a batch (order, dither, SpecAugment, look-ahead) derives from
``(seed, epoch, batch index)``, and the omega draw of the loss is saved, so a resumed run continues exactly
where it stopped. SIGTERM and SIGINT finish the current step, save ``latest.pt`` and exit 0.

This module is the loop and the run's owner; its parts live beside it: the initial model
(:mod:`~streamer.training.model_init`), the optimiser and schedule (:mod:`~streamer.training.optim`), one
step (:mod:`~streamer.training.step`), checkpoints (:mod:`~streamer.training.rundir`) and the run's log and
metrics files (:mod:`~streamer.training.runlog`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from streamer.asr import clocks
from streamer.asr.tokenizer import Tokenizer
from streamer.errors import ConfigError
from streamer.training.data import (
    Batch,
    BatchFeaturizer,
    EpochBatches,
    batch_seed,
    epoch_loader,
    eval_batches,
    extra_utterances,
    first_hours,
    load_utterances,
    plan_epoch,
    spec_augment,
)
from streamer.training.evaluate import decode_offline, word_error_rate
from streamer.training.model_init import build_model, center_front_end, feature_statistics
from streamer.training.optim import build_optimizer, scheduled_lr
from streamer.training.pretrain_checkpoint import load_encoder_into, pretrained_encoder_from
from streamer.training.recipe import Recipe, any_model_config, load_recipe
from streamer.training.rundir import (
    AnyModel,
    Progress,
    read_warm_start,
    restore_checkpoint,
    save_checkpoint,
)
from streamer.training.runlog import (
    Cadence,
    StopFlag,
    draw_curves,
    log_validation,
    log_window,
    logging_to,
    next_batch,
    open_run,
    step_bar,
    write_metrics,
)
from streamer.training.speed import use_fast_depthwise, use_input_normalization
from streamer.training.step import (
    StepResult,
    batch_to,
    bf16_supported,
    sample_context,
    train_step,
    training_device,
    with_mel,
)
from streamer.training.tdt_loss import TransducerLoss

logger = logging.getLogger(__name__)


class Trainer:
    """Owns one run: data, model, optimiser, loop, validation and checkpoints."""

    def __init__(self, recipe: Recipe, run_dir: Path, resume: bool = False) -> None:
        self.recipe, self.run_dir = recipe, run_dir
        torch.set_num_threads(recipe.train.threads)
        data = recipe.data
        corpus = Path(data.corpus_dir)
        if not data.tokenizer_path.is_file():
            raise ConfigError(f"tokenizer {data.tokenizer_path} does not exist (the corpus builder writes it last)")
        self.tokenizer_model = data.tokenizer_path.read_bytes()
        warm: tuple[AnyModel, dict[str, Any]] | None = None
        # train.init_from: a pretrained encoder (streamer pretrain) or a whole model (.nemo, run checkpoint)
        init_from = Path(recipe.train.init_from) if recipe.train.init_from and not resume else None
        encoder_init = pretrained_encoder_from(init_from) if init_from is not None else None
        if init_from is not None and encoder_init is None:
            warm = read_warm_start(init_from)
            assert warm[0].tokenizer is not None
            if warm[0].tokenizer.model_bytes != self.tokenizer_model:
                logger.warning(
                    "the corpus tokenizer differs from %s's; training with the model's", recipe.train.init_from
                )
            self.tokenizer_model = warm[0].tokenizer.model_bytes
        tokenizer = Tokenizer.from_bytes(self.tokenizer_model, str(data.tokenizer_path))
        self.train_utts = load_utterances(corpus, data.train_split, tokenizer, data.min_duration_s, data.max_duration_s)
        if data.train_hours > 0:
            self.train_utts = first_hours(self.train_utts, data.train_hours)
        for extra in data.extra_train:
            more = extra_utterances(
                Path(extra.corpus_dir), extra.split, tokenizer, extra.hours, data.min_duration_s, data.max_duration_s
            )
            logger.info(
                "data.extra_train: %d utterances (%.2f h) of %s/%s join %d of %s",
                len(more),
                sum(u.num_samples for u in more) / clocks.SAMPLE_RATE_HZ / 3600,
                extra.corpus_dir,
                extra.split,
                len(self.train_utts),
                corpus,
            )
            self.train_utts += more
        self.dev_utts = load_utterances(
            corpus, data.dev_split, tokenizer, data.min_duration_s, data.max_duration_s, limit=data.dev_utterances
        )
        self.featurizer = BatchFeaturizer(corpus, any_model_config(recipe, tokenizer.vocab_size).features, data.dither)
        self.device = training_device(recipe.train.device)
        if recipe.train.bf16 and not bf16_supported(self.device):
            logger.warning(
                "train.bf16: this %s has no native bfloat16 (torch's CPU capability: %s); training in float32",
                self.device,
                torch.backends.cpu.get_cpu_capability(),
            )
            self.recipe = recipe = recipe.with_updates({"train": {"bf16": False}})
        self.model = build_model(recipe, tokenizer, recipe.seed)
        if recipe.train.fast_depthwise and self.device.type == "cpu":
            use_fast_depthwise(self.model.encoder)
        if recipe.train.input_normalization:
            mean, std = feature_statistics(self.featurizer, self.train_utts)
            use_input_normalization(self.model.encoder, mean, std)
            logger.info("log-mel mean %.3f, std %.3f: the first conv trains on normalised input", mean, std)
        # A warm start (or a pretrained encoder) brings its own front end.
        if recipe.train.center_front_end and not resume and warm is None and encoder_init is None:
            offset = center_front_end(self.model.encoder, self.featurizer, self.train_utts)
            logger.info("front end centred (its output's constant part was %.3f rms)", offset)
        self.model.to(self.device)  # before the optimizer, whose state then lives beside the weights
        self.optimizer = build_optimizer(self.model, recipe)
        head = recipe.model.transducer
        self.loss_fn = TransducerLoss(
            head.durations, recipe.loss.sigma, recipe.loss.omega, recipe.loss.reduction, seed=recipe.seed
        )
        self.progress = Progress()
        self.init_report: tuple[list[str], list[str]] | None = None  # pretrained encoder: (loaded, fresh) keys
        self._last_lr = 0.0
        if resume:
            self._restore(run_dir / "checkpoints" / "latest.pt")
        elif warm is not None:
            self._warm_start(*warm)
        elif encoder_init is not None:
            self._load_encoder(encoder_init)
        hours = sum(u.num_samples for u in self.train_utts) / clocks.SAMPLE_RATE_HZ / 3600
        logger.info(
            "model: %.2fM parameters on %s; train: %d utterances (%.1f h); dev subset: %d",
            self.model.num_parameters / 1e6,
            self.device,
            len(self.train_utts),
            hours,
            len(self.dev_utts),
        )

    def _restore(self, path: Path) -> None:
        self.progress = restore_checkpoint(path, self.model, self.optimizer, self.loss_fn)
        logger.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            path,
            self.progress.step,
            self.progress.epoch,
            self.progress.batch_in_epoch,
        )

    def _warm_start(self, model: AnyModel, record: dict[str, Any]) -> None:
        own = self.model.state_dict()
        theirs = model.state_dict()
        if own.keys() != theirs.keys() or any(own[k].shape != theirs[k].shape for k in own):
            raise ConfigError(f"train.init_from: {self.recipe.train.init_from} does not have this recipe's model shape")
        self.model.load_state_dict(theirs, strict=True)
        step = int(record.get("step", 0))
        self.progress = Progress(
            step=step,
            epoch=int(record.get("epoch", -1)) + 1,  # a fresh shuffle
            audio_seconds=float(record.get("audio_seconds", 0.0)),
            train_seconds=float(record.get("train_seconds", 0.0)),
            warm_start_step=step,
            warm_start_from=self.recipe.train.init_from,
        )
        logger.info(
            "warm start from %s: step %d, %.1f h of audio seen before; lr ramps up over %d steps",
            self.recipe.train.init_from,
            step,
            self.progress.audio_seconds / 3600,
            self.recipe.optim.rewarmup_steps,
        )

    def _load_encoder(self, weights: dict[str, torch.Tensor]) -> None:
        """Start from a pretrained encoder: its weights load; the heads and the step count start fresh."""
        source = self.recipe.train.init_from
        loaded, fresh = load_encoder_into(self.model, weights, source)
        self.progress.warm_start_from = source  # the step count and lr schedule start at 0 (warm_start_step -1)
        self.init_report = (loaded, fresh)
        logger.info(
            "init_from %s: loaded the pretrained encoder (%d tensors: pre_encode and %d layers); "
            "left as initialised: %d tensors (%s)",
            source,
            len(loaded),
            self.recipe.model.encoder.n_layers,
            len(fresh),
            ", ".join(sorted({k.split(".")[0] for k in fresh})),
        )

    # ------------------------------------------------------------------ loop

    def _batches(self) -> Iterator[tuple[int, int, Batch]]:
        """(epoch, batch index, batch) from the saved data position on, forever."""
        while True:
            epoch = self.progress.epoch
            plan = plan_epoch(self.train_utts, self.recipe.batching, self.recipe.seed, epoch)
            dataset = EpochBatches(
                self.train_utts, plan, self.featurizer, self.recipe.seed, epoch, start=self.progress.batch_in_epoch
            )
            for index, batch in epoch_loader(dataset, self.recipe.data.workers):
                yield epoch, index, batch
            self.progress.epoch += 1
            self.progress.batch_in_epoch = 0

    def run(self) -> int:
        """Train until ``max_steps``, ``max_hours`` or a signal; returns the exit status (0)."""
        recipe, progress = self.recipe, self.progress
        deadline = time.monotonic() + recipe.train.max_hours * 3600 if recipe.train.max_hours > 0 else math.inf
        window: list[StepResult] = []
        cadence = Cadence(recipe.train.log_every_steps, recipe.train.val_every_steps, recipe.train.max_steps,
                          recipe.train.checkpoint_every_minutes * 60, window.clear)
        bar = step_bar(progress.step, recipe.train.max_steps)
        with StopFlag() as stop, bar:
            batches = self._batches()
            while progress.step < recipe.train.max_steps and not stop.is_set and time.monotonic() < deadline:
                step_start = time.monotonic()
                fetched = next_batch(batches, stop)
                if fetched is None:
                    break
                epoch, index, batch = fetched
                seed = batch_seed(recipe.seed, epoch, index)
                ctx = sample_context(recipe, seed)
                if recipe.spec_augment.start_step <= progress.step:
                    g = torch.Generator().manual_seed(seed + 1)
                    batch = with_mel(batch, spec_augment(batch.mel, batch.mel_lengths, recipe.spec_augment, g))
                self._last_lr = scheduled_lr(recipe, progress)
                result = train_step(self.model, self.optimizer, batch, ctx, self.loss_fn, recipe, self._last_lr)
                progress.step += 1
                progress.epoch, progress.batch_in_epoch = epoch, index + 1
                progress.audio_seconds += result.audio_s
                progress.train_seconds += time.monotonic() - step_start
                window.append(result)
                bar.update(1)
                cadence.after_step(progress.step, lambda seconds: self._log(window, seconds, bar), self.validate,
                                   self.save_latest)
            self.save_latest()
        logger.info("stopped at step %d; resume with: streamer train --resume %s", progress.step, self.run_dir)
        return 0

    def _log(self, window: list[StepResult], seconds: float, bar: tqdm) -> None:
        entry = log_window(self.progress, window, seconds, self._last_lr)
        bar.set_postfix(
            loss=f"{entry['loss']:.3f}",
            lr=f"{entry['lr']:.2e}",
            audio_s_per_s=f"{entry['audio_s_per_s']:.0f}",
            hours=f"{entry['audio_hours']:.2f}",
        )
        self._write_metrics()

    # ------------------------------------------------------------------ validation and files

    def validate(self) -> dict[str, float]:
        """Greedy WER on the dev subset at each validation look-ahead; saves best.pt on a new best."""
        self.model.eval()
        start = time.monotonic()
        wers: dict[str, float] = {}
        paraformer = self.recipe.model.type == "paraformer"  # full context: one WER
        for ctx in [[-1, -1]] if paraformer else self.recipe.train.val_att_context_sizes:
            refs, hyps = [], []
            for batch in eval_batches(self.dev_utts, self.featurizer, self.recipe.batching.max_batch_mel_frames):
                batch = batch_to(batch, self.device)
                hyps += decode_offline(self.model, batch.mel, batch.mel_lengths, (ctx[0], ctx[1]))
                refs += batch.texts
            wers["wer" if paraformer else f"wer_{ctx[0]}_{ctx[1]}"] = word_error_rate(refs, hyps)[0]
        self.model.train()
        p = self.progress
        main = next(iter(wers.values()))
        if main < p.best_wer:
            p.best_wer, p.best_step = main, p.step
            save_checkpoint(
                self.run_dir / "checkpoints" / "best.pt", self.model, self.tokenizer_model, None, self.recipe, p, None
            )
        log_validation(self.run_dir, p, wers, time.monotonic() - start)
        draw_curves(self.run_dir)
        self._write_metrics()
        return wers

    def _write_metrics(self) -> None:
        write_metrics(self.run_dir, self.recipe.name, self.progress, self.model.num_parameters)

    def save_latest(self) -> None:
        """Write ``checkpoints/latest.pt`` (everything a resume needs) and ``metrics.json``."""
        save_checkpoint(
            self.run_dir / "checkpoints" / "latest.pt",
            self.model,
            self.tokenizer_model,
            self.optimizer,
            self.recipe,
            self.progress,
            self.loss_fn,
        )
        self._write_metrics()
        logger.info("saved %s at step %d", self.run_dir / "checkpoints" / "latest.pt", self.progress.step)


def train(
    config: Path | None, resume: Path | None, runs_root: Path = Path("runs"), overrides: dict[str, Any] | None = None
) -> tuple[int, Path]:
    """Start a run from a recipe, or resume one; returns (exit status, run directory)."""
    recipe, run_dir = open_run("train", config, resume, runs_root, overrides, load_recipe)
    with logging_to(run_dir):
        has_latest = (run_dir / "checkpoints" / "latest.pt").is_file()
        trainer = Trainer(recipe, run_dir, resume=resume is not None and has_latest)
        return trainer.run(), run_dir

