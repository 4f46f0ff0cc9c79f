"""Sans-I/O recognition: push samples into a :class:`Stream`, call :meth:`Recognizer.step`, read results.

``Recognizer.step(streams)`` runs one batched cache-aware encoder step and one stateful greedy decoder
step for every stream that holds a full chunk (or is flushing its tail). Nothing here does I/O or
knows about asyncio: the daemon's scheduler, ``streamer transcribe`` and the benchmarks all drive it
the same way. Only one thread may touch a stream and the recognizer at a time (the inference thread).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from streamer.asr import clocks
from streamer.asr.boosting import Boost, PhraseTree
from streamer.asr.config import ContextSize
from streamer.asr.ctc import CTCState, GreedyCTCDecoder
from streamer.asr.features import FeatureState
from streamer.asr.features_many import step_many
from streamer.asr.hypothesis import TokenSpan
from streamer.asr.model import AsrModel, DecoderKind
from streamer.asr.paraformer import ParaformerModel
from streamer.asr.streaming import EncoderState, StreamingEncoder
from streamer.asr.transducer import TransducerState
from streamer.asr.words import Word, words_from_tokens
from streamer.engine.cuda_graphs import BucketedEncoder
from streamer.engine.residence import Residence, gather, settle
from streamer.errors import ConfigError


@dataclass(frozen=True)
class Transcript:
    """What was recognized: text, tokens with their encoder frames, words with times."""

    text: str
    token_ids: tuple[int, ...]
    token_frames: tuple[int, ...]
    token_durations: tuple[int, ...]
    token_confidences: tuple[float, ...]
    words: tuple[Word, ...]
    eou: bool = False  # an end-of-utterance token (EOU models) was emitted

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "token_frames": list(self.token_frames),
            "token_durations": list(self.token_durations),
            "token_confidences": [round(c, 4) for c in self.token_confidences],
            "words": [
                {"word": w.word, "start_s": round(w.start_s, 3), "end_s": round(w.end_s, 3),
                 "confidence": round(w.confidence, 4)}
                for w in self.words
            ],
            "eou": self.eou,
        }


def make_transcript(model: AsrModel | ParaformerModel, span: TokenSpan) -> Transcript:
    """Turn accumulated tokens into text and words (special EOU/EOB tokens become a flag)."""
    tok = model.tokenizer
    eou_ids = set(model.config.eou_token_ids)
    eou = any(t in eou_ids for t in span.token_ids)
    if tok is None:
        text, words = " ".join(str(t) for t in span.token_ids), ()
    else:
        text = tok.decode(span.token_ids, strip_special=True)
        words = tuple(
            words_from_tokens(
                tok,
                span.token_ids,
                span.token_frames,
                span.token_durations if model.config.transducer and model.config.transducer.is_tdt else None,
                span.token_confidences,
                frame_shift_s=model.config.frame_shift_s,
            )
        )
    return Transcript(
        text=text,
        token_ids=span.token_ids,
        token_frames=span.token_frames,
        token_durations=span.token_durations,
        token_confidences=span.token_confidences,
        words=words,
        eou=eou,
    )


# Offline decoding goes through the encoder output this many frames (40 s) at a time; the greedy decoders are
# stateful, so the tokens equal one pass over all frames (the streaming path relies on the same property).
DECODE_WINDOW_FRAMES = 500

Progress = Callable[[str, int, int], None]  # (stage, done, total): "encoder" layers, then "decoder" frames


@torch.inference_mode()
def transcribe_offline(
    model: AsrModel | ParaformerModel,
    audio: np.ndarray,
    decoder: DecoderKind | None = None,
    att_context_size: ContextSize | None = None,
    progress: Progress | None = None,
) -> Transcript:
    """Recognize a whole utterance (16 kHz mono float32) with one encoder pass.

    With a local-attention model (:meth:`AsrModel.change_attention`) time and memory grow linearly with the
    audio, so hours go through in one pass; ``progress`` hears each encoder layer and decoded window. A
    Paraformer fires and decodes all its tokens at once after the encoder.
    """
    if isinstance(model, ParaformerModel):
        return _transcribe_paraformer(model, audio, decoder, att_context_size, progress)
    kind = model.check_decoder(decoder)
    ctx = model.check_context(att_context_size)
    param = next(model.parameters())
    x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None].to(param.device)
    feats, lens = model.preprocessor(x, torch.tensor([x.size(1)], device=param.device))
    del x
    on_layer = None if progress is None else (lambda done, total: progress("encoder", done, total))
    enc, enc_len = model.encoder(feats, lens, ctx, on_layer=on_layer)
    span = _decode(model, kind, enc, enc_len, progress)
    return make_transcript(model, span)


def _transcribe_paraformer(
    model: ParaformerModel,
    audio: np.ndarray,
    decoder: str | None,
    att_context_size: ContextSize | None,
    progress: Progress | None,
) -> Transcript:
    model.check_decoder(decoder)
    ctx = model.check_context(att_context_size)
    param = next(model.parameters())
    x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None].to(param.device)
    feats, lens = model.preprocessor(x, torch.tensor([x.size(1)], device=param.device))
    on_layer = None if progress is None else (lambda done, total: progress("encoder", done, total))
    enc, enc_len = model.encoder(feats, lens, ctx, on_layer=on_layer)
    enc = enc.float()
    (span,) = model.decode_fired(model.fire(enc, enc_len), enc, enc_len, [0])
    if progress is not None:
        progress("decoder", 1, 1)
    return make_transcript(model, span)


def _decode(
    model: AsrModel, kind: DecoderKind, enc: Tensor, enc_len: Tensor, progress: Progress | None = None
) -> TokenSpan:
    greedy = model.greedy_decoder(kind)
    state = greedy.init_state(enc.size(0))
    inputs = model.ctc_log_probs(enc) if isinstance(greedy, GreedyCTCDecoder) else enc
    total = int(enc_len[0])
    span = TokenSpan()
    for start in range(0, max(total, 1), DECODE_WINDOW_FRAMES):
        n = min(DECODE_WINDOW_FRAMES, total - start)
        spans, state = greedy.step(inputs[:, start : start + n], torch.tensor([n], device=enc.device), state)
        span = span + spans[0]
        if progress is not None:
            progress("decoder", start + n, total)
    return span


_ids = itertools.count(1)


@dataclass(eq=False)
class Stream:
    """One audio source's recognition state. Create with :meth:`Recognizer.create_stream`."""

    recognizer: Recognizer
    name: str
    feat_state: FeatureState
    home: Residence[EncoderState, TransducerState | CTCState]  # encoder and decoder state (a batch row)
    pending: Tensor  # [F, n] mel frames not yet given to the encoder
    raw: list[np.ndarray] = field(default_factory=list)  # samples whose features are not computed yet
    tokens: TokenSpan = field(default_factory=TokenSpan)
    samples_in: int = 0
    mel_consumed: int = 0  # mel frames the encoder has consumed (padding the channel added included)
    frames_done: int = 0  # encoder frames decoded so far: the stream's position on the encoder clock
    input_done: bool = False  # no more audio will come
    flushed: bool = False  # everything was recognized
    hotwords: PhraseTree | None = None  # phrases to boost (streamer.engine.hotwords); set before the first step

    def accept_waveform(self, samples: np.ndarray) -> None:
        """Append 16 kHz mono float32 samples (copied; their features are computed at the next step,
        together with every other stream's: see :mod:`streamer.asr.features_many`)."""
        if self.input_done:
            raise RuntimeError(f"stream {self.name}: audio after input_finished()")
        if samples.size == 0:
            return
        self.raw.append(np.array(samples, dtype=np.float32, copy=True).reshape(-1))
        self.samples_in += samples.size

    def input_finished(self) -> None:
        """No more audio: the tail will be flushed by the next steps."""
        if self.input_done:
            return
        self.recognizer.featurize([self])
        frames = self.recognizer.featurizer.finish(self.feat_state)
        if frames.size(2):
            self.pending = torch.cat([self.pending, frames[0]], dim=1)
        self.input_done = True

    @property
    def mel_available(self) -> int:
        """Mel frames the encoder could take now: pending ones and those the raw samples complete."""
        if not self.raw:
            return self.pending.size(1)
        cfg = self.recognizer.model.config.features
        complete = clocks.num_complete_mel_frames(self.samples_in, cfg.hop_length, cfg.win_length, cfg.n_fft)
        return self.pending.size(1) + complete - int(self.feat_state.num_frames[0])

    @property
    def enc_state(self) -> EncoderState:
        """The encoder cache (batch 1; a read-only view while it is a row of the last step's batch)."""
        return self.home.states()[0]

    @property
    def dec_state(self) -> TransducerState | CTCState:
        """The decoder state (batch 1; read-only like :attr:`enc_state`)."""
        return self.home.states()[1]

    @property
    def frames_needed(self) -> int:
        """Mel frames the next full step needs."""
        streaming = self.recognizer.streaming
        return streaming.chunk_mel_frames if self.mel_consumed else streaming.first_chunk_mel_frames

    @property
    def samples_recognized(self) -> int:
        """Samples the encoder has consumed (padding the channel added included)."""
        return self.mel_consumed * self.recognizer.model.config.features.hop_length

    @property
    def samples_to_ready(self) -> int:
        """More samples the stream needs before its next full step (0: it is ready, or its input is finished)."""
        if self.input_done:
            return 0
        cfg = self.recognizer.model.config.features
        target = self.mel_consumed + self.frames_needed  # mel frames it will have consumed
        reach = clocks.window_reach(cfg.win_length, cfg.n_fft)
        return max(0, (target - 1) * cfg.hop_length + reach - self.samples_in)

    @property
    def is_ready(self) -> bool:
        """True when a step would make progress: a full chunk is pending, or the tail must be flushed."""
        if self.flushed:
            return False
        return self.mel_available >= self.frames_needed or self.input_done

    def transcript(self) -> Transcript:
        return make_transcript(self.recognizer.model, self.tokens)


class Recognizer:
    """Batched cache-aware streaming recognition at one look-ahead with one decoder."""

    def __init__(
        self,
        model: AsrModel,
        att_context_size: ContextSize | None = None,
        decoder: DecoderKind | None = None,
        *,
        cuda_graphs: bool = True,
        max_batch: int = 1,
    ) -> None:
        if model.config.features.normalize not in ("NA", "None", "none", ""):
            raise ConfigError(
                f"streaming needs a model without per-utterance feature normalisation "
                f"(this one uses {model.config.features.normalize!r}); use offline mode"
            )
        self.model = model
        # Features are computed per stream as audio arrives, on the CPU (cheap, and no tiny transfers);
        # the encoder and decoder run batched on the model's device, with their caches there.
        self.device = next(model.parameters()).device
        featurizer = model.preprocessor.featurizer
        self.featurizer = featurizer if self.device.type == "cpu" else copy.deepcopy(featurizer).cpu()
        self.kind = model.check_decoder(decoder)
        self.streaming: StreamingEncoder = model.encoder.streaming(att_context_size)
        self.greedy = model.greedy_decoder(self.kind)
        # On CUDA the encoder step runs at batch buckets, as CUDA graphs (engine.cuda_graphs); batches above
        # ``max_batch`` are split. None: the plain step (the CPU, or graphs turned off).
        self.runner: BucketedEncoder | None = None
        if self.device.type == "cuda" and cuda_graphs:
            self.runner = BucketedEncoder(self.streaming, max_batch)

    @property
    def att_context_size(self) -> ContextSize:
        """The look-ahead this recognizer streams at."""
        return self.streaming.att_context_size

    @property
    def chunk_seconds(self) -> float:
        """Audio per full chunk (the step period of a real-time stream)."""
        return self.streaming.chunk_mel_frames * self.model.config.features.window_stride

    def create_stream(self, name: str | None = None) -> Stream:
        model = self.model
        return Stream(
            recognizer=self,
            name=name or f"s{next(_ids)}",
            feat_state=self.featurizer.init_state(1),
            home=Residence.fresh(self.streaming.init_state(1), self.greedy.init_state(1)),
            pending=torch.zeros(model.config.features.n_mels, 0),
        )

    def featurize(self, streams: list[Stream]) -> None:
        """Turn the streams' waiting samples into pending mel frames, all streams in one spectral pass."""
        todo = [s for s in streams if s.raw]
        if not todo:
            return
        chunks = [s.raw[0] if len(s.raw) == 1 else np.concatenate(s.raw) for s in todo]
        frames, states = step_many(self.featurizer, chunks, [s.feat_state for s in todo])
        for s, f, state in zip(todo, frames, states, strict=True):
            s.raw.clear()
            s.feat_state = state
            if f.size(2):
                s.pending = torch.cat([s.pending, f[0]], dim=1) if s.pending.size(1) else f[0]

    @torch.inference_mode()
    def step(self, streams: list[Stream]) -> list[TokenSpan]:
        """One batched step for every ready stream in ``streams``; returns each one's new tokens."""
        self.featurize(streams)
        ready = [s for s in streams if s.is_ready]
        new: dict[int, TokenSpan] = {}
        work = []
        for s in ready:
            n = min(s.frames_needed, s.pending.size(1))
            if n == 0:  # flushing with nothing left
                s.flushed = True
                continue
            work.append((s, n))
        if work:
            order, enc_state, dec_state = gather([s.home for s, _ in work], self.streaming.stack_rows)
            work = [work[i] for i in order]
            width = max(s.frames_needed for s, _ in work)
            mel = torch.zeros(len(work), self.model.config.features.n_mels, width)
            for i, (s, n) in enumerate(work):
                mel[i, :, :n] = s.pending[:, :n]
            n_new = torch.tensor([n for _, n in work])
            if self.runner is not None:
                out, out_len, enc_state = self.runner.step(mel, n_new, [enc_state])
            else:
                if self.device.type != "cpu":
                    mel, n_new = mel.to(self.device, non_blocking=True), n_new.to(self.device)
                mel = mel.to(self.streaming.dtype)  # float16/bfloat16 encoders (model.dtype); else a no-op
                out, out_len, enc_state = self.streaming.step(mel, n_new, enc_state)
                out = out.float()  # the decoders stay float32
            dec_in = self.model.ctc_log_probs(out) if self.kind == "ctc" else out
            boost = Boost.of([s.hotwords for s, _ in work], self.device)
            spans, dec_state = self.greedy.step(dec_in, out_len, dec_state, boost)
            settle([s.home for s, _ in work], range(len(work)), enc_state, dec_state)
            for (s, n), frames, span in zip(work, out_len.tolist(), spans, strict=True):
                s.pending = s.pending[:, n:]
                s.mel_consumed += n
                s.frames_done += frames
                s.tokens = s.tokens + span
                new[id(s)] = span
                if s.input_done and s.pending.size(1) == 0:
                    s.flushed = True
        return [new.get(id(s), TokenSpan()) for s in streams]

    def run_to_end(self, streams: list[Stream]) -> None:
        """Step until every stream whose input is finished is flushed (for files and tests)."""
        while any(s.is_ready for s in streams):
            self.step(streams)


def transcribe_streaming(
    model: AsrModel,
    audio: np.ndarray,
    decoder: DecoderKind | None = None,
    att_context_size: ContextSize | None = None,
    push_samples: int = 1600,
) -> Transcript:
    """Recognize a whole utterance through the streaming path, pushing ``push_samples`` at a time."""
    rec = Recognizer(model, att_context_size, decoder)
    stream = rec.create_stream()
    for i in range(0, len(audio), push_samples):
        stream.accept_waveform(audio[i : i + push_samples])
        while stream.is_ready:
            rec.step([stream])
    stream.input_finished()
    rec.run_to_end([stream])
    return stream.transcript()
