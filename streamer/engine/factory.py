"""Build the model and its recognizer from ``[model]`` settings: the one place every command loads a model.

``serve``, ``mic`` (in process) and ``eval`` call :func:`load_recognizer` or :func:`load_model`;
``transcribe`` calls :func:`load_model` (its offline mode also runs models that cannot stream).
torch is imported when a model is loaded, not with this module, so ``streamer mic --url`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from streamer.errors import ConfigError
from streamer.settings import EngineSettings, ModelSettings

if TYPE_CHECKING:
    from streamer.asr.model import AsrModel
    from streamer.asr.paraformer import ParaformerModel
    from streamer.engine.buffered import AnyRecognizer


def load_model(model: ModelSettings) -> AsrModel | ParaformerModel:
    """Load ``model.spec`` onto ``model.device`` with its encoder in ``model.dtype``, with torch's threads set
    to ``model.threads`` when given, and its offline encoder compiled per ``model.compile``
    (:mod:`streamer.asr.compiled`; each length bucket compiles on first use). The device and dtype are
    checked first, before the (slow) load. A directory holding ``paraformer.json`` is a Paraformer model
    (:mod:`streamer.asr.paraformer`).

    Blocking (seconds): run it in a thread from async code.

    Raises:
        ConfigError: the device or dtype cannot run here (no CUDA in this torch, half precision on the CPU),
            or ``model.compile`` is ``offline-graphs`` off CUDA.
        CheckpointError: the spec names no model that loads (the message says what was tried).
    """
    import torch

    from streamer.asr.compiled import compile_offline
    from streamer.asr.model import AsrModel
    from streamer.asr.paraformer import ParaformerModel, is_paraformer_dir
    from streamer.asr.precision import check_device, check_dtype, to_precision

    device = check_device(model.device)
    dtype = check_dtype(model.dtype, device)
    if model.compile == "offline-graphs" and device.type != "cuda":
        raise ConfigError("model.compile=offline-graphs replays CUDA graphs: it needs model.device=cuda "
                          "(on the CPU use offline)")
    if model.threads:
        torch.set_num_threads(model.threads)
    loaded: AsrModel | ParaformerModel
    if is_paraformer_dir(model.spec):
        loaded = ParaformerModel.load(model.spec).to_device(device)
    else:
        loaded = AsrModel.load(model.spec).to_device(device)
    to_precision(loaded, dtype)
    compile_offline(loaded.encoder, model.compile)
    return loaded


def load_recognizer(model: ModelSettings, engine: EngineSettings | None = None) -> AnyRecognizer:
    """:func:`load_model`, then the live recognizer ``engine.streaming`` asks for, with ``model.decoder``:
    cache-aware streaming at ``model.att_context_size``, or buffered streaming (``engine.buffer_*_s``) of a model
    that cannot stream by itself (``auto`` picks).

    On CUDA with ``engine.cuda_graphs``, the cache-aware encoder step's graphs are captured here for every batch
    bucket up to ``engine.max_batch``, so no step pays for a capture later.

    Raises:
        ConfigError: cache_aware asked of a model that cannot, no such look-ahead or decoder, or as
            :func:`load_model`.
    """
    from streamer.asr.model import AsrModel
    from streamer.asr.paraformer import ParaformerModel
    from streamer.engine.buffered import BufferedRecognizer
    from streamer.engine.buffered_paraformer import ParaformerBufferedRecognizer
    from streamer.engine.recognizer import Recognizer

    engine = engine or EngineSettings()
    loaded = load_model(model)
    mode = engine.streaming
    if mode == "auto":
        mode = "cache_aware" if cache_aware_problem(loaded) is None else "buffered"
    if mode == "buffered" and isinstance(loaded, ParaformerModel):
        return ParaformerBufferedRecognizer(loaded, engine.buffer_left_s, engine.buffer_chunk_s, engine.buffer_right_s)
    if mode == "buffered":
        return BufferedRecognizer(loaded, model.decoder, engine.buffer_left_s, engine.buffer_chunk_s,
                                  engine.buffer_right_s, model.att_context_size)
    problem = cache_aware_problem(loaded)
    if problem is not None:
        raise ConfigError(f"engine.streaming = cache_aware: {problem}; use buffered (or auto)")
    assert isinstance(loaded, AsrModel)  # cache_aware_problem says why a Paraformer cannot
    recognizer = Recognizer(loaded, model.att_context_size, model.decoder,
                            cuda_graphs=engine.cuda_graphs, max_batch=engine.max_batch)
    if recognizer.runner is not None:
        recognizer.runner.prepare()
    return recognizer


def cache_aware_problem(model: AsrModel | ParaformerModel) -> str | None:
    """Why ``model`` has no cache-aware streaming step (None: it has one)."""
    from streamer.asr.paraformer import ParaformerModel

    if isinstance(model, ParaformerModel):
        return "a Paraformer model is full context and non-autoregressive (it decodes whole buffers)"
    enc, features = model.config.encoder, model.config.features
    if enc.is_local_attention:
        return "the model uses local attention (offline only)"
    if not enc.is_causal:
        return "the model is full-context (non-causal subsampling or convolution), not cache-aware"
    if features.normalize not in ("NA", "None", "none", ""):
        return f"the model normalises features per utterance ({features.normalize!r})"
    return None
