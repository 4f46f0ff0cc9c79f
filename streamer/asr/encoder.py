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

import dataclasses
import math
from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor, nn

from streamer.asr.attention import attention_mask, rel_positional_table
from streamer.asr.config import ContextSize, EncoderConfig
from streamer.asr.conformer import ConformerLayer, attention_module
from streamer.asr.local_attention import local_positional_table
from streamer.asr.streaming import EncoderState, StreamingEncoder
from streamer.asr.subsampling import ConvSubsampling, subsampled_length
from streamer.errors import ConfigError

__all__ = ["EncoderState", "FastConformerEncoder", "StreamingEncoder", "rel_positional_table"]

# Inputs longer than this many mel frames (41 s) go through the subsampling convolutions in windows of it:
# the first conv's activations for an hour would take gigabytes (NeMo's conv_chunking_factor does the same).
SUBSAMPLING_WINDOW_MEL_FRAMES = 4096


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
        # the compiled offline path (None: eager), a plain attribute: no parameters, not in the state dict
        self.compiled_offline: Callable[[Tensor, Tensor, ContextSize], tuple[Tensor, Tensor] | None] | None = None

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
        self,
        mel: Tensor,
        lengths: Tensor,
        att_context_size: ContextSize | None = None,
        *,
        on_layer: Callable[[int, int], None] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Offline encoder. ``mel`` (B, F, M), ``lengths`` (B,) -> (out (B, T, D), lengths (B,)).
        ``on_layer(done, total)`` is called after each layer (progress for long inputs).

        Full attention costs T x T; a local-attention model (``rel_pos_local_attn``) costs T x window, and
        with it the whole path is linear in the audio's length. With :attr:`compiled_offline` set
        (:func:`streamer.asr.compiled.compile_offline`) inputs that fit one of its length buckets run
        compiled (``on_layer`` then hears only the end); longer ones run here.
        """
        ctx = self.check_context(att_context_size)
        if self.compiled_offline is not None:
            out = self.compiled_offline(mel, lengths, ctx)
            if out is not None:
                if on_layer is not None:
                    on_layer(len(self.layers), len(self.layers))
                return out
        return self.encode(mel, lengths, ctx, on_layer=on_layer)

    def encode(
        self,
        mel: Tensor,
        lengths: Tensor,
        ctx: ContextSize,
        *,
        on_layer: Callable[[int, int], None] | None = None,
        always_mask: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`forward`'s arithmetic at a checked context, always eager. ``always_mask`` applies the padding
        and attention masks even where nothing is padded (the same values): no branch depends on the data,
        so ``torch.compile`` traces it as one graph per input shape."""
        x, lengths = self.subsample(mel.transpose(1, 2), lengths, always_mask=always_mask)
        if self.xscale is not None:
            x = x * self.xscale
        t = x.size(1)
        valid = torch.arange(t, device=x.device)[None, :] < lengths[:, None]
        pad_mask = None if not always_mask and bool(valid.all()) else ~valid
        if self.cfg.is_local_attention:
            pos = local_positional_table(ctx, self.cfg.d_model, x.device).to(x.dtype)
            att_mask = None
        else:
            pos = rel_positional_table(t, self.cfg.d_model, x.device).to(x.dtype)
            att_mask = attention_mask(valid, ctx, self.cfg.att_context_style, always=always_mask)
        for i, layer in enumerate(self.layers):
            p = layer.self_attn.project_pos(pos)
            x = layer(x, p, att_mask, pad_mask)
            if on_layer is not None:
                on_layer(i + 1, len(self.layers))
        return x, lengths

    def subsample(
        self, x: Tensor, lengths: Tensor, window_mel_frames: int = SUBSAMPLING_WINDOW_MEL_FRAMES,
        always_mask: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """``pre_encode`` of (B, M, F) -> ((B, T, D), lengths). Long inputs go through in windows of
        ``window_mel_frames`` plus a margin of 32 mel frames each side (the three stride-2 3x3 convs see
        at most 7 mel frames each way), which gives the one-shot result: every window starts on a
        multiple of the subsampling factor, so each conv's output grid and length mask line up."""
        m = x.size(1)
        factor = self.cfg.subsampling_factor
        margin = 4 * factor
        step = max(factor, window_mel_frames // factor * factor)
        start = torch.zeros_like(lengths)
        if m <= step + 2 * margin:
            y, _, out_len = self.pre_encode(x, start, lengths, always_mask)
            return y, out_len
        out_len = subsampled_length(lengths, factor, self.cfg.causal_downsampling).to(lengths)
        parts = []
        for a in range(0, m, step):
            lo, hi = max(0, a - margin), min(m, a + step + margin)
            y, _, _ = self.pre_encode(x[:, lo:hi], start, (lengths - lo).clamp(0, hi - lo), always_mask)
            first = (a - lo) // factor
            parts.append(y[:, first : first + step // factor])
        y = torch.cat(parts, dim=1)
        total = int(subsampled_length(m, factor, self.cfg.causal_downsampling))
        return y[:, :total], out_len

    def change_attention(self, self_attention_model: str, window: ContextSize | None = None) -> None:
        """Switch the attention of a loaded model, keeping its weights: NeMo's
        ``encoder.change_attention_model(self_attention_model, window)``.

        ``"rel_pos_local_attn"`` with a window ``[left, right]`` turns a full-context model into one that
        transcribes hours in one pass (NVIDIA's cards use [128,128] or [256,256]); ``"rel_pos"`` switches
        back (window None = full context). Like NeMo, the switched attention has no global tokens.
        Unlike NeMo, a model without biases keeps none: NeMo's switch gives ``use_bias=False`` models
        randomly initialised q/k/v/out biases (nemo-reference.md §6).

        Raises:
            ConfigError: unknown attention model, or a local window that is not [left>=0, right>=0], one > 0.
        """
        if self_attention_model not in ("rel_pos", "rel_pos_local_attn"):
            raise ConfigError(f"attention {self_attention_model!r} is not one of rel_pos, rel_pos_local_attn")
        if window is None:
            window = self.cfg.default_att_context_size if self_attention_model == "rel_pos_local_attn" else (-1, -1)
        window = (int(window[0]), int(window[1]))
        if self_attention_model == "rel_pos_local_attn" and (min(window) < 0 or max(window) <= 0):
            raise ConfigError(f"local attention needs a window [left,right] with both >= 0 and one > 0, got "
                              f"{list(window)}")
        cfg = dataclasses.replace(
            self.cfg,
            self_attention_model=self_attention_model,
            att_context_sizes=(window,),
            global_tokens=0,
            global_tokens_spacing=1,
            global_attn_separate=False,
        )
        param = next(self.parameters())
        for layer in cast("list[ConformerLayer]", list(self.layers)):
            new = attention_module(cfg).to(device=param.device, dtype=param.dtype)
            new.load_state_dict(layer.self_attn.state_dict(), strict=False)
            layer.self_attn = new
        self.cfg = cfg

    def streaming(self, att_context_size: ContextSize | None = None) -> StreamingEncoder:
        """Cache-aware streaming at ``att_context_size`` (None = the model's default).

        Raises:
            ConfigError: the model was not trained for ``att_context_size`` or cannot stream at it.
        """
        if self.cfg.is_local_attention:
            raise ConfigError(
                "this model uses local attention (rel_pos_local_attn), which is offline only: transcribe files "
                "with it, or serve a cache-aware streaming model"
            )
        ctx = self.check_context(att_context_size)
        layers = cast("list[ConformerLayer]", list(self.layers))
        return StreamingEncoder(self.cfg, self.pre_encode, layers, self.xscale, ctx)
