"""Training recipes: the typed contents of ``models/<name>/recipe.yaml`` and the model they describe.

A recipe is a YAML file with the sections below, each a pydantic model like the daemon's settings
(:mod:`streamer.settings_models`): every key has a default here, unknown keys are an error (with a "did you
mean" hint), values keep the type YAML gives them (``3`` is no string, ``"3"`` no number; only numbers
written ``3e-4``, which YAML 1.1 reads as strings, are taken as numbers), and the run directory keeps the
resolved copy as ``config.yaml``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from streamer.asr.config import CTCConfig, EncoderConfig, FeatureConfig, ModelConfig, TransducerConfig
from streamer.asr.paraformer import ParaformerConfig
from streamer.errors import ConfigError


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads ``3e-4`` (no dot) as a string; a number field takes it as the number it spells."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value  # the field's own check then says it must be a number
    return value


Number = Annotated[float, BeforeValidator(_yaml_number)]
ContextPair = Annotated[list[int], Field(min_length=2, max_length=2)]  # [left, right] encoder frames


class RecipeSection(BaseModel):
    """A section of a recipe: unknown keys are errors, values are not coerced, an empty section is its defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_are_defaults(cls, data: Any) -> Any:
        """``data:`` with nothing under it is None in YAML; it means the section's defaults, as an absent one does."""
        if not isinstance(data, dict):
            return data
        return {key: value for key, value in data.items() if not (value is None and _section_type(cls, key))}


SectionT = TypeVar("SectionT", bound=RecipeSection)


def _section_type(cls: type[BaseModel], key: str) -> type[RecipeSection] | None:
    """The section class of ``cls``'s field ``key``, or None where that field is a value (or no field)."""
    info = cls.model_fields.get(key)
    kind = info.annotation if info is not None else None
    return kind if isinstance(kind, type) and issubclass(kind, RecipeSection) else None


class SpecAugmentConfig(RecipeSection):
    """NeMo ``SpecAugment`` settings; zero masks disable it."""

    freq_masks: int = 2
    freq_width: int = 27
    time_masks: int = 5
    time_width: Number = 0.05  # < 1: fraction of each utterance's length; >= 1: frames
    mask_value: Number = 0.0
    start_step: int = 0  # optimizer steps trained without it first (learning starts faster)


class BatchingConfig(RecipeSection):
    """How utterances are grouped into batches."""

    max_batch_mel_frames: int = 12000  # padded frames: batch size x longest utterance
    max_batch_utterances: int = 64
    curriculum_epochs: int = 1  # epochs that run batches from shortest to longest
    length_jitter: Number = 0.1  # relative noise on the sort key, so batches differ between epochs


class ExtraTrainSection(RecipeSection):
    """A second corpus whose training utterances join the main corpus's (``data.extra_train``)."""

    corpus_dir: str  # relative paths are relative to the working directory
    split: str = "train"
    hours: Number = 0.0  # > 0: its first this many hours


class DataSection(RecipeSection):
    """Where the corpus is and which utterances are used."""

    corpus_dir: str = "data/corpus-v1"  # relative paths are relative to the working directory
    tokenizer: str = ""  # default: <corpus_dir>/tokenizer.model
    train_split: str = "train"
    dev_split: str = "dev"
    dev_utterances: int = 200  # validation subset (the first N of the dev manifest)
    train_hours: Number = 0.0  # > 0: train on the first this many hours of the train manifest (a labelled subset)
    # More training utterances from other corpora, e.g. a rehearsal of the corpus a continued model was first
    # trained on: [{corpus_dir: data/corpus-v1-replay, hours: 8}]. Their text goes through the same tokenizer;
    # validation stays on corpus_dir's dev split.
    extra_train: list[ExtraTrainSection] = Field(default_factory=list)
    min_duration_s: Number = 0.3
    max_duration_s: Number = 20.0
    dither: Number = 1.0e-5  # NeMo's training dither, added to the waveform
    workers: int = 1  # DataLoader worker processes (0: features in the training process)

    @property
    def tokenizer_path(self) -> Path:
        return Path(self.tokenizer) if self.tokenizer else Path(self.corpus_dir) / "tokenizer.model"


class EncoderSection(RecipeSection):
    """A causal, cache-aware FastConformer (NeMo ``ConformerEncoder``, dw_striding 8x, rel_pos)."""

    n_layers: int = 8
    d_model: int = 192
    n_heads: int = 4
    ff_expansion_factor: int = 4
    subsampling_conv_channels: int = 64
    conv_kernel_size: int = 9
    conv_norm_type: str = "layer_norm"
    # Look-aheads trained (one sampled per batch, as NeMo does); the first is the default at inference.
    att_context_sizes: list[ContextPair] = Field(default_factory=lambda: [[70, 13], [70, 6], [70, 1], [70, 0]])
    # Sampling weights of att_context_sizes (NeMo samples uniformly).
    att_context_probs: list[Number] = Field(default_factory=list)


class TransducerSection(RecipeSection):
    """Prediction network, joint and TDT durations (empty durations: plain RNNT)."""

    pred_hidden: int = 320
    pred_rnn_layers: int = 1
    joint_hidden: int = 320
    durations: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])


class ParaformerSection(RecipeSection):
    """The CIF predictor and the non-autoregressive decoder of a Paraformer (:mod:`streamer.asr.paraformer`)."""

    predictor_kernel: int = 3  # the predictor's conv over encoder frames (odd)
    decoder_layers: int = 4
    decoder_heads: int = 4
    decoder_ff: int = 768
    dropout: Number = 0.1  # in the decoder layers
    tail_min_weight: Number = 0.5  # at inference, a leftover weight this large at the end fires one more token


class ModelSection(RecipeSection):
    """The network: ``type: tdt`` (the default) is the encoder with a transducer head and the optional CTC head;
    ``type: paraformer`` is a full-context encoder with a CIF predictor and a NAR decoder (``paraformer``).
    Each type reads its own head's section and ignores the other's."""

    type: Literal["tdt", "paraformer"] = "tdt"
    encoder: EncoderSection = Field(default_factory=EncoderSection)
    transducer: TransducerSection = Field(default_factory=TransducerSection)
    # an auxiliary CTC head on the encoder, weighted by loss.ctc_weight: a NeMo hybrid model's for tdt (decodable);
    # a Paraformer's for training only (FunASR's recipes weight it 0.3)
    ctc_head: bool = True
    paraformer: ParaformerSection = Field(default_factory=ParaformerSection)


class LossSection(RecipeSection):
    """The TDT loss (with its RNNT draw) and the weight of the CTC loss; a Paraformer's cross entropy and
    quantity loss."""

    sigma: Number = 0.02  # TDT logit under-normalisation
    omega: Number = 0.1  # probability of a plain-RNNT batch
    ctc_weight: Number = 0.3  # NeMo hybrid: (1 - w) * transducer + w * ctc; Paraformer: (1 - w) * ce + w * ctc
    # NeMo's reductions; mean_volume: per target token over the batch (NeMo's default is mean_batch).
    reduction: Literal["mean_batch", "mean", "mean_volume", "sum"] = "mean_volume"
    # Paraformer: the decoder's cross entropy per target token (and CTC, above) + quantity_weight * mean
    # |sum(alpha) - U| per utterance.
    quantity_weight: Number = 1.0
    label_smoothing: Number = 0.1


class OptimSection(RecipeSection):
    """AdamW and its learning-rate schedule (:mod:`streamer.training.optim`)."""

    lr: Number = 1.0e-3  # peak learning rate, reached after warmup_steps
    betas: Annotated[list[Number], Field(min_length=2, max_length=2)] = Field(default_factory=lambda: [0.9, 0.98])
    eps: Number = 1.0e-8
    weight_decay: Number = 1.0e-3
    # noam: lr * sqrt(warmup / step) after warmup; cosine: to min_lr at max_steps.
    schedule: Literal["noam", "cosine"] = "noam"
    warmup_steps: int = 500
    min_lr: Number = 1.0e-5
    grad_clip: Number = 1.0  # max global gradient norm; 0 disables
    rewarmup_steps: int = 200  # after a warm start (train.init_from): ramp the scheduled lr up again from 0
    # Cooldown: over the last anneal_steps before train.max_steps, scale the scheduled lr linearly down to
    # min_lr (0 = none). Set max_steps to where this stretch of training should end.
    anneal_steps: int = 0


class TrainSection(RecipeSection):
    """Where and how long the run trains, how often it logs, validates and saves, and how it starts."""

    # Where the network trains: "auto" (the GPU if torch sees one, else the CPU), "cpu", "cuda" or "cuda:N".
    # Features, batching and SpecAugment stay on the CPU in the data worker(s) either way.
    device: str = "auto"
    threads: int = 1  # torch intra-op threads of the training process
    # bfloat16 autocast for matmuls and convs (AMX/AVX-512 CPUs: ~2x; GPUs); losses in fp32. Where the device
    # has no native bfloat16 (an AVX2-only CPU, where oneDNN's LSTM refuses it) the run says so and trains in
    # float32 (streamer.training.step.bf16_supported).
    bf16: bool = True
    # Training-only depthwise conv of the subsampling (streamer.training.speed); a CPU speed-up, not used on a GPU.
    fast_depthwise: bool = True
    # Train the first conv as if its input were normalised with the corpus mean and std of the log-mel
    # features (streamer.training.speed.InputNormalizedConv2d); the saved model is unchanged in form.
    input_normalization: bool = True
    # Initial scale of each encoder block's residual-branch output projections (model_init.scale_residual_branches):
    # below 1 every block starts near the identity, so the gradient reaches the first blocks.
    residual_init_scale: Number = 1.0
    # Initialise the subsampling's output projection on the corpus so its output is centred and unit-scale
    # (model_init.center_front_end): without it the encoder starts nearly blind to the audio.
    center_front_end: bool = False
    max_steps: int = 1_000_000
    max_hours: Number = 0.0  # wall-clock limit of one invocation; 0 = none
    log_every_steps: int = 25
    val_every_steps: int = 500
    checkpoint_every_minutes: Number = 10.0
    # Warm start: a .nemo exported by `streamer export` (or any run checkpoint .pt) whose weights and
    # tokenizer start this run; its training.json (written beside it by export) carries the step count on.
    # Or a `streamer pretrain` checkpoint: only its encoder loads (same model.encoder), from step 0.
    init_from: str = ""
    # Look-aheads decoded at validation; the first decides best.pt.
    val_att_context_sizes: list[ContextPair] = Field(default_factory=lambda: [[70, 13], [70, 0]])


class Recipe(RecipeSection):
    """Everything a training run needs."""

    name: str = "model"
    seed: int = 0
    data: DataSection = Field(default_factory=DataSection)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    spec_augment: SpecAugmentConfig = Field(default_factory=SpecAugmentConfig)
    model: ModelSection = Field(default_factory=ModelSection)
    loss: LossSection = Field(default_factory=LossSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain YAML-ready values (what ``config.yaml`` and checkpoints hold)."""
        return self.model_dump()

    def with_updates(self, changes: dict[str, Any]) -> Recipe:
        """This recipe with the keys of nested ``changes`` replaced (``{"train": {"bf16": False}}``), checked again."""
        return recipe_from_dict(deep_merge(self.to_dict(), changes))

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        """Reject combinations that cannot train or cannot stream."""
        enc = self.model.encoder
        if enc.d_model % enc.n_heads:
            raise ValueError(f"model.encoder.d_model {enc.d_model} must be a multiple of n_heads {enc.n_heads}")
        if self.model.type == "paraformer":
            return self._check_paraformer()
        for left, right in enc.att_context_sizes:
            if left % (right + 1):
                raise ValueError(f"att_context_size [{left},{right}]: left must be a multiple of right + 1")
        if enc.att_context_probs and len(enc.att_context_probs) != len(enc.att_context_sizes):
            raise ValueError("model.encoder.att_context_probs needs one weight per att_context_sizes entry")
        for ctx in self.train.val_att_context_sizes:
            if ctx not in enc.att_context_sizes:
                raise ValueError(f"train.val_att_context_sizes {ctx} is not in model.encoder.att_context_sizes")
        if self.optim.anneal_steps < 0 or self.optim.anneal_steps > self.train.max_steps:
            raise ValueError(
                f"optim.anneal_steps {self.optim.anneal_steps} must lie between 0 and train.max_steps "
                f"{self.train.max_steps}: the cooldown ends at max_steps"
            )
        return self

    def _check_paraformer(self) -> Recipe:
        """A Paraformer's encoder is full context: the look-ahead keys do not apply to it."""
        head, d_model = self.model.paraformer, self.model.encoder.d_model
        if d_model % head.decoder_heads:
            raise ValueError(f"model.paraformer.decoder_heads {head.decoder_heads} must divide model.encoder.d_model "
                             f"{d_model}")
        if head.predictor_kernel < 1 or head.predictor_kernel % 2 == 0:
            raise ValueError(f"model.paraformer.predictor_kernel must be odd and positive, got {head.predictor_kernel}")
        if self.optim.anneal_steps < 0 or self.optim.anneal_steps > self.train.max_steps:
            raise ValueError(f"optim.anneal_steps {self.optim.anneal_steps} must lie between 0 and train.max_steps "
                             f"{self.train.max_steps}: the cooldown ends at max_steps")
        return self


# --------------------------------------------------------------------------------------------------
# Parsing


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe YAML file.

    Raises:
        ConfigError: the file is missing or not YAML, or a key or value is wrong (naming the file and the key).
    """
    return recipe_from_dict(read_recipe_yaml(path), f"recipe {path}")


def recipe_from_dict(data: Any, where: str = "") -> Recipe:
    """Validate a recipe given as nested mappings (a parsed YAML file, a checkpoint's copy, overrides merged in).

    Args:
        data: the recipe's sections.
        where: where ``data`` came from, put before each problem ("recipe models/x/recipe.yaml").

    Raises:
        ConfigError: naming every wrong key and why, one after the other.
    """
    return validate_sections(Recipe, data, where)


def validate_sections(root: type[SectionT], data: Any, where: str = "") -> SectionT:
    """Validate ``data`` as the recipe class ``root`` (a training or a pretraining recipe), errors in our words.

    Raises:
        ConfigError: naming every wrong key and why, one after the other.
    """
    try:
        return root.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(err, root) for err in exc.errors())
        raise ConfigError(f"{where}: {problems}" if where else problems) from exc


def read_recipe_yaml(path: Path) -> Any:
    """The parsed YAML of a recipe file.

    Raises:
        ConfigError: the file is missing or not YAML.
    """
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from exc


_MUST_BE = {
    "float_type": "a number",
    "float_parsing": "a number",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
}


def _describe(err: Any, root: type[BaseModel] = Recipe) -> str:
    """One validation error in the recipe's own words: the dotted key, what it must be, what it got."""
    loc = tuple(err["loc"])
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _section_at(loc[:-1], root)
        names = list(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(str(loc[-1]), names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(names)})"
        return f"unknown recipe key '{path}'{hint}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        what = f"recipe section '{path}'" if path else "a recipe"
        return f"{what} must be a mapping of keys to values, got {type(err['input']).__name__}"
    if kind in _MUST_BE:
        return f"recipe key '{path}' must be {_MUST_BE[kind]}, got {err['input']!r}"
    if kind == "value_error" and not loc:  # a check across keys (Recipe._check) names its own keys
        return str(err["ctx"]["error"])
    return f"recipe key '{path}': {err['msg']}, got {err['input']!r}"


def _section_at(loc: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    """The section class that ``loc`` (a path of keys from ``root``) names, if it names one."""
    cls: type[BaseModel] | None = root
    for key in loc:
        cls = _section_type(cls, str(key)) if cls is not None else None
    return cls


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra``'s keys replaced, nested mappings merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# --------------------------------------------------------------------------------------------------
# The model


def paraformer_config(recipe: Recipe, vocab_size: int) -> ParaformerConfig:
    """The :class:`ParaformerConfig` of a ``model.type: paraformer`` recipe: a full-context FastConformer (non-causal
    dw_striding 8x, symmetric convs, attention over the whole utterance) with the recipe's head sizes."""
    enc, head = recipe.model.encoder, recipe.model.paraformer
    encoder = EncoderConfig(
        feat_in=80,
        n_layers=enc.n_layers,
        d_model=enc.d_model,
        n_heads=enc.n_heads,
        ff_expansion_factor=enc.ff_expansion_factor,
        subsampling_factor=8,
        subsampling_conv_channels=enc.subsampling_conv_channels,
        causal_downsampling=False,
        att_context_sizes=((-1, -1),),
        att_context_style="regular",
        conv_kernel_size=enc.conv_kernel_size,
        conv_norm_type=enc.conv_norm_type,
        conv_context_size=None,  # symmetric
    )
    return ParaformerConfig(
        features=FeatureConfig(normalize="NA"),
        encoder=encoder,
        vocab_size=vocab_size,
        predictor_kernel=head.predictor_kernel,
        decoder_layers=head.decoder_layers,
        decoder_heads=head.decoder_heads,
        decoder_ff=head.decoder_ff,
        dropout=head.dropout,
        tail_min_weight=head.tail_min_weight,
        aux_ctc=recipe.model.ctc_head and recipe.loss.ctc_weight > 0,
    )


def any_model_config(recipe: Recipe, vocab_size: int) -> ModelConfig | ParaformerConfig:
    """The config of a recipe's model of either type."""
    if recipe.model.type == "paraformer":
        return paraformer_config(recipe, vocab_size)
    return model_config(recipe, vocab_size)


def model_config(recipe: Recipe, vocab_size: int) -> ModelConfig:
    """The streamer :class:`ModelConfig` of a recipe's model, for a tokenizer of ``vocab_size`` pieces."""
    head = recipe.model.transducer
    encoder = encoder_config(recipe.model.encoder)
    transducer = TransducerConfig(
        vocab_size=vocab_size,
        pred_hidden=head.pred_hidden,
        pred_rnn_layers=head.pred_rnn_layers,
        joint_hidden=head.joint_hidden,
        joint_dropout_layer=False,
        durations=tuple(head.durations),
    )
    ctc = CTCConfig(vocab_size=vocab_size, feat_in=encoder.d_model) if recipe.model.ctc_head else None
    return ModelConfig(
        features=FeatureConfig(normalize="NA"),
        encoder=encoder,
        transducer=transducer,
        ctc=ctc,
        model_class="EncDecHybridRNNTCTCBPEModel" if ctc is not None else "EncDecRNNTBPEModel",
    )


def encoder_config(enc: EncoderSection) -> EncoderConfig:
    """The streamer :class:`EncoderConfig` of a recipe's encoder section (a causal, cache-aware FastConformer)."""
    return EncoderConfig(
        feat_in=80,
        n_layers=enc.n_layers,
        d_model=enc.d_model,
        n_heads=enc.n_heads,
        ff_expansion_factor=enc.ff_expansion_factor,
        subsampling_factor=8,
        subsampling_conv_channels=enc.subsampling_conv_channels,
        causal_downsampling=True,
        att_context_sizes=tuple((int(a), int(b)) for a, b in enc.att_context_sizes),
        att_context_style="chunked_limited",
        conv_kernel_size=enc.conv_kernel_size,
        conv_norm_type=enc.conv_norm_type,
        conv_context_size=(enc.conv_kernel_size - 1, 0),  # causal depthwise conv
    )
