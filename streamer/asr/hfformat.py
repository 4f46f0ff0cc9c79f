"""Hugging Face transformers checkpoints: Parakeet (CTC/RNNT/TDT) and Nemotron streaming RNNT.

Maps ``config.json`` to our `ModelConfig`, renames weights between HF's and NeMo's key names with
ordered regex tables (nemo-reference.md §9.2), and reads a directory into a `Checkpoint` (`load_hf`);
a directory without ``tokenizer.model`` gets one rebuilt from ``tokenizer.json``
(:mod:`streamer.asr.hftokenizer`).

transformers keeps no mel filterbank or window in the weights; its feature extractors recompute them.

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from streamer.asr import clocks
from streamer.asr.checkpoint import Checkpoint, sha256_of, with_tokenizer
from streamer.asr.config import CTCConfig, EncoderConfig, FeatureConfig, ModelConfig, TransducerConfig
from streamer.asr.hftokenizer import sentencepiece_from_tokenizer_json
from streamer.asr.nemoconfigwriter import nemo_config_from
from streamer.asr.shapes import check_state_dict
from streamer.errors import CheckpointError, UnsupportedCheckpointError

PARAKEET_TYPES = ("parakeet_tdt", "parakeet_rnnt", "parakeet_ctc")
NEMOTRON_TYPE = "nemotron_asr_streaming"
SUPPORTED_TYPES = (*PARAKEET_TYPES, NEMOTRON_TYPE)
# NeMo's class for transducers transformers cannot name (EOU models); `streamer convert` writes it.
NEMO_CLASS_KEY = "nemo_model_class"
_NAMED_TRANSDUCER_CLASSES = ("EncDecRNNTBPEModel", "EncDecRNNTBPEEOUModel")
# transformers' NemotronAsrStreamingProcessor default when processor_config.json does not list them.
NEMOTRON_LOOKAHEADS = (13, 6, 1, 0)

Rule = tuple[str, str | Callable[[re.Match[str]], str]]

# HF -> NeMo, applied in order; the first rule that matches renames the key.
_COMMON_TO_NEMO: list[Rule] = [
    (r"^encoder\.subsampling\.linear\.", "encoder.pre_encode.out."),
    (r"^(encoder\.layers\.\d+\.conv)\.norm\.", r"\1.batch_norm."),
    (r"\.self_attn\.([qkv])_proj\.", r".self_attn.linear_\1."),
    (r"\.self_attn\.o_proj\.", ".self_attn.linear_out."),
    (r"\.self_attn\.relative_k_proj\.", ".self_attn.linear_pos."),
    (r"\.self_attn\.bias_([uv])$", r".self_attn.pos_bias_\1"),
    (r"^ctc_head\.", "decoder.decoder_layers.0."),
    (r"^decoder\.embedding\.", "decoder.prediction.embed."),
    (r"^decoder\.lstm\.", "decoder.prediction.dec_rnn.lstm."),
    (r"^decoder\.decoder_projector\.", "joint.pred."),
    (r"^encoder_projector\.", "joint.enc."),
    (r"^joint\.head\.", "joint.joint_net.2."),  # HF has no dropout; NVIDIA's models had 0.2 (§7.2)
]
_SUBSAMPLING_TO_NEMO: dict[str, list[Rule]] = {
    "parakeet": [(r"^encoder\.subsampling\.layers\.", "encoder.pre_encode.conv.")],
    # Stem conv_in = NeMo conv.0; stage i (from 0) = depthwise conv.{3i+2}, pointwise conv.{3i+3}.
    "nemotron": [
        (r"^encoder\.subsampling\.conv_in\.", "encoder.pre_encode.conv.0."),
        (
            r"^encoder\.subsampling\.layers\.(\d+)\.depthwise_conv\.",
            lambda m: f"encoder.pre_encode.conv.{3 * int(m[1]) + 2}.",
        ),
        (
            r"^encoder\.subsampling\.layers\.(\d+)\.pointwise_conv\.",
            lambda m: f"encoder.pre_encode.conv.{3 * int(m[1]) + 3}.",
        ),
    ],
}
_COMMON_TO_HF: list[Rule] = [
    (r"^encoder\.pre_encode\.out\.", "encoder.subsampling.linear."),
    (r"^(encoder\.layers\.\d+\.conv)\.batch_norm\.", r"\1.norm."),
    (r"\.self_attn\.linear_([qkv])\.", r".self_attn.\1_proj."),
    (r"\.self_attn\.linear_out\.", ".self_attn.o_proj."),
    (r"\.self_attn\.linear_pos\.", ".self_attn.relative_k_proj."),
    (r"\.self_attn\.pos_bias_([uv])$", r".self_attn.bias_\1"),
    (r"^decoder\.decoder_layers\.0\.", "ctc_head."),
    (r"^decoder\.prediction\.embed\.", "decoder.embedding."),
    (r"^decoder\.prediction\.dec_rnn\.lstm\.", "decoder.lstm."),
    (r"^joint\.pred\.", "decoder.decoder_projector."),
    (r"^joint\.enc\.", "encoder_projector."),
    (r"^joint\.joint_net\.[12]\.", "joint.head."),
]


def _nemotron_conv_to_hf(match: re.Match[str]) -> str:
    index = int(match[1])
    if index == 0:
        return "encoder.subsampling.conv_in."
    stage, kind = divmod(index - 2, 3)
    return f"encoder.subsampling.layers.{stage}.{'depthwise_conv' if kind == 0 else 'pointwise_conv'}."


_SUBSAMPLING_TO_HF: dict[str, list[Rule]] = {
    "parakeet": [(r"^encoder\.pre_encode\.conv\.", "encoder.subsampling.layers.")],
    "nemotron": [(r"^encoder\.pre_encode\.conv\.(\d+)\.", _nemotron_conv_to_hf)],
}


def _family(model_type: str) -> str:
    return "nemotron" if model_type == NEMOTRON_TYPE else "parakeet"


def _rename(key: str, rules: Iterable[Rule]) -> str:
    for pattern, replacement in rules:
        renamed, count = re.subn(pattern, replacement, key, count=1)
        if count:
            return renamed
    return key


def hf_to_nemo_key(key: str, model_type: str) -> str:
    """NeMo's name for the HF weight ``key`` of a ``model_type`` checkpoint."""
    return _rename(key, [*_SUBSAMPLING_TO_NEMO[_family(model_type)], *_COMMON_TO_NEMO])


def nemo_to_hf_key(key: str, model_type: str) -> str | None:
    """HF's name for the NeMo weight ``key``, or None for the feature buffers HF does not store."""
    if key.startswith("preprocessor."):
        return None
    return _rename(key, [*_SUBSAMPLING_TO_HF[_family(model_type)], *_COMMON_TO_HF])


# ---------------------------------------------------------------------------------------------------
# config.json


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def _processor_settings(directory: Path) -> dict[str, Any]:
    """Feature-extractor and processor keys from ``preprocessor_config.json``/``processor_config.json``."""
    settings: dict[str, Any] = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (directory / name).is_file():
            data = _read_json(directory / name)
            settings |= data.get("feature_extractor") or {}
            settings |= {k: v for k, v in data.items() if not isinstance(v, dict)}
    return settings


def _value(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    if value is None:
        raise CheckpointError(f"config.json lacks {key}")
    return value


def _encoder(
    enc: Mapping[str, Any], model_type: str, settings: Mapping[str, Any], problems: list[str]
) -> EncoderConfig:
    d_model = int(_value(enc, "hidden_size"))
    ffn = int(_value(enc, "intermediate_size"))
    if ffn % d_model:
        problems.append(f"encoder_config.intermediate_size={ffn} (supported: a multiple of hidden_size)")
    if enc.get("attention_bias", True) != enc.get("convolution_bias", True):
        problems.append("attention_bias != convolution_bias (NeMo has one use_bias for both)")
    if enc.get("subsampling_conv_kernel_size", 3) != 3 or enc.get("subsampling_conv_stride", 2) != 2:
        problems.append("subsampling conv kernel/stride other than 3/2 (supported: 3 and 2)")
    if enc.get("hidden_act", "silu") != "silu":
        problems.append(f"encoder_config.hidden_act={enc.get('hidden_act')!r} (supported: 'silu')")
    kernel = int(enc.get("conv_kernel_size", 9))
    common = {
        "feat_in": int(_value(enc, "num_mel_bins")),
        "n_layers": int(_value(enc, "num_hidden_layers")),
        "d_model": d_model,
        "n_heads": int(_value(enc, "num_attention_heads")),
        "ff_expansion_factor": max(ffn // d_model, 1),
        "subsampling_factor": int(enc.get("subsampling_factor", clocks.SUBSAMPLING_FACTOR)),
        "subsampling_conv_channels": int(enc.get("subsampling_conv_channels", 256)),
        "xscaling": bool(enc.get("scale_input", True)),
        "untie_biases": True,
        "pos_emb_max_len": int(enc.get("max_position_embeddings", 5000)),
        "conv_kernel_size": kernel,
        "use_bias": bool(enc.get("attention_bias", True)),
    }
    if model_type != NEMOTRON_TYPE:  # offline FastConformer: symmetric conv, BatchNorm, full context
        return EncoderConfig(
            **common,
            causal_downsampling=False,
            att_context_sizes=((-1, -1),),
            att_context_style="regular",
            conv_norm_type="batch_norm",
            conv_context_size=None,
        )
    left = int(enc.get("sliding_window", 71)) - 1  # the window counts the frame itself
    lookaheads = [int(r) for r in settings.get("supported_num_lookahead_tokens") or NEMOTRON_LOOKAHEADS]
    default = int(settings.get("default_num_lookahead_tokens", enc.get("default_num_lookahead_tokens", 13)))
    ordered = [default, *(r for r in lookaheads if r != default)]  # NeMo's default is the first entry
    return EncoderConfig(
        **common,
        causal_downsampling=True,
        att_context_sizes=tuple((left, r) for r in ordered),
        att_context_style="chunked_limited",
        conv_norm_type="layer_norm",
        conv_context_size=(kernel - 1, 0),
    )


def model_config(directory: Path) -> ModelConfig:
    """Our config for the HF checkpoint in ``directory`` (``config.json`` + processor settings).

    Raises:
        UnsupportedCheckpointError: an unknown ``model_type`` or settings NeMo's modules cannot express.
        CheckpointError: a required key is missing.
    """
    cfg = _read_json(directory / "config.json")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise UnsupportedCheckpointError(
            f"{directory}: Hugging Face model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_TYPES)}; or use the model's .nemo file)"
        )
    settings, problems = _processor_settings(directory), []
    encoder = _encoder(cfg.get("encoder_config") or {}, model_type, settings, problems)
    sample_rate = int(settings.get("sampling_rate", clocks.SAMPLE_RATE_HZ))
    features = FeatureConfig(
        sample_rate=sample_rate,
        window_size=int(settings.get("win_length", clocks.WIN_LENGTH)) / sample_rate,
        window_stride=int(settings.get("hop_length", clocks.HOP_LENGTH)) / sample_rate,
        n_fft=int(settings.get("n_fft", clocks.N_FFT)),
        n_mels=encoder.feat_in,
        preemph=float(settings.get("preemphasis", 0.97)),
        # Parakeet's extractor always normalises per feature; Nemotron's never does (§1.3).
        normalize="NA" if model_type == NEMOTRON_TYPE else "per_feature",
        pad_value=float(settings.get("padding_value", 0.0)),
    )
    vocab = int(_value(cfg, "vocab_size")) - 1  # HF counts the blank
    transducer = ctc = None
    if model_type == "parakeet_ctc":
        if int(cfg.get("pad_token_id", vocab)) != vocab:
            problems.append(
                f"CTC blank (pad_token_id) {cfg.get('pad_token_id')} (supported: the last id, {vocab})"
            )
        ctc = CTCConfig(vocab_size=vocab, feat_in=encoder.d_model, key_prefix="decoder")
    else:
        if int(cfg.get("blank_token_id", vocab)) != vocab:
            problems.append(f"blank_token_id {cfg.get('blank_token_id')} (supported: the last id, {vocab})")
        hidden = int(_value(cfg, "decoder_hidden_size"))
        transducer = TransducerConfig(
            vocab_size=vocab,
            pred_hidden=hidden,
            joint_hidden=hidden,
            pred_rnn_layers=int(cfg.get("num_decoder_layers", 1)),
            joint_activation=str(cfg.get("hidden_act", "relu")),
            joint_dropout_layer=True,
            durations=tuple(int(d) for d in cfg.get("durations") or ())
            if model_type == "parakeet_tdt"
            else (),
            max_symbols=int(cfg.get("max_symbols_per_step", 10)),
        )
    model_class = "EncDecCTCModelBPE" if ctc is not None else "EncDecRNNTBPEModel"
    if NEMO_CLASS_KEY in cfg:
        model_class = str(cfg[NEMO_CLASS_KEY])
        if ctc is not None or model_class not in _NAMED_TRANSDUCER_CLASSES:
            problems.append(f"{NEMO_CLASS_KEY}={model_class!r} (supported: {', '.join(_NAMED_TRANSDUCER_CLASSES)})")
    if problems:
        raise UnsupportedCheckpointError(f"{directory}: streamer does not implement " + "; ".join(problems))
    return ModelConfig(
        features=features,
        encoder=encoder,
        transducer=transducer,
        ctc=ctc,
        model_class=model_class,
        extra={"hf_model_type": model_type},
    )


# ---------------------------------------------------------------------------------------------------
# Weights


def weight_files(directory: Path) -> list[Path]:
    """``model.safetensors``, or the shards listed in ``model.safetensors.index.json``."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set((_read_json(index).get("weight_map") or {}).values()))
        missing = [name for name in shards if not (directory / name).is_file()]
        if missing or not shards:
            raise CheckpointError(
                f"{directory}: shard {missing[0] if missing else '(none)'} listed in {index.name} is missing"
            )
        return [directory / name for name in shards]
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def read_weights(files: list[Path]) -> dict[str, Tensor]:
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    state: dict[str, Tensor] = {}
    for path in files:
        try:
            state |= load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
    return state


def to_nemo_state_dict(state: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Rename HF weights to NeMo keys; add BatchNorm step counters if the file left them out."""
    model_type = config.extra["hf_model_type"]
    renamed = {hf_to_nemo_key(key, model_type): tensor for key, tensor in state.items()}
    if config.encoder.conv_norm_type == "batch_norm":
        for i in range(config.encoder.n_layers):
            renamed.setdefault(
                f"encoder.layers.{i}.conv.batch_norm.num_batches_tracked", torch.tensor(0, dtype=torch.long)
            )
    return renamed


def to_hf_state_dict(state: Mapping[str, Tensor], model_type: str) -> dict[str, Tensor]:
    """The inverse of `to_nemo_state_dict` (feature buffers dropped)."""
    return {
        hf: tensor for key, tensor in state.items() if (hf := nemo_to_hf_key(key, model_type)) is not None
    }


# ---------------------------------------------------------------------------------------------------
# Tokenizer and the whole directory


def tokenizer_model(directory: Path) -> bytes | None:
    """``tokenizer.model`` if present, else one rebuilt from ``tokenizer.json``, else None."""
    if (directory / "tokenizer.model").is_file():
        return (directory / "tokenizer.model").read_bytes()
    if (directory / "tokenizer.json").is_file():
        return sentencepiece_from_tokenizer_json(_read_json(directory / "tokenizer.json"))
    return None


def load_hf(directory: str | os.PathLike[str], *, require_tokenizer: bool = True) -> Checkpoint:
    """Read a Hugging Face transformers Parakeet / Nemotron-streaming directory (§9.2).

    Weights are renamed to NeMo's keys; the mel filterbank and window are absent
    (``has_feature_buffers`` is False), so the model builder keeps its computed ones. The tokenizer is
    ``tokenizer.model`` when present, else a SentencePiece model rebuilt from ``tokenizer.json``
    (decoding is exact; encoding text, needed only for training, may differ from the original).

    Raises:
        CheckpointError: files are missing or do not fit together.
        UnsupportedCheckpointError: the ``model_type`` is not one streamer implements.
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: no config.json; not a Hugging Face model directory")
    config = model_config(directory)
    files = weight_files(directory)
    state_dict = to_nemo_state_dict(read_weights(files), config)
    tokenizer = tokenizer_model(directory)
    if tokenizer is None and require_tokenizer:
        raise CheckpointError(f"{directory}: no tokenizer.model or tokenizer.json")
    check_state_dict(config, state_dict, str(directory))
    config = with_tokenizer(config, tokenizer, str(directory))
    raw = nemo_config_from(config, tokenizer, artifact_prefix="0" * 32) if tokenizer is not None else {}
    return Checkpoint(
        config, state_dict, tokenizer, raw, str(directory), sha256_of(files), extra={"format": "hf"}
    )
