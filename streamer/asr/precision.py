"""Where and in what precision the model runs: ``model.device`` and ``model.dtype`` checked, then applied.

The checks run before a model is loaded, so a box without CUDA, or a precision the device cannot run,
fails in a second with a message that says what to do, not after a minute of loading or with a torch
traceback. :func:`to_precision` puts the encoder (almost all the arithmetic) in float16 or bfloat16 and
keeps everything that decides tokens in float32:

* features: computed in float32 (on the CPU for streaming, by the preprocessor offline) and cast to the
  encoder's dtype only at its input;
* the encoder's own sensitive reductions: PyTorch's CUDA layer norm and softmax accumulate half inputs
  in float32, and attention's mask fill (-10000) is within float16's range;
* the decoders (prediction network, joint, CTC head): float32 weights on float32 encoder output, so the
  greedy argmax, its ties and the confidences are computed as in a float32 model.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from streamer.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?)$")  # the settings check the same form when they load


def check_device(name: str) -> torch.device:
    """``model.device`` as a torch device, after checking that this torch and this machine can use it.

    Raises:
        ConfigError: the name is malformed, CUDA is asked for and this torch has none (a CPU-only build, or
            no driver or GPU), or the GPU index is out of range.
    """
    if not DEVICE_PATTERN.fullmatch(name.strip()):
        raise ConfigError(f"model.device: {name!r} is not a device streamer runs on: use cpu, cuda or cuda:N")
    device = torch.device(name.strip())
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        build = f"this torch ({torch.__version__}) was built without CUDA" if torch.version.cuda is None else (
            f"this torch ({torch.__version__}, CUDA {torch.version.cuda}) finds no GPU or driver")
        raise ConfigError(f"model.device={name}: {build}. Install a CUDA build of torch on a machine with an "
                          "NVIDIA GPU and driver (README, section GPU), or set model.device=cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"model.device={name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return device


def check_dtype(name: str, device: torch.device) -> torch.dtype:
    """``model.dtype`` as a torch dtype, after checking that ``device`` runs it.

    Raises:
        ConfigError: an unknown name; float16 or bfloat16 on the CPU (streamer's CPU kernels are float32,
            with int8 weights as the fast option in ``streamer bench``); bfloat16 on a GPU without it.
    """
    if name not in DTYPES:
        raise ConfigError(f"model.dtype: {name!r} is not one of {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype is torch.float32:
        return dtype
    if device.type == "cpu":
        raise ConfigError(f"model.dtype={name} runs on CUDA GPUs only (set model.device=cuda); on the CPU "
                          "use float32")
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"model.dtype=bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16; "
                          "use float16 or float32")
    return dtype


def exact_float32_on_cuda() -> None:
    """Make CUDA float32 mean float32: cuDNN's convolutions default to TF32 (a 10-bit mantissa) on Ampere and
    later GPUs, enough to change tokens against the CPU. Process-wide: a daemon runs one model."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def encoder_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's encoder computes in."""
    return next(model.encoder.parameters()).dtype  # type: ignore[union-attr]


def to_precision(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Put ``model.encoder`` in ``dtype`` and keep the rest in float32; returns ``model`` (changed in place).

    float32 on a CUDA model turns TF32 off (:func:`exact_float32_on_cuda`), so that it gives the CPU's tokens.

    The encoder's offline ``forward`` gets hooks that cast its input to ``dtype`` and its output back to
    float32, so every caller (``transcribe_offline``, ``eval``) keeps passing and getting float32. The
    streaming step casts at the same two places (:class:`~streamer.engine.recognizer.Recognizer`). Call it
    once, before building a ``StreamingEncoder``, which copies projections in the encoder's dtype.
    """
    if dtype is torch.float32:
        if next(model.parameters()).device.type == "cuda":
            exact_float32_on_cuda()
        return model
    encoder: nn.Module = model.encoder  # type: ignore[assignment]
    encoder.to(dtype)

    def cast_input(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        mel, *rest = args
        return (mel.to(dtype), *rest), kwargs

    def cast_output(_module: nn.Module, _args: tuple, _kwargs: dict, out: tuple[Tensor, Tensor]) -> tuple:
        return out[0].float(), out[1]

    encoder.register_forward_pre_hook(cast_input, with_kwargs=True)
    encoder.register_forward_hook(cast_output, with_kwargs=True)
    return model
