"""Training recipes: the typed contents of ``models/<name>/recipe.yaml`` and the model they describe.

A recipe is a YAML file with the sections below; every key has a default here, unknown keys are an
error (with a "did you mean" hint), and the run directory keeps the resolved copy as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from streamer.asr.config import CTCConfig, EncoderConfig, FeatureConfig, ModelConfig, TransducerConfig
from streamer.errors import ConfigError
from streamer.training.data import BatchingConfig, SpecAugmentConfig


@dataclass(frozen=True, slots=True)
class DataSection:
    """Where the corpus is and which utterances are used."""

    corpus_dir: str = "data/corpus-v1"  # relative paths are relative to the working directory
    tokenizer: str = ""  # default: <corpus_dir>/tokenizer.model
    train_split: str = "train"
    dev_split: str = "dev"
    dev_utterances: int = 200  # validation subset (the first N of the dev manifest)
    min_duration_s: float = 0.3
    max_duration_s: float = 20.0
    dither: float = 1.0e-5  # NeMo's training dither, added to the waveform
    workers: int = 1  # DataLoader worker processes (0: features in the training process)

    @property
    def tokenizer_path(self) -> Path:
        return Path(self.tokenizer) if self.tokenizer else Path(self.corpus_dir) / "tokenizer.model"


@dataclass(frozen=True, slots=True)
class EncoderSection:
    """A causal, cache-aware FastConformer (NeMo ``ConformerEncoder``, dw_striding 8x, rel_pos)."""

    n_layers: int = 8
    d_model: int = 192
    n_heads: int = 4
    ff_expansion_factor: int = 4
    subsampling_conv_channels: int = 64
    conv_kernel_size: int = 9
    conv_norm_type: str = "layer_norm"
    # Look-aheads trained (one sampled per batch, as NeMo does); the first is the default at inference.
    att_context_sizes: list[list[int]] = field(default_factory=lambda: [[70, 13], [70, 6], [70, 1], [70, 0]])
    # Sampling weights of att_context_sizes (NeMo samples uniformly).
    att_context_probs: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class TransducerSection:
    """Prediction network, joint and TDT durations (empty durations: plain RNNT)."""

    pred_hidden: int = 320
    pred_rnn_layers: int = 1
    joint_hidden: int = 320
    durations: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])


@dataclass(frozen=True, slots=True)
class ModelSection:
    encoder: EncoderSection = field(default_factory=EncoderSection)
    transducer: TransducerSection = field(default_factory=TransducerSection)
    ctc_head: bool = True  # an auxiliary CTC head (NeMo hybrid model); weight in loss.ctc_weight


@dataclass(frozen=True, slots=True)
class LossSection:
    sigma: float = 0.02  # TDT logit under-normalisation
    omega: float = 0.1  # probability of a plain-RNNT batch
    ctc_weight: float = 0.3  # NeMo hybrid: (1 - w) * transducer + w * ctc
    reduction: str = "mean_volume"  # per target token over the batch; NeMo's default is mean_batch


@dataclass(frozen=True, slots=True)
class OptimSection:
    lr: float = 1.0e-3  # peak learning rate, reached after warmup_steps
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1.0e-8
    weight_decay: float = 1.0e-3
    schedule: str = "noam"  # noam: lr * sqrt(warmup / step) after warmup; cosine: to min_lr at max_steps
    warmup_steps: int = 500
    min_lr: float = 1.0e-5
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    rewarmup_steps: int = 200  # after a warm start (train.init_from): ramp the scheduled lr up again from 0
    # Cooldown: over the last anneal_steps before train.max_steps, scale the scheduled lr linearly down to
    # min_lr (0 = none). Set max_steps to where this stretch of training should end.
    anneal_steps: int = 0


@dataclass(frozen=True, slots=True)
class TrainSection:
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
    residual_init_scale: float = 1.0
    # Initialise the subsampling's output projection on the corpus so its output is centred and unit-scale
    # (model_init.center_front_end): without it the encoder starts nearly blind to the audio.
    center_front_end: bool = False
    max_steps: int = 1_000_000
    max_hours: float = 0.0  # wall-clock limit of one invocation; 0 = none
    log_every_steps: int = 25
    val_every_steps: int = 500
    checkpoint_every_minutes: float = 10.0
    # Warm start: a .nemo exported by `streamer export` (or any run checkpoint .pt) whose weights and
    # tokenizer start this run; its training.json (written beside it by export) carries the step count on.
    init_from: str = ""
    # Look-aheads decoded at validation; the first decides best.pt.
    val_att_context_sizes: list[list[int]] = field(default_factory=lambda: [[70, 13], [70, 0]])


@dataclass(frozen=True, slots=True)
class Recipe:
    """Everything a training run needs."""

    name: str = "model"
    seed: int = 0
    data: DataSection = field(default_factory=DataSection)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    spec_augment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Parsing


def _build(cls: type, data: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, recursing into nested dataclass fields."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'recipe'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown recipe key '{path}'{hint}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, value or {}, path)  # type: ignore[arg-type]
        else:
            kwargs[key] = _coerce(value, kind, path)
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, path: str) -> Any:
    """Light type checking of a scalar or list value (YAML gives int for 1, float for 1.0e-3)."""
    origin = typing.get_origin(kind)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"recipe key '{path}' must be a list, got {value!r}")
        return value
    if isinstance(kind, types.UnionType):
        return value
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        # YAML 1.1 reads 3e-4 (no dot) as a string; the recipe's type says it is a number.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"recipe key '{path}' must be a number, got {value!r}") from None
    if kind in (int, str, bool) and not isinstance(value, kind):
        raise ConfigError(f"recipe key '{path}' must be {kind.__name__}, got {value!r}")
    return value


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe YAML file."""
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from exc
    recipe = _build(Recipe, data, "")
    check_recipe(recipe)
    return recipe


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    recipe = _build(Recipe, data, "")
    check_recipe(recipe)
    return recipe


def check_recipe(recipe: Recipe) -> None:
    """Reject combinations that cannot train or cannot stream."""
    enc = recipe.model.encoder
    if enc.d_model % enc.n_heads:
        raise ConfigError(f"model.encoder.d_model {enc.d_model} must be a multiple of n_heads {enc.n_heads}")
    for left, right in enc.att_context_sizes:
        if left % (right + 1):
            raise ConfigError(f"att_context_size [{left},{right}]: left must be a multiple of right + 1")
    if enc.att_context_probs and len(enc.att_context_probs) != len(enc.att_context_sizes):
        raise ConfigError("model.encoder.att_context_probs needs one weight per att_context_sizes entry")
    for ctx in recipe.train.val_att_context_sizes:
        if ctx not in enc.att_context_sizes:
            raise ConfigError(f"train.val_att_context_sizes {ctx} is not in model.encoder.att_context_sizes")
    if recipe.optim.schedule not in ("noam", "cosine"):
        raise ConfigError(f"optim.schedule must be noam or cosine, not {recipe.optim.schedule!r}")
    if recipe.optim.anneal_steps < 0 or recipe.optim.anneal_steps > recipe.train.max_steps:
        raise ConfigError(
            f"optim.anneal_steps {recipe.optim.anneal_steps} must lie between 0 and train.max_steps "
            f"{recipe.train.max_steps}: the cooldown ends at max_steps"
        )
    if recipe.loss.reduction not in ("mean_batch", "mean", "mean_volume", "sum"):
        raise ConfigError(f"loss.reduction {recipe.loss.reduction!r} is not one of NeMo's reductions")


# --------------------------------------------------------------------------------------------------
# The model


def model_config(recipe: Recipe, vocab_size: int) -> ModelConfig:
    """The streamer :class:`ModelConfig` of a recipe's model, for a tokenizer of ``vocab_size`` pieces."""
    enc, head = recipe.model.encoder, recipe.model.transducer
    encoder = EncoderConfig(
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
    transducer = TransducerConfig(
        vocab_size=vocab_size,
        pred_hidden=head.pred_hidden,
        pred_rnn_layers=head.pred_rnn_layers,
        joint_hidden=head.joint_hidden,
        joint_dropout_layer=False,
        durations=tuple(head.durations),
    )
    ctc = CTCConfig(vocab_size=vocab_size, feat_in=enc.d_model) if recipe.model.ctc_head else None
    return ModelConfig(
        features=FeatureConfig(normalize="NA"),
        encoder=encoder,
        transducer=transducer,
        ctc=ctc,
        model_class="EncDecHybridRNNTCTCBPEModel" if ctc is not None else "EncDecRNNTBPEModel",
    )
