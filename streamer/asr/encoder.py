"""FastConformer encoder (NeMo ``ConformerEncoder`` with ``dw_striding`` subsampling and rel-pos attention).

Two entry points share every layer:

* :meth:`FastConformerEncoder.forward` - offline, the whole utterance under the attention mask of one
  ``att_context_size`` (NeMo's ``encoder.forward``).
* :meth:`FastConformerEncoder.step` - cache-aware streaming, one chunk per call with explicit
  :class:`EncoderState`, batched over streams whose caches are at different fill levels.

Streaming design (differs from NeMo's buffer, gives the same numbers):
every step runs the subsampling on one window of ``(s+1) + s*(R+1)`` mel rows (``s`` = subsampling
factor, ``R`` = right context), i.e. NeMo's 9 cached + 8(R+1) new rows for ``s = 8``, and drops the first
2 subsampled frames. A stream's *first* chunk has only ``1 + s*R`` real rows; it is placed behind ``2s``
rows that are masked as "before the start of audio" at every subsampling layer, which is exactly the
causal zero padding of the offline convs. The same left mask covers a cache that holds fewer than
``s+1`` real rows (NeMo fills those with zeros, which is why its ``[70,0]`` streaming differs from
offline). A final, shorter chunk is masked on the right like the offline length mask. Hence streaming
equals the offline forward with the same ``att_context_size`` at every look-ahead, including 0.

Attention caches hold projected keys and values of the last ``left`` frames per layer (NeMo caches the
normalised layer input and re-projects it every step; the numbers are the same, the work is not).

Shapes: B batch, F mel bins, T frames, D d_model, H heads, dk = D/H, C attention cache size,
K depthwise kernel, L layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamer.asr import clocks
from streamer.asr.config import ContextSize, EncoderConfig
from streamer.errors import ConfigError

MASK_FILL = -10000.0  # NeMo's fill value for masked attention scores


# --------------------------------------------------------------------------------------------------
# Subsampling


def _strided_out_len(length: Tensor, causal: bool) -> Tensor:
    """Output length of one kernel-3 stride-2 conv: pad (2,1) causal, (1,1) symmetric."""
    total_pad = 3 if causal else 2
    return torch.div(length + total_pad - 3, 2, rounding_mode="floor") + 1


class ConvSubsampling(nn.Module):
    """``dw_striding`` subsampling: conv 3x3/2, then (depthwise 3x3/2, pointwise 1x1) per extra halving.

    State-dict keys match NeMo: ``conv.{0,2,3,5,6}``, ``out``. Activations are masked by time before every
    module and after the last (NeMo >= 2.5 ``MaskedConvSequential``); our mask also has a left edge
    (``start``) so streaming windows can hold rows from before the start of audio.
    """

    def __init__(self, feat_in: int, d_model: int, channels: int, factor: int, causal: bool) -> None:
        super().__init__()
        n = int(math.log2(factor))
        if 2**n != factor or n < 1:
            raise ConfigError(f"dw_striding subsampling factor must be a power of 2, got {factor}")
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
            freq = (freq + (3 if causal else 2) - 3) // 2 + 1
        self.out = nn.Linear(channels * freq, d_model)

    def forward(self, x: Tensor, start: Tensor, end: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Subsample ``x`` [B, T, F] whose valid rows are ``start <= t < end`` (per row of the batch).

        Returns ``(y [B, T', D], start', end')``. ``start`` must stay even through every halving but the
        last (the streaming window guarantees it).
        """
        # channels-last makes the depthwise 3x3 convs take the fast oneDNN path (8x on small inputs)
        h = x.unsqueeze(1).contiguous(memory_format=torch.channels_last)  # [B, 1, T, F]
        need_mask = bool((start > 0).any()) or bool((end < h.size(2)).any())
        for module in self.conv:
            if need_mask:
                h = h * _row_mask(start, end, h.size(2), h.dtype)
            if isinstance(module, nn.Conv2d) and module.stride[0] == 2:
                if self.causal:
                    h = F.pad(h, (2, 1, 2, 1))
                h = module(h)
                start = torch.div(start + 1, 2, rounding_mode="floor")
                end = _strided_out_len(end, self.causal)
                need_mask = bool((start > 0).any()) or bool((end < h.size(2)).any())
            else:
                h = module(h)
        if need_mask:
            h = h * _row_mask(start, end, h.size(2), h.dtype)
        b, c, t, f = h.shape
        y = self.out(h.transpose(1, 2).reshape(b, t, c * f))
        return y, start, end


def _row_mask(start: Tensor, end: Tensor, t: int, dtype: torch.dtype) -> Tensor:
    """[B, 1, T, 1] mask of rows ``start <= i < end``."""
    idx = torch.arange(t, device=start.device)
    ok = (idx[None, :] >= start[:, None]) & (idx[None, :] < end[:, None])
    return ok.to(dtype)[:, None, :, None]


def subsampled_length(mel_frames: Tensor | int, factor: int, causal: bool) -> Tensor:
    """Encoder frames produced from ``mel_frames`` valid mel frames (NeMo ``calc_length``)."""
    return torch.as_tensor(clocks.num_encoder_frames(torch.as_tensor(mel_frames), factor, is_causal=causal))


# --------------------------------------------------------------------------------------------------
# Positional encoding


def rel_positional_table(n: int, d_model: int, device: torch.device | None = None) -> Tensor:
    """NeMo ``RelPositionalEncoding`` rows for relative positions ``n-1, ..., -(n-1)``: [2n-1, D].

    Same float32 op order as NeMo's ``extend_pe``; every row depends only on its own position, so the
    table for any ``n`` equals the matching slice of NeMo's long table.
    """
    positions = torch.arange(n - 1, -n, -1, dtype=torch.float32, device=device).unsqueeze(1)
    div_term = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / d_model)
    )
    pe = torch.zeros(positions.size(0), d_model, device=device)
    pe[:, 0::2] = torch.sin(positions * div_term)
    pe[:, 1::2] = torch.cos(positions * div_term)
    return pe


# --------------------------------------------------------------------------------------------------
# Layer parts


class FeedForward(nn.Module):
    """``linear2(SiLU(linear1(x)))``."""

    def __init__(self, d_model: int, d_ff: int, bias: bool) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(F.silu(self.linear1(x)))


class RelPositionMultiHeadAttention(nn.Module):
    """Transformer-XL style attention with relative positions (NeMo ``RelPositionMultiHeadAttention``)."""

    def __init__(self, n_heads: int, d_model: int, bias: bool) -> None:
        super().__init__()
        self.h = n_heads
        self.d_k = d_model // n_heads
        self.s_d_k = math.sqrt(self.d_k)
        self.linear_q = nn.Linear(d_model, d_model, bias=bias)
        self.linear_k = nn.Linear(d_model, d_model, bias=bias)
        self.linear_v = nn.Linear(d_model, d_model, bias=bias)
        self.linear_out = nn.Linear(d_model, d_model, bias=bias)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_heads, self.d_k))

    def project_pos(self, pos: Tensor) -> Tensor:
        """``linear_pos`` of a positional table [P, D] -> [H, P, dk]."""
        return self.linear_pos(pos).view(pos.size(0), self.h, self.d_k).transpose(0, 1)

    def heads(self, linear: nn.Linear, x: Tensor) -> Tensor:
        """Project [B, T, D] and split heads -> [B, H, T, dk]."""
        b, t, _ = x.shape
        return linear(x).view(b, t, self.h, self.d_k).transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, p: Tensor, mask: Tensor | None) -> Tensor:
        """Scores and context. ``q`` [B,Tq,D] (projected, heads not split), ``k``/``v`` [B,H,Tk,dk],
        ``p`` [H, P, dk] with ``P >= Tq + Tk - 1``, ``mask`` [B, Tq, Tk] True = masked."""
        b, tq, _ = q.shape
        tk = k.size(2)
        q = q.view(b, tq, self.h, self.d_k)
        q_u = (q + self.pos_bias_u).transpose(1, 2)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        ac = torch.matmul(q_u, k.transpose(-2, -1))
        bd = torch.matmul(q_v, p.transpose(-2, -1))  # [B, H, Tq, P]
        bd = _rel_shift(bd)[..., :tk]
        scores = (ac + bd) / self.s_d_k
        if mask is not None:
            m = mask.unsqueeze(1)
            attn = torch.softmax(scores.masked_fill(m, MASK_FILL), dim=-1).masked_fill(m, 0.0)
        else:
            attn = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(attn, v).transpose(1, 2).reshape(b, tq, self.h * self.d_k)
        return self.linear_out(ctx)


def _rel_shift(x: Tensor) -> Tensor:
    """NeMo's ``rel_shift``: out[..., i, j] = x[..., i, Tq - 1 - i + j]."""
    b, h, tq, p = x.shape
    x = F.pad(x, (1, 0))
    x = x.view(b, h, p + 1, tq)[:, :, 1:].view(b, h, tq, p)
    return x


class ConvModule(nn.Module):
    """Pointwise conv + GLU, depthwise conv (causal or symmetric), norm, SiLU, pointwise conv."""

    def __init__(self, d_model: int, kernel: int, context: ContextSize, norm: str, bias: bool) -> None:
        super().__init__()
        self.context = context
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * d_model, 1, bias=bias)
        self.depthwise_conv = nn.Conv1d(d_model, d_model, kernel, groups=d_model, bias=bias)
        if norm == "batch_norm":
            self.batch_norm: nn.Module = nn.BatchNorm1d(d_model)
        elif norm == "layer_norm":
            self.batch_norm = nn.LayerNorm(d_model)  # NeMo keeps the attribute name `batch_norm`
        else:
            raise ConfigError(f"conv_norm_type {norm!r} is not supported; use batch_norm or layer_norm")
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, 1, bias=bias)

    def forward(self, x: Tensor, pad_mask: Tensor | None, tail: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``x`` [B, T, D]; ``pad_mask`` [B, T] True = padded; ``tail`` [B, D, left] cached inputs or None.

        Returns the output [B, T, D] and the new tail (None offline)."""
        # Pointwise convs as linears on [B, T, D]: same maths, no transposes, faster for short chunks.
        pw1 = self.pointwise_conv1
        h = F.glu(F.linear(x, pw1.weight.squeeze(-1), pw1.bias), dim=-1).transpose(1, 2)
        if pad_mask is not None:
            h = h.masked_fill(pad_mask.unsqueeze(1), 0.0)
        left, right = self.context
        new_tail = None
        if tail is None:
            h = F.pad(h, (left, right))
        else:
            h = torch.cat([tail, h], dim=2)
            new_tail = h[:, :, h.size(2) - left :] if left > 0 else tail
            if right:
                h = F.pad(h, (0, right))
        h = self._depthwise(h)
        if isinstance(self.batch_norm, nn.LayerNorm):
            h = self.batch_norm(h.transpose(1, 2))
        else:
            h = self.batch_norm(h).transpose(1, 2)
        pw2 = self.pointwise_conv2
        return F.linear(F.silu(h), pw2.weight.squeeze(-1), pw2.bias), new_tail

    def _depthwise(self, h: Tensor) -> Tensor:
        """Depthwise conv over an already padded [B, D, T+K-1]. Short inputs (streaming chunks) use an
        unfold-and-sum, which avoids PyTorch's slow grouped-conv path for tiny outputs."""
        conv = self.depthwise_conv
        k = conv.kernel_size[0]
        t_out = h.size(2) - k + 1
        if t_out > 32:
            return conv(h)
        out = (h.unfold(2, k, 1) * conv.weight[:, 0, None, :]).sum(-1)
        return out if conv.bias is None else out + conv.bias[:, None]


class ConformerLayer(nn.Module):
    """Macaron Conformer block: FF/2, MHSA, conv, FF/2, LayerNorm (NeMo ``ConformerLayer``)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        d, bias = cfg.d_model, cfg.use_bias
        self.norm_feed_forward1 = nn.LayerNorm(d)
        self.feed_forward1 = FeedForward(d, d * cfg.ff_expansion_factor, bias)
        self.norm_self_att = nn.LayerNorm(d)
        self.self_attn = RelPositionMultiHeadAttention(cfg.n_heads, d, bias)
        self.norm_conv = nn.LayerNorm(d)
        self.conv = ConvModule(d, cfg.conv_kernel_size, cfg.conv_context, cfg.conv_norm_type, bias)
        self.norm_feed_forward2 = nn.LayerNorm(d)
        self.feed_forward2 = FeedForward(d, d * cfg.ff_expansion_factor, bias)
        self.norm_out = nn.LayerNorm(d)

    def forward(
        self,
        x: Tensor,
        p: Tensor,
        att_mask: Tensor | None,
        pad_mask: Tensor | None,
        kv_cache: tuple[Tensor, Tensor] | None = None,
        conv_tail: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """One block. Offline: no caches. Streaming: ``kv_cache`` = projected (k, v) [B,H,C,dk] of the
        cached frames, ``conv_tail`` [B,D,K-1]. Returns (y, k_all, v_all, new_conv_tail) where k_all/v_all
        cover cache + chunk (the caller keeps the last C)."""
        r = x + 0.5 * self.feed_forward1(self.norm_feed_forward1(x))
        xn = self.norm_self_att(r)
        att = self.self_attn
        q = att.linear_q(xn)
        k = att.heads(att.linear_k, xn)
        v = att.heads(att.linear_v, xn)
        if kv_cache is not None:
            k = torch.cat([kv_cache[0], k], dim=2)
            v = torch.cat([kv_cache[1], v], dim=2)
        r = r + att.attend(q, k, v, p, att_mask)
        c, new_tail = self.conv(self.norm_conv(r), pad_mask, conv_tail)
        r = r + c
        r = r + 0.5 * self.feed_forward2(self.norm_feed_forward2(r))
        return self.norm_out(r), k, v, new_tail


# --------------------------------------------------------------------------------------------------
# Masks


def attention_mask(
    valid: Tensor, att_context_size: ContextSize, style: str, query_offset: int = 0
) -> Tensor | None:
    """NeMo's attention mask (True = masked) for keys at positions ``0..M-1``.

    ``valid`` [B, M] marks real key positions. Queries are positions ``query_offset..M-1``. Returns
    [B, Tq, M], or None when nothing is masked (full context, no padding).
    """
    b, m = valid.shape
    left, right = att_context_size
    qpos = torch.arange(query_offset, m, device=valid.device)[:, None]
    kpos = torch.arange(m, device=valid.device)[None, :]
    allowed = torch.ones(qpos.size(0), m, dtype=torch.bool, device=valid.device)
    if style == "chunked_limited" and right >= 0:
        chunk = right + 1
        left_chunks = left // chunk if left >= 0 else 10000
        diff = torch.div(qpos, chunk, rounding_mode="floor") - torch.div(kpos, chunk, rounding_mode="floor")
        allowed = (diff >= 0) & (diff <= left_chunks)
    else:
        if left >= 0:
            allowed &= kpos >= qpos - left
        if right >= 0:
            allowed &= kpos <= qpos + right
    ok = allowed[None] & valid[:, None, :] & valid[:, query_offset:, None]
    if bool(ok.all()):
        return None
    return ~ok


# --------------------------------------------------------------------------------------------------
# Streaming state and plan


@dataclass(frozen=True, slots=True)
class EncoderState:
    """Per-stream encoder cache, batched along ``BATCH_DIM``."""

    mel_tail: Tensor  # [B, F, s+1] the last mel rows, left context of the next subsampling window
    mel_seen: Tensor  # [B] int64 mel frames consumed so far (0 = the next chunk is the first)
    attn_k: Tensor  # [L, B, H, C, dk] projected keys of the last C frames, newest last
    attn_v: Tensor  # [L, B, H, C, dk]
    attn_len: Tensor  # [B] int64 how many of the C cache slots are real (right-aligned)
    conv_tail: Tensor  # [L, B, D, K-1] last depthwise-conv inputs

    BATCH_DIM: ClassVar[dict[str, int]] = {
        "mel_tail": 0,
        "mel_seen": 0,
        "attn_k": 1,
        "attn_v": 1,
        "attn_len": 0,
        "conv_tail": 1,
    }


@dataclass(frozen=True)
class StreamingPlan:
    """The chunk schedule of one ``att_context_size`` plus per-layer tables computed once.

    Mel frames: the first chunk needs ``first_chunk`` new frames, every later one ``chunk``; each gives
    ``out_frames`` encoder frames. Built by :meth:`FastConformerEncoder.streaming_plan`; it holds
    projections of the weights, so build it again after the weights change.
    """

    att_context_size: ContextSize
    first_chunk: int
    chunk: int
    pre_cache: int
    drop: int
    cache_size: int
    out_frames: int
    window: int
    pos_proj: tuple[Tensor, ...]  # per layer [H, P, dk]

    @property
    def lookahead_ms(self) -> float:
        """Right context in milliseconds of audio (R encoder frames of 80 ms)."""
        return self.att_context_size[1] * 80.0


# --------------------------------------------------------------------------------------------------
# Encoder


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

    # ------------------------------------------------------------------ offline

    def _context(self, att_context_size: ContextSize | None) -> ContextSize:
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
        """Offline encoder. ``mel`` [B, F, T], ``lengths`` [B] -> (out [B, T', D], lengths [B])."""
        ctx = self._context(att_context_size)
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
            x, _, _, _ = layer(x, p, att_mask, pad_mask)
        return x, lengths

    # ------------------------------------------------------------------ streaming

    def streaming_plan(self, att_context_size: ContextSize | None = None) -> StreamingPlan:
        """Chunk schedule and cached tables for cache-aware streaming at ``att_context_size``."""
        cfg = self.cfg
        ctx = self._context(att_context_size)
        left, right = ctx
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
        s = cfg.subsampling_factor
        out_frames = right + 1
        n = left + out_frames
        device = next(self.parameters()).device
        dtype = next(self.parameters()).dtype
        pos = rel_positional_table(n, cfg.d_model, device).to(dtype)
        with torch.no_grad():
            pos_proj = tuple(layer.self_attn.project_pos(pos).contiguous() for layer in self.layers)
        return StreamingPlan(
            att_context_size=ctx,
            first_chunk=1 + s * right,
            chunk=s * out_frames,
            pre_cache=s + 1,
            drop=2,
            cache_size=left,
            out_frames=out_frames,
            window=(s + 1) + s * out_frames,
            pos_proj=pos_proj,
        )

    def init_state(self, batch: int, plan: StreamingPlan, device=None, dtype=None) -> EncoderState:
        """A fresh cache for ``batch`` streams."""
        cfg = self.cfg
        p = next(self.parameters())
        device = device or p.device
        dtype = dtype or p.dtype
        att = self.layers[0].self_attn
        nl = cfg.n_layers
        return EncoderState(
            mel_tail=torch.zeros(batch, cfg.feat_in, plan.pre_cache, device=device, dtype=dtype),
            mel_seen=torch.zeros(batch, dtype=torch.long, device=device),
            attn_k=torch.zeros(nl, batch, att.h, plan.cache_size, att.d_k, device=device, dtype=dtype),
            attn_v=torch.zeros(nl, batch, att.h, plan.cache_size, att.d_k, device=device, dtype=dtype),
            attn_len=torch.zeros(batch, dtype=torch.long, device=device),
            conv_tail=torch.zeros(
                nl, batch, cfg.d_model, cfg.conv_context[0], device=device, dtype=dtype
            ),
        )

    def chunk_frames(self, plan: StreamingPlan, state: EncoderState) -> Tensor:
        """New mel frames each stream needs for its next step: [B] int64."""
        return torch.where(state.mel_seen == 0, plan.first_chunk, plan.chunk)

    def step(
        self, mel: Tensor, n_new: Tensor, state: EncoderState, plan: StreamingPlan
    ) -> tuple[Tensor, Tensor, EncoderState]:
        """One cache-aware step for a batch of streams.

        ``mel`` [B, F, N] holds each stream's new mel frames left-aligned; ``n_new`` [B] says how many are
        real: exactly :meth:`chunk_frames` for a full step, fewer only for a stream's last (flushing)
        step, whose state is then spent. Returns (out [B, R+1, D], out_len [B], new state).
        """
        b, f, _ = mel.shape
        s = self.cfg.subsampling_factor
        w = plan.window
        first = state.mel_seen == 0
        need = self.chunk_frames(plan, state)
        if bool((n_new > need).any()):
            raise ValueError("step() got more mel frames than the chunk schedule allows")
        # Build the subsampling window: [masked/tail rows | new rows | right padding].
        steady = not bool(first.any()) and bool((n_new == plan.chunk).all())
        if steady:  # the common case: every stream continues with a full chunk
            window = torch.cat([state.mel_tail, mel[:, :, : plan.chunk]], dim=2)
            start = (plan.pre_cache - state.mel_seen).clamp(min=0)
            end = torch.full_like(n_new, w)
            return self._step_window(window, start, end, n_new, state, plan)
        rows = []
        start = torch.empty(b, dtype=torch.long, device=mel.device)
        for i in range(b):
            ni = int(n_new[i])
            if bool(first[i]):
                lead = mel.new_zeros(f, 2 * s)
                start[i] = 2 * s
            else:
                lead = state.mel_tail[i]
                start[i] = max(0, plan.pre_cache - int(state.mel_seen[i]))
            row = torch.cat([lead, mel[i, :, :ni]], dim=1)
            if row.size(1) < w:
                row = F.pad(row, (0, w - row.size(1)))
            rows.append(row)
        window = torch.stack(rows)  # [B, F, W]
        end = torch.where(first, 2 * s, plan.pre_cache) + n_new
        return self._step_window(window, start, end, n_new, state, plan)

    def _step_window(
        self, window: Tensor, start: Tensor, end: Tensor, n_new: Tensor, state: EncoderState,
        plan: StreamingPlan,
    ) -> tuple[Tensor, Tensor, EncoderState]:
        """Subsample one window per stream ([B, F, W], valid rows start..end) and run the layers."""
        b = window.size(0)
        x, _, sub_end = self.pre_encode(window.transpose(1, 2), start, end)
        x = x[:, plan.drop : plan.drop + plan.out_frames]
        out_len = (sub_end - plan.drop).clamp(min=0, max=plan.out_frames)
        if self.xscale is not None:
            x = x * self.xscale
        t = x.size(1)
        c = plan.cache_size
        # Key validity over [cache | chunk]; chunked_limited with whole chunks needs no other mask.
        kpos = torch.arange(c + t, device=window.device)[None, :]
        valid = (kpos >= (c - state.attn_len)[:, None]) & (kpos < (c + out_len)[:, None])
        att_mask = None
        if not bool(valid.all()):
            att_mask = (~valid)[:, None, :].expand(b, t, c + t)
        pad_mask = None if bool((out_len == t).all()) else ~valid[:, c:]
        new_k, new_v, new_tail = [], [], []
        for li, layer in enumerate(self.layers):
            x, k_all, v_all, tail = layer(
                x,
                plan.pos_proj[li],
                att_mask,
                pad_mask,
                kv_cache=(state.attn_k[li], state.attn_v[li]),
                conv_tail=state.conv_tail[li],
            )
            new_k.append(k_all[:, :, k_all.size(2) - c :])
            new_v.append(v_all[:, :, v_all.size(2) - c :])
            new_tail.append(tail)
        # Next window's left context: the last s+1 rows of this window that hold audio.
        if bool((end == window.size(2)).all()):
            tail_rows = window[:, :, window.size(2) - plan.pre_cache :]
        else:
            tail_rows = torch.stack([window[i, :, int(end[i]) - plan.pre_cache : int(end[i])] for i in range(b)])
        new_state = EncoderState(
            mel_tail=tail_rows,
            mel_seen=state.mel_seen + n_new,
            attn_k=torch.stack(new_k),
            attn_v=torch.stack(new_v),
            attn_len=(state.attn_len + out_len).clamp(max=c),
            conv_tail=torch.stack(new_tail),
        )
        return x, out_len, new_state
