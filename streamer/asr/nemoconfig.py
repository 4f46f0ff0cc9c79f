"""Read NeMo's ``model_config.yaml`` (a plain dict) into our typed `ModelConfig`.

`parse_nemo_config` reads what the model maths needs and collects everything streamer does not
implement into one `UnsupportedCheckpointError` (nemo-reference.md §1, §3.1, §7, §9.1). The model
classes and module targets named here are shared with the way back,
:mod:`streamer.asr.nemoconfigwriter`.

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
"""


from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from streamer.asr import clocks
from streamer.asr.config import CTCConfig, EncoderConfig, FeatureConfig, ModelConfig, TransducerConfig
from streamer.asr.interpolation import resolve_interpolations
from streamer.errors import CheckpointError, UnsupportedCheckpointError

# Model classes we implement, by the last component of the config's `target`.
MODEL_TARGETS: dict[str, str] = {
    "EncDecRNNTBPEModel": "nemo.collections.asr.models.rnnt_bpe_models.EncDecRNNTBPEModel",
    "EncDecHybridRNNTCTCBPEModel": (
        "nemo.collections.asr.models.hybrid_rnnt_ctc_bpe_models.EncDecHybridRNNTCTCBPEModel"
    ),
    "EncDecCTCModelBPE": "nemo.collections.asr.models.ctc_bpe_models.EncDecCTCModelBPE",
    "EncDecRNNTBPEEOUModel": "nemo.collections.asr.models.asr_eou_models.EncDecRNNTBPEEOUModel",
    "EncDecHybridRNNTCTCBPEEOUModel": (
        "nemo.collections.asr.models.asr_eou_models.EncDecHybridRNNTCTCBPEEOUModel"
    ),
}
_CTC_ONLY = {"EncDecCTCModelBPE"}
HYBRID_CLASSES = {"EncDecHybridRNNTCTCBPEModel", "EncDecHybridRNNTCTCBPEEOUModel"}
_WHY_NOT = {
    "EncDecMultiTaskModel": "Canary-style attention encoder-decoder (AED)",
    "EncDecTransfModelBPE": "transformer decoder",
    "EncDecRNNTModel": "character vocabulary (labels) instead of a SentencePiece tokenizer",
    "EncDecCTCModel": "character vocabulary (labels) instead of a SentencePiece tokenizer",
    "EncDecHybridRNNTCTCModel": "character vocabulary (labels) instead of a SentencePiece tokenizer",
}
_MISSING = object()


def _get(section: Mapping[str, Any], path: str, key: str, kind: type, default: Any = _MISSING) -> Any:
    """Read ``section[key]`` as ``kind`` (int, float, bool, str); a missing or null key gives ``default``."""
    value = section.get(key)
    if value is None:
        if default is _MISSING:
            raise CheckpointError(f"model_config.yaml lacks {path}.{key}")
        return default
    try:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and not isinstance(value, bool) and float(value) == int(float(value)):
            return int(float(value))
        if kind is float and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
    except (TypeError, ValueError):
        pass
    raise CheckpointError(f"model_config.yaml: {path}.{key} = {value!r} is not a {kind.__name__}")


def _section(cfg: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    value = cfg.get(path.rsplit(".", 1)[-1])
    if not isinstance(value, Mapping):
        raise CheckpointError(f"model_config.yaml lacks the {path} section")
    return value


def _choice(value: Any, allowed: tuple[Any, ...], name: str, problems: list[str]) -> None:
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        problems.append(f"{name}={value!r} (supported: {choices})")


def _target_class(section: Mapping[str, Any]) -> str:
    return str(section.get("_target_") or section.get("target") or "").rsplit(".", 1)[-1]


def _model_class(cfg: Mapping[str, Any], problems: list[str]) -> str:
    """The NeMo model class name, from `target` or, in old files without it, from the sections."""
    name = str(cfg.get("target") or "").rsplit(".", 1)[-1]
    if not name:
        decoder = cfg.get("decoder") if isinstance(cfg.get("decoder"), Mapping) else {}
        if "joint" in cfg:
            name = "EncDecHybridRNNTCTCBPEModel" if "aux_ctc" in cfg else "EncDecRNNTBPEModel"
        elif _target_class(decoder) == "ConvASRDecoder":
            name = "EncDecCTCModelBPE"
    if name not in MODEL_TARGETS:
        why = f" ({_WHY_NOT[name]})" if name in _WHY_NOT else ""
        problems.append(f"model class {name or 'unknown'!r}{why} (supported: {', '.join(MODEL_TARGETS)})")
    return name


def _parse_features(pre: Mapping[str, Any], problems: list[str]) -> FeatureConfig:
    """`AudioToMelSpectrogramPreprocessor` settings; defaults are NeMo's constructor defaults (§1.1)."""
    p = "preprocessor"
    _choice(
        _target_class(pre) or "AudioToMelSpectrogramPreprocessor",
        ("AudioToMelSpectrogramPreprocessor",),
        f"{p}._target_",
        problems,
    )
    sample_rate = _get(pre, p, "sample_rate", int, clocks.SAMPLE_RATE_HZ)
    window_size = _get(pre, p, "window_size", float, 0.02)
    n_fft = _get(pre, p, "n_fft", int, 0) or 2 ** math.ceil(math.log2(int(window_size * sample_rate)))
    guard = pre.get("log_zero_guard_value")
    if guard in ("tiny", "eps"):  # NeMo reads torch.finfo of the (float32) input
        guard = float(getattr(torch.finfo(torch.float32), guard))
    else:
        guard = _get(pre, p, "log_zero_guard_value", float, 2.0**-24)
    normalize = pre.get("normalize", "per_feature")
    if normalize == "all_features" or isinstance(normalize, Mapping):
        problems.append(f"{p}.normalize={normalize!r} (supported: 'per_feature', 'NA')")
    _choice(pre.get("window", "hann"), ("hann",), f"{p}.window", problems)
    _choice(pre.get("log", True), (True,), f"{p}.log", problems)
    _choice(pre.get("log_zero_guard_type", "add"), ("add",), f"{p}.log_zero_guard_type", problems)
    _choice(pre.get("frame_splicing", 1), (1,), f"{p}.frame_splicing", problems)
    _choice(bool(pre.get("exact_pad", False)), (False,), f"{p}.exact_pad", problems)
    _choice(pre.get("mel_norm", "slaney"), ("slaney",), f"{p}.mel_norm", problems)
    _choice(bool(pre.get("stft_conv", False)), (False,), f"{p}.stft_conv", problems)
    preemph = pre.get("preemph", 0.97)
    return FeatureConfig(
        sample_rate=sample_rate,
        window_size=window_size,
        window_stride=_get(pre, p, "window_stride", float, clocks.MEL_FRAME_S),
        n_fft=n_fft,
        n_mels=_get(pre, p, "features", int, 64),
        preemph=None if preemph is None else _get(pre, p, "preemph", float, 0.97),
        log_zero_guard_value=guard,
        mag_power=_get(pre, p, "mag_power", float, 2.0),
        normalize="per_feature" if normalize == "per_feature" else "NA",  # any other string is a no-op
        lowfreq=_get(pre, p, "lowfreq", float, 0.0),
        highfreq=_get(pre, p, "highfreq", float, None),
        pad_value=_get(pre, p, "pad_value", float, 0.0),
    )


def _context_sizes(value: Any) -> tuple[tuple[int, int], ...]:
    """NeMo's att_context_size: null, one ``[L, R]`` or a list of them."""
    if value is None:
        return ((-1, -1),)
    entries = value if value and isinstance(value[0], list | tuple) else [value]
    try:
        sizes = tuple((int(left), int(right)) for left, right in entries)
    except (TypeError, ValueError):
        raise CheckpointError(
            f"model_config.yaml: encoder.att_context_size = {value!r} is not [L, R]"
        ) from None
    return sizes


def _conv_context(value: Any, kernel: int, problems: list[str]) -> tuple[int, int] | None:
    if value is None:
        return None
    if value == "causal":
        return (kernel - 1, 0)
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        if value[0] + value[1] + 1 != kernel:
            raise CheckpointError(
                f"model_config.yaml: encoder.conv_context_size {list(value)} does not fit kernel {kernel}"
            )
        return (value[0], value[1])
    problems.append(f"encoder.conv_context_size={value!r} (supported: null, 'causal', [left, right])")
    return None


def _parse_encoder(enc: Mapping[str, Any], problems: list[str]) -> EncoderConfig:
    """`ConformerEncoder` settings; defaults are NeMo's constructor defaults (§3.1)."""
    p = "encoder"
    _choice(_target_class(enc) or "ConformerEncoder", ("ConformerEncoder",), f"{p}._target_", problems)
    _choice(enc.get("subsampling", "striding"), ("dw_striding",), f"{p}.subsampling", problems)
    attention = str(enc.get("self_attention_model", "rel_pos"))
    _choice(attention, ("rel_pos", "rel_pos_local_attn"), f"{p}.self_attention_model", problems)
    _choice(
        enc.get("att_context_style", "regular"),
        ("regular", "chunked_limited"),
        f"{p}.att_context_style",
        problems,
    )
    _choice(
        enc.get("conv_norm_type", "batch_norm"), ("batch_norm", "layer_norm"), f"{p}.conv_norm_type", problems
    )
    _choice(enc.get("conv_context_style", "regular"), ("regular",), f"{p}.conv_context_style", problems)
    _choice(enc.get("feat_out", -1), (-1,), f"{p}.feat_out", problems)
    _choice(enc.get("reduction"), (None,), f"{p}.reduction", problems)
    d_model = _get(enc, p, "d_model", int)
    n_heads = _get(enc, p, "n_heads", int, 4)
    factor = _get(enc, p, "subsampling_factor", int, 4)
    if d_model % n_heads:
        raise CheckpointError(f"model_config.yaml: encoder.d_model {d_model} is not a multiple of n_heads")
    if factor < 2 or factor & (factor - 1):
        problems.append(f"{p}.subsampling_factor={factor} (supported: a power of 2)")
    kernel = _get(enc, p, "conv_kernel_size", int, 31)
    channels = _get(enc, p, "subsampling_conv_channels", int, -1)
    return EncoderConfig(
        feat_in=_get(enc, p, "feat_in", int),
        n_layers=_get(enc, p, "n_layers", int),
        d_model=d_model,
        n_heads=n_heads,
        ff_expansion_factor=_get(enc, p, "ff_expansion_factor", int, 4),
        subsampling_factor=factor,
        subsampling_conv_channels=d_model if channels == -1 else channels,
        causal_downsampling=_get(enc, p, "causal_downsampling", bool, False),
        att_context_sizes=_context_sizes(enc.get("att_context_size")),
        att_context_style=str(enc.get("att_context_style", "regular")),
        xscaling=_get(enc, p, "xscaling", bool, True),
        untie_biases=_get(enc, p, "untie_biases", bool, True),
        pos_emb_max_len=_get(enc, p, "pos_emb_max_len", int, 5000),
        conv_kernel_size=kernel,
        conv_norm_type=str(enc.get("conv_norm_type", "batch_norm")),
        conv_context_size=_conv_context(enc.get("conv_context_size"), kernel, problems),
        use_bias=_get(enc, p, "use_bias", bool, True),
        self_attention_model=attention,
        global_tokens=_get(enc, p, "global_tokens", int, 0),
        global_tokens_spacing=_get(enc, p, "global_tokens_spacing", int, 1),
        global_attn_separate=_get(enc, p, "global_attn_separate", bool, False),
    )


def _durations(cfg: Mapping[str, Any]) -> tuple[int, ...]:
    """TDT durations from model_defaults, loss.tdt_kwargs or decoding, whichever is set first."""
    loss = cfg.get("loss") or {}
    for source in (
        (cfg.get("model_defaults") or {}).get("tdt_durations"),
        (loss.get("tdt_kwargs") or {}).get("durations"),
        (cfg.get("decoding") or {}).get("durations"),
    ):
        if source:
            return tuple(int(d) for d in source)
    return ()


def _parse_transducer(cfg: Mapping[str, Any], d_model: int, problems: list[str]) -> TransducerConfig:
    """`RNNTDecoder` + `RNNTJoint` (+ TDT durations and greedy max_symbols), §7.1–§7.3."""
    dec, joint = _section(cfg, "decoder"), _section(cfg, "joint")
    prednet, jointnet = dec.get("prednet") or {}, joint.get("jointnet") or {}
    _choice(_target_class(dec) or "RNNTDecoder", ("RNNTDecoder",), "decoder._target_", problems)
    _choice(_target_class(joint) or "RNNTJoint", ("RNNTJoint",), "joint._target_", problems)
    _choice(bool(dec.get("blank_as_pad", True)), (True,), "decoder.blank_as_pad", problems)
    _choice(dec.get("normalization_mode"), (None,), "decoder.normalization_mode", problems)
    _choice(prednet.get("rnn_type", "lstm"), ("lstm",), "decoder.prednet.rnn_type", problems)
    _choice(
        jointnet.get("activation", "relu"), ("relu", "tanh", "sigmoid"), "joint.jointnet.activation", problems
    )
    loss_name = str((cfg.get("loss") or {}).get("loss_name", "default"))
    if "multiblank" in loss_name:  # the loss is training-only, but multi-blank changes the joint's outputs
        problems.append(f"loss.loss_name={loss_name!r} (multi-blank RNNT; supported: RNNT and TDT)")
    pred_hidden = _get(prednet, "decoder.prednet", "pred_hidden", int)
    hidden = prednet.get("rnn_hidden_size", -1)
    if hidden not in (None, -1, pred_hidden):
        problems.append(f"decoder.prednet.rnn_hidden_size={hidden} (supported: -1, equal to pred_hidden)")
    encoder_hidden = jointnet.get("encoder_hidden", d_model)
    if encoder_hidden not in (None, d_model):
        raise CheckpointError(
            f"model_config.yaml: joint.jointnet.encoder_hidden {encoder_hidden} != {d_model}"
        )
    durations = _durations(cfg)
    extra = _get(joint, "joint", "num_extra_outputs", int, 0)
    is_tdt = (
        loss_name == "tdt"
        or (cfg.get("decoding") or {}).get("model_type") == "tdt"
        or (extra > 0 and len(durations) == extra and "multiblank" not in loss_name)
    )
    if not is_tdt:
        durations = ()
        if extra and "multiblank" not in loss_name:
            problems.append(
                f"joint.num_extra_outputs={extra} without TDT (multi-blank RNNT is not supported)"
            )
    elif len(durations) != extra:
        raise CheckpointError(
            f"model_config.yaml: {len(durations)} TDT durations {list(durations)} but "
            f"joint.num_extra_outputs = {extra}"
        )
    greedy = (cfg.get("decoding") or {}).get("greedy") or {}
    return TransducerConfig(
        vocab_size=_get(dec, "decoder", "vocab_size", int),
        pred_hidden=pred_hidden,
        pred_rnn_layers=_get(prednet, "decoder.prednet", "pred_rnn_layers", int, 1),
        joint_hidden=_get(jointnet, "joint.jointnet", "joint_hidden", int),
        joint_activation=str(jointnet.get("activation", "relu")),
        joint_dropout_layer=_get(jointnet, "joint.jointnet", "dropout", float, 0.0) > 0,
        durations=durations,
        # NeMo's null means "no limit"; every released config says 10, which we also use for null.
        max_symbols=_get(greedy, "decoding.greedy", "max_symbols", int, 10),
    )


def _parse_ctc(
    dec: Mapping[str, Any],
    path: str,
    vocab_size: int | None,
    d_model: int,
    key_prefix: str,
    problems: list[str],
) -> CTCConfig:
    """A `ConvASRDecoder` head (§7.8): num_classes -1 means "the tokenizer's vocabulary"."""
    _choice(_target_class(dec) or "ConvASRDecoder", ("ConvASRDecoder",), f"{path}._target_", problems)
    num_classes = _get(dec, path, "num_classes", int, -1)
    if num_classes < 1:
        num_classes = len(dec.get("vocabulary") or ()) or (vocab_size or 0)
    if num_classes < 1:
        raise CheckpointError(f"model_config.yaml: {path}.num_classes is not set")
    feat_in = _get(dec, path, "feat_in", int, -1)
    return CTCConfig(
        vocab_size=num_classes, feat_in=d_model if feat_in < 1 else feat_in, key_prefix=key_prefix
    )


def parse_nemo_config(raw: Mapping[str, Any]) -> ModelConfig:
    """Build a `ModelConfig` from a NeMo ``model_config.yaml`` dict.

    `eou_token_ids` is left empty: it needs the tokenizer, so the loaders fill it in.

    Raises:
        UnsupportedCheckpointError: one error listing everything the config uses that streamer does
            not implement, each with the supported alternatives.
        CheckpointError: a required key is missing or has the wrong type.
    """
    cfg = resolve_interpolations(raw)
    problems: list[str] = []
    model_class = _model_class(cfg, problems)
    tokenizer = cfg.get("tokenizer") or {}
    if model_class in MODEL_TARGETS:
        _choice(str(tokenizer.get("type", "bpe")).lower(), ("bpe",), "tokenizer.type", problems)
    if problems and model_class not in MODEL_TARGETS:  # nothing else is worth reading
        raise UnsupportedCheckpointError("streamer does not implement " + "; ".join(problems))
    features = _parse_features(_section(cfg, "preprocessor"), problems)
    encoder = _parse_encoder(_section(cfg, "encoder"), problems)
    transducer = ctc = None
    if model_class not in _CTC_ONLY:
        transducer = _parse_transducer(cfg, encoder.d_model, problems)
    if model_class in HYBRID_CLASSES:
        aux = _section(cfg, "aux_ctc")
        ctc = _parse_ctc(
            _section(aux, "aux_ctc.decoder"),
            "aux_ctc.decoder",
            transducer.vocab_size if transducer else None,
            encoder.d_model,
            "ctc_decoder",
            problems,
        )
    elif model_class in _CTC_ONLY:
        ctc = _parse_ctc(_section(cfg, "decoder"), "decoder", None, encoder.d_model, "decoder", problems)
    if problems:
        raise UnsupportedCheckpointError("streamer does not implement " + "; ".join(problems))
    if encoder.feat_in != features.n_mels:
        raise CheckpointError(
            f"model_config.yaml: encoder.feat_in {encoder.feat_in} != preprocessor.features {features.n_mels}"
        )
    extra = {
        "target": cfg.get("target") or MODEL_TARGETS[model_class],
        "nemo_version": cfg.get("nemo_version"),
    }
    return ModelConfig(
        features=features,
        encoder=encoder,
        transducer=transducer,
        ctc=ctc,
        model_class=model_class,
        extra=extra,
    )
