"""The recognizer's module tree: front end, encoder, transducer and/or CTC heads, under NeMo's attribute names.

Because the names equal NeMo's, the tree's state dict has exactly a NeMo checkpoint's keys: the model
loads weights 1:1 with ``strict=True``, and the checkpoint check derives every expected key and shape
from this tree built on the meta device (:mod:`streamer.asr.shapes`).

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
"""

from __future__ import annotations

from torch import nn

from streamer.asr.config import ModelConfig
from streamer.asr.ctc import ConvASRDecoder
from streamer.asr.encoder import FastConformerEncoder
from streamer.asr.features import Preprocessor
from streamer.asr.transducer import RNNTDecoder, RNNTJoint
from streamer.errors import ConfigError


class AsrNetwork(nn.Module):
    """The modules of a FastConformer recognizer with a TDT/RNNT head, a CTC head, or both (hybrid).

    Args:
        config: the model configuration.

    Raises:
        ConfigError: the config has neither a transducer nor a CTC head, or a part it cannot build.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.preprocessor = Preprocessor(config.features)
        self.encoder = FastConformerEncoder(config.encoder)
        self.joint: RNNTJoint | None = None
        self.ctc_decoder: ConvASRDecoder | None = None
        if config.transducer is not None:
            self.decoder: nn.Module = RNNTDecoder(config.transducer)
            self.joint = RNNTJoint(config.transducer, config.encoder.d_model)
        if config.ctc is not None:
            ctc = ConvASRDecoder(config.ctc)
            if config.ctc.key_prefix == "decoder":  # a pure CTC model: NeMo calls its head `decoder`
                self.decoder = ctc
            else:
                self.ctc_decoder = ctc
        if config.transducer is None and config.ctc is None:
            raise ConfigError("a model needs a transducer or a CTC head")
