"""Batching of per-stream streaming state.

Every stateful part of the recognizer keeps its state in a frozen dataclass of tensors that declares
the batch axis of each field (``BATCH_DIM``). One generic :func:`stack` / :func:`unstack` pair then
batches any set of streams, whatever their fill levels, and splits the result back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, replace
from typing import ClassVar, Protocol, TypeVar

import torch


class BatchedState(Protocol):
    BATCH_DIM: ClassVar[dict[str, int]]


S = TypeVar("S", bound=BatchedState)
Rows = Sequence[tuple[S, int]]  # (batched state, row) per stream, in batch order


def stack(states: Sequence[S]) -> S:
    """Join per-stream states (batch 1 each, or any batch) into one batched state. Inverse of `unstack`."""
    if not states:
        raise ValueError("stack() needs at least one state")
    first = states[0]
    if len(states) == 1:
        return first
    return type(first)(
        **{
            f.name: torch.cat([getattr(s, f.name) for s in states], dim=first.BATCH_DIM[f.name])
            for f in fields(first)  # type: ignore[arg-type]
        }
    )


def stack_rows(rows: Rows[S]) -> S:
    """One batched state from rows of others: one ``index_select`` per run of rows from the same source."""
    pieces: list[S] = []
    k = 0
    while k < len(rows):
        state, first = rows[k]
        picked = [first]
        k += 1
        while k < len(rows) and rows[k][0] is state:
            picked.append(rows[k][1])
            k += 1
        whole = picked == list(range(batch_size(state)))
        pieces.append(state if whole else select(state, picked))
    return stack(pieces)


def unstack(state: S) -> list[S]:
    """Split a batched state into per-stream states (batch 1 each)."""
    parts = {
        f.name: getattr(state, f.name).split(1, dim=state.BATCH_DIM[f.name])
        for f in fields(state)  # type: ignore[arg-type]
    }
    batch = len(next(iter(parts.values())))
    return [type(state)(**{name: p[i] for name, p in parts.items()}) for i in range(batch)]


def select(state: S, index: torch.Tensor | Sequence[int]) -> S:
    """Pick batch rows ``index`` of a batched state (keeps their order; copies)."""
    idx = torch.as_tensor(index, dtype=torch.long)
    out = {}
    for f in fields(state):  # type: ignore[arg-type]
        t = getattr(state, f.name)
        out[f.name] = t.index_select(state.BATCH_DIM[f.name], idx.to(t.device))
    return replace(state, **out)  # type: ignore[type-var]


def batch_size(state: BatchedState) -> int:
    """Number of streams held by a batched state."""
    f = fields(state)[0]  # type: ignore[arg-type]
    return getattr(state, f.name).shape[state.BATCH_DIM[f.name]]
