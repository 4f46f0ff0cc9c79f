"""The model a new run starts from: built from its recipe and initialised so that the encoder learns.

Three choices here are measured on the corpus rather than taken from NeMo (the recipe's ``train`` section
switches each): the residual branches may start scaled down (:func:`scale_residual_branches`), the front
end's output may start centred (:func:`center_front_end`), and the first conv may train on normalised input
(:func:`feature_statistics` gives the statistics; :mod:`streamer.training.speed` applies them).

Shape legend:
    B utterances   F mel bins   M mel frames   T encoder frames   D encoder width
"""

from __future__ import annotations

import math

import torch

from streamer.asr.encoder import FastConformerEncoder
from streamer.asr.model import AsrModel
from streamer.asr.tokenizer import Tokenizer
from streamer.training.data import BatchFeaturizer, Utterance
from streamer.training.recipe import Recipe
from streamer.training.rundir import AnyModel, model_of_recipe


def build_model(recipe: Recipe, tokenizer: Tokenizer, seed: int) -> AnyModel:
    """A freshly initialised model for the recipe (NeMo's LSTM forget-gate bias of 1 for a transducer; the
    encoder's residual branches scaled by ``train.residual_init_scale``, see :func:`scale_residual_branches`)."""
    torch.manual_seed(seed)
    model = model_of_recipe(recipe, tokenizer)
    scale_residual_branches(model.encoder, recipe.train.residual_init_scale)
    if not isinstance(model, AsrModel):
        return model.train()
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
        valid = torch.arange(y.size(1))[None, :] < lengths[:, None]  # (B, T)
        outs.append(y[valid].double())  # (frames, D)
    y = torch.cat(outs)
    mean = y.mean(0)
    std = float((y - mean).std())
    scale = 1.0 / (std * (encoder.xscale or 1.0))
    pre.out.weight.mul_(scale)
    if pre.out.bias is not None:
        pre.out.bias.sub_(mean.to(pre.out.bias.dtype)).mul_(scale)
    return float(mean.pow(2).mean().sqrt())


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
