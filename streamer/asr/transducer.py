"""RNNT / TDT heads (NeMo ``RNNTDecoder`` + ``RNNTJoint``) and their stateful batched greedy decoder.

The greedy decoder follows NeMo 3.0.0 ``greedy_batch`` (the label-looping computers): for each stream it
searches forward for the next non-blank label, feeds it to the prediction network, and repeats. The state
carries everything NeMo keeps in a partial hypothesis, so decoding a sequence in any chunk split gives the
same tokens, frames and durations as decoding it in one call (nemo-reference.md §7.4-§7.6).

Shape legend:
    B streams in the batch   T encoder frames (80 ms)   D encoder width   P prediction width
    J joint width   L LSTM layers   U emitted tokens   V vocab incl. blank   N TDT durations
    (``cfg.vocab_size`` is V - 1: the blank id; the joint emits V + N values)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor, nn

from streamer.asr.boosting import Boost
from streamer.asr.config import TransducerConfig
from streamer.asr.hypothesis import TokenSpan
from streamer.errors import UnsupportedCheckpointError

# NeMo's ``jointnet.dropout`` in every supported checkpoint. Only active in training; it decides nothing at
# inference, and TransducerConfig only records whether the layer exists (it shifts the output layer's key).
JOINT_DROPOUT = 0.2

_ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


class _DecRNN(nn.Module):
    """Holds the LSTM under NeMo's key ``dec_rnn.lstm`` (NeMo's ``LSTMDropout`` without dropout)."""

    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(hidden, hidden, num_layers=layers)  # time-major, gates i, f, g, o


class _PredictionNet(nn.Module):
    """NeMo's ``prediction`` dict: ``embed`` and ``dec_rnn``."""

    def __init__(self, cfg: TransducerConfig) -> None:
        super().__init__()
        # blank_as_pad: the blank row is the padding row, all zeros, so embed(blank) is NeMo's SOS vector.
        self.embed = nn.Embedding(cfg.vocab_size + 1, cfg.pred_hidden, padding_idx=cfg.blank_id)
        self.dec_rnn = _DecRNN(cfg.pred_hidden, cfg.pred_rnn_layers)


class RNNTDecoder(nn.Module):
    """Prediction network: embedding + LSTM. Keys ``prediction.embed.*``, ``prediction.dec_rnn.lstm.*``."""

    def __init__(self, cfg: TransducerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.prediction = _PredictionNet(cfg)

    def zero_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """LSTM state of zeros, NeMo's ``initialize_state``: ``(h, c)``, each ``(L, B, P)``."""
        ref = self.prediction.embed.weight
        shape = (self.cfg.pred_rnn_layers, batch, self.cfg.pred_hidden)
        h = torch.zeros(shape, device=device or ref.device, dtype=dtype or ref.dtype)
        return h, torch.zeros_like(h)

    def predict(self, tokens: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Feed one token per stream to the LSTM (blank feeds the zero SOS vector).

        Args:
            tokens: ``(B,)`` int64 token ids in ``[0, blank]``.
            h: ``(L, B, P)`` LSTM hidden state.
            c: ``(L, B, P)`` LSTM cell state.

        Returns:
            ``(g, h, c)``: the unprojected output ``(B, P)`` and the new state.
        """
        # One step, layer by layer, with the kernel of nn.LSTMCell: the same maths as nn.LSTM without its
        # oneDNN path, which on CPU re-packs the weights on every call (~10x slower for a single step).
        lstm = self.prediction.dec_rnn.lstm
        x = self.prediction.embed(tokens)  # (B, P)
        hs, cs = [], []
        for k in range(lstm.num_layers):
            weights = [
                getattr(lstm, f"{name}_l{k}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            ]
            x, c_k = torch.lstm_cell(x, (h[k], c[k]), *weights)  # (B, P) each
            hs.append(x)
            cs.append(c_k)
        return x, torch.stack(hs), torch.stack(cs)

    def forward(self, targets: Tensor) -> Tensor:
        """Teacher-forced prediction network for training, with the zero SOS step prepended.

        The LSTM is causal, so outputs at ``u <= length`` do not depend on the padding of ``targets``;
        no lengths are needed.

        Args:
            targets: ``(B, U)`` int64 label ids (padding: any id in ``[0, blank]``).

        Returns:
            ``(B, U + 1, P)``: output ``u`` has seen the SOS and labels ``< u``.
        """
        x = self.prediction.embed(targets)  # (B, U, P)
        x = torch.cat([x.new_zeros(x.shape[0], 1, x.shape[2]), x], dim=1)  # (B, U+1, P)
        y, _ = self.prediction.dec_rnn.lstm(x.transpose(0, 1))  # (U+1, B, P), zero initial state
        return y.transpose(0, 1)


class RNNTJoint(nn.Module):
    """Joint network. Keys ``enc.*``, ``pred.*``, ``joint_net.{1|2}.*`` (2 when NeMo had a Dropout)."""

    def __init__(self, cfg: TransducerConfig, enc_dim: int) -> None:
        super().__init__()
        if cfg.joint_activation not in _ACTIVATIONS:
            raise UnsupportedCheckpointError(
                f"joint activation {cfg.joint_activation!r} is not supported; "
                f"expected one of {sorted(_ACTIVATIONS)}"
            )
        self.cfg = cfg
        self.enc = nn.Linear(enc_dim, cfg.joint_hidden)
        self.pred = nn.Linear(cfg.pred_hidden, cfg.joint_hidden)
        layers: list[nn.Module] = [_ACTIVATIONS[cfg.joint_activation]()]
        if cfg.joint_dropout_layer:
            layers.append(nn.Dropout(JOINT_DROPOUT))
        layers.append(nn.Linear(cfg.joint_hidden, cfg.num_outputs))
        self.joint_net = nn.Sequential(*layers)

    def project_encoder(self, enc: Tensor) -> Tensor:
        """``(..., D) -> (..., J)``."""
        return self.enc(enc)

    def project_prednet(self, g: Tensor) -> Tensor:
        """``(..., P) -> (..., J)``."""
        return self.pred(g)

    def joint_after_projection(self, fe: Tensor, gp: Tensor) -> Tensor:
        """Raw logits ``(..., V + N)`` from projected inputs; ``fe`` and ``gp`` must broadcast.

        NeMo's joint additionally log-softmaxes this over the whole last axis when on CPU; callers that
        need NeMo's scores do that themselves.
        """
        return self.joint_net(fe + gp)

    def joint(self, enc: Tensor, pred: Tensor) -> Tensor:
        """Teacher-forced joint: ``enc (B, T, D)``, ``pred (B, U+1, P)`` -> raw ``(B, T, U+1, V+N)``."""
        fe = self.project_encoder(enc)[:, :, None, :]  # (B, T, 1, J)
        gp = self.project_prednet(pred)[:, None, :, :]  # (B, 1, U+1, J)
        return self.joint_after_projection(fe, gp)

    def forward(self, enc: Tensor, pred: Tensor) -> Tensor:
        """Same as :meth:`joint`."""
        return self.joint(enc, pred)


@dataclass(frozen=True, slots=True)
class TransducerState:
    """Greedy decoding state of a batch of streams (NeMo's ``LabelLoopingStateItem`` plus the score).

    The state starts *after* the SOS step: ``g``, ``h``, ``c`` already hold the prediction network's
    answer to the zero SOS vector, as in NeMo.
    """

    h: Tensor  # (L, B, P) LSTM hidden state after the last emitted label
    c: Tensor  # (L, B, P) LSTM cell state
    g: Tensor  # (B, J)    projected prediction output after the last emitted label
    last_label: Tensor  # (B,) int64, last emitted label (blank before the first one)
    time_jump: Tensor  # (B,) int64, TDT frames to skip at the start of the next chunk (0 for RNNT)
    frames_done: Tensor  # (B,) int64, encoder frames decoded so far (offset of the next chunk's frame 0)
    score: Tensor  # (B,) float, running NeMo CPU ``Hypothesis.score`` (sum of the tokens' logprobs)
    boost_node: Tensor  # (B,) int64, node of the stream's hotword tree (streamer.asr.boosting); 0 without one

    BATCH_DIM: ClassVar[dict[str, int]] = {
        "h": 1,
        "c": 1,
        "g": 0,
        "last_label": 0,
        "time_jump": 0,
        "frames_done": 0,
        "score": 0,
        "boost_node": 0,
    }


@dataclass(frozen=True, slots=True)
class _Choices:
    """Greedy decisions for a set of streams (``R`` rows, listed in ``rows``)."""

    rows: Tensor  # (R,) int64 batch index of each stream
    frame: Tensor  # (R,) int64 frame of the joint evaluation (within the chunk)
    label: Tensor  # (R,) int64 argmax over tokens + blank
    duration: Tensor  # (R,) int64 frames to advance (TDT: blank with duration 0 -> 1; RNNT: blank 1, label 0)
    logprob: Tensor  # (R,) chosen label after log_softmax over the whole joint output
    confidence: Tensor  # (R,) softmax probability of the label over tokens + blank

    def take(self, mask: Tensor) -> _Choices:
        """The rows where ``mask (R,)`` is true."""
        return _Choices(*(getattr(self, f.name)[mask] for f in fields(self)))

    @staticmethod
    def cat(parts: list[_Choices]) -> _Choices:
        """Concatenate the rows of several choices, in order."""
        return _Choices(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(_Choices)))


@dataclass(slots=True)
class _Fusion:
    """The hotword bonuses of a batch during one step: each row's bonus for every token at its tree's current node,
    kept up to date as labels are emitted (so the search loop only reads it)."""

    boost: Boost
    boosted: Tensor  # (B,) bool: the row has hotwords
    bonus: Tensor  # (B, V) float: the bonus of each token now (0 in rows without hotwords)

    @classmethod
    def start(cls, boost: Boost, node: Tensor) -> _Fusion:
        rows = torch.arange(node.shape[0], device=node.device)
        return cls(boost, boost.offsets >= 0, boost.rows_bonus(rows, node))

    def emitted(self, node: Tensor, rows: Tensor, labels: Tensor) -> None:
        """Rows ``rows`` emitted ``labels``: move their trees (``node (B,)``, in place) and update their bonuses."""
        boosted = self.boosted[rows]  # (R,)
        if not bool(boosted.any()):
            return
        rows, labels = rows[boosted], labels[boosted]
        moved = self.boost.advance(self.boost.nodes(rows, node[rows]), labels)
        node[rows] = moved
        self.bonus[rows] = self.boost.bonus(self.boost.nodes(rows, moved))


class GreedyTransducerDecoder:
    """Stateful batched greedy RNNT / TDT decoding (NeMo 3.0.0 ``greedy_batch``, label looping).

    Holds references to the modules; all per-stream data lives in :class:`TransducerState`. Each round
    searches every unfinished stream for its next label (blank decisions only move it along the frames)
    and then feeds the found labels to the prediction network. The joint and the LSTM only run on the
    streams that need them, which keeps a batch as cheap as its busiest streams.

    Decisions are taken on the joint output after log_softmax over all outputs, as NeMo does on CPU (an
    argmax is unchanged by it except in exact float ties). Departure from NeMo: NeMo's batched TDT loop
    records some wrong ``token_duration`` values when B > 1 (nemo-reference.md §7.5); here each token
    keeps the duration predicted with it, which is what NeMo gives for B = 1.

    Hotwords (:mod:`streamer.asr.boosting`): rows of a :class:`Boost` get NeMo's greedy phrase boosting; the
    other rows' decisions are never touched, so they decode exactly as without it. Departure from NeMo: a
    boosted token's logprob, confidence and the running score stay the model's own (NeMo's label-looping
    score adds the bonus), so confidences keep their meaning.
    """

    def __init__(self, decoder: RNNTDecoder, joint: RNNTJoint) -> None:
        self.decoder = decoder
        self.joint = joint
        self.cfg = decoder.cfg
        self._durations = torch.tensor(self.cfg.durations, dtype=torch.long)  # (N,)

    @torch.inference_mode()
    def init_state(self, batch: int, device: torch.device | None = None) -> TransducerState:
        """State of ``batch`` fresh streams (modules' dtype); the prediction network has consumed SOS."""
        h, c = self.decoder.zero_state(batch, device)
        sos = torch.full((batch,), self.cfg.blank_id, dtype=torch.long, device=h.device)
        y, h, c = self.decoder.predict(sos, h, c)
        zeros = torch.zeros(batch, dtype=torch.long, device=h.device)
        return TransducerState(
            h=h,
            c=c,
            g=self.joint.project_prednet(y),
            last_label=sos,
            time_jump=zeros,
            frames_done=zeros.clone(),
            score=torch.zeros(batch, dtype=h.dtype, device=h.device),
            boost_node=zeros.clone(),
        )

    def _choose(
        self, rows: Tensor, frame: Tensor, logits: Tensor, durations: Tensor, fusion: _Fusion | None
    ) -> _Choices:
        """Greedy decisions from raw joint logits ``(R, V + N)`` evaluated at ``frame``.

        ``durations`` ``(N,)`` are the TDT durations on the logits' device (empty for RNNT); ``fusion``: the
        batch's hotword bonuses, or None.
        """
        blank = self.cfg.blank_id
        logp = logits.log_softmax(dim=-1)  # NeMo's CPU joint output
        tokens = logp[:, : blank + 1]  # (R, V) tokens + blank
        logprob, label = tokens.max(dim=-1)
        is_blank = label == blank
        if fusion is not None:
            # NeMo's greedy fusion keeps the model's blank / non-blank decision; the bonus picks the token. Rows
            # without hotwords keep their decision as it is (not recomputed), so nothing about them can change.
            keep = is_blank | ~fusion.boosted[rows]  # (R,)
            if not bool(keep.all()):  # most decisions are blanks: then there is nothing to pick
                pick = (tokens[:, :blank] + fusion.bonus[rows]).max(dim=-1).indices  # (R,)
                label = torch.where(keep, label, pick)
                logprob = torch.where(keep, logprob, tokens.gather(1, pick[:, None])[:, 0])
        if self.cfg.is_tdt:
            duration = durations[logp[:, blank + 1 :].argmax(dim=-1)]
            duration = torch.where(is_blank & (duration == 0), 1, duration)  # blank always advances
        else:
            duration = is_blank.long()  # RNNT: blank moves to the next frame, a label stays
        confidence = (logprob - tokens.logsumexp(dim=-1)).exp()
        return _Choices(rows, frame, label, duration, logprob, confidence)

    def _search(
        self, fe: Tensor, g: Tensor, t: Tensor, lengths: Tensor, rows: Tensor, durations: Tensor,
        fusion: _Fusion | None,
    ) -> _Choices:
        """Move each stream in ``rows`` forward from frame ``t`` until the joint gives a non-blank label.

        A stream stops at its first label (even if the label's duration takes it past the end) or when
        blanks have moved it to ``t >= length``; ``t`` is advanced in place.

        Args:
            fe: ``(B, T, J)`` projected encoder output.
            g: ``(B, J)`` projected prediction output.
            t: ``(B,)`` current frame of every stream.
            lengths: ``(B,)`` valid frames.
            rows: ``(R,)`` streams to search (at least one), all with ``t < length``.
            durations: ``(N,)`` TDT durations on the device.
            fusion: the batch's hotword bonuses (blanks do not change them), or None.

        Returns:
            The labels found, one per stream that found one.
        """
        found = []
        while rows.numel() > 0:
            frame = t[rows]
            logits = self.joint.joint_after_projection(fe[rows, frame], g[rows])  # (R, V+N)
            choice = self._choose(rows, frame, logits, durations, fusion)
            t[rows] = frame + choice.duration
            is_label = choice.label != self.cfg.blank_id
            found.append(choice.take(is_label))
            rows = rows[~is_label & (t[rows] < lengths[rows])]
        return _Choices.cat(found)

    @torch.inference_mode()
    def step(
        self, enc: Tensor, enc_lengths: Tensor, state: TransducerState, boost: Boost | None = None
    ) -> tuple[list[TokenSpan], TransducerState]:
        """Decode the next chunk of encoder frames of every stream.

        Args:
            enc: ``(B, T, D)`` encoder output; frames at or beyond a stream's length are ignored.
            enc_lengths: ``(B,)`` valid frames per stream (``<= T``; 0 is allowed).
            state: State of the same B streams after their previous chunks.
            boost: The hotword trees of the B streams (:meth:`Boost.of`), or None when none has any.

        Returns:
            The new tokens of every stream (frames are absolute), and the new state.
        """
        if boost is not None and boost.vocab_size != self.cfg.blank_id:
            raise ValueError(f"hotword trees for {boost.vocab_size} tokens; this decoder has {self.cfg.blank_id}")
        lengths = enc_lengths.to(device=enc.device, dtype=torch.long)
        fe = self.joint.project_encoder(enc)  # (B, T, J)
        durations = self._durations.to(enc.device)  # (N,)
        # Working copies, updated in place row by row.
        h, c, g = state.h.clone(), state.c.clone(), state.g.clone()
        score, last_label, t = state.score.clone(), state.last_label.clone(), state.time_jump.clone()
        node = state.boost_node.clone() if boost is not None else state.boost_node
        fusion = _Fusion.start(boost, node) if boost is not None else None
        # Labels emitted at ``label_frame`` in this call. A frame never spans two chunks (TDT only carries
        # a skip, and a label with duration 0 keeps t below the length), so counting restarts per call.
        label_frame = torch.full_like(t, -1)
        label_count = torch.zeros_like(t)
        emitted: list[_Choices] = []
        rows = (t < lengths).nonzero()[:, 0]  # (R,) streams with frames left
        while rows.numel() > 0:
            found = self._search(fe, g, t, lengths, rows, durations, fusion)
            rows = found.rows  # streams without a label have run out of frames
            if rows.numel() == 0:
                break
            emitted.append(found)
            score[rows] += found.logprob
            last_label[rows] = found.label
            if fusion is not None:  # only an emitted label moves a hotword tree
                fusion.emitted(node, rows, found.label)
            y, h_rows, c_rows = self.decoder.predict(found.label, h[:, rows], c[:, rows])
            h[:, rows], c[:, rows], g[rows] = h_rows, c_rows, self.joint.project_prednet(y)
            # max_symbols: after that many labels on one frame, move on as if a blank was emitted.
            same_frame = label_frame[rows] == found.frame
            label_count[rows] = torch.where(same_frame, label_count[rows] + 1, 1)
            label_frame[rows] = found.frame
            t[rows] += ((t[rows] == found.frame) & (label_count[rows] >= self.cfg.max_symbols)).long()
            rows = rows[t[rows] < lengths[rows]]
        new_state = TransducerState(
            h=h,
            c=c,
            g=g,
            last_label=last_label,
            time_jump=t - lengths,
            frames_done=state.frames_done + lengths,
            score=score,
            boost_node=node,
        )
        return self._spans(emitted, state.frames_done, enc.shape[0]), new_state

    def _spans(self, emitted: list[_Choices], offsets: Tensor, batch: int) -> list[TokenSpan]:
        """Per-stream spans from the labels of every round, in emission order (two host transfers)."""
        spans = [TokenSpan() for _ in range(batch)]
        if not emitted:
            return spans
        found = _Choices.cat(emitted)
        duration = found.duration if self.cfg.is_tdt else torch.ones_like(found.duration)  # RNNT: 1 frame
        rows, ids, frames, durations = torch.stack(
            [found.rows, found.label, found.frame + offsets[found.rows], duration]
        ).tolist()
        confidences, logprobs = torch.stack([found.confidence, found.logprob]).tolist()
        order: list[list[int]] = [[] for _ in range(batch)]  # indices into ``found``, per stream
        for i, row in enumerate(rows):
            order[row].append(i)
        for row, idx in enumerate(order):
            if idx:
                spans[row] = TokenSpan(
                    token_ids=tuple(ids[i] for i in idx),
                    token_frames=tuple(frames[i] for i in idx),
                    token_durations=tuple(durations[i] for i in idx),
                    token_confidences=tuple(confidences[i] for i in idx),
                    token_logprobs=tuple(logprobs[i] for i in idx),
                )
        return spans
