"""Build the model and its recognizer from ``[model]`` settings: the one place every command loads a model.

``serve``, ``mic`` (in process) and ``eval`` call :func:`load_recognizer` or :func:`load_model`;
``transcribe`` calls :func:`load_model` (its offline mode also runs models that cannot stream).
torch is imported when a model is loaded, not with this module, so ``streamer mic --url`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from streamer.settings import ModelSettings

if TYPE_CHECKING:
    from streamer.asr.model import AsrModel
    from streamer.engine.recognizer import Recognizer


def load_model(model: ModelSettings) -> AsrModel:
    """Load ``model.spec`` onto ``model.device``, with torch's threads set to ``model.threads`` when given.

    Blocking (seconds): run it in a thread from async code.

    Raises:
        CheckpointError: the spec names no model that loads (the message says what was tried).
    """
    import torch

    from streamer.asr.model import AsrModel

    if model.threads:
        torch.set_num_threads(model.threads)
    return AsrModel.load(model.spec).to_device(model.device)


def load_recognizer(model: ModelSettings) -> Recognizer:
    """:func:`load_model`, then the streaming recognizer at ``model.att_context_size`` with ``model.decoder``.

    Raises:
        ConfigError: the model cannot stream, or has no such look-ahead or decoder.
    """
    from streamer.engine.recognizer import Recognizer

    return Recognizer(load_model(model), model.att_context_size, model.decoder)
