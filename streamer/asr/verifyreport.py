"""What ``streamer convert --verify`` reports: rows of largest differences, and the logits it compares.

Shared by :mod:`streamer.asr.convertverify` (streamer against streamer) and
:mod:`streamer.asr.convert_transformers` (streamer against transformers' classes).

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from streamer.asr.model import AsrModel, DecoderKind

FEATURE_ATOL = 1e-4  # float32 FFT rounding, magnified by the per-feature std division (tests/test_golden_nemo.py)
SENTENCE = "The quick brown fox jumps over the lazy dog, then calls home at seven."


@dataclass(frozen=True)
class Row:
    """One comparison: the largest absolute difference and what it may be."""

    check: str
    diff: float
    tolerance: float
    note: str = ""

    @property
    def ok(self) -> bool:
        return not math.isnan(self.diff) and self.diff <= self.tolerance


@dataclass
class Report:
    """All comparisons of one source/destination pair."""

    audio: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(row.ok for row in self.rows)

    def table(self) -> str:
        """The rows as an aligned text table, mismatches marked."""
        width = max(len(row.check) for row in self.rows) if self.rows else 5
        lines = [f"audio: {self.audio}", f"{'check':<{width}}  {'max |diff|':>10}  {'tolerance':>9}  result"]
        for row in self.rows:
            verdict = "ok" if row.ok else "MISMATCH"
            note = f"  {row.note}" if row.note else ""
            lines.append(f"{row.check:<{width}}  {row.diff:>10.3g}  {row.tolerance:>9.3g}  {verdict}{note}")
        lines += self.notes
        return "\n".join(lines)


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    """The largest absolute difference; infinity when the shapes differ."""
    if a.shape != b.shape:
        return math.inf
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def head_logits(model: AsrModel, kind: DecoderKind, enc: Tensor, token_ids: list[int]) -> Tensor:
    """CTC log-probabilities ``(1, T, V+1)``, or the transducer's raw joint ``(1, T, U+1, V+1+N)``
    teacher-forced on ``token_ids``."""
    if kind == "ctc":
        return model.ctc_log_probs(enc)
    assert model.joint is not None
    pred = model.decoder(torch.tensor([token_ids], dtype=torch.long))
    return model.joint.joint(enc, pred)
