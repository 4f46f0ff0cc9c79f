"""English text -> IPA phonemes with espeak-ng, and the conversions the neural voices expect.

Piper voices were trained on espeak-ng's IPA as is; Kokoro-82M was trained on misaki's phoneme set,
which writes diphthongs and affricates as single letters (eI -> "A", aI -> "I", tS -> "ʧ", ...).
`to_kokoro` rewrites espeak-ng's IPA into that set (our own table, built from the vocabulary that
ships with the model), and `piper_ids` turns IPA into a Piper voice's phoneme ids.
"""

from __future__ import annotations

import subprocess
import unicodedata

from streamer.errors import SynthesisError

# espeak-ng IPA sequence -> Kokoro (misaki) symbol; longest sequences are replaced first.
_KOKORO_COMMON = {
    "eɪ": "A",
    "aɪ": "I",
    "aʊ": "W",
    "ɔɪ": "Y",
    "dʒ": "ʤ",
    "tʃ": "ʧ",
    "n̩": "ᵊn",
    "l̩": "ᵊl",
    "r": "ɹ",
    "ɬ": "l",
}
_KOKORO_US = {"oʊ": "O", "ɚ": "əɹ", "ɜː": "ɜɹ", "ɾ": "T", "ː": ""}
_KOKORO_GB = {"əʊ": "Q", "ɐ": "ə"}


def espeak_ipa(text: str, language: str = "en-us") -> str:
    """IPA with stress marks for `text`, words separated by spaces, clauses joined with ", ".

    Raises:
        SynthesisError: espeak-ng is missing or failed.
    """
    try:
        result = subprocess.run(
            ["espeak-ng", "-q", "--ipa", "-v", language, text],
            check=True,
            capture_output=True,
            timeout=60,
        )
    except FileNotFoundError as exc:
        raise SynthesisError("espeak-ng not found; install it with `apt-get install espeak-ng`") from exc
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise SynthesisError(f"espeak-ng could not phonemize {text!r}: {exc}") from exc
    lines = [ln.strip() for ln in result.stdout.decode().splitlines() if ln.strip()]
    return unicodedata.normalize("NFC", ", ".join(lines))


def to_kokoro(ipa: str, language: str, vocab: dict[str, int]) -> str:
    """Rewrite espeak-ng IPA into Kokoro's phoneme set, dropping symbols the model does not know."""
    table = {**_KOKORO_COMMON, **(_KOKORO_US if language == "en-us" else _KOKORO_GB)}
    keys = sorted(table, key=len, reverse=True)
    out: list[str] = []
    i = 0
    while i < len(ipa):
        match = next((k for k in keys if ipa.startswith(k, i)), None)
        if match is not None:
            out.append(table[match])
            i += len(match)
        else:
            out.append(ipa[i])
            i += 1
    return "".join(ch for ch in "".join(out) if ch in vocab)


def piper_ids(ipa: str, id_map: dict[str, list[int]]) -> list[int]:
    """Phoneme ids the way Piper feeds them: "^", then each phoneme followed by the pad "_", then "$"."""
    pad = id_map["_"]
    ids = [*id_map["^"], *pad]
    for ch in ipa:
        if ch in id_map:
            ids.extend(id_map[ch])
            ids.extend(pad)
    ids.extend(id_map["$"])
    return ids
