"""Log-mel front end: offline NeMo semantics, incremental == offline, filterbank, clocks."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from streamer.asr import clocks
from streamer.asr.config import FeatureConfig
from streamer.asr.features import (
    FeatureState,
    FilterbankFeatures,
    Preprocessor,
    hz_to_mel,
    mel_filterbank,
    mel_to_hz,
    normalize_per_feature,
)
from streamer.asr.state import stack, unstack
from streamer.errors import ConfigError, UnsupportedCheckpointError

CFG = FeatureConfig(n_mels=80)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Small tensors: intra-op threads only add overhead (and stall badly on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def featurizer() -> FilterbankFeatures:
    return FilterbankFeatures(CFG)


def _audio(num_samples: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """Speech-like test signal: noise plus a chirp, scaled into [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(num_samples) / 16000
    chirp = torch.sin(2 * math.pi * (200 + 1500 * t) * t)
    return (0.1 * torch.randn(batch, num_samples, generator=g) + 0.3 * chirp).float()


def _reference_nemo(audio: torch.Tensor, length: int, fe: FilterbankFeatures) -> torch.Tensor:
    """NeMo 3.0.0's steps written out with torch.stft (B = 1): the semantics ours must match."""
    x = audio[:, :length]
    y = torch.cat([x[:, :1], x[:, 1:] - 0.97 * x[:, :-1]], dim=1)
    y = torch.nn.functional.pad(y, (0, audio.shape[1] - length))  # pre-emphasis masked past the length
    spec = torch.stft(y, n_fft=512, hop_length=160, win_length=400, window=fe.window, center=True,
                      pad_mode="constant", return_complex=True)  # (1, 257, 1 + S // 160)
    power = torch.view_as_real(spec).pow(2).sum(-1).sqrt().pow(2.0)
    feats = torch.log(torch.matmul(fe.fb, power) + 2.0**-24)
    feats[:, :, length // 160 :] = 0.0
    return feats


def _run_incremental(fe: FilterbankFeatures, audio: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Feed ``audio`` in pieces of ``sizes`` samples, then finish; returns all frames."""
    assert sum(sizes) == audio.shape[1]
    state, pieces, start = fe.init_state(audio.shape[0]), [], 0
    for size in sizes:
        frames, state = fe.step(audio[:, start : start + size], state)
        pieces.append(frames)
        start += size
    pieces.append(fe.finish(state))
    return torch.cat(pieces, dim=2)


def _split(total: int, size: int) -> list[int]:
    return [size] * (total // size) + ([total % size] if total % size else [])


# --------------------------------------------------------------------------------------------------
# Offline


@pytest.mark.parametrize("num_samples", [16000, 16001, 16159, 4567])
def test_offline_matches_torch_stft_reference(featurizer: FilterbankFeatures, num_samples: int) -> None:
    """Our framing (unfold + rfft) gives NeMo's torch.stft(center=True, constant pad) features."""
    audio = _audio(num_samples)
    feats, lengths = featurizer(audio, torch.tensor([num_samples]))
    expected = _reference_nemo(audio, num_samples, featurizer)
    torch.testing.assert_close(feats, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_samples", [0, 1, 159, 160, 161, 199, 200, 16000])
def test_offline_shapes_and_lengths(featurizer: FilterbankFeatures, num_samples: int) -> None:
    """T = 1 + S // 160 columns, S // 160 valid; every column from the valid count on is pad_value."""
    feats, lengths = featurizer(_audio(num_samples), torch.tensor([num_samples]))
    assert feats.shape == (1, 80, 1 + num_samples // 160)
    assert feats.dtype == torch.float32
    assert lengths.tolist() == [num_samples // 160]
    assert lengths.dtype == torch.int64
    assert torch.all(feats[:, :, num_samples // 160 :] == 0.0)
    assert torch.all(feats[:, :, : num_samples // 160] != 0.0)


def test_offline_padded_batch_equals_single_rows(featurizer: FilterbankFeatures) -> None:
    """Each row of a padded batch equals that utterance alone, whatever fills the padding."""
    long, short = 16000 + 77, 9000
    audio = _audio(long, seed=1, batch=2)
    audio[1, short:] = torch.randn(long - short)  # garbage past the length must not leak in
    feats, lengths = featurizer(audio, torch.tensor([long, short]))
    assert lengths.tolist() == [long // 160, short // 160]
    alone_long, _ = featurizer(audio[:1], torch.tensor([long]))
    alone_short, _ = featurizer(audio[1:, :short], torch.tensor([short]))
    torch.testing.assert_close(feats[0], alone_long[0], rtol=0, atol=1e-6)
    n = short // 160
    torch.testing.assert_close(feats[1, :, :n], alone_short[0, :, :n], rtol=0, atol=1e-6)
    assert torch.all(feats[1, :, short // 160 :] == 0.0)


def test_preemphasis_is_masked_past_length(featurizer: FilterbankFeatures) -> None:
    """NeMo >= 2.5 zeroes pre-emphasised samples past the length: the last valid frames see zeros."""
    length = 8000
    audio = _audio(length + 400, seed=2)
    feats, _ = featurizer(audio, torch.tensor([length]))
    zeroed = audio.clone()
    zeroed[:, length:] = 0.0
    expected, _ = featurizer(zeroed[:, :length], torch.tensor([length]))
    # Frame 49 covers samples [7640, 8040): it reaches past the length, so the tail matters.
    torch.testing.assert_close(feats[:, :, :50], expected[:, :, :50], rtol=0, atol=0)


def test_silence_is_log_guard(featurizer: FilterbankFeatures) -> None:
    """Digital silence gives ln(2**-24) = -16.6355 in every valid cell."""
    feats, _ = featurizer(torch.zeros(1, 3200), torch.tensor([3200]))
    torch.testing.assert_close(feats[:, :, :20], torch.full((1, 80, 20), math.log(2.0**-24)))


def test_offline_rejects_bad_lengths(featurizer: FilterbankFeatures) -> None:
    """Lengths beyond the audio or of the wrong shape are errors, not silent garbage."""
    with pytest.raises(ValueError, match="outside"):
        featurizer(torch.zeros(1, 100), torch.tensor([101]))
    with pytest.raises(ValueError, match="expected audio"):
        featurizer(torch.zeros(1, 100), torch.tensor([100, 100]))


# --------------------------------------------------------------------------------------------------
# Normalisation


def test_normalize_per_feature_by_hand() -> None:
    """Unbiased std plus 1e-5; one valid frame gives std 0 -> (x - x) / 1e-5 = 0; padding ignored."""
    feats = torch.tensor([[[1.0, 2.0, 3.0, 99.0]], [[5.0, 7.0, -3.0, -3.0]]])  # (B=2, F=1, M=4)
    out = normalize_per_feature(feats, torch.tensor([3, 1]))
    # Row 0: mean 2, squared deviations 1 + 0 + 1 = 2 over n - 1 = 2 -> std 1, divided by 1 + 1e-5.
    torch.testing.assert_close(out[0, 0, :3], torch.tensor([-1.0, 0.0, 1.0]) / (1.0 + 1e-5))
    # Row 1: a single valid frame; NeMo turns its NaN std into 0, then adds 1e-5.
    assert out[1, 0, 0].item() == 0.0
    torch.testing.assert_close(out[1, 0, 1], torch.tensor((7.0 - 5.0) / 1e-5))


def test_normalize_per_feature_matches_float64_formula() -> None:
    """Random features: per utterance and bin, (x - mean) / (unbiased std + 1e-5) over valid frames."""
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 5, 40, generator=g) * 3 + 1
    lengths = torch.tensor([40, 23])
    out = normalize_per_feature(feats, lengths)
    for b, n in enumerate(lengths.tolist()):
        x = feats[b, :, :n].double()
        expected = (x - x.mean(dim=1, keepdim=True)) / (x.std(dim=1, unbiased=True, keepdim=True) + 1e-5)
        torch.testing.assert_close(out[b, :, :n].double(), expected, rtol=1e-5, atol=1e-5)


def test_per_feature_model_normalizes_offline() -> None:
    """normalize='per_feature' normalises the valid frames and keeps the padding column at pad_value."""
    cfg = FeatureConfig(n_mels=80, normalize="per_feature")
    fe_norm, fe_raw = FilterbankFeatures(cfg), FilterbankFeatures(CFG)
    audio = _audio(12345, seed=4)
    feats, lengths = fe_norm(audio, torch.tensor([12345]))
    raw, _ = fe_raw(audio, torch.tensor([12345]))
    n = int(lengths[0])
    torch.testing.assert_close(feats[:, :, :n], normalize_per_feature(raw, lengths)[:, :, :n])
    assert torch.all(feats[:, :, n:] == 0.0)
    torch.testing.assert_close(feats[0, :, :n].mean(dim=1), torch.zeros(80), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Incremental == offline


@pytest.mark.parametrize("piece", [159, 160, 161, 1600, 16000])
@pytest.mark.parametrize("num_samples", [16000, 16123, 150, 210])
def test_incremental_equals_offline(featurizer: FilterbankFeatures, piece: int, num_samples: int) -> None:
    """Frames from step()+finish() in fixed-size pieces equal the offline valid frames."""
    audio = _audio(num_samples, seed=5)
    offline, lengths = featurizer(audio, torch.tensor([num_samples]))
    got = _run_incremental(featurizer, audio, _split(num_samples, piece))
    assert got.shape == (1, 80, int(lengths[0]))
    torch.testing.assert_close(got, offline[:, :, : int(lengths[0])], rtol=0, atol=1e-6)


def test_incremental_one_sample_at_a_time(featurizer: FilterbankFeatures) -> None:
    """Single-sample steps (and empty ones) give the offline frames too."""
    num_samples = 2500
    audio = _audio(num_samples, seed=6)
    offline, _ = featurizer(audio, torch.tensor([num_samples]))
    sizes = [1] * num_samples
    sizes.insert(700, 0)
    got = _run_incremental(featurizer, audio, sizes)
    torch.testing.assert_close(got, offline[:, :, : num_samples // 160], rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_random_splits(featurizer: FilterbankFeatures, seed: int) -> None:
    """Random piece sizes, zero included, give the offline frames."""
    rng = np.random.default_rng(seed)
    num_samples = int(rng.integers(5000, 20000))
    audio = _audio(num_samples, seed=seed)
    sizes, total = [], 0
    while total < num_samples:
        size = min(int(rng.integers(0, 700)), num_samples - total)
        sizes.append(size)
        total += size
    offline, _ = featurizer(audio, torch.tensor([num_samples]))
    got = _run_incremental(featurizer, audio, sizes)
    torch.testing.assert_close(got, offline[:, :, : num_samples // 160], rtol=0, atol=1e-6)


def test_frames_come_out_when_their_window_is_complete(featurizer: FilterbankFeatures) -> None:
    """Frame m needs samples up to 160m + 199: 199 samples give none, 200 give frame 0, 360 frame 1."""
    state = featurizer.init_state(1)
    audio = _audio(400)
    frames, state = featurizer.step(audio[:, :199], state)
    assert frames.shape[2] == 0
    frames, state = featurizer.step(audio[:, 199:200], state)
    assert frames.shape[2] == 1
    frames, state = featurizer.step(audio[:, 200:359], state)
    assert frames.shape[2] == 0
    frames, state = featurizer.step(audio[:, 359:360], state)
    assert frames.shape[2] == 1
    assert state.num_samples.tolist() == [360] and state.num_frames.tolist() == [2]


def test_finish_before_any_full_frame(featurizer: FilterbankFeatures) -> None:
    """Fewer than 160 samples: no valid frame offline, none from finish either."""
    state = featurizer.init_state(1)
    frames, state = featurizer.step(_audio(120), state)
    assert frames.shape == (1, 80, 0)
    assert featurizer.finish(state).shape == (1, 80, 0)


def test_incremental_batched_lockstep(featurizer: FilterbankFeatures) -> None:
    """Two streams stepped together in one batch equal each stream stepped alone."""
    audio = _audio(8000, seed=7, batch=2)
    together = _run_incremental(featurizer, audio, _split(8000, 1000))
    for b in range(2):
        alone = _run_incremental(featurizer, audio[b : b + 1], _split(8000, 1000))
        torch.testing.assert_close(together[b : b + 1], alone, rtol=0, atol=1e-6)


def test_state_stack_unstack_streams_at_different_positions(featurizer: FilterbankFeatures) -> None:
    """States of streams at different positions stack and unstack intact; each continues correctly."""
    audio = _audio(6000, seed=8, batch=2)
    state_a, state_b = featurizer.init_state(1), featurizer.init_state(1)
    out_a, state_a = featurizer.step(audio[:1, :1234], state_a)
    out_b, state_b = featurizer.step(audio[1:, :3001], state_b)
    batched = stack([state_a, state_b])
    assert isinstance(batched, FeatureState)
    assert batched.tail.shape == (2, 512) and batched.num_samples.tolist() == [1234, 3001]
    with pytest.raises(ValueError, match="different positions"):
        featurizer.step(torch.zeros(2, 10), batched)
    state_a, state_b = unstack(batched)
    rest_a, state_a = featurizer.step(audio[:1, 1234:], state_a)
    rest_b, state_b = featurizer.step(audio[1:, 3001:], state_b)
    got_a = torch.cat([out_a, rest_a, featurizer.finish(state_a)], dim=2)
    got_b = torch.cat([out_b, rest_b, featurizer.finish(state_b)], dim=2)
    offline, _ = featurizer(audio, torch.tensor([6000, 6000]))
    torch.testing.assert_close(got_a[0], offline[0, :, :37], rtol=0, atol=1e-6)
    torch.testing.assert_close(got_b[0], offline[1, :, :37], rtol=0, atol=1e-6)


def test_step_rejects_wrong_batch(featurizer: FilterbankFeatures) -> None:
    """Samples whose batch differs from the state's are an error."""
    with pytest.raises(ValueError, match="expected samples"):
        featurizer.step(torch.zeros(2, 10), featurizer.init_state(1))


# --------------------------------------------------------------------------------------------------
# Buffers and the mel filterbank


def test_preprocessor_state_dict_keys_and_loading() -> None:
    """Keys are featurizer.window / featurizer.fb; loaded buffers replace ours and change the output."""
    pre = Preprocessor(CFG)
    state = pre.state_dict()
    assert set(state) == {"featurizer.window", "featurizer.fb"}
    assert state["featurizer.window"].shape == (400,) and state["featurizer.fb"].shape == (1, 80, 257)
    torch.testing.assert_close(state["featurizer.window"], torch.hann_window(400, periodic=False))
    audio = _audio(4000)
    before, _ = pre(audio, torch.tensor([4000]))
    loaded_fb = torch.rand(1, 80, 257, generator=torch.Generator().manual_seed(9)) * 0.01
    pre.load_state_dict({"featurizer.window": state["featurizer.window"], "featurizer.fb": loaded_fb})
    after, _ = pre(audio, torch.tensor([4000]))
    assert torch.equal(pre.featurizer.fb, loaded_fb)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, _reference_nemo(audio, 4000, pre.featurizer), rtol=0, atol=1e-6)


def _slaney_mel(hz: float) -> float:
    """The Slaney scale written out: 3 mels per 200 Hz up to 1 kHz, then 27 mels per factor 6.4."""
    return 3 * hz / 200 if hz < 1000 else 15 + 27 * math.log(hz / 1000) / math.log(6.4)


def _slaney_hz(mel: float) -> float:
    return 200 * mel / 3 if mel < 15 else 1000 * 6.4 ** ((mel - 15) / 27)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filterbank_against_literal_formula(n_mels: int) -> None:
    """Each filter is a triangle on Slaney-spaced edges, scaled to unit area over Hz."""
    cfg = FeatureConfig(n_mels=n_mels)
    fb = mel_filterbank(cfg)
    assert fb.shape == (n_mels, 257) and fb.dtype == np.float32
    top = _slaney_mel(8000.0)
    edges = [_slaney_hz(top * i / (n_mels + 1)) for i in range(n_mels + 2)]
    bins = [8000.0 * k / 256 for k in range(257)]
    expected = np.zeros((n_mels, 257))
    for i in range(n_mels):
        low, peak, high = edges[i : i + 3]
        for k, f in enumerate(bins):
            triangle = max(0.0, min((f - low) / (peak - low), (high - f) / (high - peak)))
            expected[i, k] = triangle * 2.0 / (high - low)
    np.testing.assert_allclose(fb, expected, rtol=1e-5, atol=1e-9)


def test_mel_filterbank_shape_properties() -> None:
    """Non-negative, each row one contiguous bump, peaks rising in frequency, wide filters of unit area."""
    fb = mel_filterbank(CFG).astype(np.float64)
    assert np.all(fb >= 0)
    peaks = fb.argmax(axis=1)
    assert np.all(np.diff(peaks) >= 0) and peaks[-1] > peaks[0]
    for row in fb:
        support = np.flatnonzero(row)
        assert support.size > 0 and np.all(np.diff(support) == 1)  # one contiguous run
        peak = row.argmax()
        assert np.all(np.diff(row[support[0] : peak + 1]) >= 0)  # rises to the peak
        assert np.all(np.diff(row[peak : support[-1] + 1]) <= 0)  # then falls
        if support.size > 12:  # sampled every 31.25 Hz, a wide triangle's area is close to its exact 1
            assert abs(row.sum() * 8000 / 256 - 1.0) < 0.02


def test_slaney_scale_round_trip_and_knee() -> None:
    """hz_to_mel is 15 mels at 1 kHz, continuous there, and mel_to_hz inverts it."""
    hz = np.array([0.0, 500.0, 999.999, 1000.0, 4000.0, 8000.0])
    mel = hz_to_mel(hz)
    np.testing.assert_allclose(mel, [_slaney_mel(f) for f in hz], rtol=1e-12)
    assert mel[3] == pytest.approx(15.0) and mel[2] == pytest.approx(15.0, abs=1e-4)
    np.testing.assert_allclose(mel_to_hz(mel), hz, rtol=1e-12, atol=1e-9)


def test_config_errors() -> None:
    """A window longer than the FFT and unsupported normalisation fail at construction."""
    with pytest.raises(ConfigError, match="win_length"):
        FilterbankFeatures(FeatureConfig(window_size=0.05))
    with pytest.raises(UnsupportedCheckpointError, match="all_features"):
        FilterbankFeatures(FeatureConfig(normalize="all_features"))


# --------------------------------------------------------------------------------------------------
# Clocks


def test_clock_arithmetic() -> None:
    """Samples -> mel frames -> encoder frames, derived by hand."""
    # NeMo seq_len = (S + 2 * 256 - 512) // 160 = S // 160; the STFT has one more column.
    assert [clocks.num_mel_frames(s) for s in (0, 159, 160, 16000, 16159)] == [0, 0, 1, 100, 100]
    assert [clocks.num_stft_frames(s) for s in (0, 159, 160, 16000)] == [1, 1, 2, 101]
    assert clocks.num_mel_frames(torch.tensor([16000, 161])).tolist() == [100, 1]
    # Window 400 centred in 512: 56 zeros, frame centre at 256 -> reach 56 + 400 - 256 = 200.
    assert clocks.window_reach() == 200
    # Frame m is complete at S >= 160 m + 200: m = 0 at 200, m = 1 at 360.
    assert [clocks.num_complete_mel_frames(s) for s in (0, 199, 200, 359, 360)] == [0, 0, 1, 1, 2]
    # Never more than the valid count: (S - 200) // 160 + 1 = (S - 40) // 160 <= S // 160.
    assert all(clocks.num_complete_mel_frames(s) <= clocks.num_mel_frames(s) for s in range(0, 2000, 7))
    assert clocks.encoder_frames_to_seconds(25) == pytest.approx(2.0)
    assert clocks.mel_frames_to_seconds(100) == pytest.approx(1.0)
    assert clocks.samples_to_seconds(8000) == pytest.approx(0.5)


def test_encoder_frame_counts_match_nemo_table() -> None:
    """dw_striding x8 lengths as measured with NeMo 3.0.0 (nemo-reference.md section 2.2)."""
    mel = [1, 2, 7, 8, 9, 15, 16, 17, 100]
    # Symmetric: L -> (L - 1) // 2 + 1 = ceil(L / 2), three times (17 -> 9 -> 5 -> 3).
    assert [clocks.num_encoder_frames(m, is_causal=False) for m in mel] == [1, 1, 1, 1, 2, 2, 2, 3, 13]
    # Causal: L -> L // 2 + 1, three times (17 -> 9 -> 5 -> 3; 100 -> 51 -> 26 -> 14).
    assert [clocks.num_encoder_frames(m, is_causal=True) for m in mel] == [1, 2, 2, 2, 2, 3, 3, 3, 14]
    # A causal first chunk of 1 + 8R frames gives R + 1 encoder frames (section 2.3).
    assert [clocks.num_encoder_frames(1 + 8 * r, is_causal=True) for r in range(5)] == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="power of 2"):
        clocks.num_encoder_frames(10, 6, is_causal=True)
