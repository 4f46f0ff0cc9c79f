"""One FastConformer block (NeMo ``ConformerLayer``): feed-forward, self-attention, convolution, feed-forward.

Each part runs offline (whole utterance) or streaming (the caller passes the cached keys/values and
the causal conv tail and keeps what comes back).

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
    (here also: dk = D / H per-head width, Tq / Tk query and key frames)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from streamer.asr.attention import RelPositionMultiHeadAttention
from streamer.asr.config import ContextSize, EncoderConfig
from streamer.asr.local_attention import LocalRelPositionMultiHeadAttention
from streamer.errors import ConfigError


@dataclass(slots=True)
class Joins:
    """One layer's streaming caches joined with room for this chunk, along time: keys and values
    [B, H, C+T, dk], conv inputs [B, K-1+T, D]. The first frames hold the cache; the layer writes this
    chunk's frames after them (:func:`fill_end`), and the caller keeps the last frames as the next caches."""

    k: Tensor
    v: Tensor
    conv: Tensor


def fill_end(joined: Tensor, new: Tensor, dim: int) -> Tensor:
    """Write ``new`` into the last frames (along time, ``dim``) of ``joined``, whose first frames hold the cache.

    While tracing for export (``streamer bench``'s ONNX step) the join is built by concatenation instead (an
    in-place write into a slice does not survive the TorchScript exporter): callers store the result back.
    """
    if torch.jit.is_tracing():
        return torch.cat([joined.narrow(dim, 0, joined.size(dim) - new.size(dim)), new], dim=dim)
    joined.narrow(dim, joined.size(dim) - new.size(dim), new.size(dim)).copy_(new)
    return joined


class FeedForward(nn.Module):
    """``linear2(SiLU(linear1(x)))``."""

    def __init__(self, d_model: int, d_ff: int, bias: bool) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(F.silu(self.linear1(x)))


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

    def forward(self, x: Tensor, pad_mask: Tensor | None, joins: Joins | None) -> Tensor:
        """``x`` [B, T, D]; ``pad_mask`` [B, T] True = padded. Offline ``joins`` is None; streaming its
        ``conv`` [B, K-1+T, D] (time-major) holds the cached inputs first, and this chunk's inputs are written
        after them. Returns [B, T, D]."""
        # Pointwise convs as linears on [B, T, D]: same maths, no transposes, faster for short chunks.
        pw1 = self.pointwise_conv1
        h = F.glu(F.linear(x, pw1.weight.squeeze(-1), pw1.bias), dim=-1)  # [B, T, D]
        if pad_mask is not None:
            h = h.masked_fill(pad_mask.unsqueeze(2), 0.0)
        left, right = self.context
        if joins is None:
            h = self._depthwise(F.pad(h.transpose(1, 2), (left, right)))  # [B, D, T]
            if isinstance(self.batch_norm, nn.LayerNorm):
                h = self.batch_norm(h.transpose(1, 2))
            else:
                h = self.batch_norm(h).transpose(1, 2)
        else:
            h = joins.conv = fill_end(joins.conv, h, dim=1)
            if right:
                h = F.pad(h, (0, 0, 0, right))
            h = self._depthwise_time_major(h)  # [B, T, D]
            if isinstance(self.batch_norm, nn.LayerNorm):
                h = self.batch_norm(h)
            else:
                h = self.batch_norm(h.transpose(1, 2)).transpose(1, 2)
        pw2 = self.pointwise_conv2
        return F.linear(F.silu(h), pw2.weight.squeeze(-1), pw2.bias)

    def _depthwise(self, h: Tensor) -> Tensor:
        """Depthwise conv over an already padded [B, D, T+K-1]. Short inputs use an unfold-and-sum, which
        avoids PyTorch's slow grouped-conv path for tiny outputs."""
        conv = self.depthwise_conv
        k = conv.kernel_size[0]
        t_out = h.size(2) - k + 1
        if t_out > 32:
            return conv(h)
        out = (h.unfold(2, k, 1) * conv.weight[:, 0, None, :]).sum(-1)
        return out if conv.bias is None else out + conv.bias[:, None]

    def _depthwise_time_major(self, h: Tensor) -> Tensor:
        """Depthwise conv over a padded, time-major [B, T+K-1, D] -> [B, T, D]: one multiply-add per tap
        over contiguous channels (a streaming chunk is a few frames; K taps of [B, T, D] beat any conv
        kernel and the unfold, whose sum runs over a strided axis of K)."""
        conv = self.depthwise_conv
        k = conv.kernel_size[0]
        t_out = h.size(1) - k + 1
        taps = conv.weight[:, 0, :].t()  # [K, D]
        out = h[:, :t_out] * taps[0]
        for j in range(1, k):
            out = torch.addcmul(out, h[:, j : j + t_out], taps[j])
        return out if conv.bias is None else out + conv.bias


def attention_module(cfg: EncoderConfig) -> RelPositionMultiHeadAttention:
    """The self-attention ``cfg`` asks for: full (masked) or local + global (``rel_pos_local_attn``)."""
    if cfg.is_local_attention:
        return LocalRelPositionMultiHeadAttention(
            cfg.n_heads,
            cfg.d_model,
            cfg.use_bias,
            cfg.default_att_context_size,
            cfg.global_tokens,
            cfg.global_tokens_spacing,
            cfg.global_attn_separate,
        )
    return RelPositionMultiHeadAttention(cfg.n_heads, cfg.d_model, cfg.use_bias)


class ConformerLayer(nn.Module):
    """Macaron Conformer block: FF/2, MHSA, conv, FF/2, LayerNorm (NeMo ``ConformerLayer``)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        d, bias = cfg.d_model, cfg.use_bias
        self.norm_feed_forward1 = nn.LayerNorm(d)
        self.feed_forward1 = FeedForward(d, d * cfg.ff_expansion_factor, bias)
        self.norm_self_att = nn.LayerNorm(d)
        self.self_attn = attention_module(cfg)
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
        joins: Joins | None = None,
    ) -> Tensor:
        """One block. Offline ``joins`` is None. Streaming it holds the caches with room for this chunk: the
        block writes the chunk's keys, values and conv inputs after them and attends / convolves over all."""
        r = x + 0.5 * self.feed_forward1(self.norm_feed_forward1(x))
        xn = self.norm_self_att(r)
        att = self.self_attn
        q = att.linear_q(xn)
        k = att.heads(att.linear_k, xn)
        v = att.heads(att.linear_v, xn)
        if joins is not None:
            k = joins.k = fill_end(joins.k, k, dim=2)
            v = joins.v = fill_end(joins.v, v, dim=2)
        if isinstance(att, LocalRelPositionMultiHeadAttention):
            r = r + att.attend_local(xn, q, k, v, p, pad_mask)
        else:
            r = r + att.attend(q, k, v, p, att_mask)
        r = r + self.conv(self.norm_conv(r), pad_mask, joins)
        r = r + 0.5 * self.feed_forward2(self.norm_feed_forward2(r))
        return self.norm_out(r)
