"""One optimizer step: the look-ahead a batch trains at, its loss, and forward, backward, clip and AdamW.

Also where the step runs: the training device and whether it has native bfloat16.

Shape legend:
    B utterances   F mel bins   M mel frames   T encoder frames   U target tokens   D encoder width
    P prediction/joint width   V vocab incl. blank   N TDT durations

A step's loss is the weighted sum of named parts, logged one by one: a TDT model's ``transducer`` and ``ctc``;
a Paraformer's (``model.type: paraformer``) ``ce`` (its decoder's cross entropy), ``ctc`` (the auxiliary head)
and ``quantity``.
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass

import torch
from torch import Tensor

from streamer.asr.config import ContextSize
from streamer.asr.paraformer import ParaformerModel
from streamer.errors import ConfigError
from streamer.training.data import Batch
from streamer.training.recipe import Recipe
from streamer.training.rundir import AnyModel
from streamer.training.tdt_loss import TransducerLoss, ctc_loss

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one step measured: the loss and its named parts (floats; a part the model lacks is absent), the
    gradient norm before clipping."""

    loss: float
    parts: dict[str, float]
    grad_norm: float
    audio_s: float
    context: ContextSize


def sample_context(recipe: Recipe, seed: int) -> ContextSize:
    """The look-ahead of one batch (NeMo samples uniformly; ``att_context_probs`` may weight them); a
    Paraformer's full context."""
    if recipe.model.type == "paraformer":
        return (-1, -1)
    enc = recipe.model.encoder
    sizes = [(int(a), int(b)) for a, b in enc.att_context_sizes]
    weights = enc.att_context_probs or None
    return random.Random(seed).choices(sizes, weights=weights)[0]


def compute_loss(
    model: AnyModel, batch: Batch, ctx: ContextSize, loss_fn: TransducerLoss, recipe: Recipe
) -> tuple[Tensor, dict[str, Tensor]]:
    """The total loss of a batch at look-ahead ``ctx`` and its parts: ``transducer`` and (with the CTC head and
    a positive ``loss.ctc_weight``) ``ctc``; a Paraformer's as :func:`paraformer_loss`."""
    device = next(model.parameters()).device
    batch = batch_to(batch, device)
    bf16 = recipe.train.bf16 and bf16_supported(device)
    if isinstance(model, ParaformerModel):
        return paraformer_loss(model, batch, recipe, bf16)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        enc, enc_len = model.encoder(batch.mel, batch.mel_lengths, ctx)  # (B, T, D)
        pred = model.decoder(batch.targets)  # (B, U+1, P)
        assert model.joint is not None
        logits = model.joint.joint(enc, pred)  # (B, T, U+1, V+N)
    transducer = loss_fn(logits.float(), batch.targets, enc_len, batch.target_lengths)
    if model.ctc_decoder is None or recipe.loss.ctc_weight <= 0:
        return transducer, {"transducer": transducer}
    log_probs = model.ctc_decoder(enc.float())  # (B, T, V)
    ctc = ctc_loss(log_probs, batch.targets, enc_len, batch.target_lengths, recipe.loss.reduction)
    w = recipe.loss.ctc_weight
    return (1 - w) * transducer + w * ctc, {"transducer": transducer, "ctc": ctc}


def paraformer_loss(
    model: ParaformerModel, batch: Batch, recipe: Recipe, bf16: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    """The total and its parts ``ce``, ``ctc`` (with the auxiliary head) and ``quantity``: the cross entropy per
    target token (label-smoothed) of the NAR decoder's logits, with the alphas scaled to fire the target length;
    the auxiliary head's CTC loss (``loss.reduction``); and the mean over utterances of ``|sum(alpha) - U|``
    (the unscaled alphas: what the predictor will fire at inference). The total is
    ``(1 - ctc_weight) * ce + ctc_weight * ctc + quantity_weight * quantity`` (without the head,
    ``ce + quantity_weight * quantity``)."""
    device = batch.mel.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(batch.mel, batch.mel_lengths, batch.target_lengths)
    u = out.logits.size(1)
    valid = torch.arange(u, device=device)[None, :] < batch.target_lengths[:, None]  # (B, U)
    targets = batch.targets[:, :u].masked_fill(~valid, -100)
    ce = torch.nn.functional.cross_entropy(
        out.logits.float().transpose(1, 2), targets, ignore_index=-100, label_smoothing=recipe.loss.label_smoothing
    )
    quantity = (out.alpha_sums.float() - batch.target_lengths.float()).abs().mean()
    parts = {"ce": ce, "quantity": quantity}
    total = recipe.loss.quantity_weight * quantity
    if out.ctc_log_probs is None:
        return ce + total, parts
    parts["ctc"] = ctc = ctc_loss(
        out.ctc_log_probs, batch.targets, out.enc_len, batch.target_lengths, recipe.loss.reduction
    )
    w = recipe.loss.ctc_weight
    return (1 - w) * ce + w * ctc + total, parts


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


def with_mel(batch: Batch, mel: Tensor) -> Batch:
    """The batch with other features of the same shape (SpecAugment's masked copy)."""
    return Batch(mel, batch.mel_lengths, batch.targets, batch.target_lengths, batch.ids, batch.texts)


def train_step(
    model: AnyModel,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    ctx: ContextSize,
    loss_fn: TransducerLoss,
    recipe: Recipe,
    lr: float,
) -> StepResult:
    """Forward, backward, clip, AdamW step (skipped, with a warning, on a non-finite gradient norm)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    total, parts = compute_loss(model, batch, ctx, loss_fn, recipe)
    total.backward()
    clip = recipe.optim.grad_clip
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
    if torch.isfinite(norm):
        optimizer.step()
    else:
        logger.warning("non-finite gradient norm; step skipped")
    return StepResult(
        loss=float(total.detach()),
        parts={name: float(value.detach()) for name, value in parts.items()},
        grad_norm=float(norm),
        audio_s=batch.audio_seconds,
        context=ctx,
    )
