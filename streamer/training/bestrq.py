"""Best-RQ: self-supervised targets from a frozen random-projection quantizer, span masking, masked prediction.

Chiu et al. 2022, "Self-supervised Learning with Random-projection Quantizer for Speech Recognition":

1. The log-mel features are normalised (here per utterance and mel bin, NeMo's ``per_feature``: the synthetic
   corpus varies the level by 29 dB per utterance, and a code should say what is spoken, not how loud) and
   stacked to the encoder's frame rate: encoder frame ``t`` of the causal 8x front end sees mel frames up to
   ``8t``, so its target stacks mel frames ``8t-7 .. 8t`` (8 x 80 = 640 values).
2. A frozen projection (Xavier-uniform, 640 -> ``code_dim``) maps each stack to a vector; after l2
   normalisation the nearest of ``codebook_size`` frozen, l2-normalised standard-normal codes (cosine and l2
   distance rank the same once both sides are normalised) is the frame's target. Several codebooks give
   several independent targets per frame.
3. Spans of the input log-mel are masked: every valid frame starts a span of ``mask_span_frames`` with
   probability ``mask_start_prob``; masked frames are replaced by noise N(0, ``mask_noise_std``^2) in
   normalised units (mapped back to this utterance's log-mel scale, since the encoder takes raw log-mel).
   A frame is masked with probability ``1 - (1 - p)^span`` away from the edges (:func:`expected_mask_share`);
   an utterance without a whole span in it gets one, so every utterance carries loss.
4. The encoder's output goes through a linear softmax over the codes of each codebook; the loss is the
   cross-entropy on the masked encoder frames only (those with at least ``min_masked_share`` of their 8 mel
   frames masked), averaged over codebooks.

Constants picked for the default recipe (``models/streamer-tdt-small/pretrain.yaml``): the paper's 8192 codes
of dimension 16, one codebook, p = 0.01 with 400 ms spans (about a third of the frames masked) and noise std
0.1. One codebook because the head's softmax is the only part that grows with codebooks and the 8M-parameter
encoder on 2 CPU cores cannot afford to spend its steps there; the tiny test models use small codebooks
(64 codes) so that a few dozen steps on a few clips can show learning.

Shape legend:
    B utterances   F mel bins   M mel frames (10 ms)   T encoder frames (80 ms)   D encoder width
    C codebooks    K codes per codebook   E code dimension   N masked encoder frames in the batch
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamer.asr.config import ContextSize
from streamer.asr.encoder import FastConformerEncoder
from streamer.asr.features import length_mask
from streamer.asr.subsampling import subsampled_length
from streamer.training.pretrain_recipe import BestRqSection

FACTOR = 8  # mel frames per encoder frame (dw_striding 8x)
NORM_EPS = 1e-5


def expected_mask_share(cfg: BestRqSection) -> float:
    """Share of frames (away from the utterance's edges) that span masking covers: ``1 - (1 - p)^span``."""
    return 1.0 - (1.0 - cfg.mask_start_prob) ** cfg.mask_span_frames


class RandomProjectionQuantizer(nn.Module):
    """The frozen Best-RQ quantizer: stacked normalised features -> one code index per codebook.

    Its projection and codebook are buffers (saved in checkpoints, never trained), drawn from their own
    generator seeded by ``seed``: the same seed gives the same targets on any machine.
    """

    projection: Tensor  # (C, 8F, E)
    codebook: Tensor  # (C, K, E)

    def __init__(self, stack_dim: int, cfg: BestRqSection, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        c, k, e = cfg.num_codebooks, cfg.codebook_size, cfg.code_dim
        bound = math.sqrt(6.0 / (stack_dim + e))  # Xavier uniform, as the paper
        projection = (torch.rand(c, stack_dim, e, generator=g) * 2 - 1) * bound  # (C, 8F, E)
        codebook = F.normalize(torch.randn(c, k, e, generator=g), dim=-1)  # (C, K, E)
        self.register_buffer("projection", projection)
        self.register_buffer("codebook", codebook)

    @torch.no_grad()
    def forward(self, stacked: Tensor) -> Tensor:
        """Codes of ``stacked`` (N, 8F) features: (N, C) int64 indices of the nearest codes (cosine)."""
        x = stacked.float().to(self.projection.device)
        z = F.normalize(torch.einsum("nf,cfe->cne", x, self.projection), dim=-1)  # (C, N, E)
        codes = torch.einsum("cne,cke->cnk", z, self.codebook).argmax(-1)  # (C, N)
        return codes.T.contiguous().to(stacked.device)


def normalize_utterances(mel: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per utterance and mel bin: ``(normalised (B, F, M) with zeros past each length, mean (B, F, 1), std)``."""
    valid = length_mask(lengths, mel.shape[2])[:, None, :]  # (B, 1, M)
    count = valid.sum(dim=2, keepdim=True).clamp(min=1)
    mean = torch.where(valid, mel, 0.0).sum(dim=2, keepdim=True) / count
    var = torch.where(valid, (mel - mean) ** 2, 0.0).sum(dim=2, keepdim=True) / count
    std = var.sqrt() + NORM_EPS
    return torch.where(valid, (mel - mean) / std, 0.0), mean, std


def stack_to_encoder_frames(x: Tensor, frames: int) -> Tensor:
    """(B, F, M) -> (B, T, 8F): encoder frame ``t`` gets mel frames ``8t-7 .. 8t`` (zeros outside)."""
    b, f, m = x.shape
    right = FACTOR * frames - (FACTOR - 1) - m
    padded = F.pad(x, (FACTOR - 1, max(right, 0)))[:, :, : FACTOR * frames]  # (B, F, 8T)
    return padded.reshape(b, f, frames, FACTOR).permute(0, 2, 3, 1).reshape(b, frames, FACTOR * f)


def span_mask(lengths: Tensor, frames: int, cfg: BestRqSection, generator: torch.Generator) -> Tensor:
    """(B, M) bool: the masked mel frames. Each valid frame starts a span with ``mask_start_prob``;
    a row without a whole span inside it gets one at a uniform start (so every utterance carries loss)."""
    b = lengths.shape[0]
    valid = length_mask(lengths, frames)  # (B, M)
    starts = (torch.rand(b, frames, generator=generator) < cfg.mask_start_prob) & valid
    room = (lengths - cfg.mask_span_frames + 1).clamp(min=1)  # (B,) starts whose span fits
    fallback = (torch.rand(b, generator=generator) * room).long()
    lacking = ~(starts & length_mask(room, frames)).any(1)
    starts[lacking, fallback[lacking].clamp(max=frames - 1)] = True
    counts = F.pad(starts.long().cumsum(1), (cfg.mask_span_frames, 0))  # (B, span + M)
    covered = counts[:, cfg.mask_span_frames :] - counts[:, :frames]  # starts in the last `span` frames
    return (covered > 0) & valid


def masked_input(
    mel: Tensor, mask: Tensor, mean: Tensor, std: Tensor, noise_std: float, generator: torch.Generator
) -> Tensor:
    """``mel`` (B, F, M) with the masked frames replaced by ``mean + std * N(0, noise_std^2)``."""
    noise = mean + std * noise_std * torch.randn(mel.shape, generator=generator)
    return torch.where(mask[:, None, :], noise, mel)


def encoder_frame_mask(mask: Tensor, frames: int, min_share: float) -> Tensor:
    """(B, M) masked mel frames -> (B, T) encoder frames with at least ``min_share`` of their 8 mel frames masked."""
    stacked = stack_to_encoder_frames(mask[:, None, :].float(), frames)  # (B, T, 8)
    return stacked.mean(-1) >= min_share


@dataclass
class BestRqTargets:
    """One batch's masked input and what the encoder must predict."""

    masked_mel: Tensor  # (B, F, M) the encoder's input
    codes: Tensor  # (B, T, C) target code per encoder frame
    loss_frames: Tensor  # (B, T) bool: masked and valid encoder frames
    mel_mask: Tensor  # (B, M) bool: masked mel frames
    valid_frames: Tensor  # (B, T) bool: encoder frames within each utterance


@torch.no_grad()
def make_targets(
    quantizer: RandomProjectionQuantizer, mel: Tensor, lengths: Tensor, cfg: BestRqSection, generator: torch.Generator
) -> BestRqTargets:
    """Targets (from the unmasked features), the span mask and the masked input of a batch (on the CPU)."""
    frames = int(subsampled_length(mel.shape[2], FACTOR, causal=True))
    enc_lengths = subsampled_length(lengths, FACTOR, causal=True)
    normed, mean, std = normalize_utterances(mel, lengths)
    stacked = stack_to_encoder_frames(normed, frames)  # (B, T, 8F)
    codes = quantizer(stacked.reshape(-1, stacked.shape[-1])).reshape(mel.shape[0], frames, -1)
    mask = span_mask(lengths, mel.shape[2], cfg, generator)
    valid = length_mask(enc_lengths, frames)
    loss_frames = encoder_frame_mask(mask, frames, cfg.min_masked_share) & valid
    masked = masked_input(mel, mask, mean, std, cfg.mask_noise_std, generator)
    return BestRqTargets(masked, codes, loss_frames, mask, valid)


class BestRqModel(nn.Module):
    """The encoder being pretrained, its softmax head over the codes and the frozen quantizer."""

    def __init__(self, encoder: FastConformerEncoder, cfg: BestRqSection, seed: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_codebooks, self.codebook_size = cfg.num_codebooks, cfg.codebook_size
        self.head = nn.Linear(encoder.cfg.d_model, cfg.num_codebooks * cfg.codebook_size)
        self.quantizer = RandomProjectionQuantizer(FACTOR * encoder.cfg.feat_in, cfg, seed)

    def forward(
        self, targets: BestRqTargets, lengths: Tensor, ctx: ContextSize, bf16: bool = False
    ) -> tuple[Tensor, Tensor]:
        """(mean cross-entropy over masked frames and codebooks, masked-code accuracy) of one batch."""
        device = next(self.parameters()).device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            enc, _ = self.encoder(targets.masked_mel.to(device), lengths.to(device), ctx)  # (B, T, D)
            picked = enc[targets.loss_frames.to(device)]  # (N, D)
            logits = self.head(picked)
        logits = logits.float().reshape(-1, self.num_codebooks, self.codebook_size)  # (N, C, K)
        codes = targets.codes.to(device)[targets.loss_frames.to(device)]  # (N, C)
        loss = F.cross_entropy(logits.reshape(-1, self.codebook_size), codes.reshape(-1))
        accuracy = (logits.argmax(-1) == codes).float().mean()
        return loss, accuracy.detach()
