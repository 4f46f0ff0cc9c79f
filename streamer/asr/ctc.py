"""CTC head (NeMo ``ConvASRDecoder``) and its stateful greedy decoder.

Greedy CTC takes the argmax of every frame, merges repeats and drops blanks (nemo-reference.md §7.8). The
state keeps the previous frame's argmax, so a run of one token that crosses a chunk boundary is emitted
once, exactly as when the whole sequence is decoded at once.

Hotwords (:mod:`streamer.asr.boosting`) follow NeMo's greedy CTC fusion: a frame whose argmax is blank or repeats
the last label keeps it; any other frame emits the non-blank token, other than the last label, that scores best
with the tree's bonus added. The choice changes what the next frame repeats, so boosted rows are decoded frame
by frame; the other rows take the vectorised path, unchanged.

Shape legend:
    B streams in the batch   T encoder frames (80 ms)   D encoder width   V vocab incl. blank
    (``cfg.vocab_size`` is V - 1: the blank id, which is the last class)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from streamer.asr.boosting import Boost
from streamer.asr.config import CTCConfig
from streamer.asr.hypothesis import TokenSpan


class ConvASRDecoder(nn.Module):
    """A 1x1 convolution to V classes then log_softmax. Keys ``decoder_layers.0.{weight (V, D, 1), bias}``."""

    def __init__(self, cfg: CTCConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder_layers = nn.Sequential(nn.Conv1d(cfg.feat_in, cfg.vocab_size + 1, kernel_size=1))

    def forward(self, enc: Tensor) -> Tensor:
        """``enc (B, T, D)`` -> log-probabilities ``(B, T, V)``."""
        logits = self.decoder_layers(enc.transpose(1, 2))  # (B, V, T)
        return logits.transpose(1, 2).log_softmax(dim=-1)


@dataclass(frozen=True, slots=True)
class CTCState:
    """Greedy CTC state of a batch of streams."""

    last_label: Tensor  # (B,) int64 label chosen at the last valid frame decoded (blank initially)
    frames_done: Tensor  # (B,) int64 encoder frames decoded so far
    boost_node: Tensor  # (B,) int64 node of the stream's hotword tree (streamer.asr.boosting); 0 without one

    BATCH_DIM: ClassVar[dict[str, int]] = {"last_label": 0, "frames_done": 0, "boost_node": 0}


class GreedyCTCDecoder:
    """Stateful batched greedy CTC decoding; holds no tensors of its own."""

    def __init__(self, cfg: CTCConfig) -> None:
        self.cfg = cfg

    def init_state(self, batch: int, device: torch.device | None = None) -> CTCState:
        """State of ``batch`` fresh streams: no frame seen, previous argmax = blank."""
        blank = torch.full((batch,), self.cfg.vocab_size, dtype=torch.long, device=device)
        return CTCState(last_label=blank, frames_done=torch.zeros_like(blank), boost_node=torch.zeros_like(blank))

    @torch.inference_mode()
    def step(
        self, log_probs: Tensor, lengths: Tensor, state: CTCState, boost: Boost | None = None
    ) -> tuple[list[TokenSpan], CTCState]:
        """Decode the next chunk of every stream.

        A token is emitted at the first frame of each run of equal non-blank argmaxes; its frame is
        absolute, its duration 1, its confidence and logprob those of that first frame.

        Args:
            log_probs: ``(B, T, V)`` output of :class:`ConvASRDecoder`; frames at or beyond a stream's
                length are ignored.
            lengths: ``(B,)`` valid frames per stream (``<= T``; 0 is allowed).
            state: State of the same B streams after their previous chunks.
            boost: The hotword trees of the B streams (:meth:`Boost.of`), or None when none has any.

        Returns:
            The new tokens of every stream, and the new state.
        """
        batch, frames, _ = log_probs.shape
        if frames == 0:
            return [TokenSpan() for _ in range(batch)], state
        lengths = lengths.to(device=log_probs.device, dtype=torch.long)
        logprob, label = log_probs.max(dim=-1)  # (B, T)
        previous = torch.cat([state.last_label[:, None], label[:, :-1]], dim=1)  # (B, T)
        valid = torch.arange(frames, device=log_probs.device)[None, :] < lengths[:, None]  # (B, T)
        emit = valid & (label != self.cfg.vocab_size) & (label != previous)
        node = state.boost_node
        if boost is not None:
            node = self._boost_rows(log_probs, valid, state, boost, label, logprob, emit)
        last_index = (lengths - 1).clamp(min=0)[:, None]
        last_label = torch.where(lengths > 0, label.gather(1, last_index)[:, 0], state.last_label)
        new_state = CTCState(last_label=last_label, frames_done=state.frames_done + lengths, boost_node=node)

        emit, label, logprob = emit.cpu(), label.cpu(), logprob.cpu()
        offsets = state.frames_done.cpu().tolist()
        spans = []
        for b in range(batch):
            frame = emit[b].nonzero()[:, 0]
            lp = logprob[b, frame]
            spans.append(
                TokenSpan(
                    token_ids=tuple(label[b, frame].tolist()),
                    token_frames=tuple((frame + offsets[b]).tolist()),
                    token_durations=(1,) * len(frame),
                    # log_probs are normalised over tokens + blank, so exp is the softmax probability.
                    token_confidences=tuple(lp.exp().tolist()),
                    token_logprobs=tuple(lp.tolist()),
                )
            )
        return spans, new_state

    def _boost_rows(
        self, log_probs: Tensor, valid: Tensor, state: CTCState, boost: Boost, label: Tensor, logprob: Tensor,
        emit: Tensor,
    ) -> Tensor:
        """Decode the rows with hotwords frame by frame, overwriting their ``label``, ``logprob`` and ``emit``
        ``(B, T)`` in place (``valid (B, T)``: the frames within each row's length); returns every row's tree node
        after the chunk ``(B,)``.

        Only frames where some boosted row's argmax is a token need a look: a blank stands whatever the tree says.
        The label before a frame is read back from ``label``, which holds the choices made so far.
        """
        blank = self.cfg.vocab_size
        if boost.vocab_size != blank:
            raise ValueError(f"hotword trees for {boost.vocab_size} tokens; this decoder has {blank}")
        node = state.boost_node.clone()
        rows = (boost.offsets >= 0).nonzero()[:, 0]  # (R,)
        if rows.numel() == 0:
            return node
        raw, live = label[rows], valid[rows]  # (R, T) each: the model's argmax, frames within the length
        local = node[rows]  # (R,)
        for frame in ((raw != blank) & live).any(dim=0).nonzero()[:, 0].tolist():
            last = label[rows, frame - 1] if frame > 0 else state.last_label[rows]  # (R,) the label chosen before
            keep = (raw[:, frame] == blank) | (raw[:, frame] == last)  # blank or a repeat: the model's call stands
            if bool(keep.all()):
                emit[rows, frame] = False
                continue
            lp = log_probs[rows, frame]  # (R, V)
            fused = lp.clone()
            fused[:, :blank] += boost.bonus(boost.nodes(rows, local))
            fused.scatter_(1, last[:, None], float("-inf"))  # never the repeat of the last label
            chosen = torch.where(keep, raw[:, frame], fused[:, :blank].argmax(dim=-1))
            emits = live[:, frame] & ~keep
            local = torch.where(emits, boost.advance(boost.nodes(rows, local), chosen), local)
            label[rows, frame] = torch.where(live[:, frame], chosen, raw[:, frame])
            logprob[rows, frame] = lp.gather(1, label[rows, frame][:, None])[:, 0]
            emit[rows, frame] = emits
        node[rows] = local
        return node
