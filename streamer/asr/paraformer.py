"""Paraformer (Gao et al. 2022): a non-autoregressive recognizer, and its directory format on disk.

The network, in order:

* **encoder**: a full-context :class:`~streamer.asr.encoder.FastConformerEncoder` (non-causal front end and
  convolutions, attention over the whole utterance);
* **CIF predictor** (:class:`CifPredictor`): a 1-D convolution over the encoder frames and a sigmoid give one
  weight ``alpha_t`` in (0, 1) per frame; their sum is the predicted number of tokens;
* **continuous integrate-and-fire** (:func:`cif_weights`, :func:`integrate_and_fire`): the alphas are summed
  frame by frame and a token *fires* each time the sum crosses the threshold (1.0); the frame that crosses it
  gives the part of its weight up to the threshold to the token that fires and the rest to the next one. A
  token's acoustic embedding is the weighted sum of its frames. In training the alphas are scaled so that
  their sum is the target length (exactly ``U`` tokens fire); at inference a leftover of at least
  ``tail_min_weight`` at the end fires one last token;
* **NAR decoder** (:class:`NarDecoder`): pre-norm transformer decoder layers over the acoustic embeddings
  (with sinusoidal positions), attending to the encoder output, without a causal mask; a linear layer gives
  token logits, and greedy decoding is the argmax at every position. A token's time is the frame it fired at;
* **auxiliary CTC head** (``aux_ctc``, optional): a CTC layer on the encoder output, for training only. It gives
  the encoder an alignment signal of its own from the first step, as FunASR's Paraformer recipes do
  (``ctc_weight`` 0.3); decoding does not use it.

Training losses (in :mod:`streamer.training.step`): cross entropy of the decoder's logits, the quantity loss
``|sum(alpha) - U|`` and, with the head, CTC. The glancing language-model sampler of the paper is not built.

On disk a Paraformer model is a directory (what ``--model DIR`` loads)::

    paraformer.json     {"format": "streamer-paraformer", "version": 1, "config": {...}} (every size)
    model.safetensors   the weights (state-dict keys of :class:`ParaformerModel`)
    tokenizer.model     the SentencePiece model

Shape legend::

    B utterances   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   T encoder frames (80 ms)
    D encoder width   U tokens (fired or target)   V vocabulary (no blank)
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from streamer.asr import clocks
from streamer.asr.config import ContextSize, CTCConfig, EncoderConfig, FeatureConfig
from streamer.asr.ctc import ConvASRDecoder
from streamer.asr.encoder import FastConformerEncoder
from streamer.asr.features import Preprocessor
from streamer.asr.hypothesis import TokenSpan
from streamer.asr.tokenizer import Tokenizer
from streamer.errors import CheckpointError, ConfigError

FORMAT_NAME = "streamer-paraformer"
FORMAT_VERSION = 1
CONFIG_FILE = "paraformer.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"
DECODER_KIND = "paraformer"


@dataclass(frozen=True, slots=True)
class ParaformerConfig:
    """Every size of a Paraformer model. ``transducer``, ``ctc`` and ``eou_token_ids`` are there so the engine's
    code that reads a :class:`~streamer.asr.config.ModelConfig` reads this one too (it has neither head)."""

    features: FeatureConfig
    encoder: EncoderConfig
    vocab_size: int
    predictor_kernel: int = 3
    decoder_layers: int = 4
    decoder_heads: int = 4
    decoder_ff: int = 768
    dropout: float = 0.1
    threshold: float = 1.0
    tail_min_weight: float = 0.5
    aux_ctc: bool = False  # a CTC head on the encoder for the auxiliary training loss (files before it: none)
    transducer: None = None
    ctc: None = None
    eou_token_ids: tuple[int, ...] = ()
    model_class: str = "Paraformer"
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def frame_shift_s(self) -> float:
        """Seconds per encoder frame."""
        return clocks.encoder_frame_s(self.features.window_stride, self.encoder.subsampling_factor)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (what ``paraformer.json`` holds)."""
        skip = {"transducer", "ctc", "eou_token_ids", "model_class", "extra", "features", "encoder"}
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        out["features"] = dataclasses.asdict(self.features)
        out["encoder"] = dataclasses.asdict(self.encoder)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParaformerConfig:
        """The config of :meth:`to_dict`'s values (lists back to tuples).

        Raises:
            CheckpointError: a key is unknown or a value is missing.
        """
        try:
            enc = dict(data["encoder"])
            enc["att_context_sizes"] = tuple(tuple(c) for c in enc["att_context_sizes"])
            if enc.get("conv_context_size") is not None:
                enc["conv_context_size"] = tuple(enc["conv_context_size"])
            rest = {k: v for k, v in data.items() if k not in ("features", "encoder")}
            return cls(FeatureConfig(**data["features"]), EncoderConfig(**enc), **rest)
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"the Paraformer config is not one this version reads: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# Continuous integrate-and-fire


def cif_weights(alphas: Tensor, num_tokens: int, threshold: float = 1.0) -> Tensor:
    """The share of each frame's weight that goes to each token: (B, U, T) from alphas (B, T).

    With ``c_t`` the running sum of the alphas (in units of ``threshold``), token ``u`` (0-based) collects the
    part of frame ``t``'s interval ``[c_t - alpha_t, c_t)`` that lies in ``[u, u + 1)``: a frame inside one
    token's interval gives it all its weight, the frame that crosses ``u + 1`` splits its weight between
    token ``u`` and token ``u + 1``. Differentiable in the alphas.
    """
    scaled = alphas / threshold
    end = torch.cumsum(scaled, dim=1)  # (B, T)
    start = end - scaled
    u = torch.arange(num_tokens, device=alphas.device, dtype=alphas.dtype)[None, :, None]  # (1, U, 1)
    lo = torch.maximum(start[:, None, :], u)
    hi = torch.minimum(end[:, None, :], u + 1)
    return (hi - lo).clamp(min=0) * threshold


@dataclass(frozen=True)
class Fired:
    """Tokens fired by integrate-and-fire, a batch of them.

    Attributes:
        embeds: (B, U, D) acoustic embeddings, zero past each row's count.
        counts: (B,) tokens fired per row.
        frames: (B, U) the frame each token fired at (the frame whose weight completed it; the last valid
            frame for a tail token).
        leftover: (B,) weight integrated after the last full token (not fired unless it was a tail).
    """

    embeds: Tensor
    counts: Tensor
    frames: Tensor
    leftover: Tensor


def integrate_and_fire(
    hidden: Tensor,
    alphas: Tensor,
    lengths: Tensor,
    threshold: float = 1.0,
    tail_min_weight: float | Tensor | None = 0.5,
) -> Fired:
    """Fire tokens from encoder frames ``hidden`` (B, T, D) with weights ``alphas`` (B, T) (zero past ``lengths``).

    Args:
        hidden: frames to integrate.
        alphas: their weights.
        lengths: (B,) valid frames per row.
        threshold: the integrated weight at which a token fires.
        tail_min_weight: a leftover of at least this (in units of ``threshold``) at the end fires one more
            token; None: never (a chunk in the middle of a stream keeps its leftover); a (B,) tensor: per row
            (``inf`` for none).
    """
    b, t = alphas.shape
    valid = torch.arange(t, device=alphas.device)[None, :] < lengths[:, None]
    alphas = alphas.masked_fill(~valid, 0.0)
    total = alphas.sum(1) / threshold  # (B,)
    full = torch.floor(total + 1e-4).clamp(min=0)
    counts = full.long()
    leftover = (total - full).clamp(min=0)
    if tail_min_weight is not None:
        counts = counts + (leftover >= tail_min_weight).long()
    u = int(counts.max()) if b else 0
    weights = cif_weights(alphas, u, threshold)  # (B, U, T)
    embeds = torch.bmm(weights.to(hidden.dtype), hidden)  # (B, U, D)
    keep = torch.arange(u, device=alphas.device)[None, :] < counts[:, None]  # (B, U)
    embeds = embeds * keep[..., None]
    ends = torch.cumsum(alphas, dim=1) / threshold  # (B, T)
    marks = torch.arange(1, u + 1, device=alphas.device, dtype=alphas.dtype)[None, :, None] - 1e-4
    frames = (ends[:, None, :] < marks).sum(-1)  # (B, U): frames before the crossing one
    frames = torch.minimum(frames, (lengths - 1).clamp(min=0)[:, None]) * keep
    return Fired(embeds, counts, frames, leftover)


# --------------------------------------------------------------------------------------------------
# Modules


class CifPredictor(nn.Module):
    """``alpha_t = sigmoid(linear(relu(conv1d(h)_t + h_t)))``: one weight per encoder frame (B, T, D) -> (B, T)."""

    def __init__(self, d_model: int, kernel: int) -> None:
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ConfigError(f"the CIF predictor's kernel must be odd and positive, got {kernel}")
        self.conv = nn.Conv1d(d_model, d_model, kernel, padding=kernel // 2)
        self.out = nn.Linear(d_model, 1)

    def forward(self, enc: Tensor, enc_len: Tensor) -> Tensor:
        valid = torch.arange(enc.size(1), device=enc.device)[None, :] < enc_len[:, None]  # (B, T)
        h = enc * valid[..., None]
        x = torch.relu(self.conv(h.transpose(1, 2)).transpose(1, 2) + h)
        return torch.sigmoid(self.out(x).squeeze(-1)).masked_fill(~valid, 0.0)


def sinusoid_positions(length: int, width: int, device: torch.device) -> Tensor:
    """(length, width) sine/cosine absolute positions (Vaswani et al.)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, width, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: width // 2])
    return table


class NarDecoder(nn.Module):
    """Non-autoregressive decoder: acoustic embeddings (B, U, D) attending to the encoder output -> logits (B, U, V)."""

    def __init__(self, cfg: ParaformerConfig) -> None:
        super().__init__()
        d = cfg.encoder.d_model
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(d, cfg.decoder_heads, cfg.decoder_ff, cfg.dropout, batch_first=True,
                                       norm_first=True)
            for _ in range(cfg.decoder_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, cfg.vocab_size)

    def forward(self, embeds: Tensor, lengths: Tensor, enc: Tensor, enc_len: Tensor) -> Tensor:
        u, t = embeds.size(1), enc.size(1)
        x = embeds + sinusoid_positions(u, embeds.size(2), embeds.device).to(embeds.dtype)
        tgt_pad = torch.arange(u, device=x.device)[None, :] >= lengths.clamp(min=1)[:, None]  # (B, U)
        mem_pad = torch.arange(t, device=x.device)[None, :] >= enc_len.clamp(min=1)[:, None]  # (B, T)
        for layer in self.layers:
            x = layer(x, enc, tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=mem_pad)
        return self.out(self.norm(x))


@dataclass(frozen=True)
class ParaformerOutput:
    """A training forward pass: logits (B, U, V) at the target positions, the predicted lengths (B,) (the
    unscaled sums of the alphas), the encoder's lengths (B,) and, with the auxiliary head, its CTC
    log-probabilities (B, T, V + 1; blank last)."""

    logits: Tensor
    alpha_sums: Tensor
    enc_len: Tensor
    ctc_log_probs: Tensor | None = None


class ParaformerModel(nn.Module):
    """Encoder, CIF predictor and NAR decoder, with the tokenizer; the interface the engine uses of a model.

    Args:
        config: every size.
        tokenizer: the SentencePiece tokenizer (None: decode to ids only).
    """

    decoder_kinds: tuple[str, ...] = (DECODER_KIND,)

    def __init__(self, config: ParaformerConfig, tokenizer: Tokenizer | None = None) -> None:
        super().__init__()
        if config.encoder.d_model % config.decoder_heads:
            raise ConfigError(f"the decoder's heads ({config.decoder_heads}) must divide d_model "
                              f"({config.encoder.d_model})")
        self.config, self.tokenizer = config, tokenizer
        self.preprocessor = Preprocessor(config.features)
        self.encoder = FastConformerEncoder(config.encoder)
        self.predictor = CifPredictor(config.encoder.d_model, config.predictor_kernel)
        self.decoder = NarDecoder(config)
        self.aux_ctc = (
            ConvASRDecoder(CTCConfig(config.vocab_size, config.encoder.d_model)) if config.aux_ctc else None
        )

    # ------------------------------------------------------------------ what the engine asks of a model

    def check_decoder(self, kind: str | None) -> str:
        """The only decoder is greedy NAR decoding ("paraformer").

        Raises:
            ConfigError: another decoder was asked for.
        """
        if kind not in (None, DECODER_KIND):
            raise ConfigError(f"decoder {kind!r} is not available for a Paraformer model; it decodes with its own "
                              "non-autoregressive decoder (leave model.decoder unset)")
        return DECODER_KIND

    def check_context(self, att_context_size: ContextSize | None) -> ContextSize:
        """The encoder's attention context (full context unless switched to local attention)."""
        return self.encoder.check_context(att_context_size)

    def change_attention(self, self_attention_model: str, window: ContextSize | None = None) -> None:
        """Switch the encoder's attention (:meth:`FastConformerEncoder.change_attention`)."""
        self.encoder.change_attention(self_attention_model, window)
        self.config = dataclasses.replace(self.config, encoder=self.encoder.cfg)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def to_device(self, device: str | torch.device) -> ParaformerModel:
        return self.to(torch.device(device))

    # ------------------------------------------------------------------ training and decoding

    def forward(self, mel: Tensor, mel_len: Tensor, target_lengths: Tensor) -> ParaformerOutput:
        """Logits at the target positions: the alphas scaled so each row fires exactly its target length."""
        enc, enc_len = self.encoder(mel, mel_len)  # (B, T, D)
        alphas = self.predictor(enc, enc_len)  # (B, T)
        sums = alphas.sum(1)
        scaled = alphas * (target_lengths.to(alphas.dtype) / sums.clamp(min=1e-4))[:, None]
        u = int(target_lengths.max())
        weights = cif_weights(scaled.float(), u, self.config.threshold)  # (B, U, T)
        embeds = torch.bmm(weights.to(enc.dtype), enc)  # (B, U, D)
        logits = self.decoder(embeds, target_lengths, enc, enc_len)
        ctc = self.aux_ctc(enc.float()) if self.aux_ctc is not None else None
        return ParaformerOutput(logits, sums, enc_len, ctc)

    def fire(self, enc: Tensor, enc_len: Tensor, tail: bool = True) -> Fired:
        """Integrate-and-fire over encoder output (B, T, D) with this model's predictor."""
        alphas = self.predictor(enc, enc_len).float()
        return integrate_and_fire(enc, alphas, enc_len, self.config.threshold,
                                  self.config.tail_min_weight if tail else None)

    def decode_fired(self, fired: Fired, enc: Tensor, enc_len: Tensor, frame_offsets: list[int]) -> list[TokenSpan]:
        """Greedy tokens of fired embeddings: the argmax at every position, its softmax probability as the
        confidence, its fire frame (plus the row's ``frame_offsets``) as its time."""
        if fired.embeds.size(1) == 0:
            return [TokenSpan() for _ in frame_offsets]
        logits = self.decoder(fired.embeds.to(enc.dtype), fired.counts, enc, enc_len).float()
        logp = torch.log_softmax(logits, dim=-1)
        best, ids = logp.max(-1)  # (B, U)
        spans = []
        for row, offset in enumerate(frame_offsets):
            n = int(fired.counts[row])
            spans.append(TokenSpan(
                tuple(ids[row, :n].tolist()),
                tuple(offset + f for f in fired.frames[row, :n].tolist()),
                (1,) * n,
                tuple(best[row, :n].exp().tolist()),
                tuple(best[row, :n].tolist()),
            ))
        return spans

    def decode(self, mel: Tensor, mel_len: Tensor) -> list[TokenSpan]:
        """Greedy decoding of a batch of features (B, F, M): tokens with their fire frames."""
        enc, enc_len = self.encoder(mel, mel_len)
        return self.decode_fired(self.fire(enc.float(), enc_len), enc.float(), enc_len, [0] * enc.size(0))

    # ------------------------------------------------------------------ on disk

    def save(self, directory: str | Path) -> None:
        """Write the model directory (see the module docstring); the files are replaced if there."""
        from safetensors.torch import save_file  # noqa: PLC0415

        if self.tokenizer is None:
            raise CheckpointError("a model without a tokenizer cannot be saved")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        save_file(state, str(out / WEIGHTS_FILE))
        (out / TOKENIZER_FILE).write_bytes(self.tokenizer.model_bytes)
        record = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": self.config.to_dict()}
        (out / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> ParaformerModel:
        """Read a model directory written by :meth:`save` (eval mode).

        Raises:
            CheckpointError: a file is missing, of another format or version, or the weights do not fit.
        """
        from safetensors.torch import load_file  # noqa: PLC0415

        path = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
            if not (path / name).is_file():
                raise CheckpointError(f"{path}: no {name}; a Paraformer model directory holds {CONFIG_FILE}, "
                                      f"{WEIGHTS_FILE} and {TOKENIZER_FILE}")
        try:
            record = json.loads((path / CONFIG_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path / CONFIG_FILE} is not JSON: {exc}") from exc
        if record.get("format") != FORMAT_NAME or record.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"{path / CONFIG_FILE}: format {record.get('format')!r} version "
                                  f"{record.get('version')!r}, expected {FORMAT_NAME!r} version {FORMAT_VERSION}")
        tokenizer = Tokenizer.from_bytes((path / TOKENIZER_FILE).read_bytes(), str(path / TOKENIZER_FILE))
        config = ParaformerConfig.from_dict(record["config"])
        if config.vocab_size != tokenizer.vocab_size:
            raise CheckpointError(f"{path}: the model has a vocabulary of {config.vocab_size} but the tokenizer "
                                  f"has {tokenizer.vocab_size} pieces")
        model = cls(config, tokenizer)
        try:
            model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path / WEIGHTS_FILE}: the weights do not fit the config: {exc}") from exc
        return model.eval()


def is_paraformer_dir(spec: str | Path) -> bool:
    """Whether ``spec`` is a directory holding a Paraformer model (its ``paraformer.json``)."""
    path = Path(spec)
    return path.is_dir() and (path / CONFIG_FILE).is_file()
