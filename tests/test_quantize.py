"""Int8 weights: close to float32, same shapes, every linear replaced."""

import torch

from streamer.asr.config import EncoderConfig
from streamer.asr.encoder import FastConformerEncoder
from streamer.asr.quantize import Int8Linear, quantize_linears_int8


def test_int8_linear_is_close_to_float() -> None:
    """Per-channel int8 weights give outputs within a few tenths of a percent of float32."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 128)
    x = torch.randn(3, 5, 64)
    q = Int8Linear(lin)
    with torch.inference_mode():
        ref, got = lin(x), q(x)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert ((got - ref).norm() / ref.norm()) < 1e-2
    assert q.qweight.dtype == torch.int8


def test_quantized_encoder_streams_close_to_float() -> None:
    """An int8 encoder (sizes multiples of 64) replaces every linear and stays close to the float one."""
    torch.manual_seed(0)
    enc = FastConformerEncoder(EncoderConfig(feat_in=80, n_layers=2, d_model=64, n_heads=4,
                                             subsampling_conv_channels=64, conv_context_size=(8, 0))).eval()
    mel = torch.randn(1, 80, 120)
    with torch.inference_mode():
        ref, _ = enc(mel, torch.tensor([120]))
        q = quantize_linears_int8(enc)
        got, _ = q(mel, torch.tensor([120]))
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    assert ((got - ref).norm() / ref.norm()) < 3e-2
