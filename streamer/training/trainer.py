"""``streamer train``: train a streaming FastConformer-TDT from a recipe, resumably, on a small CPU machine.

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

Shape legend:
    B utterances   F mel bins   M mel frames   T encoder frames   U target tokens   V vocab incl. blank
    N TDT durations
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor
from tqdm import tqdm

from streamer.asr import clocks
from streamer.asr.config import ContextSize
from streamer.asr.encoder import FastConformerEncoder
from streamer.asr.model import AsrModel
from streamer.asr.tokenizer import Tokenizer
from streamer.errors import ConfigError
from streamer.training.data import (
    Batch,
    BatchFeaturizer,
    EpochBatches,
    Utterance,
    batch_seed,
    epoch_loader,
    eval_batches,
    load_utterances,
    plan_epoch,
    spec_augment,
)
from streamer.training.evaluate import decode_offline, word_error_rate
from streamer.training.recipe import Recipe, load_recipe, model_config, recipe_from_dict
from streamer.training.rundir import (
    CHECKPOINT_VERSION,
    load_checkpoint_file,
    new_run_dir,
    read_warm_start,
)
from streamer.training.speed import InputNormalizedConv2d, use_fast_depthwise, use_input_normalization
from streamer.training.tdt_loss import TransducerLoss, ctc_loss

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Model, optimiser, schedule


def build_model(recipe: Recipe, tokenizer: Tokenizer, seed: int) -> AsrModel:
    """A freshly initialised model for the recipe (NeMo's LSTM forget-gate bias of 1; the encoder's
    residual branches scaled by ``train.residual_init_scale``, see :func:`scale_residual_branches`)."""
    torch.manual_seed(seed)
    model = AsrModel(model_config(recipe, tokenizer.vocab_size), tokenizer)
    scale_residual_branches(model.encoder, recipe.train.residual_init_scale)
    lstm = model.decoder.prediction.dec_rnn.lstm  # type: ignore[union-attr]
    with torch.no_grad():
        for name, param in lstm.named_parameters():
            if name.startswith("bias_ih"):
                hidden = param.shape[0] // 4
                param.zero_()
                param[hidden : 2 * hidden] = 1.0  # gates i, f, g, o: forget gate open at the start
            elif name.startswith("bias_hh"):
                param.zero_()
    return model.train()


def scale_residual_branches(encoder: FastConformerEncoder, scale: float) -> None:
    """Multiply the initial output projections of every residual branch (both feed-forwards, attention,
    convolution module) by ``scale``.

    Every block adds its four branches to the residual stream and ends in a LayerNorm (``norm_out``), so
    at initialisation each block mixes random features into what the front end gave it. Measured on the
    corpus (with :func:`center_front_end`): the last block's output varied over time by 0.43 of its scale
    with the default initialisation and by 0.70 with ``scale`` 0.1, which starts every block near the
    identity. Only the initial values change.
    """
    if scale == 1.0:
        return
    with torch.no_grad():
        for layer in encoder.layers:
            for out in (
                layer.feed_forward1.linear2,
                layer.feed_forward2.linear2,
                layer.self_attn.linear_out,
                layer.conv.pointwise_conv2,
            ):
                out.weight.mul_(scale)
                if out.bias is not None:
                    out.bias.zero_()


@torch.no_grad()
def center_front_end(
    encoder: FastConformerEncoder, featurizer: BatchFeaturizer, utts: list[Utterance], count: int = 64
) -> float:
    """Data-dependent initialisation of the subsampling's output projection (``pre_encode.out``): its output
    over real speech gets zero mean and, after ``xscaling``, unit standard deviation.

    With the default initialisation the front end's output is mostly a constant vector (the mean of its
    ReLU features through the projection): on this corpus its time-invariant part was 4.7x its varying
    part, every block inherited that, and training drove the encoder to a constant output while only the
    prediction network learned (CTC loss flat for 1,600 steps). Centring removes the constant, so the
    blocks start from what the audio says. Only the initial values change. Returns the removed mean's rms.
    """
    pre = encoder.pre_encode
    picked = utts[:: max(1, len(utts) // count)][:count]
    outs = []
    for i in range(0, len(picked), 16):
        batch = featurizer(picked[i : i + 16])
        y, _, lengths = pre(batch.mel.transpose(1, 2), torch.zeros_like(batch.mel_lengths), batch.mel_lengths)
        valid = torch.arange(y.size(1))[None, :] < lengths[:, None]
        outs.append(y[valid].double())
    y = torch.cat(outs)
    mean = y.mean(0)
    std = float((y - mean).std())
    scale = 1.0 / (std * (encoder.xscale or 1.0))
    pre.out.weight.mul_(scale)
    if pre.out.bias is not None:
        pre.out.bias.sub_(mean.to(pre.out.bias.dtype)).mul_(scale)
    return float(mean.pow(2).mean().sqrt())


def build_optimizer(model: AsrModel, recipe: Recipe) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms and the attention position biases."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and "pos_bias" not in name else no_decay).append(param)
    opt = recipe.optim
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opt.lr,
        betas=(opt.betas[0], opt.betas[1]),
        eps=opt.eps,
    )


def learning_rate(recipe: Recipe, step: int) -> float:
    """Linear warmup to ``lr``, then Noam (inverse square root) or cosine decay to ``min_lr``.

    With ``optim.anneal_steps``, the last that many steps before ``train.max_steps`` take the rate
    linearly from the schedule's value down to ``min_lr`` (a cooldown, which a run can add at its end).
    ``step`` counts optimizer steps from 0.
    """
    opt = recipe.optim
    s = step + 1
    if s <= opt.warmup_steps:
        return opt.lr * s / max(opt.warmup_steps, 1)
    if opt.schedule == "noam":
        lr = max(opt.min_lr, opt.lr * math.sqrt(opt.warmup_steps / s))
    else:
        span = max(recipe.train.max_steps - opt.warmup_steps, 1)
        progress = min(1.0, (s - opt.warmup_steps) / span)
        lr = opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1 + math.cos(math.pi * progress))
    left = recipe.train.max_steps - step  # steps still to take, this one included
    if 0 < opt.anneal_steps and left <= opt.anneal_steps:
        lr = opt.min_lr + (lr - opt.min_lr) * max(left - 1, 0) / opt.anneal_steps
    return lr


def scheduled_lr(recipe: Recipe, progress: Progress) -> float:
    """The learning rate of the next step: the schedule, ramped up again after a warm start.

    A warm start brings weights but not the optimizer's moment estimates, so the first
    ``optim.rewarmup_steps`` steps scale the scheduled rate linearly from 0 while Adam re-learns them.
    """
    lr = learning_rate(recipe, progress.step)
    if progress.warm_start_step >= 0 and recipe.optim.rewarmup_steps > 0:
        done = progress.step - progress.warm_start_step + 1
        lr *= min(1.0, done / recipe.optim.rewarmup_steps)
    return lr


def feature_statistics(featurizer: BatchFeaturizer, utts: list[Utterance], count: int = 256) -> tuple[float, float]:
    """Mean and std of the valid log-mel values of every ``len(utts) // count``-th utterance (deterministic)."""
    picked = utts[:: max(1, len(utts) // count)][:count]
    total = total_sq = 0.0
    n = 0
    for i in range(0, len(picked), 16):
        batch = featurizer(picked[i : i + 16])
        valid = torch.arange(batch.mel.size(2))[None, :] < batch.mel_lengths[:, None]  # (B, M)
        values = batch.mel.double().transpose(1, 2)[valid]  # (frames, F)
        total += float(values.sum())
        total_sq += float((values**2).sum())
        n += values.numel()
    mean = total / n
    return mean, math.sqrt(max(total_sq / n - mean**2, 1e-12))


# --------------------------------------------------------------------------------------------------
# One step


@dataclass
class StepResult:
    loss: float
    transducer_loss: float
    ctc_loss: float
    grad_norm: float
    audio_s: float
    context: ContextSize


def sample_context(recipe: Recipe, seed: int) -> ContextSize:
    """The look-ahead of one batch (NeMo samples uniformly; ``att_context_probs`` may weight them)."""
    enc = recipe.model.encoder
    sizes = [(int(a), int(b)) for a, b in enc.att_context_sizes]
    weights = enc.att_context_probs or None
    return random.Random(seed).choices(sizes, weights=weights)[0]


def compute_loss(
    model: AsrModel, batch: Batch, ctx: ContextSize, loss_fn: TransducerLoss, recipe: Recipe
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(total, transducer, ctc) losses of a batch at look-ahead ``ctx``."""
    device = next(model.parameters()).device
    batch = batch_to(batch, device)
    bf16 = recipe.train.bf16 and bf16_supported(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        enc, enc_len = model.encoder(batch.mel, batch.mel_lengths, ctx)  # (B, T, D)
        pred = model.decoder(batch.targets)  # (B, U+1, P)
        assert model.joint is not None
        logits = model.joint.joint(enc, pred)  # (B, T, U+1, V+N)
    transducer = loss_fn(logits.float(), batch.targets, enc_len, batch.target_lengths)
    if model.ctc_decoder is None or recipe.loss.ctc_weight <= 0:
        return transducer, transducer, None
    log_probs = model.ctc_decoder(enc.float())  # (B, T, V)
    ctc = ctc_loss(log_probs, batch.targets, enc_len, batch.target_lengths, recipe.loss.reduction)  # type: ignore[arg-type]
    w = recipe.loss.ctc_weight
    return (1 - w) * transducer + w * ctc, transducer, ctc


def training_device(name: str) -> torch.device:
    """``train.device``: "auto" is the first CUDA GPU if torch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"train.device: {name!r} is not a device (auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but torch {torch.__version__} sees no CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.device: {name!r} is not supported (auto, cpu, cuda or cuda:N)")
    return device


@functools.cache
def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 autocast runs natively on ``device``. On a CPU that is oneDNN's own check (AVX-512
    bf16 or AMX); without it, autocast emulates bf16 slowly and oneDNN's LSTM refuses it outright, so
    :func:`compute_loss` runs such a device in float32 whatever ``train.bf16`` says."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """The batch's tensors on ``device`` (the same batch where they already are)."""
    if batch.mel.device == device:
        return batch
    return Batch(
        batch.mel.to(device, non_blocking=True),
        batch.mel_lengths.to(device),
        batch.targets.to(device, non_blocking=True),
        batch.target_lengths.to(device),
        batch.ids,
        batch.texts,
    )


def train_step(
    model: AsrModel,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    ctx: ContextSize,
    loss_fn: TransducerLoss,
    recipe: Recipe,
    lr: float,
) -> StepResult:
    """Forward, backward, clip, AdamW step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    total, transducer, ctc = compute_loss(model, batch, ctx, loss_fn, recipe)
    total.backward()
    clip = recipe.optim.grad_clip
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
    if torch.isfinite(norm):
        optimizer.step()
    else:
        logger.warning("non-finite gradient norm; step skipped")
    return StepResult(
        loss=float(total.detach()),
        transducer_loss=float(transducer.detach()),
        ctc_loss=float(ctc.detach()) if ctc is not None else 0.0,
        grad_norm=float(norm),
        audio_s=batch.audio_seconds,
        context=ctx,
    )


# --------------------------------------------------------------------------------------------------
# Run directory and checkpoints


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


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(
    path: Path,
    model: AsrModel,
    tokenizer_model: bytes,
    optimizer: torch.optim.Optimizer | None,
    recipe: Recipe,
    progress: Progress,
    loss_fn: TransducerLoss | None,
) -> None:
    """Write a training checkpoint atomically."""
    _atomic_save(
        {
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
        },
        path,
    )


# --------------------------------------------------------------------------------------------------
# The trainer


class _StopFlag:
    """Set by SIGTERM/SIGINT; the training loop stops after the current step."""

    def __init__(self) -> None:
        self.is_set = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        logger.info("received %s: stopping after this step", signal.Signals(signum).name)
        self.is_set = True

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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
        warm: tuple[AsrModel, dict[str, Any]] | None = None
        if recipe.train.init_from and not resume:
            warm = read_warm_start(Path(recipe.train.init_from))
            assert warm[0].tokenizer is not None
            if warm[0].tokenizer.model_bytes != self.tokenizer_model:
                logger.warning(
                    "the corpus tokenizer differs from %s's; training with the model's", recipe.train.init_from
                )
            self.tokenizer_model = warm[0].tokenizer.model_bytes
        tokenizer = Tokenizer.from_bytes(self.tokenizer_model, str(data.tokenizer_path))
        self.train_utts = load_utterances(corpus, data.train_split, tokenizer, data.min_duration_s, data.max_duration_s)
        self.dev_utts = load_utterances(
            corpus, data.dev_split, tokenizer, data.min_duration_s, data.max_duration_s, limit=data.dev_utterances
        )
        self.featurizer = BatchFeaturizer(corpus, model_config(recipe, tokenizer.vocab_size).features, data.dither)
        self.device = training_device(recipe.train.device)
        if recipe.train.bf16 and not bf16_supported(self.device):
            logger.warning(
                "train.bf16: this %s has no native bfloat16 (torch's CPU capability: %s); training in float32",
                self.device,
                torch.backends.cpu.get_cpu_capability(),
            )
            self.recipe = recipe = replace(recipe, train=replace(recipe.train, bf16=False))
        self.model = build_model(recipe, tokenizer, recipe.seed)
        if recipe.train.fast_depthwise and self.device.type == "cpu":
            use_fast_depthwise(self.model.encoder)
        if recipe.train.input_normalization:
            mean, std = feature_statistics(self.featurizer, self.train_utts)
            use_input_normalization(self.model.encoder, mean, std)
            logger.info("log-mel mean %.3f, std %.3f: the first conv trains on normalised input", mean, std)
        if recipe.train.center_front_end and not resume and warm is None:  # a warm start brings its own weights
            offset = center_front_end(self.model.encoder, self.featurizer, self.train_utts)
            logger.info("front end centred (its output's constant part was %.3f rms)", offset)
        self.model.to(self.device)  # before the optimizer, whose state then lives beside the weights
        self.optimizer = build_optimizer(self.model, recipe)
        head = recipe.model.transducer
        self.loss_fn = TransducerLoss(
            head.durations, recipe.loss.sigma, recipe.loss.omega, recipe.loss.reduction, seed=recipe.seed
        )  # type: ignore[arg-type]
        self.progress = Progress()
        self._last_lr = 0.0
        if resume:
            self._restore(run_dir / "checkpoints" / "latest.pt")
        elif warm is not None:
            self._warm_start(*warm)
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
        state = load_checkpoint_file(path)
        self.model.load_state_dict(state["model"], strict=True)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state.get("train_parameters", {}).items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress = Progress(**state["progress"])
        self.loss_fn.load_state_dict(state["loss_rng"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        logger.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            path,
            self.progress.step,
            self.progress.epoch,
            self.progress.batch_in_epoch,
        )

    def _warm_start(self, model: AsrModel, record: dict[str, Any]) -> None:
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
        last_save = time.monotonic()
        window: list[StepResult] = []
        window_start = time.monotonic()
        bar = tqdm(
            initial=progress.step,
            total=recipe.train.max_steps,
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
            smoothing=0.05,
        )
        with _StopFlag() as stop, bar:
            batches = self._batches()
            while progress.step < recipe.train.max_steps and not stop.is_set and time.monotonic() < deadline:
                step_start = time.monotonic()
                try:
                    epoch, index, batch = next(batches)
                except RuntimeError:
                    if stop.is_set:  # Ctrl-C also reached the data worker, which exited
                        break
                    raise
                seed = batch_seed(recipe.seed, epoch, index)
                ctx = sample_context(recipe, seed)
                if recipe.spec_augment.start_step <= progress.step:
                    g = torch.Generator().manual_seed(seed + 1)
                    batch = _with_mel(batch, spec_augment(batch.mel, batch.mel_lengths, recipe.spec_augment, g))
                self._last_lr = scheduled_lr(recipe, progress)
                result = train_step(self.model, self.optimizer, batch, ctx, self.loss_fn, recipe, self._last_lr)
                progress.step += 1
                progress.epoch, progress.batch_in_epoch = epoch, index + 1
                progress.audio_seconds += result.audio_s
                progress.train_seconds += time.monotonic() - step_start
                window.append(result)
                bar.update(1)
                if progress.step % recipe.train.log_every_steps == 0:
                    self._log(window, time.monotonic() - window_start, bar)
                    window, window_start = [], time.monotonic()
                # The last step is validated too: a cooldown ends there, and best.pt must be able to hold it.
                if progress.step % recipe.train.val_every_steps == 0 or progress.step == recipe.train.max_steps:
                    self.validate()
                    window_start = time.monotonic()
                if time.monotonic() - last_save > recipe.train.checkpoint_every_minutes * 60:
                    self.save_latest()
                    last_save = time.monotonic()
            self.save_latest()
        logger.info("stopped at step %d; resume with: streamer train --resume %s", progress.step, self.run_dir)
        return 0

    def _log(self, window: list[StepResult], seconds: float, bar: tqdm) -> None:
        p = self.progress
        audio = sum(r.audio_s for r in window)
        entry = {
            "step": p.step,
            "epoch": p.epoch,
            "loss": float(np.mean([r.loss for r in window])),
            "transducer_loss": float(np.mean([r.transducer_loss for r in window])),
            "ctc_loss": float(np.mean([r.ctc_loss for r in window])),
            "grad_norm": float(np.mean([r.grad_norm for r in window])),
            "lr": self._last_lr,
            "audio_s_per_s": audio / max(seconds, 1e-9),
            "audio_hours": p.audio_seconds / 3600,
        }
        p.history = [*p.history[-199:], entry]
        bar.set_postfix(
            loss=f"{entry['loss']:.3f}",
            lr=f"{entry['lr']:.2e}",
            audio_s_per_s=f"{entry['audio_s_per_s']:.0f}",
            hours=f"{entry['audio_hours']:.2f}",
        )
        logger.info(
            "step %d epoch %d loss %.4f (tdt %.4f ctc %.4f) grad %.2f lr %.2e %.0f audio s/s %.2f h",
            p.step,
            p.epoch,
            entry["loss"],
            entry["transducer_loss"],
            entry["ctc_loss"],
            entry["grad_norm"],
            entry["lr"],
            entry["audio_s_per_s"],
            entry["audio_hours"],
        )
        self._write_metrics()

    # ------------------------------------------------------------------ validation and files

    def validate(self) -> dict[str, float]:
        """Greedy WER on the dev subset at each validation look-ahead; saves best.pt on a new best."""
        self.model.eval()
        start = time.monotonic()
        wers: dict[str, float] = {}
        for ctx in self.recipe.train.val_att_context_sizes:
            refs, hyps = [], []
            for batch in eval_batches(self.dev_utts, self.featurizer, self.recipe.batching.max_batch_mel_frames):
                batch = batch_to(batch, self.device)
                hyps += decode_offline(self.model, batch.mel, batch.mel_lengths, (ctx[0], ctx[1]))
                refs += batch.texts
            wers[f"wer_{ctx[0]}_{ctx[1]}"] = word_error_rate(refs, hyps)[0]
        self.model.train()
        p = self.progress
        main = next(iter(wers.values()))
        if main < p.best_wer:
            p.best_wer, p.best_step = main, p.step
            save_checkpoint(
                self.run_dir / "checkpoints" / "best.pt", self.model, self.tokenizer_model, None, self.recipe, p, None
            )
        last = p.history[-1] if p.history else {}
        row = {
            "step": p.step,
            "epoch": p.epoch,
            "audio_hours": round(p.audio_seconds / 3600, 3),
            "train_hours": round(p.train_seconds / 3600, 3),
            "lr": last.get("lr", 0.0),
            "train_loss": round(last.get("loss", float("nan")), 4),
            **{k: round(100 * v, 2) for k, v in wers.items()},
        }
        self._append_result(row)
        logger.info(
            "validation at step %d: %s (best %.2f%% at step %d; %.0f s)",
            p.step,
            ", ".join(f"{k} {100 * v:.2f}%" for k, v in wers.items()),
            100 * p.best_wer,
            p.best_step,
            time.monotonic() - start,
        )
        self._write_metrics()
        return wers

    def _append_result(self, row: dict[str, Any]) -> None:
        path = self.run_dir / "results.csv"
        is_new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if is_new:
                writer.writeheader()
            writer.writerow(row)

    def _write_metrics(self) -> None:
        p = self.progress
        metrics = {
            "name": self.recipe.name,
            "step": p.step,
            "epoch": p.epoch,
            "batch_in_epoch": p.batch_in_epoch,
            "audio_hours": round(p.audio_seconds / 3600, 3),
            "train_hours": round(p.train_seconds / 3600, 3),
            "best_wer_percent": None if math.isinf(p.best_wer) else round(100 * p.best_wer, 2),
            "best_step": p.best_step,
            "parameters": self.model.num_parameters,
            "last": p.history[-1] if p.history else None,
        }
        tmp = self.run_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=2))
        os.replace(tmp, self.run_dir / "metrics.json")

    def save_latest(self) -> None:
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


def _with_mel(batch: Batch, mel: Tensor) -> Batch:
    return Batch(mel, batch.mel_lengths, batch.targets, batch.target_lengths, batch.ids, batch.texts)


# --------------------------------------------------------------------------------------------------
# Entry points


def _attach_log(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("streamer").addHandler(handler)
    logging.getLogger("streamer").setLevel(logging.INFO)
    return handler


def train(
    config: Path | None, resume: Path | None, runs_root: Path = Path("runs"), overrides: dict[str, Any] | None = None
) -> tuple[int, Path]:
    """Start a run from a recipe, or resume one; returns (exit status, run directory)."""
    if resume is not None:
        if not (resume / "config.yaml").is_file():
            raise ConfigError(f"{resume} is not a run directory (no config.yaml)")
        recipe = load_recipe(resume / "config.yaml")
        run_dir = resume
    elif config is not None:
        recipe = load_recipe(config)
        if overrides:
            recipe = recipe_from_dict(_deep_merge(recipe.to_dict(), overrides))
        run_dir = new_run_dir(runs_root, recipe.name)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    else:
        raise ConfigError("streamer train needs --config RECIPE or --resume RUN_DIR")
    handler = _attach_log(run_dir)
    try:
        logger.info("run directory %s", run_dir)
        has_latest = (run_dir / "checkpoints" / "latest.pt").is_file()
        trainer = Trainer(recipe, run_dir, resume=resume is not None and has_latest)
        return trainer.run(), run_dir
    finally:
        logging.getLogger("streamer").removeHandler(handler)
        handler.close()


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
