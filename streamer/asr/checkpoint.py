"""What a loaded model is: the `Checkpoint` every loader returns, and the tokenizer checks they share.

A `Checkpoint` holds the typed `ModelConfig`, the weights under NeMo's state-dict key names
(nemo-reference.md §9, Appendix B), the SentencePiece model and the raw NeMo config. The loaders
live next door: :mod:`~streamer.asr.nemofile` (``.nemo`` archives, reading and writing),
:mod:`~streamer.asr.hfformat` (Hugging Face directories) and :mod:`~streamer.asr.loader` (any of them,
by path, registry name or Hugging Face id); :mod:`~streamer.asr.shapes` checks the weights' shapes.

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import Tensor

from streamer.asr.config import ModelConfig
from streamer.errors import CheckpointError

FEATURE_BUFFER_KEYS = ("preprocessor.featurizer.window", "preprocessor.featurizer.fb")
EOU_PIECES = ("<EOU>", "<EOB>")  # NeMo's EOU_STRING / EOB_STRING (nemo-reference.md §11)


@dataclass
class Checkpoint:
    """A model read from disk, ready for a model builder.

    Attributes:
        config: the typed model configuration.
        state_dict: weights under NeMo's key names. HF checkpoints lack the feature buffers
            (`FEATURE_BUFFER_KEYS`); see `has_feature_buffers`.
        tokenizer_model: the serialized SentencePiece model, or None when the file had none.
        raw_config: the NeMo ``model_config.yaml`` as a dict (for HF checkpoints: one generated
            with `nemo_config_from`).
        source: where it came from (a path, a registry name or a Hugging Face id).
        sha256: hex digest of the weights file (the ``.nemo`` archive, or the safetensors files).
    """

    config: ModelConfig
    state_dict: dict[str, Tensor]
    tokenizer_model: bytes | None
    raw_config: dict[str, Any]
    source: str
    sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def has_feature_buffers(self) -> bool:
        """False when the mel filterbank and window must be computed (HF checkpoints do not store them)."""
        return all(key in self.state_dict for key in FEATURE_BUFFER_KEYS)


# ---------------------------------------------------------------------------------------------------
# Tokenizer checks


def sentencepiece_processor(tokenizer_model: bytes, source: str) -> Any:
    import sentencepiece  # noqa: PLC0415 - only loaders need it

    try:
        return sentencepiece.SentencePieceProcessor(model_proto=tokenizer_model)
    except (RuntimeError, OSError) as exc:
        raise CheckpointError(f"{source}: the tokenizer is not a SentencePiece model: {exc}") from exc


def eou_token_ids(tokenizer_model: bytes, source: str = "tokenizer") -> tuple[int, ...]:
    """Ids of the ``<EOU>``/``<EOB>`` pieces the tokenizer has (empty for models without them)."""
    sp = sentencepiece_processor(tokenizer_model, source)
    return tuple(sp.piece_to_id(p) for p in EOU_PIECES if sp.id_to_piece(sp.piece_to_id(p)) == p)


def with_tokenizer(config: ModelConfig, tokenizer_model: bytes | None, source: str) -> ModelConfig:
    """Check the vocabulary size against the tokenizer and fill in the EOU ids."""
    if tokenizer_model is None:
        return config
    size = sentencepiece_processor(tokenizer_model, source).get_piece_size()
    for head in (config.transducer, config.ctc):
        if head is not None and head.vocab_size != size:
            raise CheckpointError(
                f"{source}: the model has a vocabulary of {head.vocab_size} "
                f"but the tokenizer has {size} pieces"
            )
    return replace(config, eou_token_ids=eou_token_ids(tokenizer_model, source))


def sha256_of(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
