"""The cache-aware encoder step in a form CUDA graphs can capture: fixed shapes, no host synchronisation.

:meth:`StreamingEncoder.step` takes shortcuts that read tensors on the host (``bool(x.all())``: is every
stream continuing with a full chunk? is nothing masked?). Each is a GPU-to-CPU sync, and a graph
capture refuses them. :func:`fixed_shape_step` computes the same numbers with none: it builds every
stream's subsampling window with tensor ops (first chunks, continuing chunks and a flushing last chunk
alike), always applies the row and attention masks (an all-true mask multiplies by 1 and fills nothing,
so the values are the same), and gathers the next window's tail per stream. Its output shapes depend on
the batch size only, so one capture serves every step of that batch size.

It drives the modules the ``StreamingEncoder`` shares with the encoder (its subsampling, layers and
projected positional table), so the two agree as long as they call the layers the same way; the tests
check that they do, and that no step reads a tensor on the host (they run it on the ``meta`` device).

Shape legend::

    B streams in the batch   M mel frames (10 ms)   F mel bins   T encoder frames (80 ms)   D encoder width
    L layers   H heads   C cached left-context encoder frames   dk = D / H   W mel rows in one window
    s subsampling factor   R right context (look-ahead) in encoder frames
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from streamer.asr import clocks
from streamer.asr.conformer import Joins
from streamer.asr.streaming import DROP_FRAMES, EncoderState, StreamingEncoder
from streamer.asr.subsampling import ConvSubsampling


def build_window(
    enc: StreamingEncoder, mel: Tensor, n_new: Tensor, state: EncoderState
) -> tuple[Tensor, Tensor, Tensor]:
    """Every stream's subsampling window and its valid rows, as :meth:`StreamingEncoder.step` lays them out.

    Args:
        enc: the streaming encoder.
        mel: (B, F, M) new mel frames, left-aligned, with ``M >= enc.chunk_mel_frames``.
        n_new: (B,) int64 how many of them are real (at most the stream's chunk, see ``chunk_frames``).
        state: the streams' batched state.

    Returns:
        ``(window (B, F, W), start (B,), end (B,))``: rows ``start <= t < end`` hold audio. A first chunk sits
        behind ``2s`` rows masked as before the start of audio; a later one behind the ``s+1`` cached rows.
    """
    s = enc.cfg.subsampling_factor
    w, keep = enc.window_mel_frames, enc.tail_mel_frames
    b, f, m = mel.shape
    real = torch.arange(m, device=mel.device)[None, None, :] < n_new[:, None, None]  # (B, 1, M)
    mel = mel.masked_fill(~real, 0.0)
    first = state.mel_seen == 0  # (B,)
    # W = (s+1) + s(R+1) = 2s + (1 + sR): both layouts fill exactly W rows; columns past W hold no audio.
    later = torch.cat([state.mel_tail.to(mel.dtype), mel], dim=2)[:, :, :w]
    opening = torch.cat([mel.new_zeros(b, f, 2 * s), mel], dim=2)[:, :, :w]
    window = torch.where(first[:, None, None], opening, later)
    start = torch.where(first, 2 * s, (keep - state.mel_seen).clamp(min=0))
    end = torch.where(first, 2 * s, keep) + n_new
    return window, start, end


def subsample(pre_encode: nn.Module, window: Tensor, start: Tensor, end: Tensor) -> tuple[Tensor, Tensor]:
    """:class:`~streamer.asr.subsampling.ConvSubsampling` on ``window`` (B, F, W) with rows outside
    ``start..end`` masked before every module and after the last, always. Returns ``(y (B, T', D), end')``."""
    causal = pre_encode.causal  # type: ignore[union-attr]
    h = window.transpose(1, 2).unsqueeze(1).contiguous(memory_format=torch.channels_last)  # (B, 1, W, F)
    for module in pre_encode.conv:  # type: ignore[union-attr]
        h = h * _rows(start, end, h.size(2), h.dtype)
        if isinstance(module, nn.Conv2d) and module.stride[0] == 2:
            h = ConvSubsampling._strided(module, h) if causal else module(h)
            start = torch.div(start + 1, 2, rounding_mode="floor")
            end = clocks.strided_conv_length(end, is_causal=causal)
        else:
            h = module(h)
    h = h * _rows(start, end, h.size(2), h.dtype)
    b, c, t, f = h.shape
    return pre_encode.out(h.transpose(1, 2).reshape(b, t, c * f)), end  # type: ignore[operator]


def _rows(start: Tensor, end: Tensor, t: int, dtype: torch.dtype) -> Tensor:
    """(B, 1, t, 1) ones on rows ``start <= i < end``, zeros elsewhere."""
    idx = torch.arange(t, device=start.device)[None, :]
    return ((idx >= start[:, None]) & (idx < end[:, None])).to(dtype)[:, None, :, None]


def fixed_shape_step(
    enc: StreamingEncoder, mel: Tensor, n_new: Tensor, state: EncoderState
) -> tuple[Tensor, Tensor, EncoderState]:
    """:meth:`StreamingEncoder.step` without host synchronisation; same arguments, same results.

    ``mel`` must be ``(B, F, M)`` with ``M >= enc.chunk_mel_frames`` (any float dtype: it is cast to the
    encoder's) and ``n_new`` within each stream's schedule (the caller checks: checking here would read
    the device). Rows whose input is garbage give
    garbage only in their own outputs: every operation works row by row.

    Returns:
        ``(out (B, R+1, D), out_len (B,), new state)``.
    """
    window, start, end = build_window(enc, mel.to(enc.dtype), n_new, state)
    x, sub_end = subsample(enc._pre_encode, window, start, end)
    t = enc.chunk_encoder_frames
    x = x[:, DROP_FRAMES : DROP_FRAMES + t]
    out_len = (sub_end - DROP_FRAMES).clamp(min=0, max=t)
    if enc._xscale is not None:
        x = x * enc._xscale
    b, c = x.size(0), enc.cache_frames
    kpos = torch.arange(c + t, device=x.device)[None, :]
    valid = (kpos >= (c - state.attn_len)[:, None]) & (kpos < (c + out_len)[:, None])  # (B, C+T)
    att_mask = (~valid)[:, None, :].expand(b, t, c + t)
    pad_mask = ~valid[:, c:]
    # The caches joined with room for this chunk (fresh buffers: a graph replays into the same ones).
    joined = [
        torch.cat([cache, cache.new_zeros(*cache.shape[:dim], t, *cache.shape[dim + 1 :])], dim=dim)
        for cache, dim in ((state.attn_k, 3), (state.attn_v, 3), (state.conv_tail, 2))
    ]
    joins = [Joins(joined[0][li], joined[1][li], joined[2][li]) for li in range(len(enc._layers))]
    for li, layer in enumerate(enc._layers):
        x = layer(x, enc._pos_proj[li], att_mask, pad_mask, joins=joins[li])
    keep = enc.tail_mel_frames
    cols = (end[:, None] - keep + torch.arange(keep, device=end.device)[None, :]).clamp(min=0)  # (B, s+1)
    tail_rows = torch.gather(window, 2, cols[:, None, :].expand(b, window.size(1), keep))
    new_state = EncoderState(
        mel_tail=tail_rows,
        mel_seen=state.mel_seen + n_new,
        attn_k=joined[0][:, :, :, t:],
        attn_v=joined[1][:, :, :, t:],
        attn_len=(state.attn_len + out_len).clamp(max=c),
        conv_tail=joined[2][:, :, t:],
    )
    return x, out_len, new_state
