"""Relative-position multi-head self-attention (Transformer-XL style, NeMo ``RelPositionMultiHeadAttention``).

The positional table, the attention itself and NeMo's attention mask for one ``att_context_size``.

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
    (here also: dk = D / H per-head width, Tq / Tk query and key frames)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from streamer.asr.config import ContextSize

MASK_FILL = -10000.0  # NeMo's fill value for masked attention scores


def sinusoid_rows(positions: Tensor, d_model: int) -> Tensor:
    """NeMo's ``create_pe`` for the given relative positions [P] -> [P, D] (sin on even, cos on odd columns)."""
    positions = positions.to(torch.float32).unsqueeze(1)
    div_term = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32, device=positions.device) * -(math.log(10000.0) / d_model)
    )
    pe = torch.zeros(positions.size(0), d_model, device=positions.device)
    pe[:, 0::2] = torch.sin(positions * div_term)
    pe[:, 1::2] = torch.cos(positions * div_term)
    return pe


def rel_positional_table(n: int, d_model: int, device: torch.device | None = None) -> Tensor:
    """NeMo ``RelPositionalEncoding`` rows for relative positions ``n-1, ..., -(n-1)``: [2n-1, D].

    Same float32 op order as NeMo's ``extend_pe``; every row depends only on its own position, so the
    table for any ``n`` equals the matching slice of NeMo's long table.
    """
    return sinusoid_rows(torch.arange(n - 1, -n, -1, dtype=torch.float32, device=device), d_model)


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
        # The table is shared by the batch: one [H, B*Tq, dk] x [H, dk, P] product, not B broadcast copies.
        bd = torch.matmul(q_v.transpose(0, 1).reshape(self.h, b * tq, self.d_k), p.transpose(-2, -1))
        bd = bd.view(self.h, b, tq, -1).transpose(0, 1)  # [B, H, Tq, P]
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


def attention_mask(
    valid: Tensor, att_context_size: ContextSize, style: str, query_offset: int = 0, always: bool = False
) -> Tensor | None:
    """NeMo's attention mask (True = masked) for keys at positions ``0..M-1``.

    ``valid`` [B, M] marks real key positions. Queries are positions ``query_offset..M-1``. Returns
    [B, Tq, M], or None when nothing is masked (full context, no padding) unless ``always`` (no
    data-dependent test, for a ``torch.compile``d graph).
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
    if not always and bool(ok.all()):
        return None
    return ~ok
