"""``streamer pretrain``: Best-RQ self-supervised pretraining of the FastConformer encoder on unlabelled audio.

The run directory, progress bar, signals and resume work as in ``streamer train``
(:mod:`streamer.training.trainer`): ``config.yaml``, ``train.log``, ``metrics.json``, ``results.csv``
(loss and masked-code accuracy per validation), ``checkpoints/best.pt`` (lowest dev loss) and ``latest.pt``
(everything a resume needs: weights, optimizer, progress, RNG states), plus ``clips.jsonl`` (the audio the
run trains on). A checkpoint's encoder starts a TDT run through ``train.init_from``
(:func:`streamer.training.rundir.read_warm_start`). The method lives in :mod:`streamer.training.bestrq`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from streamer.asr import clocks
from streamer.asr.config import ContextSize, FeatureConfig
from streamer.asr.encoder import FastConformerEncoder
from streamer.training.bestrq import BestRqModel, make_targets
from streamer.training.data import Batch, EpochBatches, batch_seed, epoch_loader, eval_batches, plan_epoch
from streamer.training.model_init import center_front_end, feature_statistics, scale_residual_branches
from streamer.training.optim import build_optimizer, learning_rate
from streamer.training.pretrain_checkpoint import PretrainProgress, restore_pretrain, save_pretrain, write_metrics
from streamer.training.pretrain_data import ClipFeaturizer, load_clips
from streamer.training.pretrain_recipe import PretrainRecipe, load_pretrain_recipe
from streamer.training.recipe import encoder_config
from streamer.training.runlog import (
    Cadence,
    StopFlag,
    append_result,
    draw_curves,
    logging_to,
    next_batch,
    open_run,
    step_bar,
)
from streamer.training.speed import use_fast_depthwise, use_input_normalization
from streamer.training.step import bf16_supported, training_device

logger = logging.getLogger(__name__)
QUANTIZER_SEED_OFFSET = 7919  # the quantizer's generator: recipe seed + this (apart from the weights' seed)


def build_bestrq_model(recipe: PretrainRecipe) -> BestRqModel:
    """A freshly initialised encoder (seeded like the TDT recipe's), its code head and the frozen quantizer."""
    torch.manual_seed(recipe.seed)
    encoder = FastConformerEncoder(encoder_config(recipe.model.encoder))
    scale_residual_branches(encoder, recipe.train.residual_init_scale)
    return BestRqModel(encoder, recipe.bestrq, recipe.seed + QUANTIZER_SEED_OFFSET).train()


class Pretrainer:
    """Owns one pretraining run: clips, model, optimiser, loop, validation and checkpoints."""

    def __init__(self, recipe: PretrainRecipe, run_dir: Path, resume: bool = False) -> None:
        self.recipe, self.run_dir = recipe, run_dir
        torch.set_num_threads(recipe.train.threads)
        self.clips = load_clips(recipe.data, recipe.seed, run_dir)
        self.featurizer = ClipFeaturizer(
            Path(recipe.data.corpus_dir), FeatureConfig(normalize="NA"), recipe.data.dither, self.clips.from_files
        )
        self.device = training_device(recipe.train.device)
        if recipe.train.bf16 and not bf16_supported(self.device):
            logger.warning("train.bf16: this %s has no native bfloat16; training in float32", self.device)
            self.recipe = recipe = recipe.with_updates({"train": {"bf16": False}})
        self.model = build_bestrq_model(recipe)
        encoder = self.model.encoder
        if recipe.train.fast_depthwise and self.device.type == "cpu":
            use_fast_depthwise(encoder)
        if recipe.train.input_normalization:
            mean, std = feature_statistics(self.featurizer, self.clips.train)
            use_input_normalization(encoder, mean, std)
            logger.info("log-mel mean %.3f, std %.3f: the first conv trains on normalised input", mean, std)
        if recipe.train.center_front_end and not resume:
            center_front_end(encoder, self.featurizer, self.clips.train)
        self.model.to(self.device)
        self.optimizer = build_optimizer(self.model, recipe)
        self.progress = PretrainProgress(skipped_files=len(self.clips.skipped))
        self._last_lr = 0.0
        if resume:
            self.progress = restore_pretrain(run_dir / "checkpoints" / "latest.pt", self.model, self.optimizer)
            logger.info("resumed at step %d (epoch %d, batch %d)", self.progress.step, *self._position())
        hours = sum(u.num_samples for u in self.clips.train) / clocks.SAMPLE_RATE_HZ / 3600
        logger.info(
            "encoder: %.2fM parameters on %s; train: %d clips (%.2f h); dev: %d clips; %d files skipped",
            sum(p.numel() for p in encoder.parameters()) / 1e6,
            self.device,
            len(self.clips.train),
            hours,
            len(self.clips.dev),
            self.progress.skipped_files,
        )

    def _position(self) -> tuple[int, int]:
        return self.progress.epoch, self.progress.batch_in_epoch

    def _batches(self) -> Iterator[tuple[int, int, Batch]]:
        """(epoch, batch index, batch) from the saved data position on, forever."""
        recipe = self.recipe
        while True:
            epoch = self.progress.epoch
            plan = plan_epoch(self.clips.train, recipe.batching, recipe.seed, epoch)
            dataset = EpochBatches(
                self.clips.train, plan, self.featurizer, recipe.seed, epoch, start=self.progress.batch_in_epoch
            )
            for index, batch in epoch_loader(dataset, recipe.data.workers):
                yield epoch, index, batch
            self.progress.epoch += 1
            self.progress.batch_in_epoch = 0

    def _context(self, seed: int) -> ContextSize:
        """The look-ahead of one batch: one of the encoder's, as the TDT trainer samples it."""
        enc = self.recipe.model.encoder
        sizes = [(int(a), int(b)) for a, b in enc.att_context_sizes]
        return random.Random(seed).choices(sizes, weights=enc.att_context_probs or None)[0]

    def step(self, epoch: int, index: int, batch: Batch) -> tuple[float, float, float, float]:
        """One optimizer step on a batch; returns (loss, masked-code accuracy, gradient norm, audio seconds)."""
        recipe = self.recipe
        seed = batch_seed(recipe.seed, epoch, index)
        g = torch.Generator().manual_seed(seed + 2)
        targets = make_targets(self.model.quantizer, batch.mel, batch.mel_lengths, recipe.bestrq, g)
        self._last_lr = learning_rate(recipe, self.progress.step)
        for group in self.optimizer.param_groups:
            group["lr"] = self._last_lr
        self.optimizer.zero_grad(set_to_none=True)
        bf16 = recipe.train.bf16 and bf16_supported(self.device)
        loss, accuracy = self.model(targets, batch.mel_lengths, self._context(seed), bf16)
        loss.backward()
        clip = recipe.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        if torch.isfinite(norm):
            self.optimizer.step()
        else:
            logger.warning("non-finite gradient norm; step skipped")
        return float(loss.detach()), float(accuracy), float(norm), batch.audio_seconds

    def run(self) -> int:
        """Pretrain until ``max_steps``, ``max_hours`` or a signal; returns the exit status (0)."""
        recipe, progress = self.recipe, self.progress
        deadline = time.monotonic() + recipe.train.max_hours * 3600 if recipe.train.max_hours > 0 else math.inf
        window: list[tuple[float, float, float, float]] = []
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
                window.append(self.step(epoch, index, batch))
                progress.step += 1
                progress.epoch, progress.batch_in_epoch = epoch, index + 1
                progress.audio_seconds += batch.audio_seconds
                progress.train_seconds += time.monotonic() - step_start
                bar.update(1)
                cadence.after_step(progress.step, lambda seconds: self._log(window, seconds, bar), self.validate,
                                   self.save_latest)
            self.save_latest()
        logger.info("stopped at step %d; resume with: streamer pretrain --resume %s", progress.step, self.run_dir)
        return 0

    def _log(self, window: list[tuple[float, float, float, float]], seconds: float, bar: tqdm) -> None:
        p = self.progress
        loss, acc, grad, _ = (float(np.mean(col)) for col in zip(*window, strict=True))
        entry = {
            "step": p.step,
            "epoch": p.epoch,
            "loss": loss,
            "accuracy": acc,
            "grad_norm": grad,
            "lr": self._last_lr,
            "audio_s_per_s": sum(w[3] for w in window) / max(seconds, 1e-9),
            "audio_hours": p.audio_seconds / 3600,
        }
        p.history = [*p.history[-199:], entry]
        logger.info(
            "step %d epoch %d loss %.4f masked-code accuracy %.3f grad %.2f lr %.2e %.2f h",
            p.step, p.epoch, loss, acc, grad, self._last_lr, entry["audio_hours"],
        )  # fmt: skip
        bar.set_postfix(
            loss=f"{loss:.3f}", acc=f"{acc:.3f}", lr=f"{self._last_lr:.2e}", hours=f"{entry['audio_hours']:.2f}"
        )
        self._write_metrics()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and masked-code accuracy on the dev clips, with masks fixed by seed (the same every time)."""
        self.model.eval()
        recipe = self.recipe
        ctx = (int(recipe.train.val_att_context_size[0]), int(recipe.train.val_att_context_size[1]))
        total_loss = total_acc = frames = 0.0
        codes_seen: set[int] = set()
        batches = eval_batches(self.clips.dev, self.featurizer, recipe.batching.max_batch_mel_frames)
        for i, batch in enumerate(batches):
            g = torch.Generator().manual_seed(batch_seed(recipe.seed, -1, i))
            targets = make_targets(self.model.quantizer, batch.mel, batch.mel_lengths, recipe.bestrq, g)
            n = float(targets.loss_frames.sum())
            if n == 0:
                continue
            loss, acc = self.model(targets, batch.mel_lengths, ctx, recipe.train.bf16 and bf16_supported(self.device))
            total_loss, total_acc, frames = total_loss + float(loss) * n, total_acc + float(acc) * n, frames + n
            codes_seen.update(targets.codes[..., 0][targets.valid_frames].tolist())
        self.model.train()
        return {
            "dev_loss": total_loss / max(frames, 1.0),
            "dev_accuracy": total_acc / max(frames, 1.0),
            "dev_codes_used": float(len(codes_seen)),
        }

    def validate(self) -> dict[str, float]:
        """:meth:`evaluate`, a ``results.csv`` row, and ``best.pt`` on a new lowest dev loss."""
        start = time.monotonic()
        result = self.evaluate()
        p = self.progress
        if result["dev_loss"] < p.best_dev_loss:
            p.best_dev_loss, p.best_step = result["dev_loss"], p.step
            save_pretrain(self.run_dir / "checkpoints" / "best.pt", self.model, None, self.recipe, p)
        last = p.history[-1] if p.history else {}
        append_result(
            self.run_dir,
            {
                "step": p.step,
                "epoch": p.epoch,
                "audio_hours": round(p.audio_seconds / 3600, 3),
                "train_hours": round(p.train_seconds / 3600, 3),
                "lr": last.get("lr", self._last_lr),
                "train_loss": round(last.get("loss", float("nan")), 4),
                "train_accuracy": round(last.get("accuracy", float("nan")), 4),
                "dev_loss": round(result["dev_loss"], 4),
                "dev_accuracy": round(result["dev_accuracy"], 4),
                "dev_codes_used": int(result["dev_codes_used"]),
            },
        )
        logger.info(
            "validation at step %d: dev loss %.4f, masked-code accuracy %.3f, %d codes used (best %.4f at step %d; "
            "%.0f s)",
            p.step, result["dev_loss"], result["dev_accuracy"], result["dev_codes_used"], p.best_dev_loss,
            p.best_step, time.monotonic() - start,
        )  # fmt: skip
        draw_curves(self.run_dir)
        self._write_metrics()
        return result

    def _write_metrics(self) -> None:
        parameters = sum(p.numel() for p in self.model.encoder.parameters())
        write_metrics(self.run_dir, self.recipe.name, self.progress, parameters)

    def save_latest(self) -> None:
        """Write ``checkpoints/latest.pt`` (everything a resume needs) and ``metrics.json``."""
        save_pretrain(
            self.run_dir / "checkpoints" / "latest.pt", self.model, self.optimizer, self.recipe, self.progress
        )
        self._write_metrics()
        logger.info("saved %s at step %d", self.run_dir / "checkpoints" / "latest.pt", self.progress.step)


def pretrain(
    config: Path | None, resume: Path | None, runs_root: Path = Path("runs"), overrides: dict[str, Any] | None = None
) -> tuple[int, Path]:
    """Start a pretraining run from a recipe, or resume one; returns (exit status, run directory)."""
    recipe, run_dir = open_run("pretrain", config, resume, runs_root, overrides, load_pretrain_recipe)
    with logging_to(run_dir):
        has_latest = (run_dir / "checkpoints" / "latest.pt").is_file()
        trainer = Pretrainer(recipe, run_dir, resume=resume is not None and has_latest)
        return trainer.run(), run_dir
