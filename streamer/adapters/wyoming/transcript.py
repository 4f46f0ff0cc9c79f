"""One utterance's transcript as Wyoming streams it: ``transcript-chunk`` deltas that only ever append, then the
whole text in ``transcript``.

A Wyoming client concatenates the chunks' texts, so a chunk can never take back what an earlier one said. The
engine's partials may still change their last word ("turn of" becomes "turn off"), but each carries ``stable``, the
prefix of the open segment's text that will not change any more: chunks follow the stable text, one word behind the
partial, and the segment's final adds the rest. The utterance's text is its finals joined by spaces (the engine
may end several segments in one utterance at pauses), so the chunks add up to exactly the ``transcript`` text.
"""

from __future__ import annotations

import logging

from streamer.protocol import Final, Partial

logger = logging.getLogger(__name__)


def _join(left: str, right: str) -> str:
    return f"{left} {right}" if left and right else left or right


class TranscriptStream:
    """The text of one utterance so far, and the deltas that bring a client's copy up to it."""

    def __init__(self) -> None:
        self.text = ""  # the finals so far, joined
        self.sent = ""  # what the deltas so far add up to
        self.is_broken = False  # the deltas went astray (see _advance): no more of them

    def partial(self, partial: Partial) -> str:
        """The delta for a partial: the newly stable words of the open segment ("" for none)."""
        return self._advance(_join(self.text, partial.stable))

    def final(self, final: Final) -> str:
        """The delta for a segment's final: the rest of its text."""
        self.text = _join(self.text, final.text)
        return self._advance(self.text)

    def _advance(self, known: str) -> str:
        if self.is_broken:
            return ""
        if not known.startswith(self.sent):
            # The engine promises that a final starts with its partials' stable text; if it ever did not, the
            # client's chunks could not be mended (transcript still carries the right text): say so.
            logger.warning("the streamed transcript %r is no prefix of %r; no more chunks for this utterance",
                           self.sent, known)
            self.is_broken = True
            return ""
        delta, self.sent = known[len(self.sent):], known
        return delta
