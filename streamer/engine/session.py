"""The old name of :mod:`streamer.engine.segmenting` (issue 17: it holds a clock and a segmenter, not a session).

Only :mod:`streamer.engine.channel` still imports it, from a branch being optimised at the same time; change
that import to ``streamer.engine.segmenting`` and delete this file.
"""

from streamer.engine.segmenting import Clock, Segmenter

__all__ = ["Clock", "Segmenter"]
