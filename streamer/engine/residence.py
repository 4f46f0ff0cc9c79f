"""Where a stream's recognizer state lives between steps: as one row of the batch its last step made.

Why: a batched step needs its streams' caches as batched tensors. Stacking B per-stream caches before
every step and splitting them after (``torch.cat`` of B small pieces per field) was 43 % of a 64-stream
step of the bundled model at [70,1]. Instead each stream's state stays a row of the batched state its
last step produced. The next step over the same streams uses that batch as it is, with no copy; any
other mix (a stream joined, one skipped a round) gathers rows with one ``index_select`` per source
batch and one ``cat``.

Invariant: every row of a live :class:`Batch` belongs to a stream whose home it is. When a step moves
some of a batch's streams on, the ones left behind get their rows copied out (:meth:`Residence.detach`),
so an old batch is freed as soon as its streams have moved, and the memory held stays one state per
stream. Only the inference thread touches residences (as with streams and the recognizer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from streamer.asr.state import BatchedState, select, stack

E = TypeVar("E", bound=BatchedState)
D = TypeVar("D", bound=BatchedState)


@dataclass(eq=False)
class Batch(Generic[E, D]):
    """The batched encoder and decoder state of one step; row ``i`` belongs to ``members[i]``."""

    enc: E
    dec: D
    members: list[Residence[E, D]] = field(default_factory=list)


@dataclass(eq=False)
class Residence(Generic[E, D]):
    """One stream's state: its own (batch 1) tensors, or a row of a :class:`Batch`."""

    own_enc: E | None = None
    own_dec: D | None = None
    batch: Batch[E, D] | None = None
    row: int = 0

    @classmethod
    def fresh(cls, enc: E, dec: D) -> Residence[E, D]:
        return cls(own_enc=enc, own_dec=dec)

    def states(self) -> tuple[E, D]:
        """This stream's state as batch-1 states (views of its batch row while it has one: read only)."""
        if self.own_enc is None or self.own_dec is None:
            assert self.batch is not None
            self.own_enc, self.own_dec = _row_view(self.batch.enc, self.row), _row_view(self.batch.dec, self.row)
        return self.own_enc, self.own_dec

    def detach(self) -> None:
        """Give this stream its own copy of its batch row, so the batch can be freed."""
        batch = self.batch
        if batch is None:
            return
        index = torch.tensor([self.row], device=_device(batch.enc))
        self.own_enc, self.own_dec = select(batch.enc, index), select(batch.dec, index)
        self.batch = None


def gather(residences: Sequence[Residence[E, D]]) -> tuple[list[int], E, D]:
    """Batch the states of ``residences`` for one step.

    Returns ``(order, enc, dec)``: row ``k`` of the batched states is ``residences[order[k]]``. Rows that
    share a source batch are kept together in their old order, so a step over the same streams as the
    last one reuses that batch unchanged.
    """
    order = sorted(
        range(len(residences)),
        key=lambda i: (residences[i].batch is None, id(residences[i].batch), residences[i].row),
    )
    first = residences[order[0]].batch
    if first is not None and len(first.members) == len(residences) and all(
        residences[i] is first.members[k] for k, i in enumerate(order)
    ):
        return order, first.enc, first.dec  # the same streams as the batch's step, in its order
    encs: list[E] = []
    decs: list[D] = []
    k = 0
    while k < len(order):
        res = residences[order[k]]
        if res.batch is None:
            assert res.own_enc is not None and res.own_dec is not None
            encs.append(res.own_enc)
            decs.append(res.own_dec)
            k += 1
            continue
        rows = []
        while k < len(order) and residences[order[k]].batch is res.batch:
            rows.append(residences[order[k]].row)
            k += 1
        index = torch.tensor(rows, device=_device(res.batch.enc))
        encs.append(select(res.batch.enc, index))
        decs.append(select(res.batch.dec, index))
    return order, stack(encs), stack(decs)


def settle(residences: Sequence[Residence[E, D]], order: Sequence[int], enc: E, dec: D) -> None:
    """After a step: ``residences`` (in ``order``, as :func:`gather` gave it) now live in the new batch.

    Streams left behind in the batches these came from get their rows copied out, so those batches die.
    """
    batch: Batch[E, D] = Batch(enc, dec, [residences[i] for i in order])
    moving = {id(r) for r in batch.members}
    old = {id(r.batch): r.batch for r in batch.members if r.batch is not None}
    for source in old.values():
        for member in source.members:
            if id(member) not in moving:
                member.detach()
    for row, res in enumerate(batch.members):
        res.batch, res.row = batch, row
        res.own_enc = res.own_dec = None


def _row_view(state: E, row: int) -> E:
    """Row ``row`` of a batched state as a batch-1 state of views."""
    from dataclasses import fields

    return type(state)(**{
        f.name: getattr(state, f.name).narrow(state.BATCH_DIM[f.name], row, 1)
        for f in fields(state)  # type: ignore[arg-type]
    })


def _device(state: BatchedState) -> torch.device:
    from dataclasses import fields

    return getattr(state, fields(state)[0].name).device  # type: ignore[arg-type]
