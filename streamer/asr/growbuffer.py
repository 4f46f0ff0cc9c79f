"""Streaming caches that grow at their end in place: the new frames of a step are written after the cache.

Why: each cache-aware step joins every layer's cached keys, values and conv inputs with the chunk's new
ones, attends or convolves over the join, and keeps the last frames as the next cache. Joining by
``torch.cat`` copies the whole cache every step (the keys and values of 64 streams of the bundled model
are 55 MB per step); that copy was the largest single cost of a batched step after the matrix products.

Here a cache is a view into a buffer with spare room after it along the time axis. A step writes its new
frames into that room and uses ``buffer[start : start + C + T]`` as the join with no copy; the next cache
is the view ``[start + T : start + T + C]``. Only when the room runs out is the cache copied to the front
of a fresh buffer: once every ``slack / T`` steps instead of every step.

Views of inference tensors do not know their base, so a buffer is recognised by its layout (contiguous
but for spare room along time) and identified by its storage. Safety: a buffer remembers where its
newest cache ends. The room after a cache is used only by the step
that continues that newest cache; stepping an older state of the same buffer again (a retry, a test that
branches) finds the mark elsewhere and copies into a fresh buffer, so no state is ever overwritten.
"""

from __future__ import annotations

import torch
from torch import Tensor


class GrowBuffers:
    """Tracks buffers with room after their newest cache (one instance per streaming encoder)."""

    def __init__(self) -> None:
        self._ends: dict[int, int] = {}  # storage address -> where its newest cache ends (along time)

    def extend(self, cache: Tensor, new: int, dim: int, slack: int) -> Tensor:
        """A view of ``cache`` followed by ``new`` frames of room along ``dim`` (contents of the room undefined).

        ``cache``'s frames are copied only when it is not the newest cache of a buffer with room after it;
        then a buffer with ``slack`` frames of room beyond this step is made.
        """
        frames = cache.size(dim)
        if torch.jit.is_tracing():  # exported graphs are functional: plain concatenation (see conformer.fill_end)
            size = list(cache.shape)
            size[dim] = new
            return torch.cat([cache, cache.new_zeros(size)], dim=dim)
        place = _place(cache, dim)
        if place is not None:
            start, width = place
            if start + frames + new <= width and self._ends.get(_address(cache)) == start + frames:
                size = list(cache.shape)
                size[dim] = frames + new
                return cache.as_strided(size, cache.stride(), cache.storage_offset())
        size = list(cache.shape)
        size[dim] = frames + new + slack
        fresh = cache.new_empty(size)
        fresh.narrow(dim, 0, frames).copy_(cache)
        return fresh.narrow(dim, 0, frames + new)

    def with_room(self, like: Tensor, batch: int, batch_dim: int, dim: int, room: int) -> Tensor:
        """An empty cache shaped like ``like`` but for ``batch`` streams, in a new buffer with ``room`` frames
        after it along ``dim``, registered as that buffer's newest cache: the caller fills it, and the next
        :meth:`extend` of it needs no copy."""
        size = list(like.shape)
        size[batch_dim] = batch
        frames = size[dim]
        size[dim] = frames + room
        cache = like.new_empty(size).narrow(dim, 0, frames)
        self._ends[_address(cache)] = frames
        return cache

    def commit(self, joined: Tensor, keep: int, dim: int) -> Tensor:
        """After a step filled ``joined`` (from :meth:`extend`): the next cache, its last ``keep`` frames."""
        total = joined.size(dim)
        place = _place(joined, dim)
        if place is not None:
            if len(self._ends) > 4096:  # addresses of dead buffers: forget them (a live one just copies once)
                self._ends.clear()
            self._ends[_address(joined)] = place[0] + total
        return joined.narrow(dim, total - keep, keep)


def _address(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _place(t: Tensor, dim: int) -> tuple[int, int] | None:
    """``(start, width)`` when ``t`` is frames ``start..`` along ``dim`` of a buffer that is contiguous with
    ``width`` frames along ``dim`` and starts its storage; None for any other layout."""
    if dim == 0 or t.stride(dim) == 0:
        return None
    width, rest = divmod(t.stride(dim - 1), t.stride(dim))
    if rest:
        return None
    expected, step = [], 1
    for d in range(t.dim() - 1, -1, -1):
        expected.append(step)
        step *= width if d == dim else t.size(d)
    if tuple(reversed(expected)) != t.stride():
        return None
    start, rest = divmod(t.storage_offset(), t.stride(dim))
    if rest or start + t.size(dim) > width or t.untyped_storage().nbytes() < step * t.element_size():
        return None
    return start, width
