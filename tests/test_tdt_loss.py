"""TDT / RNNT / CTC losses: NeMo 3.0.0 goldens, brute-force path sums, and invariances."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from streamer.training.tdt_loss import TransducerLoss, ctc_loss, reduce_losses, rnnt_loss, tdt_loss

GOLDEN = Path(__file__).parent / "fixtures" / "nemo" / "tdt_loss_golden.pt"


def _golden_cases() -> list[dict]:
    return torch.load(GOLDEN, weights_only=True)["cases"]


@pytest.mark.parametrize("case", _golden_cases(), ids=lambda c: c["name"])
def test_matches_nemo(case: dict) -> None:
    """Per-utterance loss and the gradient wrt the raw joint output equal NeMo 3.0.0's."""
    logits = case["logits"].clone().requires_grad_(True)
    args = (case["targets"], case["frames"], case["tokens"])
    if case["branch"] == "rnnt":
        v = logits.shape[-1] - len(case["durations"])
        loss = rnnt_loss(logits[..., :v], *args, reduction="none")
    else:
        loss = tdt_loss(logits, *args, case["durations"], case["sigma"], reduction="none")
    loss.sum().backward()
    torch.testing.assert_close(loss.detach(), case["loss"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits.grad, case["grad"], rtol=1e-3, atol=1e-5)


def test_omega_draws_rnnt_at_its_rate() -> None:
    """TransducerLoss uses the RNNT branch on about omega of the calls, reproducibly from its seed."""
    case = next(c for c in _golden_cases() if c["name"] == "tdt_omega_b")
    args = (case["logits"], case["targets"], case["frames"], case["tokens"])
    v = case["logits"].shape[-1] - 5
    rnnt = rnnt_loss(case["logits"][..., :v], *args[1:])
    loss = TransducerLoss(case["durations"], omega=0.25, seed=3)
    hits = sum(bool(torch.isclose(loss(*args), rnnt)) for _ in range(200))
    assert 30 <= hits <= 70
    again = TransducerLoss(case["durations"], omega=0.25, seed=3)
    again.load_state_dict(TransducerLoss(case["durations"], omega=0.25, seed=3).state_dict())
    first = [float(again(*args)) for _ in range(5)]
    fresh = TransducerLoss(case["durations"], omega=0.25, seed=3)
    assert first == [float(fresh(*args)) for _ in range(5)]


# ------------------------------------------------------------------------------------------------
# Brute force: enumerate every alignment of a tiny lattice


def _paths(t_len: int, labels: list[int], durations: list[int]) -> list[list[tuple[int, int, int]]]:
    """All TDT alignments as lists of (frame, token or -1 for blank, duration index)."""
    out: list[list[tuple[int, int, int]]] = []

    def walk(t: int, u: int, path: list[tuple[int, int, int]]) -> None:
        if t == t_len and u == len(labels) and path and path[-1][1] == -1:
            out.append(path)
            return
        if t >= t_len:
            return
        for i, d in enumerate(durations):
            if d >= 1:
                walk(t + d, u, [*path, (t, -1, i)])
            if u < len(labels) and t + d < t_len:
                walk(t + d, u + 1, [*path, (t, labels[u], i)])

    walk(0, 0, [])
    return out


def _brute_tdt(logits: torch.Tensor, labels: list[int], durations: list[int], sigma: float) -> torch.Tensor:
    n = len(durations)
    tok = logits[..., :-n].log_softmax(-1)
    dur = logits[..., -n:].log_softmax(-1)
    blank = tok.shape[-1] - 1
    scores = []
    for path in _paths(logits.shape[0], labels, durations):
        s, u = torch.zeros((), dtype=logits.dtype), 0
        for t, k, i in path:
            s = s + tok[t, u, blank if k < 0 else k] - sigma + dur[t, u, i]
            u += k >= 0
        scores.append(s)
    return -torch.logsumexp(torch.stack(scores), 0)


@pytest.mark.parametrize(
    ("t_len", "u_len", "durations", "sigma"),
    [(3, 2, [0, 1, 2], 0.0), (4, 1, [0, 1, 2, 3, 4], 0.05), (2, 3, [0, 1], 0.0), (4, 2, [1, 2], 0.1)],
)
def test_tdt_equals_sum_over_paths(t_len: int, u_len: int, durations: list[int], sigma: float) -> None:
    """The loss and its gradient equal those of an explicit sum over every alignment (float64)."""
    g = torch.Generator().manual_seed(t_len * 10 + u_len)
    v = 5
    logits = torch.randn(1, t_len, u_len + 1, v + len(durations), generator=g, dtype=torch.float64)
    labels = torch.randint(0, v - 1, (1, u_len), generator=g)
    ours_in = logits.clone().requires_grad_(True)
    ours = tdt_loss(ours_in, labels, torch.tensor([t_len]), torch.tensor([u_len]), durations, sigma)
    ours.backward()
    ref_in = logits[0].clone().requires_grad_(True)
    ref = _brute_tdt(ref_in, labels[0].tolist(), durations, sigma)
    ref.backward()
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours_in.grad[0], ref_in.grad, rtol=1e-7, atol=1e-9)


def test_rnnt_equals_sum_over_paths() -> None:
    """Plain RNNT: every monotonic interleaving of T blanks and U labels (the last symbol a blank)."""
    g = torch.Generator().manual_seed(0)
    t_len, u_len, v = 3, 2, 4
    logits = torch.randn(1, t_len, u_len + 1, v, generator=g, dtype=torch.float64)
    labels = [1, 2]
    lp = logits[0].log_softmax(-1)
    scores = []
    for blanks_before in itertools.combinations_with_replacement(range(t_len), u_len):
        # label j is emitted at frame blanks_before[j] (non-decreasing)
        s, t, u = torch.zeros((), dtype=torch.float64), 0, 0
        for frame in blanks_before:
            while t < frame:
                s, t = s + lp[t, u, v - 1], t + 1
            s, u = s + lp[t, u, labels[u]], u + 1
        while t < t_len:
            s, t = s + lp[t, u, v - 1], t + 1
        scores.append(s)
    ref = -torch.logsumexp(torch.stack(scores), 0)
    ours = rnnt_loss(logits, torch.tensor([labels]), torch.tensor([t_len]), torch.tensor([u_len]))
    torch.testing.assert_close(ours, ref)


# ------------------------------------------------------------------------------------------------
# Invariances


def test_padding_does_not_change_the_loss() -> None:
    """Extra padded frames and label slots (with any values) change neither loss nor the real gradients."""
    g = torch.Generator().manual_seed(4)
    durations = [0, 1, 2, 3, 4]
    logits = torch.randn(1, 6, 4, 7 + 5, generator=g)
    labels = torch.tensor([[0, 3, 5]])
    base_in = logits.clone().requires_grad_(True)
    base = tdt_loss(base_in, labels, torch.tensor([6]), torch.tensor([3]), durations, 0.02)
    base.backward()
    padded = torch.randn(1, 9, 6, 12, generator=g) * 5
    padded[:, :6, :4] = logits
    padded_in = padded.clone().requires_grad_(True)
    padded_labels = torch.tensor([[0, 3, 5, 1, 1]])
    loss = tdt_loss(padded_in, padded_labels, torch.tensor([6]), torch.tensor([3]), durations, 0.02)
    loss.backward()
    torch.testing.assert_close(loss, base)
    torch.testing.assert_close(padded_in.grad[:, :6, :4], base_in.grad)
    assert float(padded_in.grad[:, 6:].abs().max()) == 0.0
    assert float(padded_in.grad[:, :, 4:].abs().max()) == 0.0


def test_batch_rows_are_independent() -> None:
    """A batch's per-utterance losses equal the losses of each utterance alone."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 8, 5, 9 + 5, generator=g)
    labels = torch.randint(0, 8, (3, 4), generator=g)
    frames, tokens = torch.tensor([8, 5, 3]), torch.tensor([4, 2, 4])
    batch = tdt_loss(logits, labels, frames, tokens, [0, 1, 2, 3, 4], reduction="none")
    for b in range(3):
        t, u = int(frames[b]), int(tokens[b])
        alone = tdt_loss(
            logits[b : b + 1, :t, : u + 1], labels[b : b + 1, :u], frames[b : b + 1], tokens[b : b + 1], [0, 1, 2, 3, 4]
        )
        torch.testing.assert_close(batch[b], alone)


def test_sigma_shifts_by_arcs_when_one_path() -> None:
    """With T=1, U=0 there is one path (a blank of duration 1): the loss grows by exactly sigma."""
    logits = torch.randn(1, 1, 1, 3 + 3)
    args = (torch.zeros(1, 0, dtype=torch.long), torch.tensor([1]), torch.tensor([0]), [0, 1, 2])
    assert math.isclose(float(tdt_loss(logits, *args, sigma=0.3)), float(tdt_loss(logits, *args)) + 0.3, rel_tol=1e-5)


def test_reductions() -> None:
    """NeMo's reductions: mean_batch, mean (per token), mean_volume, sum."""
    losses, tokens = torch.tensor([2.0, 6.0]), torch.tensor([1, 3])
    assert float(reduce_losses(losses, tokens, "mean_batch")) == 4.0
    assert float(reduce_losses(losses, tokens, "mean")) == 2.0
    assert float(reduce_losses(losses, tokens, "mean_volume")) == 2.0
    assert float(reduce_losses(losses, tokens, "sum")) == 8.0


def test_ctc_loss_blank_last_and_zero_infinity() -> None:
    """CTC uses the last class as blank; an unalignable utterance contributes 0, not inf."""
    g = torch.Generator().manual_seed(6)
    log_probs = torch.randn(2, 5, 4, generator=g).log_softmax(-1)
    targets = torch.tensor([[0, 1, 2, 0, 1, 2], [1, 2, 0, 0, 0, 0]])
    loss = ctc_loss(log_probs, targets, torch.tensor([5, 5]), torch.tensor([6, 2]), reduction="none")
    assert float(loss[0]) == 0.0
    ref = torch.nn.functional.ctc_loss(
        log_probs[1:].transpose(0, 1), targets[1:, :2], torch.tensor([5]), torch.tensor([2]), blank=3, reduction="none"
    )
    torch.testing.assert_close(loss[1:], ref)
