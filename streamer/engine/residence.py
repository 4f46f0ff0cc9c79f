"""Where a stream's recognizer state lives between steps: as one row of the batch its last step made.

Why: a batched step needs its streams' caches as batched tensors. Stacking B per-stream caches before
every step and splitting them after (``torch.cat`` of B small pieces per field) was 43 % of a 64-stream
step of the bundled model at [70,1]. Instead each stream's state stays a row of the batched state its
last step produced. The next step over the same streams uses that batch as it is, with no copy; any
other mix (a stream joined, one skipped a round) copies each stream's rows once into the new batch
(the encoder lays them straight into buffers with room to grow, see ``StreamingEncoder.stack_rows``).

A stream that moves on leaves a dead row behind in its old batch; the streams still resident there keep
it alive without a copy. When fewer than a quarter of a batch's rows are still resident, those streams
get their rows copied out and the batch is freed, so the memory held stays within four states per
stream. Only the inference thread touches residences (as with streams and the recognizer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Generic, TypeVar

import torch

from streamer.asr.state import BatchedState, Rows, stack_rows

E = TypeVar("E", bound=BatchedState)
D = TypeVar("D", bound=BatchedState)
S = TypeVar("S", bound=BatchedState)
StackRows = Callable[[Rows[S]], S]

COMPACT_BELOW = 0.25  # copy the residents out when fewer than this share of a batch's rows are theirs


@dataclass(eq=False)
class Batch(Generic[E, D]):
    """The batched encoder and decoder state of one step; row ``i`` belongs to ``members[i]`` (None: it left)."""

    enc: E
    dec: D
    members: list[Residence[E, D] | None] = field(default_factory=list)
    resident: int = 0


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

    def source(self) -> tuple[E, D, int]:
        """Where this stream's state is: ``(batched encoder state, batched decoder state, row)``."""
        if self.batch is not None:
            return self.batch.enc, self.batch.dec, self.row
        assert self.own_enc is not None and self.own_dec is not None
        return self.own_enc, self.own_dec, 0

    def detach(self) -> None:
        """Give this stream its own copy of its batch row, so the batch can be freed."""
        batch = self.batch
        if batch is None:
            return
        enc, dec = _row_view(batch.enc, self.row), _row_view(batch.dec, self.row)
        self.own_enc, self.own_dec = _copy(enc), _copy(dec)  # just the row (index_select copies whole strided sources)
        self.batch = None


def gather(
    residences: Sequence[Residence[E, D]], stack_enc: StackRows[E] | None = None
) -> tuple[list[int], E, D]:
    """Batch the states of ``residences`` for one step.

    Returns ``(order, enc, dec)``: row ``k`` of the batched states is ``residences[order[k]]``. Rows that
    share a source batch are kept together in their old order, so a step over the same streams as the
    last one reuses that batch unchanged. ``stack_enc`` builds the encoder state from rows (default:
    :func:`stack_rows`).
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
    sources = [residences[i].source() for i in order]
    enc_rows = [(enc, row) for enc, _, row in sources]
    dec_rows = [(dec, row) for _, dec, row in sources]
    return order, (stack_enc or stack_rows)(enc_rows), stack_rows(dec_rows)


def settle(residences: Sequence[Residence[E, D]], order: Sequence[int], enc: E, dec: D) -> None:
    """After a step: ``residences`` (in ``order``, as :func:`gather` gave it) now live in the new batch.

    Their rows in the batches they came from die; a batch left with few residents has them copied out.
    """
    members: list[Residence[E, D] | None] = [residences[i] for i in order]
    batch: Batch[E, D] = Batch(enc, dec, members, resident=len(members))
    sources: dict[int, Batch[E, D]] = {}
    for res in residences:
        old = res.batch
        if old is not None and old is not batch:
            old.members[res.row] = None
            old.resident -= 1
            sources[id(old)] = old
    for row, res in enumerate(residences[i] for i in order):
        res.batch, res.row = batch, row
        res.own_enc = res.own_dec = None
    for old in sources.values():
        if 0 < old.resident < COMPACT_BELOW * len(old.members):
            for member in old.members:
                if member is not None:
                    member.detach()


def _copy(state: S) -> S:
    """A state of contiguous copies of ``state``'s tensors."""
    return type(state)(**{f.name: getattr(state, f.name).clone(memory_format=torch.contiguous_format)
                          for f in fields(state)})  # type: ignore[arg-type]


def _row_view(state: E, row: int) -> E:
    """Row ``row`` of a batched state as a batch-1 state of views."""
    return type(state)(**{
        f.name: getattr(state, f.name).narrow(state.BATCH_DIM[f.name], row, 1)
        for f in fields(state)  # type: ignore[arg-type]
    })
