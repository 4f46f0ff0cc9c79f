"""The weights a model config implies: every state-dict key and shape, read off the model built on the meta device.

The module tree (:class:`~streamer.asr.network.AsrNetwork`) names its parameters as NeMo does, so its
state dict on the meta device (no memory, no initialisation) lists exactly the keys and shapes a
checkpoint must hold (nemo-reference.md Appendix B). Nothing restates them by hand.

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from streamer.asr.checkpoint import FEATURE_BUFFER_KEYS
from streamer.asr.config import ModelConfig
from streamer.asr.network import AsrNetwork
from streamer.errors import CheckpointError, ConfigError

# Keys old NeMo versions saved that today's modules no longer have (non-persistent buffers).
OBSOLETE_KEYS = ("encoder.pos_enc.pe",)


class _ShapesOnly(TorchFunctionMode):
    """Build modules for their shapes only: parameters on the meta device and no random initialisation.

    Not ``with torch.device("meta")``: on meta tensors ``normal_`` and ``hann_window`` run through
    torch's Python decompositions, whose first use imports sympy and friends (2 s, 800 modules). So the
    allocators that modules use for parameters go to meta, the random initialisers do nothing, and the
    few small buffers made otherwise (the mel window and filterbank) are computed on the CPU.
    """

    _ALLOCATORS = frozenset({torch.empty, torch.zeros, torch.ones})
    _INITIALISERS = frozenset({"normal_", "uniform_"})

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self._INITIALISERS:  # Tensor.normal_(...), nn.init.normal_(tensor=)
            return args[0] if args else kwargs["tensor"]
        if func in self._ALLOCATORS and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key a NeMo model with ``config`` has, with its shape (incl. the feature buffers).

    Raises:
        ConfigError: the config describes a model that cannot be built.
    """
    with _ShapesOnly():
        network = AsrNetwork(config)
    return {key: tuple(tensor.shape) for key, tensor in network.state_dict().items()}


def check_state_dict(config: ModelConfig, state_dict: dict[str, Tensor], source: str) -> None:
    """Check that ``state_dict`` has exactly the keys and shapes ``config`` implies.

    The feature buffers may be absent (HF checkpoints); obsolete non-persistent buffers are removed.

    Raises:
        CheckpointError: naming the first missing, unexpected or mis-shaped key, or the config is not
            one a model can be built from.
    """
    for key in OBSOLETE_KEYS:
        state_dict.pop(key, None)
    try:
        expected = expected_shapes(config)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc
    optional = set(FEATURE_BUFFER_KEYS) if not any(k in state_dict for k in FEATURE_BUFFER_KEYS) else set()
    missing = [key for key in expected if key not in state_dict and key not in optional]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has the unexpected key {unexpected[0]}"
        counts = f"({len(missing)} missing, {len(unexpected)} unexpected keys)"
        raise CheckpointError(f"{source}: weights do not match the config: it {what} {counts}")
    for key, tensor in state_dict.items():
        if not isinstance(tensor, Tensor):
            raise CheckpointError(f"{source}: weight {key} is a {type(tensor).__name__}, not a tensor")
        if tuple(tensor.shape) != expected[key]:
            raise CheckpointError(
                f"{source}: weight {key} has shape {list(tensor.shape)}, "
                f"the config implies {list(expected[key])}"
            )
