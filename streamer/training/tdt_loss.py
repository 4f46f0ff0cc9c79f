"""Transducer losses for training: TDT (Token-and-Duration Transducer), plain RNNT, and auxiliary CTC.

The TDT loss is the negative log-likelihood of the target over all alignments of the TDT lattice
(Xu et al. 2023, "Efficient Sequence Transduction by Jointly Predicting Tokens and Durations",
arXiv:2304.06795, eq. 7). At node ``(t, u)`` (``u`` labels emitted, frame ``t``) the joint output is split
into tokens + blank (log-softmaxed over ``V``) and durations (log-softmaxed over ``N``), as NeMo 3.0.0's
``TDTLossNumba`` does. Arcs:

* blank with duration ``d >= 1``: ``(t, u) -> (t + d, u)``; the path ends with a blank that lands exactly on
  ``t = T`` at ``u = U``;
* label ``y[u]`` with duration ``d >= 0``: ``(t, u) -> (t + d, u + 1)``, landing before ``T``.

Every arc's log-weight is ``log p(token) - sigma + log p(duration)`` (``sigma``: logit under-normalisation).
With probability ``omega`` a batch is trained with the plain RNNT loss on the token outputs instead (NeMo
samples that once per call; the durations then get no gradient).

How it is computed: one custom autograd function log-softmaxes the joint output, gathers the per-arc
log-weights and runs the forward (alpha) recursion without building a graph; its backward runs the beta
recursion, turns arc posteriors into gradients wrt the arc log-probabilities and applies the two
log-softmax Jacobians in one dense pass. Each recursion is one Python loop over ``t``, vectorised over the
batch and ``u``: the duration-0 label arcs that stay on frame ``t`` form a chain along ``u``, summed in
closed form with ``logcumsumexp``. The recursions run in float64 (they are small: ``B x T x (U+1)``).

Shape legend:
    B utterances   T encoder frames   U target tokens (the lattice has U + 1 rows)
    V vocab incl. blank (blank = V - 1, NeMo's "blank last")   N TDT durations
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

Reduction = Literal["mean_batch", "mean", "mean_volume", "sum", "none"]
NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------------
# The lattice recursions (no autograd graph)


def _logsumexp(terms: list[Tensor]) -> Tensor:
    """Elementwise log(sum(exp)) of equal-shaped tensors; -inf when every term is -inf."""
    if len(terms) == 1:
        return terms[0]
    return torch.logsumexp(torch.stack(terms), dim=0)


def _chain_forward(base: Tensor, step: Tensor | None) -> Tensor:
    """alpha(u) = logsumexp(base(u), alpha(u-1) + step(u-1)) along the last axis, in closed form.

    ``base`` (B, U+1); ``step`` (B, U) log-weights of the duration-0 label arcs, or None (no such arcs).
    alpha(u) = C(u) + logcumsumexp_k<=u (base(k) - C(k)) with C(u) = sum_{j<u} step(j).
    """
    if step is None:
        return base
    c = F.pad(step.cumsum(dim=1), (1, 0))  # (B, U+1)
    return c + torch.logcumsumexp(base - c, dim=1)


def _chain_backward(base: Tensor, step: Tensor | None) -> Tensor:
    """beta(u) = logsumexp(base(u), step(u) + beta(u+1)) along the last axis (the reverse of the above).

    beta(u) = -C(u) + logsumexp_k>=u (base(k) + C(k)).
    """
    if step is None:
        return base
    c = F.pad(step.cumsum(dim=1), (1, 0))  # (B, U+1)
    return torch.logcumsumexp((base + c).flip(1), dim=1).flip(1) - c


class _Lattice:
    """Shapes, durations and masks of one batch of transducer lattices."""

    def __init__(
        self,
        blank_w: Tensor,
        label_w: Tensor,
        frames: Tensor,
        tokens: Tensor,
        blank_durations: Sequence[int],
        label_durations: Sequence[int],
    ) -> None:
        self.blank_w, self.label_w = blank_w, label_w  # (B, T, U+1, Nb), (B, T, U, Nl)
        self.frames, self.tokens = frames, tokens  # (B,), (B,)
        self.db, self.dl = list(blank_durations), list(label_durations)
        self.batch, self.max_t, self.rows = blank_w.shape[0], blank_w.shape[1], blank_w.shape[2]
        self.pad = max(self.db + self.dl)
        self.label0 = self.dl.index(0) if 0 in self.dl else None
        u = torch.arange(self.rows, device=blank_w.device)
        t = torch.arange(self.max_t + self.pad + 1, device=blank_w.device)
        self.row_ok = u[None, :] <= tokens[:, None]  # (B, U+1)
        self.time_ok = t[None, :] < frames[:, None]  # (B, T+pad+1)

    def alpha(self) -> tuple[Tensor, Tensor]:
        """Forward variables (B, T, U+1) and the log-likelihood (B,)."""
        bw, lw = self.blank_w, self.label_w
        alpha = bw.new_full((self.batch, self.max_t, self.rows), NEG_INF)
        start = bw.new_full((self.batch, self.rows), NEG_INF)
        start[:, 0] = 0.0
        for t in range(self.max_t):
            terms = [start] if t == 0 else []
            for i, d in enumerate(self.db):
                if 1 <= d <= t:
                    terms.append(alpha[:, t - d] + bw[:, t - d, :, i])
            for i, d in enumerate(self.dl):
                if 1 <= d <= t:
                    terms.append(F.pad(alpha[:, t - d, :-1] + lw[:, t - d, :, i], (1, 0), value=NEG_INF))
            base = _logsumexp(terms) if terms else torch.full_like(start, NEG_INF)
            step = lw[:, t, :, self.label0] if self.label0 is not None else None
            alpha[:, t] = _chain_forward(base, step)
        # The path ends with a blank landing exactly on T at row U.
        b = torch.arange(self.batch, device=bw.device)
        ends = []
        for i, d in enumerate(self.db):
            src = self.frames - d
            ok = src >= 0
            src = src.clamp(min=0)
            ends.append(torch.where(ok, alpha[b, src, self.tokens] + bw[b, src, self.tokens, i], NEG_INF))
        return alpha, _logsumexp(ends)

    def beta(self) -> Tensor:
        """Backward variables (B, T + pad + 1, U+1); at t >= T_b all -inf but the end (T_b, U_b) = 0."""
        bw, lw = self.blank_w, self.label_w
        beta = bw.new_full((self.batch, self.max_t + self.pad + 1, self.rows), NEG_INF)
        b = torch.arange(self.batch, device=bw.device)
        beta[b, self.frames, self.tokens] = 0.0
        valid = self.row_ok[:, None, :] & self.time_ok[:, : self.max_t, None]  # (B, T, U+1)
        for t in range(self.max_t - 1, -1, -1):
            terms = [beta[:, t + d] + bw[:, t, :, i] for i, d in enumerate(self.db)]
            for i, d in enumerate(self.dl):
                if d >= 1:  # a label must land before T_b
                    nxt = beta[:, t + d, 1:].masked_fill(~self.time_ok[:, t + d, None], NEG_INF)
                    terms.append(F.pad(nxt + lw[:, t, :, i], (0, 1), value=NEG_INF))
            base = _logsumexp(terms).masked_fill(~valid[:, t], NEG_INF)
            step = lw[:, t, :, self.label0] if self.label0 is not None else None
            beta[:, t] = torch.where(valid[:, t], _chain_backward(base, step), beta[:, t])
        return beta

    def posteriors(self, alpha: Tensor, beta: Tensor, loglike: Tensor) -> tuple[Tensor, Tensor]:
        """Arc posteriors: blank (B, T, U+1, Nb) and label (B, T, U, Nl)."""
        t_len = self.max_t
        ll = loglike[:, None, None]
        post_b = []
        for i, d in enumerate(self.db):
            post_b.append(alpha + self.blank_w[..., i] + beta[:, d : d + t_len] - ll)
        beta_label = beta.masked_fill(~self.time_ok[:, :, None], NEG_INF)[:, :, 1:]  # lands before T_b
        post_l = []
        for i, d in enumerate(self.dl):
            post_l.append(alpha[:, :, :-1] + self.label_w[..., i] + beta_label[:, d : d + t_len] - ll)
        return torch.stack(post_b, dim=-1).exp(), torch.stack(post_l, dim=-1).exp()


class _TransducerNLL(torch.autograd.Function):
    """-log P(y | x) from raw joint logits, with a hand-written backward.

    Forward: log-softmax the token part (V) and the duration part (N) of the logits, gather the arc
    log-weights and run the alpha recursion. Backward: the beta recursion gives arc posteriors, which are
    the gradients wrt the arc log-probabilities; the log-softmax Jacobians are applied densely in one pass
    (autograd through slices and gathers would allocate a dense zero tensor per indexing op).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: Tensor,
        targets: Tensor,
        frames: Tensor,
        tokens: Tensor,
        durations: tuple[int, ...],
        sigma: float,
    ) -> Tensor:
        n = len(durations)
        v = logits.shape[-1] - n
        tok = logits[..., :v]
        lse = tok.logsumexp(dim=-1)  # (B, T, U+1)
        index = _label_index(targets, logits.shape[1])  # (B, T, U+1, 1), row U points at class 0
        label_lp = (tok.gather(3, index).squeeze(3) - lse)[:, :, :-1].double()  # (B, T, U)
        blank_lp = (tok[..., v - 1] - lse).double()  # (B, T, U+1)
        if n:
            dur_lp = logits[..., v:].double().log_softmax(dim=-1)  # (B, T, U+1, N)
            blank_idx = [i for i, d in enumerate(durations) if d >= 1]
            blank_w = blank_lp[..., None] - sigma + dur_lp[..., blank_idx]
            label_w = label_lp[..., None] - sigma + dur_lp[:, :, :-1]
            db, dl = tuple(durations[i] for i in blank_idx), durations
        else:  # plain RNNT: a blank moves one frame on, a label stays
            dur_lp, blank_idx = None, []
            blank_w, label_w, db, dl = blank_lp[..., None], label_lp[..., None], (1,), (0,)
        lat = _Lattice(blank_w, label_w, frames, tokens, db, dl)
        alpha, loglike = lat.alpha()
        ctx.lattice, ctx.blank_idx, ctx.n = lat, blank_idx, n
        ctx.save_for_backward(logits, lse, index, alpha, loglike)
        ctx.dur_lp = dur_lp
        return (-loglike).to(logits.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        logits, lse, index, alpha, loglike = ctx.saved_tensors
        lat: _Lattice = ctx.lattice
        post_b, post_l = lat.posteriors(alpha, lat.beta(), loglike)
        scale = grad.double()[:, None, None, None]
        post_b, post_l = post_b * scale, post_l * scale  # d(loss)/d(arc weight) = -posterior * grad
        n = ctx.n
        v = logits.shape[-1] - n
        g_blank = -post_b.sum(-1)  # (B, T, U+1) wrt blank log-prob
        g_label = F.pad(-post_l.sum(-1), (0, 1))  # (B, T, U+1) wrt label log-prob (row U: none)
        # Token part: d/dz_j sum_k g_k log p_k = g_j - p_j * sum_k g_k.
        out = torch.empty_like(logits)
        p = (logits[..., :v] - lse[..., None]).exp_()
        p.mul_(-(g_blank + g_label).to(p.dtype)[..., None])
        p.scatter_add_(3, index, g_label.to(p.dtype)[..., None])
        p[..., v - 1] += g_blank.to(p.dtype)
        out[..., :v] = p
        if n:
            g_dur = torch.zeros_like(ctx.dur_lp)  # (B, T, U+1, N)
            g_dur[..., ctx.blank_idx] -= post_b
            g_dur[:, :, :-1] -= post_l
            out[..., v:] = (g_dur - ctx.dur_lp.exp() * g_dur.sum(-1, keepdim=True)).to(out.dtype)
        return out, None, None, None, None, None


def _label_index(targets: Tensor, frames: int) -> Tensor:
    """(B, U) targets -> (B, T, U+1, 1) gather index over the token axis (row U gets a dummy 0)."""
    padded = F.pad(targets, (0, 1))  # (B, U+1)
    return padded[:, None, :, None].expand(-1, frames, -1, 1)


# --------------------------------------------------------------------------------------------------
# Public losses


def _check(logits: Tensor, targets: Tensor, frames: Tensor, tokens: Tensor, extra: int) -> None:
    b, t, rows, _ = logits.shape
    if targets.shape[0] != b or rows != targets.shape[1] + 1:
        raise ValueError(f"logits (B, T, U+1, ...) {tuple(logits.shape)} do not fit targets {tuple(targets.shape)}")
    if bool((frames > t).any()) or bool((frames < 1).any()) or bool((tokens > targets.shape[1]).any()):
        raise ValueError(f"lengths out of range: frames {frames.tolist()} (T={t}), tokens {tokens.tolist()}")
    if logits.shape[-1] <= extra:
        raise ValueError(f"joint output of width {logits.shape[-1]} has no room for {extra} duration logits")


def reduce_losses(losses: Tensor, tokens: Tensor, reduction: Reduction) -> Tensor:
    """NeMo's ``RNNTLoss.reduce`` of per-utterance losses (B,).

    ``mean_batch`` averages over utterances, ``mean`` averages the per-token loss, ``mean_volume`` divides
    the sum by all target tokens, ``sum`` adds, ``none`` keeps (B,).
    """
    if reduction == "mean_batch":
        return losses.mean()
    if reduction == "mean":
        return (losses / tokens.clamp(min=1)).mean()
    if reduction == "mean_volume":
        return losses.sum() / tokens.sum().clamp(min=1)
    if reduction == "sum":
        return losses.sum()
    if reduction == "none":
        return losses
    raise ValueError(f"unknown reduction {reduction!r}")


def rnnt_loss(
    logits: Tensor, targets: Tensor, frames: Tensor, tokens: Tensor, reduction: Reduction = "mean_batch"
) -> Tensor:
    """Plain RNNT loss (Graves 2012) over joint logits whose blank is the last class.

    Args:
        logits: (B, T, U+1, V) raw joint outputs (tokens and blank; no durations).
        targets: (B, U) int64 label ids in ``[0, V-1)``; padding may hold any valid id.
        frames: (B,) int64 encoder frames per utterance, ``1 <= frames <= T``.
        tokens: (B,) int64 target tokens per utterance.
        reduction: see :func:`reduce_losses`.

    Returns:
        The reduced loss (a scalar, or (B,) for ``none``).
    """
    _check(logits, targets, frames, tokens, 0)
    nll = _TransducerNLL.apply(logits, targets, frames, tokens, (), 0.0)
    return reduce_losses(nll, tokens, reduction)


def tdt_loss(
    logits: Tensor,
    targets: Tensor,
    frames: Tensor,
    tokens: Tensor,
    durations: Sequence[int],
    sigma: float = 0.0,
    reduction: Reduction = "mean_batch",
) -> Tensor:
    """TDT loss (NeMo ``loss_name: tdt``, without the ``omega`` sampling; see :class:`TransducerLoss`).

    Args:
        logits: (B, T, U+1, V+N) raw joint outputs: V tokens incl. blank (last), then N duration logits.
        targets: (B, U) int64 label ids in ``[0, V-1)``.
        frames: (B,) int64 encoder frames per utterance, ``1 <= frames <= T``.
        tokens: (B,) int64 target tokens per utterance.
        durations: the N durations, ascending, e.g. ``(0, 1, 2, 3, 4)``; blank arcs use those >= 1.
        sigma: logit under-normalisation: every arc's token log-probability is lowered by ``sigma``.
        reduction: see :func:`reduce_losses`.

    Returns:
        The reduced loss.
    """
    durations = [int(d) for d in durations]
    if sorted(set(durations)) != durations or durations[0] < 0 or not any(d >= 1 for d in durations):
        raise ValueError(f"TDT durations must be ascending, distinct, >= 0 and include one >= 1: {durations}")
    n = len(durations)
    _check(logits, targets, frames, tokens, n)
    nll = _TransducerNLL.apply(logits, targets, frames, tokens, tuple(durations), float(sigma))
    return reduce_losses(nll, tokens, reduction)


def ctc_loss(
    log_probs: Tensor, targets: Tensor, frames: Tensor, tokens: Tensor, reduction: Reduction = "mean_batch"
) -> Tensor:
    """CTC loss with NeMo's conventions: blank is the last class; infinite losses (too few frames) become 0.

    Args:
        log_probs: (B, T, V) log-probabilities from the CTC head.
        targets: (B, U) int64 label ids.
        frames: (B,) int64 valid frames.
        tokens: (B,) int64 target tokens.
        reduction: see :func:`reduce_losses`.
    """
    per_utt = F.ctc_loss(
        log_probs.transpose(0, 1).float(),
        targets,
        frames,
        tokens,
        blank=log_probs.shape[-1] - 1,
        reduction="none",
        zero_infinity=True,
    )
    return reduce_losses(per_utt, tokens, reduction)


class TransducerLoss:
    """The training loss of a TDT or RNNT model: NeMo's ``RNNTLoss`` with ``tdt_kwargs`` (``omega`` included).

    ``omega`` is NeMo's sampled mix: each call uses the plain RNNT loss (tokens only) with probability
    ``omega`` and the TDT loss otherwise. The draw uses this object's own seeded generator, so a resumed
    run draws the same sequence when its state is restored (:meth:`state_dict`).
    """

    def __init__(
        self,
        durations: Sequence[int] = (),
        sigma: float = 0.0,
        omega: float = 0.0,
        reduction: Reduction = "mean_batch",
        seed: int = 0,
    ) -> None:
        self.durations = tuple(int(d) for d in durations)
        self.sigma, self.omega, self.reduction = sigma, omega, reduction
        self._rng = random.Random(seed)

    def __call__(self, logits: Tensor, targets: Tensor, frames: Tensor, tokens: Tensor) -> Tensor:
        """Loss of joint logits (B, T, U+1, V[+N]); see :func:`tdt_loss` for the arguments."""
        if not self.durations:
            return rnnt_loss(logits, targets, frames, tokens, self.reduction)
        if self.omega > 0 and self._rng.random() < self.omega:
            return rnnt_loss(logits[..., : -len(self.durations)], targets, frames, tokens, self.reduction)
        return tdt_loss(logits, targets, frames, tokens, self.durations, self.sigma, self.reduction)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.setstate(state["rng"])
