"""Conversions between the recognizer's three clocks: audio samples, mel frames and encoder frames.

Every other module asks this one how many frames a number of samples gives, so the arithmetic lives
in one place: the rates and periods (16 kHz audio, 10 ms mel frames, 80 ms encoder frames), the mel
frame count of the front end and the length formula of the strided subsampling convs. The defaults
are those of every supported model (25 ms Hann window in a 512-point FFT, 10 ms hop, 8x subsampling);
pass the checkpoint's values where they could differ. Stdlib only at run time (torch only for type
checking), so the audio layer and clients may read the rates without importing torch.

Shape legend used across ``streamer.asr``::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from torch import Tensor

SAMPLE_RATE_HZ = 16000  # the models' audio rate; every input is resampled to it
HOP_LENGTH = 160  # samples per mel frame (10 ms)
WIN_LENGTH = 400  # samples in the analysis window (25 ms)
N_FFT = 512
SUBSAMPLING_FACTOR = 8  # mel frames per encoder frame

MEL_FRAME_S = HOP_LENGTH / SAMPLE_RATE_HZ  # 0.01: seconds per mel frame (NeMo's window_stride)
WINDOW_S = WIN_LENGTH / SAMPLE_RATE_HZ  # 0.025: seconds per analysis window (NeMo's window_size)

Count = TypeVar("Count", int, "Tensor")


def encoder_frame_s(mel_frame_s: float = MEL_FRAME_S, subsampling_factor: int = SUBSAMPLING_FACTOR) -> float:
    """Seconds per encoder frame: the mel hop times the subsampling factor (0.08 for 10 ms and 8x)."""
    return mel_frame_s * subsampling_factor


ENCODER_FRAME_S = encoder_frame_s()  # 0.08: seconds per encoder frame, NeMo's timestamp unit


def num_mel_frames(num_samples: Count, hop_length: int = HOP_LENGTH, n_fft: int = N_FFT) -> Count:
    """Valid mel frames of ``num_samples`` samples: NeMo 3.0.0's ``seq_len``.

    NeMo computes ``(S + 2 * (n_fft // 2) - n_fft) // hop``, which is ``S // hop`` for an even FFT size.
    Works on Python ints and on integer tensors (lengths of a batch).
    """
    return (num_samples + 2 * (n_fft // 2) - n_fft) // hop_length


def num_stft_frames(num_samples: Count, hop_length: int = HOP_LENGTH) -> Count:
    """Columns of the centred STFT of ``num_samples`` samples: ``1 + S // hop``.

    This is the width of NeMo's feature tensor; the last column is padding (see :func:`num_mel_frames`).
    """
    return 1 + num_samples // hop_length


def window_reach(win_length: int = WIN_LENGTH, n_fft: int = N_FFT) -> int:
    """Samples past a frame's centre that its window covers: frame m needs samples ``< hop * m + reach``.

    The centred STFT puts the window in the middle of the FFT frame (``(n_fft - win) // 2`` zeros on its
    left), and the frame's centre sits ``n_fft // 2`` samples into it. For 400/512 the reach is 200, so
    frame m covers samples ``[160m - 200, 160m + 200)``.
    """
    return (n_fft - win_length) // 2 + win_length - n_fft // 2


def num_complete_mel_frames(
    num_samples: int, hop_length: int = HOP_LENGTH, win_length: int = WIN_LENGTH, n_fft: int = N_FFT
) -> int:
    """Mel frames whose whole window lies within the first ``num_samples`` samples.

    These are the frames an incremental front end can emit before it knows where the audio ends.
    """
    return max(0, (num_samples - window_reach(win_length, n_fft)) // hop_length + 1)


def num_encoder_frames(num_mel_frames: Count, subsampling_factor: int = SUBSAMPLING_FACTOR, *,
                       is_causal: bool) -> Count:
    """Encoder frames produced from valid mel frames by ``dw_striding`` subsampling (NeMo ``calc_length``).

    Each of the log2(factor) kernel-3 stride-2 convs maps ``L -> (L + pad - 3) // 2 + 1`` with
    ``pad = 3`` (causal: 2 left, 1 right) or ``pad = 2`` (symmetric: 1 and 1).
    """
    length = num_mel_frames
    for _ in range(num_strided_convs(subsampling_factor)):
        length = strided_conv_length(length, is_causal=is_causal)
    return length


def num_strided_convs(subsampling_factor: int = SUBSAMPLING_FACTOR) -> int:
    """Stride-2 convs of ``dw_striding`` subsampling: log2 of the factor.

    Raises:
        ValueError: the factor is not a power of 2 (at least 2).
    """
    num_layers = round(math.log2(subsampling_factor)) if subsampling_factor > 0 else 0
    if 2**num_layers != subsampling_factor or num_layers < 1:
        raise ValueError(f"dw_striding subsampling factor must be a power of 2, got {subsampling_factor}")
    return num_layers


def strided_conv_length(length: Count, *, is_causal: bool) -> Count:
    """Output length of one kernel-3 stride-2 conv, in time or in frequency (NeMo ``calc_length``, one step).

    ``pad = 3`` (causal: 2 before, 1 after) or ``pad = 2`` (symmetric: 1 and 1); ``//`` floors on ints
    and on integer tensors alike.
    """
    total_pad = 3 if is_causal else 2
    return (length + total_pad - 3) // 2 + 1


def samples_to_seconds(num_samples: int, sample_rate_hz: int = SAMPLE_RATE_HZ) -> float:
    """Duration of ``num_samples`` samples."""
    return num_samples / sample_rate_hz


def mel_frames_to_seconds(num_frames: int, hop_length: int = HOP_LENGTH,
                          sample_rate_hz: int = SAMPLE_RATE_HZ) -> float:
    """Time of mel frame index ``num_frames`` (its centre), or the duration of that many frames."""
    return num_frames * hop_length / sample_rate_hz


def encoder_frames_to_seconds(num_frames: int, frame_shift_s: float = ENCODER_FRAME_S) -> float:
    """Time of encoder frame index ``num_frames`` as NeMo reports timestamps (``offset * 0.08``)."""
    return num_frames * frame_shift_s
