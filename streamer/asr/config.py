"""Typed model configuration, read from a NeMo ``model_config.yaml`` (or built by hand).

Every dimension, the blank id, the TDT durations and the preprocessing come from here; nothing in
``streamer.asr`` hard-codes them. The field names follow NeMo's config keys where one exists, so a
reader can check a value against the checkpoint's yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from streamer.asr import clocks

ContextSize = tuple[int, int]


@dataclass(frozen=True, slots=True)
class FeatureConfig:
    """NeMo ``AudioToMelSpectrogramPreprocessor`` settings (inference view: no dither, no pad_to)."""

    sample_rate: int = clocks.SAMPLE_RATE_HZ
    window_size: float = clocks.WINDOW_S  # seconds; win_length = int(window_size * sample_rate)
    window_stride: float = clocks.MEL_FRAME_S  # seconds; hop_length = int(window_stride * sample_rate)
    n_fft: int = clocks.N_FFT
    n_mels: int = 80
    preemph: float | None = 0.97
    log_zero_guard_value: float = 2.0**-24
    mag_power: float = 2.0
    normalize: str = "NA"  # "NA" (none) or "per_feature"
    lowfreq: float = 0.0
    highfreq: float | None = None
    pad_value: float = 0.0

    @property
    def win_length(self) -> int:
        return int(self.window_size * self.sample_rate)

    @property
    def hop_length(self) -> int:
        return int(self.window_stride * self.sample_rate)


@dataclass(frozen=True, slots=True)
class EncoderConfig:
    """NeMo ``ConformerEncoder`` settings for a FastConformer (dw_striding; rel_pos or rel_pos_local_attn)."""

    feat_in: int = 80
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    ff_expansion_factor: int = 4
    subsampling_factor: int = clocks.SUBSAMPLING_FACTOR
    subsampling_conv_channels: int = 64
    causal_downsampling: bool = True
    # All context sizes the model supports; the first is NeMo's default at inference.
    att_context_sizes: tuple[ContextSize, ...] = ((70, 13), (70, 1))
    att_context_style: str = "chunked_limited"  # or "regular"
    xscaling: bool = True
    untie_biases: bool = True
    pos_emb_max_len: int = 5000
    conv_kernel_size: int = 9
    conv_norm_type: str = "layer_norm"  # or "batch_norm"
    conv_context_size: ContextSize | None = None  # None -> symmetric ((K-1)//2, (K-1)//2)
    use_bias: bool = True
    # "rel_pos" (full attention under the context mask) or "rel_pos_local_attn" (a sliding window of
    # att_context_sizes[0] plus global tokens; offline only, linear in the audio's length)
    self_attention_model: str = "rel_pos"
    global_tokens: int = 0
    global_tokens_spacing: int = 1
    global_attn_separate: bool = False

    @property
    def is_local_attention(self) -> bool:
        return self.self_attention_model == "rel_pos_local_attn"

    @property
    def conv_context(self) -> ContextSize:
        """Left and right padding of the depthwise conv, NeMo's ``conv_context_size``."""
        if self.conv_context_size is None:
            k = self.conv_kernel_size
            return ((k - 1) // 2, (k - 1) // 2)
        return self.conv_context_size

    @property
    def is_causal(self) -> bool:
        """True when the encoder can run cache-aware streaming (causal subsampling and conv)."""
        return self.causal_downsampling and self.conv_context[1] == 0

    @property
    def default_att_context_size(self) -> ContextSize:
        return self.att_context_sizes[0]


@dataclass(frozen=True, slots=True)
class TransducerConfig:
    """RNNT/TDT prediction network and joint (NeMo ``RNNTDecoder`` + ``RNNTJoint``)."""

    vocab_size: int  # V: number of tokenizer pieces; blank id == V
    pred_hidden: int = 64
    pred_rnn_layers: int = 1
    joint_hidden: int = 64
    joint_activation: str = "relu"
    joint_dropout_layer: bool = False  # True when NeMo's joint_net has a Dropout (key joint.joint_net.2.*)
    durations: tuple[int, ...] = ()  # TDT durations; empty for plain RNNT
    max_symbols: int = 10  # per encoder frame

    @property
    def blank_id(self) -> int:
        return self.vocab_size

    @property
    def is_tdt(self) -> bool:
        return len(self.durations) > 0

    @property
    def num_outputs(self) -> int:
        return self.vocab_size + 1 + len(self.durations)


@dataclass(frozen=True, slots=True)
class CTCConfig:
    """A CTC head (NeMo ``ConvASRDecoder``): Conv1d(d_model -> V+1, k=1), blank = V."""

    vocab_size: int
    feat_in: int
    key_prefix: str = "ctc_decoder"  # "decoder" for pure CTC models


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Everything needed to build a recognizer from a checkpoint."""

    features: FeatureConfig
    encoder: EncoderConfig
    transducer: TransducerConfig | None = None
    ctc: CTCConfig | None = None
    model_class: str = "EncDecRNNTBPEModel"
    # Special tokens: ids of pieces that mark end of utterance / backchannel (EOU models), not text.
    eou_token_ids: tuple[int, ...] = ()
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def frame_shift_s(self) -> float:
        """Seconds per encoder frame (0.08 for 10 ms hop and 8x subsampling)."""
        return clocks.encoder_frame_s(self.features.window_stride, self.encoder.subsampling_factor)
