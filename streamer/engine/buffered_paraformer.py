"""Buffered streaming of a Paraformer model: what the daemon runs with one (its file endpoint included).

A Paraformer (:mod:`streamer.asr.paraformer`) has no cache-aware step, so the daemon serves it as it serves a
full-context transducer (:mod:`streamer.engine.buffered`): each step encodes a buffer ``left | chunk | right``
and keeps what belongs to the chunk. What carries from chunk to chunk is not a decoder state but the
integrate-and-fire state: the weight integrated since the last token fired and the weighted sum of its
frames. A step integrates the chunk's frames (their alphas predicted with the whole buffer around them)
after that carry, so a token that straddles two chunks fires once, in the second; the NAR decoder then
decodes the chunk's fired tokens attending to the whole buffer. The last step of a stream fires a tail
token as offline decoding does. Hotwords are not applied (a Paraformer has no frame-by-frame search to bias).

Shape legend::

    B streams in the batch   T encoder frames (80 ms)   D encoder width   U fired tokens
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from streamer.asr.hypothesis import TokenSpan
from streamer.asr.paraformer import ParaformerModel, integrate_and_fire
from streamer.engine.buffered import BufferedRecognizer, BufferedStream, BufferSizes, _ids
from streamer.engine.recognizer import Transcript


@dataclass
class CifCarry:
    """Integrate-and-fire state between chunks: the weight since the last fire and its frames' weighted sum (D,)."""

    weight: float = 0.0
    embed: Tensor | None = None


class ParaformerBufferedRecognizer(BufferedRecognizer):
    """:class:`BufferedRecognizer` for a :class:`ParaformerModel` (same interface, same buffer plan)."""

    def __init__(self, model: ParaformerModel, left_s: float = 10.0, chunk_s: float = 1.6,
                 right_s: float = 1.6) -> None:
        self.model = model  # type: ignore[assignment]
        self.paraformer = model
        self.device = next(model.parameters()).device
        self.kind = model.check_decoder(None)  # type: ignore[assignment]
        self.context = model.check_context(None)
        features = model.config.features
        self.frame_samples = features.hop_length * model.config.encoder.subsampling_factor
        self.sizes = BufferSizes.from_seconds(left_s, chunk_s, right_s, self.frame_samples, features.sample_rate)

    def create_stream(self, name: str | None = None) -> BufferedStream:
        return BufferedStream(self, name or f"p{next(_ids)}", CifCarry())  # type: ignore[arg-type]

    def _run(self, work: list[tuple[BufferedStream, int, int, int]]) -> list[TokenSpan]:
        """Encode the buffers (one batch); integrate each one's chunk frames after its carry; decode."""
        model, fs = self.paraformer, self.frame_samples
        enc, enc_len = self._encode(work)
        alphas = model.predictor(enc, enc_len).float()  # (B, T)
        counts = []
        width = enc.size(1) + 1  # the carry's pseudo-frame first
        hidden = enc.new_zeros(len(work), width, enc.size(2))
        weights = alphas.new_zeros(len(work), width)
        tails = torch.full((len(work),), float("inf"), device=enc.device)
        for i, (s, start, end, chunk) in enumerate(work):
            first = (s.done_samples - start) // fs
            last = s.input_done and end >= s.samples_in  # the stream's last step: its frames up to the end
            n = max(0, (int(enc_len[i]) - first) if last else min(chunk // fs, int(enc_len[i]) - first))
            counts.append(n)
            carry: CifCarry = s.dec  # type: ignore[assignment]
            if carry.weight > 0 and carry.embed is not None:
                weights[i, 0] = carry.weight
                hidden[i, 0] = carry.embed / carry.weight
            weights[i, 1 : n + 1] = alphas[i, first : first + n]
            hidden[i, 1 : n + 1] = enc[i, first : first + n]
            if last:  # a leftover may fire a tail token
                tails[i] = model.config.tail_min_weight
        valid = torch.tensor(counts, device=enc.device) + 1
        fired = integrate_and_fire(hidden, weights, valid, model.config.threshold, tails)
        spans = model.decode_fired(fired, enc, enc_len, [s.frames_done - 1 for s, *_ in work])
        left = (weights[..., None] * hidden).sum(1) - fired.embeds.sum(1)  # (B, D): what did not fire
        for i, ((s, _, _, chunk), n, span) in enumerate(zip(work, counts, spans, strict=True)):
            s.dec = CifCarry(float(fired.leftover[i]), left[i].clone())  # type: ignore[assignment]
            s.done_samples += chunk
            s.frames_done += n
            s.tokens = s.tokens + span
            keep = max(0, s.done_samples - self.sizes.total - s.audio_start)
            if keep:
                s.audio, s.audio_start = s.audio[keep:], s.audio_start + keep
            if s.input_done and s.done_samples >= s.samples_in:
                s.flushed = True
        return spans


def transcribe_buffered_paraformer(
    model: ParaformerModel, audio: np.ndarray, left_s: float = 10.0, chunk_s: float = 1.6, right_s: float = 1.6
) -> Transcript:
    """Recognize a whole file by buffered streaming (what ``serve`` does with a Paraformer)."""
    rec = ParaformerBufferedRecognizer(model, left_s, chunk_s, right_s)
    stream = rec.create_stream()
    stream.accept_waveform(audio)
    stream.input_finished()
    rec.run_to_end([stream])
    return stream.transcript()
