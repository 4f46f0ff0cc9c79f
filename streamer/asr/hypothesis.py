"""Tokens emitted by one decoder step for one stream (shared by the transducer and CTC decoders).

Shape legend (for the decoders that produce these spans):
    B streams in the batch   T encoder frames (80 ms)   U emitted tokens   V vocab incl. blank
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TokenSpan:
    """The tokens one stream gained in one decoder step, in emission order (all tuples have length U).

    Attributes:
        token_ids: Vocabulary ids (never the blank id).
        token_frames: Absolute encoder-frame index of each token (counted from the stream's first frame).
        token_durations: Encoder frames the token covers: the predicted TDT duration (may be 0 when several
            tokens share a frame); 1 for plain RNNT and CTC tokens.
        token_confidences: Softmax probability of the chosen token over tokens + blank (durations excluded).
        token_logprobs: Transducer: the chosen token's value after log_softmax over the *whole* joint output
            (tokens + blank + TDT durations), i.e. NeMo's per-token contribution to ``Hypothesis.score`` on
            CPU. CTC: the token's log-probability at its first frame.
    """

    token_ids: tuple[int, ...] = ()
    token_frames: tuple[int, ...] = ()
    token_durations: tuple[int, ...] = ()
    token_confidences: tuple[float, ...] = ()
    token_logprobs: tuple[float, ...] = ()

    def __len__(self) -> int:
        return len(self.token_ids)

    def __add__(self, other: TokenSpan) -> TokenSpan:
        """Concatenate two spans (``self`` first), e.g. to accumulate a stream's partial hypothesis."""
        return TokenSpan(
            self.token_ids + other.token_ids,
            self.token_frames + other.token_frames,
            self.token_durations + other.token_durations,
            self.token_confidences + other.token_confidences,
            self.token_logprobs + other.token_logprobs,
        )
