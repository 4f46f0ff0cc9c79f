"""The OpenAI realtime transcription session's settings: both wire shapes in, both out, and what they mean here.

Two shapes exist. The GA API's ``session.update`` nests them (``session.type: "transcription"``,
``audio.input.format {type: "audio/pcm", rate: 24000}``, ``audio.input.transcription {model, language,
prompt}``, ``audio.input.turn_detection``); the beta API (header ``OpenAI-Beta: realtime=v1``) has
``transcription_session.update`` with flat fields (``input_audio_format: "pcm16"``,
``input_audio_transcription``, ``turn_detection``). :func:`apply_update` reads either into one
:class:`RealtimeConfig`; :func:`ga_session` and :func:`beta_session` write it back as each API shows it.

What they mean on the session core: the audio format becomes the session's ``StartOptions`` (``audio/pcm`` is
16-bit little-endian mono, 24 kHz unless ``rate`` says otherwise within 8-48 kHz; G.711 is not offered);
``turn_detection`` becomes endpointing (:func:`endpointing`): ``server_vad``'s ``silence_duration_ms`` is the
trailing silence that ends a turn (the daemon's own rule when left out), ``semantic_vad`` runs as
``server_vad`` with the daemon's rule, ``null`` ends turns only at ``input_audio_buffer.commit`` (or after
``endpointing.max_segment_s`` of speech). ``threshold``, ``prefix_padding_ms``, ``noise_reduction``,
``model`` and ``language`` are kept and shown back, not used; ``prompt`` becomes the session's hotwords
(:func:`prompt_hotwords`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from streamer.protocol import MAX_HOTWORD_CHARS

PCM_RATE_HZ = 24000  # the API's PCM rate
MIN_RATE_HZ, MAX_RATE_HZ = 8000, 48000
COMMIT_ONLY_SILENCE_S = 86400.0  # turn_detection null: no silence ends a turn
MIN_SILENCE_S = 0.08  # one encoder frame


class ConfigProblem(ValueError):
    """A field of an update that cannot be taken; ``param`` names it as OpenAI's errors do."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class RealtimeConfig:
    """One realtime transcription session's settings (see the module docstring)."""

    rate_hz: int = PCM_RATE_HZ
    transcription: dict[str, Any] = field(default_factory=lambda: {"model": None, "language": None, "prompt": ""})
    turn_detection: dict[str, Any] | None = None  # None: commit only
    noise_reduction: Any = None
    include: Any = None


def default_config(silence_s: float) -> RealtimeConfig:
    """A new session: server VAD with the daemon's trailing-silence rule, as ``session.created`` shows it."""
    return RealtimeConfig(turn_detection={"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                          "silence_duration_ms": round(silence_s * 1000)})


def apply_update(config: RealtimeConfig, session: Any, beta: bool) -> RealtimeConfig:
    """``config`` with an update's ``session`` object applied (fields left out keep their values).

    Raises:
        ConfigProblem: a field of the wrong type or an unsupported value; nothing of the update is applied.
    """
    if not isinstance(session, Mapping):
        raise ConfigProblem("'session' must be an object", "session")
    if beta:
        return _apply_beta(config, session)
    kind = session.get("type", "transcription")
    if kind != "transcription":
        raise ConfigProblem(f"session.type {kind!r} is not offered: this server runs transcription sessions only "
                            "(connect with ?intent=transcription and send session.type 'transcription')",
                            "session.type")
    audio = _object(session.get("audio"), "session.audio")
    raw_input = _object(audio.get("input"), "session.audio.input")
    out = config
    if "format" in raw_input:
        out = replace(out, rate_hz=_ga_format(raw_input["format"]))
    if "transcription" in raw_input:
        out = replace(out, transcription=_transcription(raw_input["transcription"], "session.audio.input"
                                                        ".transcription", config.transcription))
    if "turn_detection" in raw_input:
        out = replace(out, turn_detection=_turn_detection(raw_input["turn_detection"],
                                                          "session.audio.input.turn_detection"))
    if "noise_reduction" in raw_input:
        out = replace(out, noise_reduction=raw_input["noise_reduction"])
    if "include" in session:
        out = replace(out, include=session["include"])
    return out


def _apply_beta(config: RealtimeConfig, session: Mapping[str, Any]) -> RealtimeConfig:
    out = config
    if "input_audio_format" in session:
        value = session["input_audio_format"]
        if value != "pcm16":
            raise ConfigProblem(f"input_audio_format {value!r} is not supported here: send 'pcm16' (16-bit "
                                "little-endian PCM at 24 kHz)", "session.input_audio_format")
        out = replace(out, rate_hz=PCM_RATE_HZ)
    if "input_audio_transcription" in session:
        out = replace(out, transcription=_transcription(session["input_audio_transcription"],
                                                        "session.input_audio_transcription", config.transcription))
    if "turn_detection" in session:
        out = replace(out, turn_detection=_turn_detection(session["turn_detection"], "session.turn_detection"))
    if "input_audio_noise_reduction" in session:
        out = replace(out, noise_reduction=session["input_audio_noise_reduction"])
    if "include" in session:
        out = replace(out, include=session["include"])
    return out


def _object(value: Any, param: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigProblem(f"'{param}' must be an object", param)
    return value


def _ga_format(value: Any) -> int:
    fmt = _object(value, "session.audio.input.format")
    kind = fmt.get("type", "audio/pcm")
    if kind != "audio/pcm":
        raise ConfigProblem(f"audio format {kind!r} is not supported here: send 'audio/pcm' (16-bit little-endian "
                            "PCM, 24 kHz)", "session.audio.input.format.type")
    rate = fmt.get("rate", PCM_RATE_HZ)
    if isinstance(rate, bool) or not isinstance(rate, int) or not MIN_RATE_HZ <= rate <= MAX_RATE_HZ:
        raise ConfigProblem(f"audio rate {rate!r} is not supported: send {PCM_RATE_HZ} (this server also takes "
                            f"{MIN_RATE_HZ}-{MAX_RATE_HZ} Hz)", "session.audio.input.format.rate")
    return rate


def _transcription(value: Any, param: str, old: dict[str, Any]) -> dict[str, Any]:
    given = _object(value, param)
    out = dict(old)
    for key in ("model", "language", "prompt"):
        if key in given:
            if given[key] is not None and not isinstance(given[key], str):
                raise ConfigProblem(f"'{param}.{key}' must be a string", f"{param}.{key}")
            out[key] = given[key]
    for key, item in given.items():  # other fields (delay, keywords...) are kept and shown back
        if key not in out:
            out[key] = item
    return out


def _turn_detection(value: Any, param: str) -> dict[str, Any] | None:
    if value is None:
        return None
    given = dict(_object(value, param))
    kind = given.setdefault("type", "server_vad")
    if kind not in ("server_vad", "semantic_vad"):
        raise ConfigProblem(f"turn_detection type {kind!r} is not supported: use 'server_vad', 'semantic_vad' or "
                            "null (commit turns yourself)", f"{param}.type")
    silence = given.get("silence_duration_ms")
    if silence is not None and (isinstance(silence, bool) or not isinstance(silence, int | float) or silence < 0
                                or silence > 60_000):
        raise ConfigProblem("'silence_duration_ms' must be a number of milliseconds from 0 to 60000",
                            f"{param}.silence_duration_ms")
    return given


def endpointing(config: RealtimeConfig) -> dict[str, float]:
    """The session core's endpointing overrides for ``config.turn_detection``."""
    detection = config.turn_detection
    if detection is None:
        return {"trailing_silence_after_speech_s": COMMIT_ONLY_SILENCE_S}
    silence_ms = detection.get("silence_duration_ms")
    if detection.get("type") != "server_vad" or silence_ms is None:
        return {}
    return {"trailing_silence_after_speech_s": max(MIN_SILENCE_S, silence_ms / 1000)}


def ga_session(config: RealtimeConfig, session_id: str) -> dict[str, Any]:
    """The session as the GA API's ``session.created``/``session.updated`` show it."""
    return {"type": "transcription", "object": "realtime.transcription_session", "id": session_id,
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": config.rate_hz},
                                "transcription": config.transcription, "turn_detection": config.turn_detection,
                                "noise_reduction": config.noise_reduction}},
            "include": config.include}


def beta_session(config: RealtimeConfig, session_id: str) -> dict[str, Any]:
    """The session as the beta API's ``transcription_session.created``/``.updated`` show it."""
    return {"id": session_id, "object": "realtime.transcription_session", "modalities": ["text"],
            "input_audio_format": "pcm16", "input_audio_transcription": config.transcription,
            "turn_detection": config.turn_detection, "input_audio_noise_reduction": config.noise_reduction,
            "include": config.include}


def prompt_hotwords(prompt: object, limit: int) -> tuple[str, ...]:
    """The hotwords in an OpenAI ``prompt``: its phrases split at commas, semicolons and line ends, stripped, empty
    and over-long ones (more than :data:`~streamer.protocol.MAX_HOTWORD_CHARS` characters: prose, not a term)
    dropped, repeats counted once, at most ``limit`` (the server's ``engine.max_hotwords``). Never raises: a prompt
    is free text, and a model that only reads terms takes what it can use."""
    if not isinstance(prompt, str):
        return ()
    phrases = (" ".join(p.split()) for p in re.split(r"[,;\n]", prompt))
    kept = [p for p in phrases if p and len(p) <= MAX_HOTWORD_CHARS and p.isprintable()]
    return tuple(dict.fromkeys(kept))[: max(0, limit)]
