"""The whole recognizer model: front end, encoder, transducer and/or CTC heads, tokenizer.

Attribute names equal NeMo's, so a checkpoint's state dict loads with ``strict=True`` as it is.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor, nn

from streamer.asr.checkpoint import Checkpoint, load_checkpoint, save_nemo
from streamer.asr.config import ContextSize, ModelConfig
from streamer.asr.ctc import ConvASRDecoder, GreedyCTCDecoder
from streamer.asr.encoder import FastConformerEncoder
from streamer.asr.features import Preprocessor
from streamer.asr.tokenizer import Tokenizer
from streamer.asr.transducer import GreedyTransducerDecoder, RNNTDecoder, RNNTJoint
from streamer.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

DecoderKind = Literal["tdt", "rnnt", "ctc"]


class AsrModel(nn.Module):
    """A FastConformer recognizer with a TDT/RNNT transducer head, a CTC head, or both (hybrid)."""

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer | None = None) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.preprocessor = Preprocessor(config.features)
        self.encoder = FastConformerEncoder(config.encoder)
        self.joint: RNNTJoint | None = None
        self.ctc_decoder: ConvASRDecoder | None = None
        if config.transducer is not None:
            self.decoder: nn.Module = RNNTDecoder(config.transducer)
            self.joint = RNNTJoint(config.transducer, config.encoder.d_model)
        if config.ctc is not None:
            ctc = ConvASRDecoder(config.ctc)
            if config.ctc.key_prefix == "decoder":
                self.decoder = ctc
            else:
                self.ctc_decoder = ctc
        if config.transducer is None and config.ctc is None:
            raise ConfigError("a model needs a transducer or a CTC head")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> AsrModel:
        """Build the model a checkpoint describes and load its weights (strict)."""
        tokenizer = Tokenizer.from_bytes(ckpt.tokenizer_model) if ckpt.tokenizer_model else None
        model = cls(ckpt.config, tokenizer)
        state = dict(ckpt.state_dict)
        own = model.state_dict()
        # Hugging Face checkpoints carry no window/filterbank: keep the ones we computed.
        for key in ("preprocessor.featurizer.window", "preprocessor.featurizer.fb"):
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
