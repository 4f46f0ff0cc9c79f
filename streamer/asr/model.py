"""The whole recognizer model: the module tree of :mod:`streamer.asr.network` plus its tokenizer.

Attribute names equal NeMo's, so a checkpoint's state dict loads with ``strict=True`` as it is.

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import torch
from torch import Tensor

from streamer.asr.checkpoint import FEATURE_BUFFER_KEYS, Checkpoint
from streamer.asr.config import ContextSize, ModelConfig
from streamer.asr.ctc import GreedyCTCDecoder
from streamer.asr.loader import load_checkpoint
from streamer.asr.nemofile import save_nemo
from streamer.asr.network import AsrNetwork
from streamer.asr.tokenizer import Tokenizer
from streamer.asr.transducer import GreedyTransducerDecoder
from streamer.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

DecoderKind = Literal["tdt", "rnnt", "ctc"]


class AsrModel(AsrNetwork):
    """A FastConformer recognizer (the modules of :class:`AsrNetwork`) with its tokenizer, loading and decoding."""

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer | None = None) -> None:
        super().__init__(config)
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> AsrModel:
        """Build the model a checkpoint describes and load its weights (strict)."""
        tokenizer = Tokenizer.from_bytes(ckpt.tokenizer_model) if ckpt.tokenizer_model else None
        model = cls(ckpt.config, tokenizer)
        state = dict(ckpt.state_dict)
        own = model.state_dict()
        # Hugging Face checkpoints carry no window/filterbank: keep the ones we computed.
        for key in FEATURE_BUFFER_KEYS:
            state.setdefault(key, own[key])
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            detail = []
            if missing:
                detail.append(f"missing {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
            if unexpected:
                detail.append(
                    f"unexpected {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else "")
                )
            raise CheckpointError(f"{ckpt.source}: weights do not fit the model config ({'; '.join(detail)})")
        return model.eval()

    @classmethod
    def load(cls, spec: str) -> AsrModel:
        """Load from a .nemo file, a Hugging Face directory, a registry name or a Hugging Face id."""
        return cls.from_checkpoint(load_checkpoint(spec))

    # ------------------------------------------------------------------ decoding heads

    @property
    def decoder_kinds(self) -> tuple[DecoderKind, ...]:
        """Decoders this model supports, the default first."""
        kinds: list[DecoderKind] = []
        if self.config.transducer is not None:
            kinds.append("tdt" if self.config.transducer.is_tdt else "rnnt")
        if self.config.ctc is not None:
            kinds.append("ctc")
        return tuple(kinds)

    def check_decoder(self, kind: str | None) -> DecoderKind:
        """Validate a requested decoder kind (None = the model's default)."""
        kinds = self.decoder_kinds
        if kind is None:
            return kinds[0]
        if kind not in kinds:
            raise ConfigError(
                f"decoder {kind!r} is not available for this model; it has: {', '.join(kinds)}"
            )
        return kind  # type: ignore[return-value]

    def greedy_decoder(self, kind: DecoderKind) -> GreedyTransducerDecoder | GreedyCTCDecoder:
        """A greedy decoder object for ``kind`` (a light wrapper around this model's modules)."""
        if kind == "ctc":
            assert self.config.ctc is not None
            return GreedyCTCDecoder(self.config.ctc)
        assert self.config.transducer is not None and self.joint is not None
        return GreedyTransducerDecoder(self.decoder, self.joint)  # type: ignore[arg-type]

    def ctc_log_probs(self, enc: Tensor) -> Tensor:
        """CTC log-probabilities [B, T, V+1] of encoder output [B, T, D]."""
        head = self.ctc_decoder if self.ctc_decoder is not None else self.decoder
        return head(enc)

    def check_context(self, att_context_size: ContextSize | None) -> ContextSize:
        """Validate a look-ahead choice (None = the model's default)."""
        return self.encoder.check_context(att_context_size)

    def change_attention(self, self_attention_model: str, window: ContextSize | None = None) -> None:
        """Switch the encoder's attention (see :meth:`FastConformerEncoder.change_attention`); the model's
        config follows, so :meth:`save` writes the switched model."""
        self.encoder.change_attention(self_attention_model, window)
        self.config = dataclasses.replace(self.config, encoder=self.encoder.cfg)

    def to_checkpoint(self, source: str = "") -> Checkpoint:
        """This model's config, weights and tokenizer as a :class:`Checkpoint` (CPU tensors)."""
        if self.tokenizer is None:
            raise CheckpointError("a model without a tokenizer cannot be saved")
        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        return Checkpoint(self.config, state, self.tokenizer.model_bytes, {}, source)

    def save(self, path: str) -> None:
        """Write a ``.nemo`` archive that NeMo 3.0.0 and :meth:`load` both read."""
        save_nemo(path, self.to_checkpoint(str(path)), regenerate_config=True)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def to_device(self, device: str | torch.device) -> AsrModel:
        return self.to(torch.device(device))
