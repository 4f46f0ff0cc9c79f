"""Pretraining recipes: the typed contents of ``models/<name>/pretrain.yaml`` (``streamer pretrain``).

The same YAML system as :mod:`streamer.training.recipe` (unknown keys are errors with a hint, values keep
their YAML types, the run directory keeps the resolved copy as ``config.yaml``). The encoder, optimiser,
batching and training-loop sections are the TDT recipe's own classes, so an encoder pretrained from
``pretrain.yaml`` has exactly the shape ``recipe.yaml`` builds and loads through ``train.init_from``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from streamer.training.recipe import (
    BatchingConfig,
    ContextPair,
    EncoderSection,
    Number,
    OptimSection,
    RecipeSection,
    deep_merge,
    read_recipe_yaml,
    validate_sections,
)


class PretrainDataSection(RecipeSection):
    """Unlabelled audio: a folder of audio files, or a corpus split whose transcripts are ignored."""

    # A folder searched recursively for audio files (any format `streamer transcribe` reads)...
    audio_dir: str = ""
    # ... or a corpus made by `streamer corpus` (its int16 shards; the text is never read). Exactly one.
    corpus_dir: str = ""
    corpus_split: str = "train"
    extensions: list[str] = Field(default_factory=lambda: ["wav", "flac", "mp3", "ogg", "opus", "oga", "aiff", "au"])
    # Files longer than this are cut into consecutive pieces of at most this length; shorter tails are
    # kept when at least min_duration_s long.
    max_duration_s: Number = 20.0
    min_duration_s: Number = 1.0
    dev_clips: int = 64  # clips held out (by seed) for validation: masked-code loss and accuracy
    dither: Number = 1.0e-5
    workers: int = 1  # DataLoader worker processes (0: features in the training process)


class BestRqSection(RecipeSection):
    """The Best-RQ targets and masking (Chiu et al. 2022); see :mod:`streamer.training.bestrq` for the choices."""

    codebook_size: int = 8192  # codes per codebook (paper: 8192)
    code_dim: int = 16  # dimension of the random projection and the codes (paper: 16)
    num_codebooks: int = 1  # independent quantizers, one softmax head each; the loss averages them
    # Masking on the input log-mel: each frame starts a span with this probability (paper: 0.01) ...
    mask_start_prob: Number = 0.01
    mask_span_frames: int = 40  # ... of this many 10 ms frames (paper: 400 ms)
    mask_noise_std: Number = 0.1  # masked frames become N(0, std^2) in per-utterance normalised units (paper: 0.1)
    # An encoder frame (8 mel frames) counts as masked, and so carries loss, when this share of it is masked.
    min_masked_share: Number = 0.5


class PretrainModelSection(RecipeSection):
    """The network pretrained: the TDT recipe's encoder (its softmax head over codes is thrown away later)."""

    encoder: EncoderSection = Field(default_factory=EncoderSection)


class PretrainTrainSection(RecipeSection):
    """Where and how long pretraining runs, how often it logs, validates and saves (as ``train`` in a recipe)."""

    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    threads: int = 1
    bf16: bool = True
    fast_depthwise: bool = True  # streamer.training.speed: CPU speed-up of the front end
    input_normalization: bool = True  # the first conv trains on normalised log-mel (speed.InputNormalizedConv2d)
    residual_init_scale: Number = 1.0  # model_init.scale_residual_branches
    center_front_end: bool = False  # model_init.center_front_end
    max_steps: int = 100_000
    max_hours: Number = 0.0
    log_every_steps: int = 25
    val_every_steps: int = 500
    checkpoint_every_minutes: Number = 10.0
    # The look-ahead validation runs at (one of model.encoder.att_context_sizes).
    val_att_context_size: ContextPair = Field(default_factory=lambda: [70, 13])


class PretrainRecipe(RecipeSection):
    """Everything a Best-RQ pretraining run needs."""

    name: str = "pretrain"
    seed: int = 0
    data: PretrainDataSection = Field(default_factory=PretrainDataSection)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    bestrq: BestRqSection = Field(default_factory=BestRqSection)
    model: PretrainModelSection = Field(default_factory=PretrainModelSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    train: PretrainTrainSection = Field(default_factory=PretrainTrainSection)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain YAML-ready values (what ``config.yaml`` and checkpoints hold)."""
        return self.model_dump()

    def with_updates(self, changes: dict[str, Any]) -> PretrainRecipe:
        """This recipe with the keys of nested ``changes`` replaced, checked again."""
        return pretrain_recipe_from_dict(deep_merge(self.to_dict(), changes))

    @model_validator(mode="after")
    def _check(self) -> PretrainRecipe:
        """Reject combinations that cannot pretrain."""
        enc, data, rq = self.model.encoder, self.data, self.bestrq
        if enc.d_model % enc.n_heads:
            raise ValueError(f"model.encoder.d_model {enc.d_model} must be a multiple of n_heads {enc.n_heads}")
        if bool(data.audio_dir) == bool(data.corpus_dir):
            raise ValueError("pretraining needs exactly one of data.audio_dir (a folder) and data.corpus_dir")
        if self.train.val_att_context_size not in enc.att_context_sizes:
            raise ValueError(
                f"train.val_att_context_size {self.train.val_att_context_size} "
                "is not in model.encoder.att_context_sizes"
            )
        if not 0 < rq.mask_start_prob < 1 or rq.mask_span_frames < 1:
            raise ValueError("bestrq.mask_start_prob must lie in (0, 1) and bestrq.mask_span_frames be >= 1")
        if rq.codebook_size < 2 or rq.code_dim < 1 or rq.num_codebooks < 1:
            raise ValueError("bestrq needs codebook_size >= 2, code_dim >= 1 and num_codebooks >= 1")
        if not 0 < data.min_duration_s <= data.max_duration_s:
            raise ValueError("data.min_duration_s must be positive and at most data.max_duration_s")
        if self.optim.anneal_steps < 0 or self.optim.anneal_steps > self.train.max_steps:
            raise ValueError(f"optim.anneal_steps must lie between 0 and train.max_steps {self.train.max_steps}")
        return self


def load_pretrain_recipe(path: Path) -> PretrainRecipe:
    """Read and validate a pretraining recipe YAML file.

    Raises:
        ConfigError: the file is missing or not YAML, or a key or value is wrong (naming the file and the key).
    """
    return pretrain_recipe_from_dict(read_recipe_yaml(path), f"pretraining recipe {path}")


def pretrain_recipe_from_dict(data: Any, where: str = "") -> PretrainRecipe:
    """Validate a pretraining recipe given as nested mappings.

    Raises:
        ConfigError: naming every wrong key and why.
    """
    return validate_sections(PretrainRecipe, data, where)
