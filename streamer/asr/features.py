"""NeMo 3.0.0's log-mel front end (``AudioToMelSpectrogramPreprocessor``), offline and incremental.

The offline path reproduces NeMo's ``FilterbankFeatures.forward`` at inference (no dither, no
``pad_to``) op for op, so that with the checkpoint's ``window`` and ``fb`` buffers the features are
bit-identical on CPU. The incremental path (:meth:`FilterbankFeatures.step`) runs the same routine on
the frames whose window is complete, so its frames equal the offline ones.

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from streamer.asr import clocks
from streamer.asr.config import FeatureConfig
from streamer.errors import ConfigError, UnsupportedCheckpointError

NORMALIZE_STD_EPS = 1e-5  # NeMo adds this to the standard deviation, not to the variance


@dataclass(frozen=True, slots=True)
class FeatureState:
    """What the incremental front end carries between calls. Shapes use the legend in the module docstring.

    ``tail`` holds the newest ``n_fft`` samples of the pre-emphasised signal *including* the STFT's
    ``n_fft // 2`` zeros of left padding, i.e. padded positions ``[S - n_fft//2, S + n_fft//2)``; that is
    enough for every frame not yet emitted.
    """

    tail: Tensor  # (B, n_fft)  float32, pre-emphasised, zero-padded on the left
    last_sample: Tensor  # (B,)  float32, the last raw sample (pre-emphasis carry)
    num_samples: Tensor  # (B,)  int64, samples received so far
    num_frames: Tensor  # (B,)  int64, mel frames emitted so far

    BATCH_DIM: ClassVar[dict[str, int]] = {"tail": 0, "last_sample": 0, "num_samples": 0, "num_frames": 0}


# --------------------------------------------------------------------------------------------------
# Mel filterbank (Slaney scale and area normalisation, librosa's defaults)

_SLANEY_HZ_PER_MEL = 200.0 / 3  # linear part: 3 mels per 200 Hz
_SLANEY_LOG_START_HZ = 1000.0
_SLANEY_LOG_START_MEL = _SLANEY_LOG_START_HZ / _SLANEY_HZ_PER_MEL  # 15 mels
_SLANEY_LOG_STEP = np.log(6.4) / 27.0  # log part: 27 mels per factor 6.4


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale (``htk=False``): linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _SLANEY_HZ_PER_MEL
    with np.errstate(divide="ignore"):  # log(0) only arises where the linear branch is taken
        log = _SLANEY_LOG_START_MEL + np.log(hz / _SLANEY_LOG_START_HZ) / _SLANEY_LOG_STEP
    return np.where(hz >= _SLANEY_LOG_START_HZ, log, linear)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    linear = _SLANEY_HZ_PER_MEL * mel
    log = _SLANEY_LOG_START_HZ * np.exp(_SLANEY_LOG_STEP * (mel - _SLANEY_LOG_START_MEL))
    return np.where(mel >= _SLANEY_LOG_START_MEL, log, linear)


def mel_filterbank(cfg: FeatureConfig) -> np.ndarray:
    """Triangular mel filters over the one-sided FFT bins: (F, n_fft // 2 + 1) float32.

    Filter i rises from edge ``f[i]`` to its peak at ``f[i+1]`` and falls to ``f[i+2]``, the edges being
    ``n_mels + 2`` points evenly spaced on the Slaney mel scale from ``lowfreq`` to ``highfreq``. Each filter
    is scaled by ``2 / (f[i+2] - f[i])`` so its area over Hz is one (Slaney normalisation). Computed in
    float64; like librosa, the unscaled triangles are rounded to float32 before the scaling, and the
    product again. Checkpoints carry this matrix and overwrite ours when loaded.
    """
    highfreq = cfg.highfreq if cfg.highfreq is not None else cfg.sample_rate / 2
    num_bins = cfg.n_fft // 2 + 1
    bin_hz = np.linspace(0.0, cfg.sample_rate / 2, num_bins)  # centre frequency of each FFT bin
    mels = np.linspace(hz_to_mel(np.float64(cfg.lowfreq)), hz_to_mel(np.float64(highfreq)), cfg.n_mels + 2)
    edges_hz = mel_to_hz(mels)  # (F + 2,)
    widths_hz = np.diff(edges_hz)  # (F + 1,)
    offsets = edges_hz[:, None] - bin_hz[None, :]  # (F + 2, bins): edge minus bin frequency
    weights = np.zeros((cfg.n_mels, num_bins), dtype=np.float32)
    for i in range(cfg.n_mels):
        rising = -offsets[i] / widths_hz[i]
        falling = offsets[i + 2] / widths_hz[i + 1]
        weights[i] = np.maximum(0.0, np.minimum(rising, falling))  # rounds to float32 here
    area_norm = 2.0 / (edges_hz[2:] - edges_hz[:-2])  # (F,)
    weights *= area_norm[:, None]  # float64 product, stored as float32
    return weights


# --------------------------------------------------------------------------------------------------
# Normalisation and masking


# Offline features of longer inputs are computed this many frames (60 s) at a time.
LONG_WINDOW_FRAMES = 6000


def length_mask(lengths: Tensor, size: int) -> Tensor:
    """(B, size) bool, True at positions ``i < lengths[b]`` (valid samples or frames)."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def normalize_per_feature(feats: Tensor, lengths: Tensor) -> Tensor:
    """NeMo's ``per_feature`` normalisation: each utterance and mel bin to zero mean and unit std.

    Statistics use the valid frames ``m < lengths[b]`` only; the std is unbiased (n - 1), NaN (one frame)
    becomes 0, and 1e-5 is added to it. Invalid frames come out as garbage; the caller masks them.

    Args:
        feats: (B, F, M) log-mel features.
        lengths: (B,) int64 valid frames per utterance.

    Returns:
        (B, F, M) normalised features.
    """
    valid = length_mask(lengths, feats.shape[2])[:, None, :]  # (B, 1, M)
    count = valid.sum(dim=2)  # (B, 1)
    mean = torch.where(valid, feats, 0.0).sum(dim=2) / count  # (B, F)
    deviation = torch.where(valid, feats - mean[:, :, None], 0.0)  # (B, F, M)
    std = torch.sqrt(deviation.pow(2).sum(dim=2) / (count - 1.0))  # (B, F)
    std = std.masked_fill(std.isnan(), 0.0)
    std = std + NORMALIZE_STD_EPS
    return (feats - mean[:, :, None]) / std[:, :, None]


# --------------------------------------------------------------------------------------------------
# Modules


class FilterbankFeatures(nn.Module):
    """NeMo 3.0.0's log-mel features (inference): offline ``forward``; ``init_state``/``step``/``finish``.

    Buffers ``window`` (win_length,) and ``fb`` (1, F, n_fft // 2 + 1) are persistent, as in NeMo, so a
    checkpoint's copies replace the ones computed here.
    """

    def __init__(self, cfg: FeatureConfig) -> None:
        """Check ``cfg`` and compute the default window and filterbank."""
        super().__init__()
        if not 0 < cfg.win_length <= cfg.n_fft or cfg.hop_length <= 0:
            raise ConfigError(
                f"features: need 0 < win_length ({cfg.win_length}) <= n_fft ({cfg.n_fft}) "
                f"and hop_length > 0 ({cfg.hop_length}); check window_size, window_stride and n_fft"
            )
        if cfg.normalize == "all_features":
            raise UnsupportedCheckpointError("features: normalize='all_features' is not supported")
        self.cfg = cfg
        # NeMo's window: torch's symmetric Hann, w[n] = 0.5 - 0.5 cos(2 pi n / (win - 1)).
        self.register_buffer("window", torch.hann_window(cfg.win_length, periodic=False))
        self.register_buffer("fb", torch.from_numpy(mel_filterbank(cfg))[None])
        self.window: Tensor
        self.fb: Tensor

    @property
    def is_normalized(self) -> bool:
        """True when offline features get NeMo's per-utterance ``per_feature`` normalisation.

        NeMo treats every other value (``NA``, ``None``, ...) as no normalisation.
        """
        return self.cfg.normalize == "per_feature"

    # ---------------------------------------------------------------- shared routine

    def _preemphasis(self, x: Tensor, previous: Tensor) -> Tensor:
        """y[s] = x[s] - preemph * x[s-1], with ``previous`` (B, S) the samples one step back.

        At the very start ``previous`` is 0, and ``x - preemph * 0`` is exactly ``x``, NeMo's first sample.
        """
        if self.cfg.preemph is None:
            return x
        return x - self.cfg.preemph * previous

    def _log_mel(self, padded: Tensor, first_frame_offset: int, num_frames: int, *, pad_single_column: bool
                 ) -> Tensor:
        """Log-mel of ``num_frames`` STFT frames cut from a zero-padded, pre-emphasised signal.

        Frame k is ``padded[:, first_frame_offset + hop * k :][:, :n_fft]`` times the window centred in
        ``n_fft`` samples: the framing of ``torch.stft(center=True)``, after which the ops are NeMo's
        (magnitude via sqrt, then ``** mag_power``, mel matmul, ``ln(x + guard)``).

        Args:
            padded: (B, n) float32 signal; must hold ``first_frame_offset + hop * (num_frames - 1) + n_fft``.
            first_frame_offset: where frame 0 starts in ``padded``.
            num_frames: frames to compute.
            pad_single_column: compute a lone frame as two identical columns (see below).

        Returns:
            (B, F, num_frames) float32.
        """
        cfg = self.cfg
        batch = padded.shape[0]
        if num_frames == 0:
            return padded.new_zeros(batch, cfg.n_mels, 0)
        span = cfg.hop_length * (num_frames - 1) + cfg.n_fft
        signal = padded[:, first_frame_offset : first_frame_offset + span]
        frames = signal.unfold(1, cfg.n_fft, cfg.hop_length)  # (B, M, n_fft), the framing of torch.stft
        return self.log_mel_of_frames(frames, pad_single_column=pad_single_column)

    def _log_mel_in_windows(self, x: Tensor, lengths: Tensor, num_frames: int, window_frames: int) -> Tensor:
        """Log-mel of all ``num_frames`` frames of raw audio ``x`` (B, S), ``window_frames`` at a time: each
        window pre-emphasises, masks and zero-pads only the samples it covers (the same element-wise ops as the
        one-shot path, so the same bits), so an hour of audio costs the audio and its features, not several
        padded copies of it and a spectrum of every frame (15 bytes per sample)."""
        cfg, hop = self.cfg, self.cfg.hop_length
        parts = []
        for m in range(0, num_frames, window_frames):
            n = min(window_frames, num_frames - m)
            lo = hop * m - cfg.n_fft // 2  # the window's first sample in the (unpadded) signal
            span = hop * (n - 1) + cfg.n_fft
            parts.append(self._log_mel(self._padded_slice(x, lengths, lo, lo + span), 0, n, pad_single_column=False))
        return torch.cat(parts, dim=2)

    def _padded_slice(self, x: Tensor, lengths: Tensor, lo: int, hi: int) -> Tensor:
        """Samples ``lo..hi-1`` of the pre-emphasised, length-masked signal with zeros outside ``[0, S)``."""
        a, b = max(lo, 0), min(hi, x.shape[1])
        if b <= a:
            return x.new_zeros(x.shape[0], hi - lo)
        previous = x[:, a - 1 : b - 1] if a > 0 else F.pad(x[:, : b - 1], (1, 0))
        y = self._preemphasis(x[:, a:b], previous)
        valid = torch.arange(a, b, device=x.device)[None, :] < lengths[:, None]
        return F.pad(y.masked_fill(~valid, 0.0), (a - lo, hi - b))

    def log_mel_of_frames(self, frames: Tensor, *, pad_single_column: bool) -> Tensor:
        """Log-mel of STFT frames (B, M, n_fft) cut from the pre-emphasised, padded signal: (B, F, M)."""
        cfg = self.cfg
        num_frames = frames.shape[1]
        left = (cfg.n_fft - cfg.win_length) // 2
        window = F.pad(self.window, (left, cfg.n_fft - cfg.win_length - left))  # (n_fft,) as torch.stft does
        spec = torch.fft.rfft(frames * window, dim=-1)  # (B, M, n_fft//2+1): torch.stft's, transposed
        # NeMo: sqrt first, then the power. Element-wise, so computed before the transpose to (B, bins, M)
        # (the same values; the pairs summed are then adjacent in memory).
        parts = torch.view_as_real(spec)
        re, im = parts[..., 0], parts[..., 1]
        magnitude = (re * re + im * im).sqrt()  # what pow(2).sum(-1) computes, bit for bit, without a reduction
        power = (magnitude.pow(cfg.mag_power) if cfg.mag_power != 1.0 else magnitude).transpose(1, 2)
        if pad_single_column and num_frames == 1:
            # A one-column matmul takes BLAS's matrix-vector route, whose summation order differs from the
            # matrix-matrix one the offline pass uses; two columns keep incremental frames bit-identical.
            mel = torch.matmul(self.fb, torch.cat([power, power], dim=2))[:, :, :1]
        else:
            mel = torch.matmul(self.fb, power)  # (B, F, M)
        return torch.log(mel + cfg.log_zero_guard_value)

    # ---------------------------------------------------------------- offline

    def forward(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Features of whole utterances, exactly as NeMo 3.0.0 computes them at inference.

        Args:
            audio: (B, S) samples in [-1, 1]; cast to float32 like NeMo.
            lengths: (B,) int64 valid samples per row; samples past them are ignored.

        Returns:
            feats: (B, F, 1 + S // hop) float32; frames ``m >= lengths_out[b]`` hold ``pad_value`` (the
                last column always does: NeMo counts it as padding).
            lengths_out: (B,) int64 valid mel frames, ``lengths // hop``.
        """
        if audio.ndim != 2 or lengths.shape != (audio.shape[0],):
            raise ValueError(f"features: expected audio (B, S) and lengths (B,), got {tuple(audio.shape)} "
                             f"and {tuple(lengths.shape)}")
        if bool((lengths < 0).any()) or bool((lengths > audio.shape[1]).any()):
            raise ValueError(f"features: lengths {lengths.tolist()} outside [0, {audio.shape[1]}]")
        cfg = self.cfg
        with torch.autocast(audio.device.type, enabled=False):
            x = audio.float()
            lengths = lengths.long()
            out_lengths = clocks.num_mel_frames(lengths, cfg.hop_length, cfg.n_fft)
            num_frames = clocks.num_stft_frames(x.shape[1], cfg.hop_length)
            if num_frames > LONG_WINDOW_FRAMES:
                feats = self._log_mel_in_windows(x, lengths, num_frames, LONG_WINDOW_FRAMES)
            else:
                y = self._preemphasis(x, F.pad(x, (1, 0))[:, :-1])
                y = y.masked_fill(~length_mask(lengths, y.shape[1]), 0.0)  # NeMo >= 2.5 masks the tail
                padded = F.pad(y, (cfg.n_fft // 2, cfg.n_fft // 2))  # centre=True, constant (zero) padding
                feats = self._log_mel(padded, 0, num_frames, pad_single_column=False)
            if self.is_normalized:
                feats = normalize_per_feature(feats, out_lengths)
            feats = feats.masked_fill(~length_mask(out_lengths, num_frames)[:, None, :], cfg.pad_value)
        return feats, out_lengths

    # ---------------------------------------------------------------- incremental

    def init_state(self, batch: int = 1, device: torch.device | None = None) -> FeatureState:
        """State before the first sample: left padding only. Device defaults to the buffers' device."""
        device = self.window.device if device is None else device
        return FeatureState(
            tail=torch.zeros(batch, self.cfg.n_fft, device=device),
            last_sample=torch.zeros(batch, device=device),
            num_samples=torch.zeros(batch, dtype=torch.long, device=device),
            num_frames=torch.zeros(batch, dtype=torch.long, device=device),
        )

    def step(self, samples: Tensor, state: FeatureState) -> tuple[Tensor, FeatureState]:
        """Take new samples and emit every mel frame whose window they complete.

        Frame m covers samples ``[hop*m - 200, hop*m + 200)`` (for a 400-sample window), so it comes out
        once sample ``hop*m + 199`` has arrived. Frames are raw log-mel: ``per_feature`` normalisation
        needs whole-utterance statistics, so incremental frames of such a model are *not* normalised.
        The streams of a batched state must have received the same number of samples (lockstep);
        step streams at different positions one at a time and :func:`~streamer.asr.state.stack` their states.

        Args:
            samples: (B, S) new samples, float32 in [-1, 1].
            state: from :meth:`init_state` or the previous call.

        Returns:
            frames: (B, F, k) the new frames, k >= 0.
            state: the new state.
        """
        cfg = self.cfg
        received = self._lockstep_position(state, samples)
        x = samples.float()
        num_new = x.shape[1]
        if num_new == 0:
            return x.new_zeros(x.shape[0], cfg.n_mels, 0), state
        emitted = int(state.num_frames[0])
        total = received + num_new
        ready = clocks.num_complete_mel_frames(total, cfg.hop_length, cfg.win_length, cfg.n_fft)
        with torch.autocast(x.device.type, enabled=False):
            previous = torch.cat([state.last_sample[:, None], x[:, :-1]], dim=1)
            # Padded positions [received - n_fft/2, total + n_fft/2). The zero-windowed right edge of the
            # last frames may lie beyond them: zeros stand in (the window multiplies them by 0 anyway).
            signal = torch.cat([state.tail, self._preemphasis(x, previous)], dim=1)
            signal_ext = F.pad(signal, (0, cfg.n_fft))
            offset = cfg.hop_length * emitted - (received - cfg.n_fft // 2)
            frames = self._log_mel(signal_ext, offset, ready - emitted, pad_single_column=True)
        new_state = FeatureState(
            tail=signal[:, -cfg.n_fft :],
            last_sample=x[:, -1],
            num_samples=state.num_samples + num_new,
            num_frames=torch.full_like(state.num_frames, ready),
        )
        return frames, new_state

    def finish(self, state: FeatureState) -> Tensor:
        """Emit the frames left at the end of the audio, up to NeMo's valid count ``S // hop``.

        The missing right context is the STFT's zero padding, so these frames equal the offline ones.
        NeMo's last STFT column (always padding) is not emitted.

        Args:
            state: the state after the last :meth:`step`.

        Returns:
            (B, F, k) the remaining frames, k >= 0.
        """
        cfg = self.cfg
        received = self._lockstep_position(state, None)
        emitted = int(state.num_frames[0])
        valid = clocks.num_mel_frames(received, cfg.hop_length, cfg.n_fft)
        with torch.autocast(state.tail.device.type, enabled=False):
            signal = F.pad(state.tail, (0, cfg.n_fft))  # zeros after the last sample, as offline
            offset = cfg.hop_length * emitted - (received - cfg.n_fft // 2)
            return self._log_mel(signal, offset, max(valid - emitted, 0), pad_single_column=True)

    def _lockstep_position(self, state: FeatureState, samples: Tensor | None) -> int:
        """Samples received by every stream of ``state``; raises if they differ or ``samples`` mismatches."""
        batch = state.num_samples.shape[0]
        if samples is not None and (samples.ndim != 2 or samples.shape[0] != batch):
            raise ValueError(f"features: expected samples (B={batch}, S), got {tuple(samples.shape)}")
        counts = state.num_samples.tolist()
        if any(c != counts[0] for c in counts):
            raise ValueError(
                f"features: batched streams are at different positions ({counts} samples); "
                "step them one at a time and stack their states"
            )
        return int(counts[0])


class Preprocessor(nn.Module):
    """NeMo's ``AudioToMelSpectrogramPreprocessor``: a shell around ``featurizer``.

    It exists for the state-dict keys ``featurizer.window`` and ``featurizer.fb`` (in a model,
    ``preprocessor.featurizer.*``).
    """

    def __init__(self, cfg: FeatureConfig) -> None:
        """Build the featurizer from ``cfg``."""
        super().__init__()
        self.featurizer = FilterbankFeatures(cfg)

    def forward(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Offline features; see :meth:`FilterbankFeatures.forward`.

        Args:
            audio: (B, S) float32 samples.
            lengths: (B,) int64 valid samples.

        Returns:
            (B, F, 1 + S // hop) features and (B,) int64 valid mel frames.
        """
        return self.featurizer(audio, lengths)
