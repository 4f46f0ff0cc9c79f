"""Int8 weights for CPU inference of memory-bound streaming steps.

At one stream and a short look-ahead a cache-aware step multiplies a few encoder frames by every
weight matrix, so it is bound by reading the weights, not by arithmetic. Storing the linear
weights as int8 with one scale per output channel (weight-only quantization, bf16 activations,
PyTorch's ``_weight_int8pack_mm`` kernel) reads a quarter of the bytes. Results are close to, not
equal to, float32: never use it for parity tests. Opt-in (``--dtypes int8`` in ``streamer bench``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` with per-output-channel symmetric int8 weights."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.qweight, self.scales)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


# The int8 kernel works on blocked layouts; odd sizes crash it, so those layers stay float.
BLOCK = 64


def quantizable(linear: nn.Linear) -> bool:
    return linear.in_features % BLOCK == 0 and linear.out_features % BLOCK == 0


def quantize_linears_int8(module: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` below ``module`` whose sizes are multiples of 64 by an
    :class:`Int8Linear`, in place (all of them in real models); returns ``module``."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and quantizable(child):
            setattr(module, name, Int8Linear(child))
        else:
            quantize_linears_int8(child)
    return module
