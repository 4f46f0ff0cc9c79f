"""Buffered streaming of full-context models: NeMo's stateful buffered RNNT/TDT inference, batched over streams.

A full-context FastConformer (parakeet-tdt-0.6b, parakeet-rnnt, parakeet-ctc) has no cache-aware step. NeMo
serves it live by re-running the offline encoder on a sliding buffer of audio, ``left | chunk | right``
seconds, and decoding only the chunk's encoder frames, with the decoder's state carried from chunk to chunk
(``examples/asr/asr_chunked_inference/rnnt/speech_to_text_streaming_infer_rnnt.py``; facts in
nemo-reference.md §12). Every chunk is decoded once, so nothing is merged, and the partial text of a stream
only grows. The cost is the latency, ``chunk + right`` seconds, and the compute: each chunk's frames are
encoded as part of a buffer ``(left + chunk + right) / chunk`` times their length.

The steps, for one stream whose decoded audio ends at sample ``done`` (``C``, ``R``, ``L`` in samples,
multiples of one encoder frame, 1280 samples):

* a step is due once ``done + C + R`` samples arrived; it decodes ``C`` samples' frames from a buffer of
  ``[end - (L + C + R), end)`` with ``end = done + C + R`` (clipped at 0);
* once the input is finished and at most ``C + R`` samples are left, the last step decodes all of them
  (``end`` = the last sample), from a buffer of the same total size;
* the buffer's features are computed on it alone (``per_feature`` normalisation over the buffer), and the
  frames decoded are ``[left // 1280, left // 1280 + chunk // 1280)`` of its encoder output, as NeMo slices.

:class:`BufferedRecognizer` has :class:`~streamer.engine.recognizer.Recognizer`'s interface (the channel and the
scheduler use either), and :func:`transcribe_buffered` runs a whole file through it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from streamer.asr.boosting import Boost, PhraseTree
from streamer.asr.config import ContextSize
from streamer.asr.ctc import CTCState
from streamer.asr.hypothesis import TokenSpan
from streamer.asr.model import AsrModel, DecoderKind
from streamer.asr.state import stack, unstack
from streamer.asr.transducer import TransducerState
from streamer.engine.recognizer import Recognizer, Transcript, make_transcript
from streamer.errors import ConfigError

_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class BufferSizes:
    """The buffer ``left | chunk | right`` in samples, each a whole number of encoder frames."""

    left: int
    chunk: int
    right: int

    @classmethod
    def from_seconds(cls, left_s: float, chunk_s: float, right_s: float, frame_samples: int,
                     sample_rate: int) -> BufferSizes:
        """Round each part down to whole encoder frames, as NeMo does (``int(seconds * 100 / 8)`` frames).

        Raises:
            ConfigError: a negative part, or a chunk shorter than one encoder frame.
        """
        if min(left_s, chunk_s, right_s) < 0:
            raise ConfigError("buffered streaming: left, chunk and right must be >= 0 seconds")
        frame_s = frame_samples / sample_rate
        frames = [int(s / frame_s + 1e-9) for s in (left_s, chunk_s, right_s)]
        if frames[1] < 1:
            raise ConfigError(f"buffered streaming: the chunk must be at least one encoder frame ({frame_s} s)")
        return cls(*(n * frame_samples for n in frames))

    @property
    def total(self) -> int:
        return self.left + self.chunk + self.right


@dataclass(eq=False)
class BufferedStream:
    """One audio source's buffered-streaming state. Create with :meth:`BufferedRecognizer.create_stream`."""

    recognizer: BufferedRecognizer
    name: str
    dec: TransducerState | CTCState  # the decoder's state (batch 1), carried from chunk to chunk
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # samples from `audio_start` on
    audio_start: int = 0
    done_samples: int = 0  # audio decoded: the chunks so far end here
    tokens: TokenSpan = field(default_factory=TokenSpan)
    samples_in: int = 0
    frames_done: int = 0  # encoder frames decoded so far
    input_done: bool = False
    flushed: bool = False
    hotwords: PhraseTree | None = None

    def accept_waveform(self, samples: np.ndarray) -> None:
        """Append 16 kHz mono float32 samples (copied)."""
        if self.input_done:
            raise RuntimeError(f"stream {self.name}: audio after input_finished()")
        if samples.size:
            self.audio = np.concatenate([self.audio, np.asarray(samples, dtype=np.float32).reshape(-1)])
            self.samples_in += samples.size

    def input_finished(self) -> None:
        """No more audio: the next step decodes what is left."""
        self.input_done = True

    @property
    def samples_recognized(self) -> int:
        """Samples whose frames are decoded."""
        return self.done_samples

    @property
    def samples_to_ready(self) -> int:
        """More samples the next full step needs (0: it is ready, or the input is finished)."""
        if self.input_done:
            return 0
        sizes = self.recognizer.sizes
        return max(0, self.done_samples + sizes.chunk + sizes.right - self.samples_in)

    @property
    def is_ready(self) -> bool:
        """True when a step would make progress: a full chunk and its right context arrived, or the tail must go."""
        if self.flushed:
            return False
        sizes = self.recognizer.sizes
        return self.samples_in >= self.done_samples + sizes.chunk + sizes.right or self.input_done

    def plan(self) -> tuple[int, int, int]:
        """The next step's buffer: ``(start, end, chunk)`` in samples (the chunk starts at ``done_samples``)."""
        sizes = self.recognizer.sizes
        rest = self.samples_in - self.done_samples
        if self.input_done and rest <= sizes.chunk + sizes.right:
            end, chunk = self.samples_in, rest  # the last step: everything left is chunk
        else:
            end, chunk = self.done_samples + sizes.chunk + sizes.right, sizes.chunk
        return max(0, end - sizes.total), end, chunk

    def transcript(self) -> Transcript:
        return make_transcript(self.recognizer.model, self.tokens)


class BufferedRecognizer:
    """Batched buffered streaming of a full-context model (or any model) with one decoder."""

    runner = None  # no CUDA-graph runner: the offline encoder runs eagerly

    def __init__(
        self,
        model: AsrModel,
        decoder: DecoderKind | None = None,
        left_s: float = 10.0,
        chunk_s: float = 1.6,
        right_s: float = 1.6,
        att_context_size: ContextSize | None = None,
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.kind = model.check_decoder(decoder)
        self.context = model.check_context(att_context_size)
        features = model.config.features
        self.frame_samples = features.hop_length * model.config.encoder.subsampling_factor
        self.sizes = BufferSizes.from_seconds(left_s, chunk_s, right_s, self.frame_samples, features.sample_rate)
        self.greedy = model.greedy_decoder(self.kind)

    @property
    def att_context_size(self) -> ContextSize:
        """The encoder's attention context (full context for the models this serves)."""
        return self.context

    @property
    def chunk_seconds(self) -> float:
        """Audio per step of a real-time stream."""
        return self.sizes.chunk / self.model.config.features.sample_rate

    @property
    def latency_seconds(self) -> float:
        """What buffering costs before a word can be decoded: the chunk and its right context."""
        return (self.sizes.chunk + self.sizes.right) / self.model.config.features.sample_rate

    def create_stream(self, name: str | None = None) -> BufferedStream:
        return BufferedStream(self, name or f"b{next(_ids)}", self.greedy.init_state(1))

    @torch.inference_mode()
    def step(self, streams: list[BufferedStream]) -> list[TokenSpan]:
        """One batched step for every ready stream in ``streams``; returns each one's new tokens."""
        work = []
        for s in streams:
            if not s.is_ready:
                continue
            start, end, chunk = s.plan()
            if chunk <= 0:
                s.flushed = True
                continue
            work.append((s, start, end, chunk))
        new: dict[int, TokenSpan] = {}
        if work:
            for (s, *_), span in zip(work, self._run(work), strict=True):
                new[id(s)] = span
        return [new.get(id(s), TokenSpan()) for s in streams]

    def _encode(self, work: list[tuple[BufferedStream, int, int, int]]) -> tuple[Tensor, Tensor]:
        """The buffers ``[start, end)`` of the streams in ``work``, zero-padded into one batch, through the
        preprocessor and the offline encoder: (B, T, D) float32 and (B,) valid frames."""
        lengths = torch.tensor([end - start for _, start, end, _ in work])
        audio = torch.zeros(len(work), int(lengths.max()))
        for i, (s, start, end, _) in enumerate(work):
            audio[i, : end - start] = torch.from_numpy(s.audio[start - s.audio_start : end - s.audio_start])
        audio, lengths = audio.to(self.device), lengths.to(self.device)
        feats, feat_lens = self.model.preprocessor(audio, lengths)
        enc, enc_len = self.model.encoder(feats, feat_lens, self.context)
        return enc.float(), enc_len

    def _run(self, work: list[tuple[BufferedStream, int, int, int]]) -> list[TokenSpan]:
        """Encode the buffers (one batch), decode each one's chunk frames from its carried state."""
        model, fs = self.model, self.frame_samples
        enc, _ = self._encode(work)
        firsts = [(s.done_samples - start) // fs for s, start, _, _ in work]
        counts = [chunk // fs for *_, chunk in work]
        width = max(max(counts), 1)
        chunk_enc = enc.new_zeros(len(work), width, enc.size(2))
        for i, (first, n) in enumerate(zip(firsts, counts, strict=True)):
            n = min(n, enc.size(1) - first)
            counts[i] = max(n, 0)
            chunk_enc[i, :n] = enc[i, first : first + n]
        dec_in = model.ctc_log_probs(chunk_enc) if self.kind == "ctc" else chunk_enc
        state = stack([s.dec for s, *_ in work])
        boost = Boost.of([s.hotwords for s, *_ in work], self.device)
        spans, state = self.greedy.step(dec_in, torch.tensor(counts, device=self.device), state, boost)
        for (s, _, _, chunk), dec, n, span in zip(work, unstack(state), counts, spans, strict=True):
            s.dec = dec
            s.done_samples += chunk
            s.frames_done += n
            s.tokens = s.tokens + span
            # the next buffer starts at done - left, or (the last step) as early as done - (left + chunk + right)
            keep = max(0, s.done_samples - self.sizes.total - s.audio_start)
            if keep:
                s.audio, s.audio_start = s.audio[keep:], s.audio_start + keep
            if s.input_done and s.done_samples >= s.samples_in:
                s.flushed = True
        return spans

    def run_to_end(self, streams: list[BufferedStream]) -> None:
        """Step until every stream whose input is finished is flushed (for files and tests)."""
        while any(s.is_ready for s in streams):
            self.step(streams)


def transcribe_buffered(
    model: AsrModel,
    audio: np.ndarray,
    decoder: DecoderKind | None = None,
    left_s: float = 10.0,
    chunk_s: float = 1.6,
    right_s: float = 1.6,
) -> Transcript:
    """Recognize a whole file by buffered streaming (what ``serve`` does live with a full-context model)."""
    rec = BufferedRecognizer(model, decoder, left_s, chunk_s, right_s)
    stream = rec.create_stream()
    stream.accept_waveform(audio)
    stream.input_finished()
    rec.run_to_end([stream])
    return stream.transcript()


AnyRecognizer = Recognizer | BufferedRecognizer  # what a channel and the scheduler drive
