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
    from streamer.engine.recognizer import Recognizer


def load_model(model: ModelSettings) -> AsrModel:
    """Load ``model.spec`` onto ``model.device`` with its encoder in ``model.dtype``, with torch's threads set
    to ``model.threads`` when given, and its offline encoder compiled per ``model.compile``
    (:mod:`streamer.asr.compiled`; each length bucket compiles on first use). The device and dtype are
    checked first, before the (slow) load.

    Blocking (seconds): run it in a thread from async code.

    Raises:
        ConfigError: the device or dtype cannot run here (no CUDA in this torch, half precision on the CPU),
            or ``model.compile`` is ``offline-graphs`` off CUDA.
        CheckpointError: the spec names no model that loads (the message says what was tried).
    """
    import torch

    from streamer.asr.compiled import compile_offline
    from streamer.asr.model import AsrModel
    from streamer.asr.precision import check_device, check_dtype, to_precision

    device = check_device(model.device)
    dtype = check_dtype(model.dtype, device)
    if model.compile == "offline-graphs" and device.type != "cuda":
        raise ConfigError("model.compile=offline-graphs replays CUDA graphs: it needs model.device=cuda "
                          "(on the CPU use offline)")
    if model.threads:
        torch.set_num_threads(model.threads)
    loaded = AsrModel.load(model.spec).to_device(device)
    to_precision(loaded, dtype)
    compile_offline(loaded.encoder, model.compile)
    return loaded


def load_recognizer(model: ModelSettings, engine: EngineSettings | None = None) -> Recognizer:
    """:func:`load_model`, then the streaming recognizer at ``model.att_context_size`` with ``model.decoder``.

    On CUDA with ``engine.cuda_graphs``, the encoder step's graphs are captured here for every batch bucket
    up to ``engine.max_batch``, so no step pays for a capture later.

    Raises:
        ConfigError: the model cannot stream, or has no such look-ahead or decoder, or as :func:`load_model`.
    """
    from streamer.engine.recognizer import Recognizer

    engine = engine or EngineSettings()
    recognizer = Recognizer(load_model(model), model.att_context_size, model.decoder,
                            cuda_graphs=engine.cuda_graphs, max_batch=engine.max_batch)
    if recognizer.runner is not None:
        recognizer.runner.prepare()
    return recognizer
