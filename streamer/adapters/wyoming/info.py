"""What ``describe`` is answered with: one speech-to-text program, streamer, with the model it runs.

Home Assistant offers a Wyoming service for speech-to-text when one of its ``asr`` programs is ``installed``, and
for the languages its installed models list (it names the entity after the program). ``requires_external_vad``
stays true: the client decides when an utterance ends (``audio-stop``); our endpointing only splits it into
segments, whose finals make up the one transcript.
"""

from __future__ import annotations

from collections.abc import Sequence

import streamer
from streamer.adapters.wyoming.framing import WyomingEvent
from streamer.session import ModelInfo

PROGRAM = "streamer"
DESCRIPTION = "streamer: real-time speech recognition (cache-aware streaming FastConformer, NeMo checkpoints)"


def _attribution(model: str) -> dict[str, str]:
    """Who made the model: a Hugging Face id's owner, else this project (the bundled model, a local file)."""
    owner, slash, _ = model.partition("/")
    if slash and owner:
        return {"name": owner, "url": f"https://huggingface.co/{model}"}
    return {"name": PROGRAM, "url": ""}


def info_event(model: ModelInfo, languages: Sequence[str]) -> WyomingEvent:
    """The ``info`` event for ``model`` speaking ``languages``."""
    left, right = model.att_context_size
    program = {
        "name": PROGRAM,
        "attribution": {"name": PROGRAM, "url": ""},
        "installed": True,
        "description": DESCRIPTION,
        "version": streamer.__version__,
        "models": [{
            "name": model.model,
            "attribution": _attribution(model.model),
            "installed": True,
            "description": f"{model.model}: attention context [{left},{right}], {model.chunk_s:g} s per step",
            "version": None,
            "languages": list(languages),
        }],
        "supports_transcript_streaming": True,
        "requires_external_vad": True,
        "prefers_auto_gain_enabled": True,
        "prefers_noise_reduction_enabled": True,
    }
    return WyomingEvent("info", {"asr": [program], "tts": [], "handle": [], "intent": [], "wake": [], "mic": [],
                                 "snd": []})
