"""Write a complete NeMo 3.0.0 ``model_config.yaml`` (as a dict) for our typed `ModelConfig`.

`nemo_config_from` is the inverse of :func:`streamer.asr.nemoconfig.parse_nemo_config`: NeMo's
``restore_from`` instantiates the config it writes (nemo-reference.md §1, §3.1, §7, §9.1).

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
"""

from __future__ import annotations

from typing import Any

from streamer.asr.config import CTCConfig, EncoderConfig, FeatureConfig, ModelConfig, TransducerConfig
from streamer.asr.nemoconfig import HYBRID_CLASSES, MODEL_TARGETS
from streamer.errors import CheckpointError, UnsupportedCheckpointError

NEMO_MODULES = "nemo.collections.asr.modules."

# Artifacts of a BPE tokenizer: config key under `tokenizer` -> file name inside the .nemo (after the prefix).
TOKENIZER_ARTIFACTS: dict[str, str] = {
    "model_path": "tokenizer.model",
    "vocab_path": "vocab.txt",
    "spe_tokenizer_vocab": "tokenizer.vocab",
}


def _features_section(f: FeatureConfig) -> dict[str, Any]:
    return {
        "_target_": NEMO_MODULES + "AudioToMelSpectrogramPreprocessor",
        "sample_rate": f.sample_rate,
        "normalize": f.normalize,
        "window_size": f.window_size,
        "window_stride": f.window_stride,
        "window": "hann",
        "features": f.n_mels,
        "n_fft": f.n_fft,
        "lowfreq": f.lowfreq,
        "highfreq": f.highfreq,
        "preemph": f.preemph,
        "log": True,
        "log_zero_guard_type": "add",
        "log_zero_guard_value": f.log_zero_guard_value,
        "mag_power": f.mag_power,
        "frame_splicing": 1,
        "dither": 1.0e-05,  # training only
        "pad_to": 0,  # NeMo's class default is 16; inference must not pad
        "pad_value": f.pad_value,
    }


def _encoder_section(e: EncoderConfig) -> dict[str, Any]:
    sizes = [list(size) for size in e.att_context_sizes]
    section = {
        "_target_": NEMO_MODULES + "ConformerEncoder",
        "feat_in": e.feat_in,
        "feat_out": -1,
        "n_layers": e.n_layers,
        "d_model": e.d_model,
        "subsampling": "dw_striding",
        "subsampling_factor": e.subsampling_factor,
        "subsampling_conv_channels": e.subsampling_conv_channels,
        "causal_downsampling": e.causal_downsampling,
        "ff_expansion_factor": e.ff_expansion_factor,
        "self_attention_model": e.self_attention_model,
        "n_heads": e.n_heads,
        "att_context_size": sizes[0] if len(sizes) == 1 else sizes,
        "att_context_style": e.att_context_style,
        "xscaling": e.xscaling,
        "untie_biases": e.untie_biases,
        "pos_emb_max_len": e.pos_emb_max_len,
        "conv_kernel_size": e.conv_kernel_size,
        "conv_norm_type": e.conv_norm_type,
        "conv_context_size": None if e.conv_context_size is None else list(e.conv_context_size),
        "use_bias": e.use_bias,
        "dropout": 0.1,
        "dropout_pre_encoder": 0.1,
        "dropout_emb": 0.0,
        "dropout_att": 0.1,
    }
    if e.is_local_attention:
        section |= {
            "global_tokens": e.global_tokens,
            "global_tokens_spacing": e.global_tokens_spacing,
            "global_attn_separate": e.global_attn_separate,
        }
    return section


def _transducer_sections(t: TransducerConfig, d_model: int, pieces: list[str]) -> dict[str, Any]:
    durations = list(t.durations)
    decoding: dict[str, Any] = {"strategy": "greedy_batch", "greedy": {"max_symbols": t.max_symbols}}
    loss: dict[str, Any] = {"loss_name": "default"}
    if t.is_tdt:
        decoding |= {"model_type": "tdt", "durations": durations}
        loss = {
            "loss_name": "tdt",
            "tdt_kwargs": {
                "fastemit_lambda": 0.0,
                "clamp": -1.0,
                "durations": durations,
                "sigma": 0.02,
                "omega": 0.1,
            },
        }
    return {
        "decoder": {
            "_target_": NEMO_MODULES + "RNNTDecoder",
            "normalization_mode": None,
            "random_state_sampling": False,
            "blank_as_pad": True,
            "vocab_size": t.vocab_size,
            "prednet": {
                "pred_hidden": t.pred_hidden,
                "pred_rnn_layers": t.pred_rnn_layers,
                "t_max": None,
                "dropout": 0.2,
            },
        },
        "joint": {
            "_target_": NEMO_MODULES + "RNNTJoint",
            "log_softmax": None,
            "preserve_memory": False,
            "fuse_loss_wer": False,
            "fused_batch_size": -1,
            "num_classes": t.vocab_size,
            "vocabulary": pieces,
            "num_extra_outputs": len(durations),
            "jointnet": {
                "joint_hidden": t.joint_hidden,
                "activation": t.joint_activation,
                "dropout": 0.2 if t.joint_dropout_layer else 0.0,
                "encoder_hidden": d_model,
                "pred_hidden": t.pred_hidden,
            },
        },
        "decoding": decoding,
        "loss": loss,
    }


def _ctc_decoder_section(c: CTCConfig, pieces: list[str]) -> dict[str, Any]:
    return {
        "_target_": NEMO_MODULES + "ConvASRDecoder",
        "feat_in": c.feat_in,
        "num_classes": c.vocab_size,
        "vocabulary": pieces,
    }


def nemo_config_from(config: ModelConfig, tokenizer_model: bytes, *, artifact_prefix: str) -> dict[str, Any]:
    """A complete NeMo 3.0.0 model config for ``config``: what ``restore_from`` needs to rebuild the model.

    Training-only sections (datasets, optimiser, SpecAugment) are null; dropouts get recipe values.

    Args:
        config: the model to describe.
        tokenizer_model: the SentencePiece model; its pieces become the vocabulary.
        artifact_prefix: 32 hex digits; the tokenizer files are referred to as
            ``nemo:<artifact_prefix>_tokenizer.model`` and so on (see `TOKENIZER_ARTIFACTS`).

    Raises:
        CheckpointError: the tokenizer does not match the vocabulary size of the heads.
    """
    import sentencepiece  # noqa: PLC0415 - keeps `import streamer.asr.nemoconfig` light

    sp = sentencepiece.SentencePieceProcessor(model_proto=tokenizer_model)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    heads = [h.vocab_size for h in (config.transducer, config.ctc) if h is not None]
    if any(v != len(pieces) for v in heads):
        raise CheckpointError(f"tokenizer has {len(pieces)} pieces but the model heads expect {heads}")
    if config.model_class not in MODEL_TARGETS:
        raise UnsupportedCheckpointError(f"cannot write model class {config.model_class!r}")
    d_model = config.encoder.d_model
    cfg: dict[str, Any] = {
        "target": MODEL_TARGETS[config.model_class],
        "sample_rate": config.features.sample_rate,
        "log_prediction": True,
        "labels": pieces,
        "tokenizer": {"dir": None, "type": "bpe"}
        | {key: f"nemo:{artifact_prefix}_{name}" for key, name in TOKENIZER_ARTIFACTS.items()},
        "train_ds": None,
        "validation_ds": None,
        "test_ds": None,
        "optim": None,
        "preprocessor": _features_section(config.features),
        "spec_augment": None,
        "encoder": _encoder_section(config.encoder),
    }
    if config.transducer is not None:
        t = config.transducer
        cfg["model_defaults"] = {
            "enc_hidden": d_model,
            "pred_hidden": t.pred_hidden,
            "joint_hidden": t.joint_hidden,
        }
        if t.is_tdt:
            cfg["model_defaults"] |= {
                "tdt_durations": list(t.durations),
                "num_tdt_durations": len(t.durations),
            }
        cfg |= _transducer_sections(t, d_model, pieces)
    if config.ctc is not None and config.model_class in HYBRID_CLASSES:
        cfg["aux_ctc"] = {
            "ctc_loss_weight": 0.3,
            "use_cer": False,
            "ctc_reduction": "mean_batch",
            "decoder": _ctc_decoder_section(config.ctc, pieces),
            "decoding": {"strategy": "greedy"},
        }
    elif config.ctc is not None:
        cfg["decoder"] = _ctc_decoder_section(config.ctc, pieces)
        cfg["decoding"] = {"strategy": "greedy"}
    return cfg
