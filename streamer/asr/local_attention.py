"""Sliding-window (local) plus global-token attention with relative positions, NeMo ``rel_pos_local_attn``.

NeMo's ``RelPositionMultiHeadAttentionLongformer`` (nemo-reference.md §6) lets each query see the keys
``i-w .. i+w`` (``w = max(left, right)``) as a band of ``2w+1`` score columns, column ``c`` holding key
``i + c - w``; columns outside ``[w-left, w+right]`` are masked. A table of ``left+right+1`` relative
positions (``left, ..., -right``) is projected once; NeMo adds its first ``left`` rows to band columns
``0..left-1`` and the remaining ``right+1`` rows to the last ``right+1`` columns. For ``left == right``
that is every column's true relative position; for an asymmetric window some columns get another row or
none, and we reproduce that, since checkpoints were trained and are evaluated with it.

Global tokens (``global_tokens`` at stride ``global_tokens_spacing`` from frame 0) are keys every query
also sees (their scores are prepended to the band before the softmax, without positional terms, so a
global key inside the window counts twice, as in NeMo), and they attend to every frame themselves.

We compute the band block by block: a block of ``Q`` queries against its ``Q + 2w`` neighbouring keys is
one dense product whose diagonal strip is the band (a strided view, no copy). Memory is linear in the
audio: no ``T x T`` tensor, and at most ``_BLOCK_ELEMENTS`` dense scores alive at a time.

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
    (here also: dk = D / H per-head width, w = max(left, right), G global tokens, Q queries per block)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from streamer.asr.attention import MASK_FILL, RelPositionMultiHeadAttention, sinusoid_rows
from streamer.asr.config import ContextSize
from streamer.errors import ConfigError

_BLOCK_ELEMENTS = 1 << 22  # dense block scores alive at once (16 MiB of float32)


def local_positional_table(window: ContextSize, d_model: int, device: torch.device | None = None) -> Tensor:
    """NeMo ``LocalAttRelPositionalEncoding``: rows for relative positions ``left, ..., -right`` -> [L+R+1, D]."""
    left, right = window
    return sinusoid_rows(torch.arange(left, -right - 1, -1, dtype=torch.float32, device=device), d_model)


class LocalRelPositionMultiHeadAttention(RelPositionMultiHeadAttention):
    """Local + global attention with relative positions. State-dict keys equal NeMo's (``global_q/k/v``
    only when ``global_attn_separate``)."""

    def __init__(
        self,
        n_heads: int,
        d_model: int,
        bias: bool,
        window: ContextSize,
        global_tokens: int = 0,
        global_tokens_spacing: int = 1,
        global_attn_separate: bool = False,
    ) -> None:
        super().__init__(n_heads, d_model, bias)
        if max(window) <= 0 or min(window) < 0:
            raise ConfigError(f"local attention needs a window [left,right] >= 0 with one > 0, got {list(window)}")
        if global_tokens < 0 or global_tokens_spacing < 1:
            raise ConfigError("global_tokens must be >= 0 and global_tokens_spacing >= 1")
        self.window = (int(window[0]), int(window[1]))
        self.global_tokens = global_tokens
        self.global_tokens_spacing = global_tokens_spacing
        self.global_attn_separate = global_attn_separate
        if global_attn_separate:
            self.global_q = nn.Linear(d_model, d_model, bias=bias)
            self.global_k = nn.Linear(d_model, d_model, bias=bias)
            self.global_v = nn.Linear(d_model, d_model, bias=bias)

    def attend_local(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, p: Tensor, pad_mask: Tensor | None) -> Tensor:
        """``x`` [B,T,D] the normed layer input (for separate global projections), ``q`` [B,T,D] projected,
        ``k``/``v`` [B,H,T,dk], ``p`` [H, L+R+1, dk] the projected local table, ``pad_mask`` [B,T] True =
        padded (None: all valid). Returns [B, T, D]."""
        b, t, _ = q.shape
        valid = torch.ones(b, t, dtype=torch.bool, device=q.device) if pad_mask is None else ~pad_mask
        qh = q.view(b, t, self.h, self.d_k)
        q_u = (qh + self.pos_bias_u).transpose(1, 2)  # [B, H, T, dk]
        q_v = (qh + self.pos_bias_v).transpose(1, 2)
        gpos = self._global_positions(t, q.device)
        if gpos is None:
            ctx = self._band_attention(q_u, q_v, k, v, p, valid, None)
        else:
            gq, gk, gv = self._global_qkv(x, qh.transpose(1, 2), k, v)
            ctx = self._band_attention(q_u, q_v, k, v, p, valid, (gq, gk[:, :, gpos], v[:, :, gpos]))
            ctx[:, :, gpos] = self._global_to_all(gq[:, :, gpos], gk, gv, valid)
        return self.linear_out(ctx.transpose(1, 2).reshape(b, t, self.h * self.d_k))

    def _global_positions(self, t: int, device: torch.device) -> Tensor | None:
        """Frames that are global tokens: ``0, s, 2s, ...`` below ``G*s`` and ``t`` (NeMo's slice)."""
        if self.global_tokens == 0:
            return None
        return torch.arange(0, min(t, self.global_tokens * self.global_tokens_spacing), self.global_tokens_spacing,
                            device=device)

    def _global_qkv(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (already divided by sqrt(dk), as NeMo does in place), keys and values of the global
        attention, each [B, H, T, dk]: separate projections of ``x``, or the local ones."""
        if self.global_attn_separate:
            q, k, v = (self.heads(lin, x) for lin in (self.global_q, self.global_k, self.global_v))
        return q / self.s_d_k, k, v

    def _band_attention(
        self, q_u: Tensor, q_v: Tensor, k: Tensor, v: Tensor, p: Tensor, valid: Tensor,
        global_kv: tuple[Tensor, Tensor, Tensor] | None,
    ) -> Tensor:
        """Every query's attention over its window (and the global keys): [B, H, T, dk]."""
        b, h, t, dk = k.shape
        left, right = self.window
        w = max(left, right)
        block = max(64, 2 * w)
        n_blocks = -(-t // block)
        t_pad = n_blocks * block
        # Queries cut into blocks; keys and values padded by w on both sides so block j's neighbourhood is
        # rows j*Q .. j*Q + Q + 2w of the padded tensors.
        qu_b = F.pad(q_u, (0, 0, 0, t_pad - t)).view(b, h, n_blocks, block, dk)
        qv_b = F.pad(q_v, (0, 0, 0, t_pad - t)).view(b, h, n_blocks, block, dk)
        k_win = _windows(F.pad(k, (0, 0, w, w + t_pad - t)), block, 2 * w)  # [B, H, nb, Q+2w, dk]
        v_win = _windows(F.pad(v, (0, 0, w, w + t_pad - t)), block, 2 * w)
        key_ok = F.pad(valid, (w, w + t_pad - t), value=False)
        key_ok = key_ok.unfold(1, block + 2 * w, block).unfold(2, 2 * w + 1, 1)  # [B, nb, Q, 2w+1]
        col = torch.arange(2 * w + 1, device=k.device)
        key_ok = key_ok & ((col >= w - left) & (col <= w + right))
        query_ok = F.pad(valid, (0, t_pad - t), value=False).view(b, n_blocks, block)
        out = torch.empty(b, h, n_blocks, block, dk, dtype=v.dtype, device=v.device)
        per_block = b * h * block * (block + 2 * w)
        step = max(1, _BLOCK_ELEMENTS // per_block)
        pt = p.transpose(-2, -1)[None, :, None]  # [1, H, 1, dk, L+R+1]
        for j0 in range(0, n_blocks, step):
            j = slice(j0, min(n_blocks, j0 + step))
            dense = torch.matmul(qu_b[:, :, j], k_win[:, :, j].transpose(-2, -1))  # [B, H, n, Q, Q+2w]
            scores = _band(dense, 2 * w + 1).clone()  # [B, H, n, Q, 2w+1]
            bd = torch.matmul(qv_b[:, :, j], pt)  # [B, H, n, Q, L+R+1]
            scores[..., :left] += bd[..., :left]
            scores[..., 2 * w - right :] += bd[..., left:]
            scores = (scores / self.s_d_k).masked_fill(~key_ok[:, None, j], MASK_FILL)
            if global_kv is not None:
                gq, gk, gv = global_kv
                q_blocks = F.pad(gq, (0, 0, 0, t_pad - t)).view(b, h, n_blocks, block, dk)[:, :, j]
                g_scores = torch.matmul(q_blocks, gk[:, :, None].transpose(-2, -1))  # [B, H, n, Q, G]
                g = gk.size(2)
                probs = torch.softmax(torch.cat([g_scores, scores], dim=-1), dim=-1)
                probs = probs.masked_fill(~query_ok[:, None, j, :, None], 0.0)
                ctx = torch.matmul(probs[..., :g], gv[:, :, None])  # [B, H, n, Q, dk]
                probs = probs[..., g:]
            else:
                probs = torch.softmax(scores, dim=-1).masked_fill(~query_ok[:, None, j, :, None], 0.0)
                ctx = None
            dense.zero_()
            _band(dense, 2 * w + 1).copy_(probs)
            local = torch.matmul(dense, v_win[:, :, j])  # [B, H, n, Q, dk]
            out[:, :, j] = local if ctx is None else ctx + local
        return out.view(b, h, t_pad, dk)[:, :, :t]

    def _global_to_all(self, gq: Tensor, gk: Tensor, gv: Tensor, valid: Tensor) -> Tensor:
        """Global tokens attend to every valid frame: ``gq`` [B,H,G,dk] (scaled), ``gk``/``gv`` [B,H,T,dk]
        -> [B, H, G, dk].

        NeMo 3.0.0 lays the global queries out as (G, B, H) and reads them back as (B, H, G)
        (``transpose(0, 1).reshape(B*H, G, dk)`` in ``_compute_out_global_to_all``), so with more than one
        global token the query of (head h, token g) is another head's query of another token. Checkpoints
        were trained with that; we reproduce it (it is the identity for one global token and one stream).
        """
        b, h, g, dk = gq.shape
        gq = gq.permute(0, 2, 1, 3).transpose(0, 1).reshape(b, h, g, dk)
        scores = torch.matmul(gq, gk.transpose(-2, -1))  # [B, H, G, T]
        scores = scores.masked_fill(~valid[:, None, None, :], torch.finfo(scores.dtype).min)
        return torch.matmul(torch.softmax(scores, dim=-1), gv)


def _windows(x: Tensor, block: int, extra: int) -> Tensor:
    """Overlapping windows of ``block + extra`` rows every ``block`` rows of a contiguous [B, H, R, dk]
    -> [B, H, n, block+extra, dk] (a view)."""
    b, h, rows, dk = x.shape
    x = x.contiguous()
    n = (rows - extra) // block
    return x.as_strided((b, h, n, block + extra, dk), (h * rows * dk, rows * dk, block * dk, dk, 1))


def _band(dense: Tensor, width: int) -> Tensor:
    """The diagonal strip of a contiguous [..., Q, Q+width-1]: row i's columns i .. i+width-1 -> [..., Q, width]
    (a view: writing it writes ``dense``)."""
    *lead, q, cols = dense.shape
    strides = list(dense.stride())
    return dense.as_strided((*lead, q, width), (*strides[:-2], cols + 1, 1))
