"""``streamer bench --offline``: offline RTFx of a parakeet-tdt-0.6b-shaped model on a batch of long utterances.

RTFx is what the Open ASR Leaderboard and the TDT paper report: seconds of audio recognized per second of
wall time, for whole utterances in batches. Here a random-weight model shaped like NVIDIA's
parakeet-tdt-0.6b-v2 (:data:`streamer.bench_model.PARAKEET_ENCODER`) recognizes ``--offline-batch`` random
utterances of ``--utterance-s`` seconds: audio copied to the device, features, the full-context encoder (in
``--dtypes``; features and decoder in float32) and, in the ``offline+tdt`` rows, batched greedy TDT decoding
with the joint biased to emit ``--tokens-per-s`` labels as speech would (random weights would emit
``max_symbols`` per frame). Each timed batch ends with a device sync. Speed is reported, never asserted.

``--offline-compile`` adds rows for the compiled encoder (:mod:`streamer.asr.compiled`) on the same model and
inputs, right after the eager row: ``streamer/compiled`` (length buckets), ``streamer/compiled-dynamic`` and,
on CUDA, ``streamer/compiled-graphs`` (buckets replayed as CUDA graphs). Every row's ``first_call_s`` is its
first batch's wall time: for compiled rows the compile plus one batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from streamer.bench_model import PARAKEET_DECODER, PARAKEET_ENCODER, PARAKEET_FEATURES, calibrate_emission
from streamer.errors import ConfigError


def build_parakeet(device: Any, dtype: Any, n_layers: int | None = None) -> Any:
    """The parakeet-shaped model with random weights (seed 0) on ``device``, its encoder in ``dtype``;
    ``n_layers`` overrides the 24 layers (a quick run on the CPU)."""
    import torch

    from streamer.asr.config import EncoderConfig, FeatureConfig, ModelConfig, TransducerConfig
    from streamer.asr.model import AsrModel
    from streamer.asr.precision import to_precision

    enc = {**PARAKEET_ENCODER, **({"n_layers": n_layers} if n_layers else {})}
    cfg = ModelConfig(features=FeatureConfig(**PARAKEET_FEATURES), encoder=EncoderConfig(**enc),
                      transducer=TransducerConfig(**PARAKEET_DECODER), model_class="EncDecRNNTBPEModel")
    torch.manual_seed(0)
    with torch.device(device):  # parameters are made (and randomly initialised) there, fast on a GPU
        model = AsrModel(cfg).eval()
    return to_precision(model.to(device), dtype)  # .to: buffers made from numpy (the mel filterbank) start on the CPU


COMPILE_IMPLS = {"off": "streamer", "offline": "streamer/compiled", "offline-dynamic": "streamer/compiled-dynamic",
                 "offline-graphs": "streamer/compiled-graphs"}


def measure_offline(model: Any, dtype_name: str, batch: int, utterance_s: float, steps: int, warmup: int,
                    with_decoder: bool, tokens_per_s: float = 4.0, compile_mode: str = "off") -> dict[str, Any]:
    """Per-batch wall times of ``batch`` utterances of ``utterance_s`` seconds; arguments of
    :func:`streamer.bench.summarize` as a dict (its ``chunk_s`` is the utterance, its ``streams`` the batch),
    plus ``first_call_s``. ``compile_mode``: a ``model.compile`` value; the encoder is eager again afterwards."""
    import torch

    from streamer.asr.compiled import compile_offline

    device = next(model.decoder.parameters()).device
    rate = model.config.features.sample_rate
    samples = int(utterance_s * rate)
    audio = 0.1 * torch.randn(batch, samples, generator=torch.Generator().manual_seed(3))
    if device.type == "cuda":
        audio = audio.pin_memory()
    lengths = torch.full((batch,), samples)
    greedy = model.greedy_decoder("tdt") if with_decoder else None

    def recognize() -> Any:
        x = audio.to(device, non_blocking=True)
        feats, lens = model.preprocessor(x, lengths.to(device))
        enc, enc_len = model.encoder(feats, lens)
        if greedy is not None:
            greedy.step(enc, enc_len, greedy.init_state(batch, device))
        return enc, enc_len

    with torch.inference_mode():
        if greedy is not None and tokens_per_s > 0:
            enc, enc_len = _encode_only(model, audio[:2], lengths[:2], device)
            calibrate_emission(greedy, enc, enc_len, tokens_per_s * model.config.frame_shift_s, iterations=12)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        times = []
        compile_offline(model.encoder, compile_mode)  # after the calibration: it runs another batch size
        try:
            for _ in range(1 + warmup + steps):  # the first call (compiles) is timed apart from the rest
                sync()
                t0 = time.perf_counter()
                recognize()
                sync()
                times.append(time.perf_counter() - t0)
        finally:
            compile_offline(model.encoder, "off")
    params = sum(p.numel() for p in model.parameters())
    return {"impl": COMPILE_IMPLS[compile_mode], "scope": "offline+tdt" if with_decoder else "offline",
            "dtype": dtype_name, "params": params, "ctx": (-1, -1), "chunk_s": utterance_s, "streams": batch,
            "times": times[1 + warmup:], "first_call_s": round(times[0], 2), "threads": torch.get_num_threads()}


def _encode_only(model: Any, audio: Any, lengths: Any, device: Any) -> tuple[Any, Any]:
    feats, lens = model.preprocessor(audio.to(device), lengths.to(device))
    return model.encoder(feats, lens)


def compile_modes(text: str, device: Any) -> list[str]:
    """``--offline-compile`` ("off,offline", "all") as the list of modes to measure, eager first.

    Raises:
        ConfigError: an unknown mode, or offline-graphs off CUDA.
    """
    from streamer.asr.compiled import COMPILE_MODES

    cuda = device.type == "cuda"
    asked = [m.strip() for m in text.split(",") if m.strip()]
    if asked == ["all"]:
        asked = [m for m in COMPILE_MODES if cuda or m != "offline-graphs"]
    for m in asked:
        if m not in COMPILE_MODES:
            raise ConfigError(f"--offline-compile: {m!r} is not one of {', '.join(COMPILE_MODES)} (or all)")
        if m == "offline-graphs" and not cuda:
            raise ConfigError("--offline-compile offline-graphs replays CUDA graphs: it needs --device cuda")
    return ["off", *(m for m in dict.fromkeys(asked) if m != "off")]


def offline_rows(args: Any, device_name: str, dtypes: list[str]) -> Iterator[dict[str, Any]]:
    """Measure each precision in ``dtypes`` on ``device_name``, eager and each ``--offline-compile`` mode,
    yielding :func:`measure_offline`'s dicts plus ``device``.

    Raises:
        ConfigError: the device, a precision or a compile mode cannot run here.
    """
    import torch

    from streamer.asr.precision import check_device, check_dtype

    device = check_device(device_name)
    modes = compile_modes(getattr(args, "offline_compile", "off"), device)
    for name in dtypes:
        model = build_parakeet(device, check_dtype(name, device), args.offline_layers)
        for with_decoder in ([False] if args.no_decoder else [False, True]):
            for mode in modes:
                yield {**measure_offline(model, name, args.offline_batch, args.utterance_s, args.steps,
                                         args.warmup, with_decoder, args.tokens_per_s, mode), "device": str(device)}
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
