"""``dw_striding`` subsampling: the FastConformer's front conv stack that turns mel frames into encoder frames.

Its activations are masked by time on both edges, so one code path serves the offline forward (valid rows
``0 <= t < length``) and the streaming window (rows before the start of audio masked on the left).
The length arithmetic is :mod:`streamer.asr.clocks`'s.

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from streamer.asr import clocks
from streamer.errors import ConfigError


class ConvSubsampling(nn.Module):
    """``dw_striding`` subsampling: conv 3x3/2, then (depthwise 3x3/2, pointwise 1x1) per extra halving.

    State-dict keys match NeMo: ``conv.{0,2,3,5,6}``, ``out``. Activations are masked by time before every
    module and after the last (NeMo >= 2.5 ``MaskedConvSequential``); our mask also has a left edge
    (``start``) so streaming windows can hold rows from before the start of audio.
    """

    def __init__(self, feat_in: int, d_model: int, channels: int, factor: int, causal: bool) -> None:
        super().__init__()
        try:
            n = clocks.num_strided_convs(factor)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self.causal = causal
        self.num_strided = n
        pad = 0 if causal else 1
        layers: list[nn.Module] = [nn.Conv2d(1, channels, 3, 2, padding=pad), nn.ReLU()]
        for _ in range(n - 1):
            layers += [
                nn.Conv2d(channels, channels, 3, 2, padding=pad, groups=channels),
                nn.Conv2d(channels, channels, 1),
                nn.ReLU(),
            ]
        self.conv = nn.Sequential(*layers)
        freq = feat_in
        for _ in range(n):
            freq = clocks.strided_conv_length(freq, is_causal=causal)
        self.out = nn.Linear(channels * freq, d_model)

    def forward(
        self, x: Tensor, start: Tensor, end: Tensor, always_mask: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Subsample ``x`` (B, M, F) whose valid rows are ``start <= t < end`` (per row of the batch).

        Returns ``(y (B, T, D), start', end')``. ``start`` must stay even through every halving but the
        last (the streaming window guarantees it). ``always_mask`` masks even when every row is valid: the
        same values, without the data-dependent test (a ``torch.compile``d graph cannot branch on data).
        """
        # channels-last makes the depthwise 3x3 convs take the fast oneDNN path (8x on small inputs)
        h = x.unsqueeze(1).contiguous(memory_format=torch.channels_last)  # (B, 1, M, F)
        need_mask = always_mask or bool((start > 0).any()) or bool((end < h.size(2)).any())
        for module in self.conv:
            if need_mask:
                h = h * _row_mask(start, end, h.size(2), h.dtype)
            if isinstance(module, nn.Conv2d) and module.stride[0] == 2:
                h = self._strided(module, h) if self.causal else module(h)
                start = torch.div(start + 1, 2, rounding_mode="floor")
                end = clocks.strided_conv_length(end, is_causal=self.causal)
                need_mask = always_mask or bool((start > 0).any()) or bool((end < h.size(2)).any())
            else:
                h = module(h)
        if need_mask:
            h = h * _row_mask(start, end, h.size(2), h.dtype)
        b, c, t, f = h.shape
        y = self.out(h.transpose(1, 2).reshape(b, t, c * f))
        return y, start, end


    @staticmethod
    def _strided(conv: nn.Conv2d, h: Tensor) -> Tensor:
        """A causal 3x3/2 conv: NeMo pads 2 before and 1 after on both axes. For the depthwise convs the conv's
        own symmetric padding of 2, cropped to the causal output size, gives the same sums without building
        a padded copy of the 32-channel input (that copy's fill was the largest cost of the front end in a
        batched streaming step)."""
        if conv.in_channels == 1:  # the first conv: its input is small, and oneDNN is slower with padding here
            return conv(F.pad(h, (2, 1, 2, 1)))
        rows = clocks.strided_conv_length(h.size(2), is_causal=True)
        cols = clocks.strided_conv_length(h.size(3), is_causal=True)
        out = F.conv2d(h, conv.weight, conv.bias, stride=2, padding=2, groups=conv.groups)
        return out[:, :, :rows, :cols]


def _row_mask(start: Tensor, end: Tensor, t: int, dtype: torch.dtype) -> Tensor:
    """(B, 1, t, 1) mask of rows ``start <= i < end``."""
    idx = torch.arange(t, device=start.device)
    ok = (idx[None, :] >= start[:, None]) & (idx[None, :] < end[:, None])
    return ok.to(dtype)[:, None, :, None]


def subsampled_length(mel_frames: Tensor | int, factor: int, causal: bool) -> Tensor:
    """Encoder frames produced from ``mel_frames`` valid mel frames, as a tensor (NeMo ``calc_length``)."""
    return torch.as_tensor(clocks.num_encoder_frames(torch.as_tensor(mel_frames), factor, is_causal=causal))
