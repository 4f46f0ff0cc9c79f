"""Cache-aware streaming of the FastConformer encoder: its chunk schedule, its state and one batched step.

:meth:`FastConformerEncoder.streaming` returns a :class:`StreamingEncoder` for one ``att_context_size``;
it owns the chunk schedule (how many mel frames each step takes, how many encoder frames it gives) and
runs ``state = init_state(batch)``, ``chunk_frames(state)``, ``step(mel, n_new, state)``, batched over
streams whose caches are at different fill levels.

Design (differs from NeMo's buffer, gives the same numbers): every step runs the subsampling on one
window of ``(s+1) + s*(R+1)`` mel rows (``s`` = subsampling factor, ``R`` = right context), i.e. NeMo's
9 cached + 8(R+1) new rows for ``s = 8``, and drops the first 2 subsampled frames. A stream's *first*
chunk has only ``1 + s*R`` real rows; it is placed behind ``2s`` rows that are masked as "before the
start of audio" at every subsampling layer, which is exactly the causal zero padding of the offline
convs. The same left mask covers a cache that holds fewer than ``s+1`` real rows (NeMo fills those with
zeros, which is why its ``[70,0]`` streaming differs from offline). A final, shorter chunk is masked on
the right like the offline length mask. Hence streaming equals the offline forward with the same
``att_context_size`` at every look-ahead, including 0.

Attention caches hold projected keys and values of the last ``left`` frames per layer (NeMo caches the
normalised layer input and re-projects it every step; the numbers are the same, the work is not).

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
    (here also: dk = D / H per-head width, W mel rows in one subsampling window)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from streamer.asr.attention import rel_positional_table
from streamer.asr.config import ContextSize, EncoderConfig
from streamer.asr.conformer import ConformerLayer, Joins
from streamer.asr.growbuffer import GrowBuffers
from streamer.asr.state import stack_rows
from streamer.asr.subsampling import ConvSubsampling
from streamer.errors import ConfigError

DROP_FRAMES = 2  # subsampled frames of each window that belong to the previous chunk (NeMo's drop_extra)


@dataclass(frozen=True, slots=True)
class EncoderState:
    """Per-stream encoder cache, batched along ``BATCH_DIM``."""

    mel_tail: Tensor  # (B, F, s+1) the last mel rows, left context of the next subsampling window
    mel_seen: Tensor  # (B,) int64 mel frames consumed so far (0 = the next chunk is the first)
    attn_k: Tensor  # (L, B, H, C, dk) projected keys of the last C frames, newest last
    attn_v: Tensor  # (L, B, H, C, dk)
    attn_len: Tensor  # (B,) int64 how many of the C cache slots are real (right-aligned)
    conv_tail: Tensor  # (L, B, K-1, D) last depthwise-conv inputs (time-major)

    BATCH_DIM: ClassVar[dict[str, int]] = {
        "mel_tail": 0,
        "mel_seen": 0,
        "attn_k": 1,
        "attn_v": 1,
        "attn_len": 0,
        "conv_tail": 1,
    }


@dataclass(frozen=True, slots=True)
class _SmallState:
    """The per-stream fields of :class:`EncoderState` without the caches (for :meth:`StreamingEncoder.stack_rows`)."""

    mel_tail: Tensor
    mel_seen: Tensor
    attn_len: Tensor

    BATCH_DIM: ClassVar[dict[str, int]] = {"mel_tail": 0, "mel_seen": 0, "attn_len": 0}


def _small(state: EncoderState) -> _SmallState:
    return _SmallState(state.mel_tail, state.mel_seen, state.attn_len)


def check_streamable(cfg: EncoderConfig, att_context_size: ContextSize) -> None:
    """Raise a :class:`ConfigError` saying why ``cfg`` cannot stream at ``att_context_size``, if it cannot."""
    left, right = att_context_size
    if not cfg.is_causal:
        raise ConfigError(
            "this model is not a cache-aware streaming model (its subsampling or convolutions look "
            "ahead); use offline mode"
        )
    if cfg.att_context_style != "chunked_limited" and right != 0:
        raise ConfigError(
            f"cache-aware streaming needs att_context_style chunked_limited (or regular with right "
            f"context 0), this model has {cfg.att_context_style} with [{left},{right}]"
        )
    if left < 0:
        raise ConfigError("cache-aware streaming needs a limited left context (att_context_size[0] >= 0)")
    if left % (right + 1):
        raise ConfigError(f"left context {left} must be a multiple of the chunk size {right + 1}")


class StreamingEncoder:
    """The encoder's cache-aware streaming at one ``att_context_size``: schedule, state and step.

    Mel frames: a stream's first step takes ``first_chunk_mel_frames`` new frames, every later one
    ``chunk_mel_frames``; each full step gives ``chunk_encoder_frames`` (R+1) encoder frames. Built by
    :meth:`FastConformerEncoder.streaming`; it shares the encoder's modules and holds projections of
    their weights, so build it again after the weights change. It holds no per-stream state.

    Args:
        cfg: the encoder's configuration.
        pre_encode: the encoder's subsampling.
        layers: the encoder's conformer layers.
        xscale: the input scale (``sqrt(D)``), or None without xscaling.
        att_context_size: ``(left, right)`` in encoder frames, already validated against the model.

    Raises:
        ConfigError: the model cannot stream at ``att_context_size`` (see :func:`check_streamable`).
    """

    def __init__(
        self,
        cfg: EncoderConfig,
        pre_encode: ConvSubsampling,
        layers: Sequence[ConformerLayer],
        xscale: float | None,
        att_context_size: ContextSize,
    ) -> None:
        check_streamable(cfg, att_context_size)
        left, right = att_context_size
        s = cfg.subsampling_factor
        self.cfg, self._pre_encode, self._layers, self._xscale = cfg, pre_encode, tuple(layers), xscale
        self.att_context_size: ContextSize = att_context_size
        self.chunk_encoder_frames = right + 1  # T per full step
        self.first_chunk_mel_frames = 1 + s * right
        self.chunk_mel_frames = s * self.chunk_encoder_frames
        self.tail_mel_frames = s + 1  # mel rows carried into the next window
        self.cache_frames = left  # C
        self.window_mel_frames = self.tail_mel_frames + self.chunk_mel_frames  # W
        param = next(iter(pre_encode.parameters()))
        self.device, self.dtype = param.device, param.dtype
        pos = rel_positional_table(left + self.chunk_encoder_frames, cfg.d_model, self.device).to(self.dtype)
        self._grow = GrowBuffers()
        self._slack = max(left, 16 * self.chunk_encoder_frames)  # frames of room: a cache copy every slack/T steps
        with torch.no_grad():  # per layer (H, 2(C+T)-1, dk): linear_pos of the table
            self._pos_proj = tuple(layer.self_attn.project_pos(pos).contiguous() for layer in self._layers)

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> EncoderState:
        """A fresh cache for ``batch`` streams (on the encoder's device and dtype unless given)."""
        cfg = self.cfg
        device = device or self.device
        dtype = dtype or self.dtype
        att = self._layers[0].self_attn
        nl = cfg.n_layers
        return EncoderState(
            mel_tail=torch.zeros(batch, cfg.feat_in, self.tail_mel_frames, device=device, dtype=dtype),
            mel_seen=torch.zeros(batch, dtype=torch.long, device=device),
            attn_k=torch.zeros(nl, batch, att.h, self.cache_frames, att.d_k, device=device, dtype=dtype),
            attn_v=torch.zeros(nl, batch, att.h, self.cache_frames, att.d_k, device=device, dtype=dtype),
            attn_len=torch.zeros(batch, dtype=torch.long, device=device),
            conv_tail=torch.zeros(nl, batch, cfg.conv_context[0], cfg.d_model, device=device, dtype=dtype),
        )

    def stack_rows(self, rows: Sequence[tuple[EncoderState, int]]) -> EncoderState:
        """One batched state from rows of others (``(state, row)`` per stream, in batch order), its caches laid
        straight into buffers with room to grow: each row is copied once, and the next step appends in place."""
        smalls: dict[int, _SmallState] = {}  # one per source state, so rows from one source stay one run
        small = stack_rows([(smalls.setdefault(id(state), _small(state)), row) for state, row in rows])
        caches = {}
        for name, dim in (("attn_k", 3), ("attn_v", 3), ("conv_tail", 2)):
            first = getattr(rows[0][0], name)
            cache = self._grow.with_room(first, len(rows), 1, dim, self.chunk_encoder_frames + self._slack)
            for k, (state, row) in enumerate(rows):
                cache[:, k].copy_(getattr(state, name)[:, row])
            caches[name] = cache
        return EncoderState(mel_tail=small.mel_tail, mel_seen=small.mel_seen, attn_len=small.attn_len, **caches)

    def chunk_frames(self, state: EncoderState) -> Tensor:
        """New mel frames each stream needs for its next step: (B,) int64."""
        return torch.where(state.mel_seen == 0, self.first_chunk_mel_frames, self.chunk_mel_frames)

    def step(self, mel: Tensor, n_new: Tensor, state: EncoderState) -> tuple[Tensor, Tensor, EncoderState]:
        """One cache-aware step for a batch of streams.

        Args:
            mel: (B, F, M) each stream's new mel frames, left-aligned.
            n_new: (B,) how many of them are real: exactly :meth:`chunk_frames` for a full step, fewer
                only for a stream's last (flushing) step, whose state is then spent.
            state: the streams' batched state.

        Returns:
            ``(out (B, R+1, D), out_len (B,), new state)``.

        Raises:
            ValueError: a stream got more mel frames than its schedule allows.
        """
        b, f, _ = mel.shape
        s = self.cfg.subsampling_factor
        w = self.window_mel_frames
        first = state.mel_seen == 0
        need = self.chunk_frames(state)
        if bool((n_new > need).any()):
            raise ValueError("step() got more mel frames than the chunk schedule allows")
        # Build the subsampling window: [masked/tail rows | new rows | right padding].
        steady = not bool(first.any()) and bool((n_new == self.chunk_mel_frames).all())
        if steady:  # the common case: every stream continues with a full chunk
            window = torch.cat([state.mel_tail, mel[:, :, : self.chunk_mel_frames]], dim=2)
            start = (self.tail_mel_frames - state.mel_seen).clamp(min=0)
            end = torch.full_like(n_new, w)
            return self._step_window(window, start, end, n_new, state)
        rows = []
        start = torch.empty(b, dtype=torch.long, device=mel.device)
        for i in range(b):
            ni = int(n_new[i])
            if bool(first[i]):
                lead = mel.new_zeros(f, 2 * s)
                start[i] = 2 * s
            else:
                lead = state.mel_tail[i]
                start[i] = max(0, self.tail_mel_frames - int(state.mel_seen[i]))
            row = torch.cat([lead, mel[i, :, :ni]], dim=1)
            if row.size(1) < w:
                row = F.pad(row, (0, w - row.size(1)))
            rows.append(row)
        window = torch.stack(rows)  # (B, F, W)
        end = torch.where(first, 2 * s, self.tail_mel_frames) + n_new
        return self._step_window(window, start, end, n_new, state)

    def _step_window(
        self, window: Tensor, start: Tensor, end: Tensor, n_new: Tensor, state: EncoderState
    ) -> tuple[Tensor, Tensor, EncoderState]:
        """Subsample one window per stream ((B, F, W), valid rows start..end) and run the layers."""
        b = window.size(0)
        x, _, sub_end = self._pre_encode(window.transpose(1, 2), start, end)
        x = x[:, DROP_FRAMES : DROP_FRAMES + self.chunk_encoder_frames]
        out_len = (sub_end - DROP_FRAMES).clamp(min=0, max=self.chunk_encoder_frames)
        if self._xscale is not None:
            x = x * self._xscale
        t = x.size(1)
        c = self.cache_frames
        # Key validity over [cache | chunk]; chunked_limited with whole chunks needs no other mask.
        kpos = torch.arange(c + t, device=window.device)[None, :]
        valid = (kpos >= (c - state.attn_len)[:, None]) & (kpos < (c + out_len)[:, None])
        att_mask = None
        if not bool(valid.all()):
            att_mask = (~valid)[:, None, :].expand(b, t, c + t)
        pad_mask = None if bool((out_len == t).all()) else ~valid[:, c:]
        # Each cache sits in a buffer with room after it: the layers write this chunk's keys, values and
        # conv inputs there and use cache + chunk with no copy (see growbuffer.py).
        grow = self._grow
        k_join = grow.extend(state.attn_k, t, dim=3, slack=self._slack)
        v_join = grow.extend(state.attn_v, t, dim=3, slack=self._slack)
        conv_join = grow.extend(state.conv_tail, t, dim=2, slack=self._slack)
        joins = [Joins(k_join[li], v_join[li], conv_join[li]) for li in range(len(self._layers))]
        for li, layer in enumerate(self._layers):
            x = layer(x, self._pos_proj[li], att_mask, pad_mask, joins=joins[li])
        if torch.jit.is_tracing():  # the layers built new joins instead of filling these (conformer.fill_end)
            k_join, v_join, conv_join = (torch.stack([getattr(j, f) for j in joins]) for f in ("k", "v", "conv"))
        # Next window's left context: the last s+1 rows of this window that hold audio.
        keep = self.tail_mel_frames
        if bool((end == window.size(2)).all()):
            tail_rows = window[:, :, window.size(2) - keep :]
        else:
            tail_rows = torch.stack([window[i, :, int(end[i]) - keep : int(end[i])] for i in range(b)])
        new_state = EncoderState(
            mel_tail=tail_rows,
            mel_seen=state.mel_seen + n_new,
            attn_k=grow.commit(k_join, c, dim=3),
            attn_v=grow.commit(v_join, c, dim=3),
            attn_len=(state.attn_len + out_len).clamp(max=c),
            conv_tail=grow.commit(conv_join, state.conv_tail.size(2), dim=2),
        )
        return x, out_len, new_state
