"""Write a `Checkpoint` as a Hugging Face transformers directory that `load_hf` and transformers both read.

The inverse of :mod:`streamer.asr.hfformat`: which ``model_type`` a model becomes, the ``config.json``
transformers' config classes take, the processor and tokenizer files, and ``model.safetensors`` under
HF's key names. A model transformers has no class for (hybrid RNNT+CTC, cache-aware TDT, BatchNorm
streaming encoders, feature settings its extractors cannot express) is refused with every reason at once.

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from streamer.asr.checkpoint import Checkpoint
from streamer.asr.config import EncoderConfig, FeatureConfig, ModelConfig
from streamer.asr.hfformat import NEMO_CLASS_KEY, NEMOTRON_TYPE, to_hf_state_dict
from streamer.asr.hftokenizer import tokenizer_json_from_sentencepiece
from streamer.asr.nemoconfig import HYBRID_CLASSES
from streamer.errors import CheckpointError, UnsupportedCheckpointError

_DEFAULT_CLASSES = {"EncDecRNNTBPEModel", "EncDecCTCModelBPE"}
ARCHITECTURES = {
    "parakeet_ctc": "ParakeetForCTC",
    "parakeet_rnnt": "ParakeetForRNNT",
    "parakeet_tdt": "ParakeetForTDT",
    NEMOTRON_TYPE: "NemotronAsrStreamingForRNNT",
}
_EXTRACTORS = {NEMOTRON_TYPE: "NemotronAsrStreamingFeatureExtractor"}
_PROCESSORS = {NEMOTRON_TYPE: "NemotronAsrStreamingProcessor"}
LOG_ZERO_GUARD = 2.0**-24  # what transformers' Parakeet/Nemotron extractors add before the log


def _feature_problems(f: FeatureConfig, model_type: str) -> list[str]:
    problems = []
    want = "NA" if model_type == NEMOTRON_TYPE else "per_feature"
    if f.normalize != want:
        problems.append(f"preprocessor.normalize={f.normalize!r} ({model_type}'s feature extractor uses {want!r})")
    if f.lowfreq != 0.0 or f.highfreq not in (None, f.sample_rate / 2):
        problems.append("a mel band other than 0 Hz to Nyquist (transformers' extractors fix it)")
    if f.mag_power != 2.0 or f.log_zero_guard_value != LOG_ZERO_GUARD:
        problems.append("mag_power other than 2 or a log guard other than 2**-24")
    if f.preemph is None:
        problems.append("no pre-emphasis (transformers' extractors always apply it)")
    return problems


def _encoder_problems(e: EncoderConfig, streaming: bool) -> list[str]:
    problems = []
    if not e.untie_biases:
        problems.append("untie_biases=false (transformers keeps per-layer pos_bias_u/v)")
    if e.is_local_attention:
        problems.append("local attention (rel_pos_local_attn): transformers' FastConformer attends to the whole input")
        return problems
    if streaming:
        lefts = {left for left, _ in e.att_context_sizes}
        if e.conv_norm_type != "layer_norm" or not e.is_causal or len(lefts) != 1:
            problems.append(
                "a cache-aware encoder needs LayerNorm conv norm, causal conv and subsampling and one left "
                f"context for {NEMOTRON_TYPE} (has {e.conv_norm_type}, causal={e.is_causal}, lefts={sorted(lefts)})"
            )
    elif (
        e.causal_downsampling
        or e.conv_norm_type != "batch_norm"
        or e.att_context_sizes != ((-1, -1),)
        or e.conv_context != ((e.conv_kernel_size - 1) // 2,) * 2
    ):
        problems.append(
            "Parakeet (offline) needs full context [-1,-1], BatchNorm, a symmetric conv and non-causal subsampling"
        )
    return problems


def hf_model_type(config: ModelConfig) -> str:
    """The transformers ``model_type`` that expresses ``config``.

    Raises:
        UnsupportedCheckpointError: transformers has no class for this model, with every reason.
    """
    t, e = config.transducer, config.encoder
    streaming = e.att_context_style == "chunked_limited" or e.causal_downsampling
    problems: list[str] = []
    if config.model_class in HYBRID_CLASSES or (t is not None and config.ctc is not None):
        problems.append(f"{config.model_class}: transformers has no hybrid RNNT+CTC model class")
    if t is None:
        model_type = "parakeet_ctc"
        if streaming:
            problems.append("a cache-aware CTC model (transformers' streaming class is RNNT only)")
    elif streaming:
        model_type = NEMOTRON_TYPE
        if t.is_tdt:
            problems.append(f"a cache-aware TDT model ({NEMOTRON_TYPE} is RNNT only; parakeet_tdt is offline)")
    else:
        model_type = "parakeet_tdt" if t.is_tdt else "parakeet_rnnt"
    if t is not None and t.joint_hidden != t.pred_hidden:
        problems.append(f"joint_hidden {t.joint_hidden} != pred_hidden {t.pred_hidden} (HF has one size)")
    problems += _encoder_problems(e, streaming) + _feature_problems(config.features, model_type)
    if problems:
        raise UnsupportedCheckpointError(
            "no Hugging Face transformers equivalent: " + "; ".join(problems) + " (keep the .nemo file)"
        )
    return model_type


def _encoder_json(e: EncoderConfig, model_type: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model_type": "nemotron_asr_streaming_encoder" if model_type == NEMOTRON_TYPE else "parakeet_encoder",
        "hidden_size": e.d_model,
        "num_hidden_layers": e.n_layers,
        "num_attention_heads": e.n_heads,
        "num_key_value_heads": e.n_heads,
        "intermediate_size": e.d_model * e.ff_expansion_factor,
        "hidden_act": "silu",
        "attention_bias": e.use_bias,
        "convolution_bias": e.use_bias,
        "conv_kernel_size": e.conv_kernel_size,
        "subsampling_factor": e.subsampling_factor,
        "subsampling_conv_channels": e.subsampling_conv_channels,
        "subsampling_conv_kernel_size": 3,
        "subsampling_conv_stride": 2,
        "num_mel_bins": e.feat_in,
        "max_position_embeddings": e.pos_emb_max_len,
        "scale_input": e.xscaling,
        "dropout": 0.0,
        "dropout_positions": 0.0,
        "layerdrop": 0.0,
        "activation_dropout": 0.0,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
    }
    if model_type == NEMOTRON_TYPE:
        left, right = e.default_att_context_size
        cfg |= {"sliding_window": left + 1, "default_num_lookahead_tokens": right}
    return cfg


def config_json(config: ModelConfig, model_type: str) -> dict[str, Any]:
    """``config.json`` for ``config``: what ``PretrainedConfig.from_pretrained`` and `model_config` read."""
    blank = (config.transducer or config.ctc).vocab_size  # type: ignore[union-attr]
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": blank + 1,
        "pad_token_id": blank,
        "encoder_config": _encoder_json(config.encoder, model_type),
    }
    t = config.transducer
    if t is not None:
        cfg |= {
            "blank_token_id": blank,
            "decoder_start_token_id": blank,
            "decoder_hidden_size": t.pred_hidden,
            "num_decoder_layers": t.pred_rnn_layers,
            "hidden_act": t.joint_activation,
            "max_symbols_per_step": t.max_symbols,
            "is_encoder_decoder": True,
        }
        if t.is_tdt:
            cfg["durations"] = list(t.durations)
    if config.model_class not in _DEFAULT_CLASSES:  # transformers keeps unknown config.json keys as they are
        cfg[NEMO_CLASS_KEY] = config.model_class
    return cfg


def processor_json(config: ModelConfig, model_type: str) -> dict[str, Any]:
    """``processor_config.json``: the feature extractor's settings and, for Nemotron, the look-aheads."""
    f = config.features
    extractor = {
        "feature_extractor_type": _EXTRACTORS.get(model_type, "ParakeetFeatureExtractor"),
        "feature_size": f.n_mels,
        "sampling_rate": f.sample_rate,
        "hop_length": f.hop_length,
        "win_length": f.win_length,
        "n_fft": f.n_fft,
        "preemphasis": f.preemph,
        "padding_value": f.pad_value,
        "padding_side": "right",
        "return_attention_mask": True,
    }
    cfg: dict[str, Any] = {
        "processor_class": _PROCESSORS.get(model_type, "ParakeetProcessor"),
        "blank_token": "<blank>",
        "feature_extractor": extractor,
    }
    if model_type == NEMOTRON_TYPE:
        rights = [right for _, right in config.encoder.att_context_sizes]
        cfg |= {"supported_num_lookahead_tokens": rights, "default_num_lookahead_tokens": rights[0]}
    else:
        cfg["decoder_type"] = {"parakeet_ctc": "ctc", "parakeet_rnnt": "rnnt", "parakeet_tdt": "tdt"}[model_type]
    return cfg


def _dump(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hf(directory: Path, checkpoint: Checkpoint) -> str:
    """Write ``checkpoint`` into the empty or new ``directory``; returns the ``model_type`` written.

    Files: ``config.json``, ``generation_config.json`` (transducers), ``processor_config.json``,
    ``model.safetensors``, ``tokenizer.json`` and ``tokenizer_config.json`` (what transformers reads) and
    ``tokenizer.model`` (the SentencePiece model itself, which `load_hf` prefers: exact text encoding).

    Raises:
        UnsupportedCheckpointError: no transformers class fits (see `hf_model_type`).
        CheckpointError: the checkpoint has no tokenizer.
    """
    from safetensors.torch import save_file  # noqa: PLC0415

    config = checkpoint.config
    try:
        model_type = hf_model_type(config)
    except UnsupportedCheckpointError as exc:
        raise UnsupportedCheckpointError(f"{checkpoint.source}: {exc}") from exc
    if checkpoint.tokenizer_model is None:
        raise CheckpointError(f"{checkpoint.source}: no tokenizer, so no tokenizer.json can be written")
    directory.mkdir(parents=True, exist_ok=True)
    cfg = config_json(config, model_type)
    _dump(directory / "config.json", cfg)
    if config.transducer is not None:
        blank = cfg["blank_token_id"]
        _dump(directory / "generation_config.json", {"decoder_start_token_id": blank, "pad_token_id": blank})
    _dump(directory / "processor_config.json", processor_json(config, model_type))
    _dump(directory / "tokenizer.json", tokenizer_json_from_sentencepiece(checkpoint.tokenizer_model))
    _dump(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "ParakeetTokenizer",
            "backend": "tokenizers",
            "pad_token": "<blank>",
            "clean_up_tokenization_spaces": False,
            "processor_class": _PROCESSORS.get(model_type, "ParakeetProcessor"),
        },
    )
    (directory / "tokenizer.model").write_bytes(checkpoint.tokenizer_model)
    weights = {k: v.detach().cpu().contiguous() for k, v in to_hf_state_dict(checkpoint.state_dict, model_type).items()}
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return model_type
