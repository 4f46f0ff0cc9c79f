"""FastConformer encoder (NeMo ``ConformerEncoder`` with ``dw_striding`` subsampling and rel-pos attention).

Two entry points share every layer:

* :meth:`FastConformerEncoder.forward` - offline, the whole utterance under the attention mask of one
  ``att_context_size`` (NeMo's ``encoder.forward``).
* :meth:`FastConformerEncoder.streaming` - cache-aware streaming at one ``att_context_size``: a
  :class:`~streamer.asr.streaming.StreamingEncoder` that owns the chunk schedule and runs
  ``init_state(batch)`` / ``step(mel, n_new, state)``, batched over streams (see
  :mod:`streamer.asr.streaming`). At every look-ahead its output equals the offline forward's.

The parts live in their own modules: :mod:`~streamer.asr.subsampling`, :mod:`~streamer.asr.attention`,
:mod:`~streamer.asr.conformer`.

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from streamer.asr.attention import attention_mask, rel_positional_table
from streamer.asr.config import ContextSize, EncoderConfig
from streamer.asr.conformer import ConformerLayer
from streamer.asr.streaming import EncoderState, StreamingEncoder
from streamer.asr.subsampling import ConvSubsampling
from streamer.errors import ConfigError

__all__ = ["EncoderState", "FastConformerEncoder", "StreamingEncoder", "rel_positional_table"]


class FastConformerEncoder(nn.Module):
    """NeMo-compatible FastConformer encoder. State-dict keys equal NeMo's ``encoder.*`` keys."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        channels = cfg.subsampling_conv_channels if cfg.subsampling_conv_channels > 0 else cfg.d_model
        self.pre_encode = ConvSubsampling(
            cfg.feat_in, cfg.d_model, channels, cfg.subsampling_factor, cfg.causal_downsampling
        )
        self.layers = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.n_layers))
        self.xscale = math.sqrt(cfg.d_model) if cfg.xscaling else None

    def check_context(self, att_context_size: ContextSize | None) -> ContextSize:
        """Validate a look-ahead choice (None = the model's default).

        Raises:
            ConfigError: the model was not trained for ``att_context_size``.
        """
        if att_context_size is None:
            return self.cfg.default_att_context_size
        ctx = (int(att_context_size[0]), int(att_context_size[1]))
        if ctx not in self.cfg.att_context_sizes and tuple(self.cfg.att_context_sizes) != ((-1, -1),):
            known = ", ".join(f"[{a},{b}]" for a, b in self.cfg.att_context_sizes)
            raise ConfigError(f"att_context_size [{ctx[0]},{ctx[1]}] is not one this model supports ({known})")
        return ctx

    def forward(
        self, mel: Tensor, lengths: Tensor, att_context_size: ContextSize | None = None
    ) -> tuple[Tensor, Tensor]:
        """Offline encoder. ``mel`` (B, F, M), ``lengths`` (B,) -> (out (B, T, D), lengths (B,))."""
        ctx = self.check_context(att_context_size)
        x = mel.transpose(1, 2)
        start = torch.zeros_like(lengths)
        x, _, lengths = self.pre_encode(x, start, lengths)
        if self.xscale is not None:
            x = x * self.xscale
        t = x.size(1)
        pos = rel_positional_table(t, self.cfg.d_model, x.device).to(x.dtype)
        valid = torch.arange(t, device=x.device)[None, :] < lengths[:, None]
        att_mask = attention_mask(valid, ctx, self.cfg.att_context_style)
        pad_mask = None if bool(valid.all()) else ~valid
        for layer in self.layers:
            p = layer.self_attn.project_pos(pos)
            x = layer(x, p, att_mask, pad_mask)
        return x, lengths

    def streaming(self, att_context_size: ContextSize | None = None) -> StreamingEncoder:
        """Cache-aware streaming at ``att_context_size`` (None = the model's default).

        Raises:
            ConfigError: the model was not trained for ``att_context_size`` or cannot stream at it.
        """
        ctx = self.check_context(att_context_size)
        layers = cast("list[ConformerLayer]", list(self.layers))
        return StreamingEncoder(self.cfg, self.pre_encode, layers, self.xscale, ctx)
