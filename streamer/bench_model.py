"""The model ``streamer bench`` measures: a configuration shaped like NVIDIA's 114M-parameter streaming
FastConformer (17 layers, d_model 512, 8 heads) with random weights, a joint biased to emit at a speech-like
rate, and ``streamer bench --save-model`` writing it as a ``.nemo`` that every command loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamer.asr.encoder import FastConformerEncoder

LARGE_STREAMING = dict(
    feat_in=80, n_layers=17, d_model=512, n_heads=8, ff_expansion_factor=4, subsampling_factor=8,
    subsampling_conv_channels=256, causal_downsampling=True, conv_kernel_size=9,
    conv_context_size=(8, 0), conv_norm_type="layer_norm", xscaling=True, use_bias=True,
    att_context_style="chunked_limited",
    att_context_sizes=((70, 13), (70, 6), (70, 1), (70, 0)),
)
LARGE_DECODER = dict(vocab_size=1024, pred_hidden=640, pred_rnn_layers=1, joint_hidden=640,
                     durations=(0, 1, 2, 3, 4), joint_dropout_layer=True)
# Shaped like NVIDIA's parakeet-tdt-0.6b-v2 (about 0.6B parameters): a full-context (offline) FastConformer-TDT on
# 128 per-feature-normalised mel bins, for `streamer bench --offline` (RTFx on long utterances).
PARAKEET_FEATURES = dict(n_mels=128, normalize="per_feature")
PARAKEET_ENCODER = dict(
    feat_in=128, n_layers=24, d_model=1024, n_heads=8, ff_expansion_factor=4, subsampling_factor=8,
    subsampling_conv_channels=256, causal_downsampling=False, conv_kernel_size=9, conv_context_size=None,
    conv_norm_type="batch_norm", xscaling=False, use_bias=False, att_context_style="regular",
    att_context_sizes=((-1, -1),),
)
PARAKEET_DECODER = dict(vocab_size=1024, pred_hidden=640, pred_rnn_layers=2, joint_hidden=640,
                        durations=(0, 1, 2, 3, 4), joint_dropout_layer=True)


def encoder_settings(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:data:`LARGE_STREAMING` with ``overrides`` (``streamer bench --encoder-set``) applied."""
    return {**LARGE_STREAMING, **(overrides or {})}


def random_encoder(overrides: Mapping[str, Any] | None = None) -> FastConformerEncoder:
    """The encoder every engine in ``streamer bench`` runs: :func:`encoder_settings`, weights drawn from seed 0.

    Built the same way for our step and for the ONNX export, so both hold the same weights.
    """
    import torch

    from streamer.asr.config import EncoderConfig
    from streamer.asr.encoder import FastConformerEncoder

    torch.manual_seed(0)
    return FastConformerEncoder(EncoderConfig(**encoder_settings(overrides))).eval()


def calibrate_emission(greedy, enc, enc_len, tokens_per_frame: float, iterations: int = 30) -> float:
    """Bias a random-weight TDT joint so greedy decoding emits about ``tokens_per_frame`` labels per frame.

    Random weights make the greedy search emit a label on nearly every step, ``max_symbols`` per frame:
    a decoder cost no trained model has. This raises the blank logit by a bias found by bisection on
    ``enc`` (``(B, T, D)``, the encoder output the benchmark will decode) and makes every decision take
    one frame (duration 1), so the decoder visits each frame once and emits at a speech-like rate.
    Changes the joint's output bias in place; returns the labels per frame reached.
    """
    import torch

    cfg = greedy.cfg
    bias = greedy.joint.joint_net[-1].bias
    blank = cfg.blank_id
    base = bias.detach().clone()
    if cfg.is_tdt:
        base[blank + 1 + list(cfg.durations).index(1)] += 100.0

    def rate(shift: float) -> float:
        with torch.no_grad():
            bias.copy_(base)
            bias[blank] += shift
        spans, _ = greedy.step(enc, enc_len, greedy.init_state(enc.shape[0]))
        return sum(len(s.token_ids) for s in spans) / float(enc_len.sum())

    low, high = -50.0, 50.0  # blank bias: more blank (fewer labels) as it grows
    for _ in range(iterations):
        mid = (low + high) / 2
        if rate(mid) > tokens_per_frame:
            low = mid
        else:
            high = mid
    return rate(high)


def tokenizer_text(limit: int = 60_000) -> list[str]:
    """English lines to train the 114M model's tokenizer on: WordNet's glosses (the Debian package setup.sh
    installs), else the docstrings and comments of Python's own standard library (a box without the package,
    such as a bare GPU machine); lower case, as the model's pieces."""
    import itertools
    import sysconfig

    from streamer.training.sources import read_source

    try:
        lines = [s.lower() for s in itertools.islice(read_source("wordnet"), limit)]
    except OSError:
        lines = []
    if len(lines) >= 1000:
        return lines
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        for raw in path.read_text(errors="replace").splitlines():
            text = raw.strip().lstrip("#").strip().lower()
            if len(text) > 30 and sum(c.isalpha() or c == " " for c in text) > 0.9 * len(text):
                lines.append(text)
        if len(lines) >= limit:
            break
    return lines[:limit]


def probe_speech(directory: str, words: str, fallback: str | None = None) -> Any:
    """16 kHz float32 speech to pace the decoder on: ``words`` spoken by espeak-ng, else the file ``fallback``,
    else ten seconds of noise (a machine with neither)."""
    import subprocess

    import numpy as np

    from streamer.audio.io import load_audio

    wav = f"{directory}/probe.wav"
    try:
        subprocess.run(["espeak-ng", "-w", wav, words], check=True, capture_output=True, timeout=60)
        return load_audio(wav)
    except (OSError, subprocess.SubprocessError):
        if fallback:
            return load_audio(fallback)
    return (0.05 * np.random.default_rng(0).standard_normal(160_000)).astype(np.float32)


def save_large_model(path: str, tokens_per_s: float = 4.0, probe_wav: str | None = None) -> str:
    """Write the benchmark's 114M configuration as a ``.nemo`` that every command loads (``--model PATH``).

    Random weights, a 1024-piece BPE tokenizer trained on WordNet's English glosses (the Debian package that
    setup.sh installs), and the joint biased (:func:`calibrate_emission`) so greedy decoding emits about
    ``tokens_per_s`` labels per second on an espeak-ng probe (``probe_wav`` on a machine without espeak-ng;
    Python's docstrings take WordNet's place on one without WordNet): a model shaped like NVIDIA's large
    streaming FastConformer, for ``streamer loadtest`` and sizing, whose words are meaningless. The encoder costs what
    the real one costs; the decoder's pace does not carry over: random logits hardly depend on the audio, so
    on other speech it emits anywhere from a few labels a minute to many per second. Returns a one-line
    description.
    """
    import io
    import tempfile

    import sentencepiece as spm
    import torch

    from streamer.asr.config import EncoderConfig, FeatureConfig, ModelConfig, TransducerConfig
    from streamer.asr.model import AsrModel
    from streamer.asr.tokenizer import Tokenizer

    sentences = tokenizer_text()
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=out, vocab_size=LARGE_DECODER["vocab_size"],
        model_type="bpe", character_coverage=1.0, bos_id=-1, eos_id=-1, unk_id=0, minloglevel=2,
    )
    tokenizer = Tokenizer.from_bytes(out.getvalue())
    torch.manual_seed(0)
    cfg = ModelConfig(
        features=FeatureConfig(n_mels=LARGE_STREAMING["feat_in"]),
        encoder=EncoderConfig(**LARGE_STREAMING),
        transducer=TransducerConfig(**LARGE_DECODER),
    )
    model = AsrModel(cfg, tokenizer).eval()
    with tempfile.TemporaryDirectory() as tmp:
        audio = torch.from_numpy(probe_speech(tmp, " ".join(sentences[:40:4]), probe_wav))[None]
    with torch.inference_mode():
        feats, lens = model.preprocessor(audio, torch.tensor([audio.size(1)]))
        enc, enc_len = model.encoder(feats, lens, (70, 1))  # what streaming at [70,1] computes
    with torch.no_grad():
        reached = calibrate_emission(model.greedy_decoder("tdt"), enc, enc_len, tokens_per_s * cfg.frame_shift_s)
    model.save(path)
    return (f"{path}: {model.num_parameters / 1e6:.1f}M parameters, random weights, {tokenizer.vocab_size}-piece "
            f"tokenizer, {reached / cfg.frame_shift_s:.1f} labels/s on espeak-ng speech")
