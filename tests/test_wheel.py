"""The package as users install it: a wheel built from the source, installed outside the checkout.

The wheel is built with this interpreter's pip and setuptools (no build isolation, no network) from a copy
of the files a release is made of, installed with ``pip install --no-deps --target`` (torch and the other
dependencies come from this venv, not reinstalled), and run from an empty folder with ``PYTHONPATH`` set to
the install alone, so the checkout's ``streamer`` cannot be imported there. From there `streamer transcribe`
must hear speech with the default model inside the wheel, and `streamer serve` must serve the caption page.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from streamer.training.evaluate import word_error_rate

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "streamer-tdt-small" / "model.nemo"
TITLE = "<title>Live captions · streamer</title>"  # clients/web/index.html's; the placeholder page has another
TIMEOUT = float(os.environ.get("STREAMER_TEST_TIMEOUT_FACTOR", "1"))
# What a release is built from; everything else in the checkout (tests, a .venv, runs/, data/) stays out.
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "streamer", "models", "clients")
# Files the wheel must carry besides the code, relative to the package.
BUNDLED = (
    "bundled/models/registry.toml",
    "bundled/models/streamer-tdt-small/model.nemo",
    "bundled/models/streamer-tdt-small/README.md",
    "bundled/models/streamer-tdt-small/recipe.yaml",
    "bundled/models/streamer-tdt-small/training.json",
    "bundled/clients/web/index.html",
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} is missing from this checkout"),
]


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; fails the test with its output when it exits non-zero."""
    result = subprocess.run(
        list(map(str, args)), cwd=cwd, env=env, capture_output=True, text=True, timeout=300 * TIMEOUT
    )
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


def outside_env(site: Path) -> dict[str, str]:
    """This environment with ``PYTHONPATH`` replaced by the install folder (pytest's runs point at the checkout)."""
    return {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the release sources, so building leaves no build/ or egg-info in the checkout."""
    root = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        src = REPO / name
        if not src.exists():  # a missing build file shows up below as a wheel without its files
            continue
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, root / name)
    return root


@pytest.fixture(scope="module")
def wheel(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    pip = (sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", out)
    run(*pip, ".", cwd=source)
    (path,) = out.glob("streamer-*.whl")
    return path


@pytest.fixture(scope="module")
def site(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed into a folder of its own, without its dependencies."""
    target = tmp_path_factory.mktemp("site")
    pip = (sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", target)
    run(*pip, wheel, cwd=wheel.parent)
    return target


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """An empty working directory with nothing of the checkout in it."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    return folder


def test_the_wheel_carries_the_model_the_registry_and_the_page(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert {f"streamer/{name}" for name in BUNDLED} <= names, sorted(n for n in names if "bundled" in n)
        bundled_model = zf.getinfo("streamer/bundled/models/streamer-tdt-small/model.nemo")
        assert bundled_model.file_size == MODEL.stat().st_size
        assert zf.read("streamer/bundled/clients/web/index.html") == (REPO / "clients/web/index.html").read_bytes()
    assert not any(name.startswith(("models/", "clients/", "tests/")) for name in names), "files outside the package"


def test_the_installed_package_finds_its_own_files_not_the_checkouts(site: Path, outside: Path) -> None:
    code = "import streamer, streamer.resources as r; print(streamer.__file__, r.default_registry(), r.web_root())"
    lines = run(sys.executable, "-c", code, cwd=outside, env=outside_env(site)).stdout.split()
    package = site / "streamer"
    assert Path(lines[0]) == package / "__init__.py", "the checkout's streamer was imported, not the wheel's"
    assert Path(lines[1]) == package / "bundled" / "models" / "registry.toml"
    assert Path(lines[2]) == package / "bundled" / "clients" / "web"


def test_transcribe_from_the_installed_package_uses_the_bundled_model(
    site: Path, outside: Path, speech_wav: Path
) -> None:
    """`python -m streamer transcribe` with no --model, run outside the checkout, writes down the speech."""
    result = run(sys.executable, "-m", "streamer", "transcribe", speech_wav, cwd=outside, env=outside_env(site))
    wer, errors, words = word_error_rate(["turn on the kitchen lights and set a timer"], [result.stdout.strip()])
    assert wer <= 0.35, f"{errors}/{words} word errors: {result.stdout!r}"


def test_serve_from_the_installed_package_serves_the_caption_page(site: Path, outside: Path) -> None:
    """`python -m streamer serve` outside the checkout: GET / is clients/web/index.html; SIGTERM ends it with 0."""
    port_file, log_path = outside / "port", outside / "serve.log"
    with log_path.open("wb") as log:  # a file, not a pipe nobody reads, which could fill up and stall the daemon
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamer", "serve", "--port", "0", "--port-file", str(port_file)],
            cwd=outside, env=outside_env(site), stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120 * TIMEOUT
            while not (port_file.is_file() and port_file.read_text().strip()):
                assert proc.poll() is None, f"serve exited {proc.returncode}: {log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no port file after 120 s: {log_path.read_text()[-3000:]}"
                time.sleep(0.1)
            with urllib.request.urlopen(f"http://127.0.0.1:{port_file.read_text().strip()}/", timeout=30) as r:
                page = r.read().decode()
            assert TITLE in page, f"not the caption page: {page[:300]!r}"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60 * TIMEOUT) == 0, log_path.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_the_sdist_carries_what_the_wheel_needs(source: Path, tmp_path: Path) -> None:
    """The sdist, built by setuptools' own build hook (``build`` is not needed), has the files setup.py copies."""
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"
    name = run(sys.executable, "-c", code, cwd=source).stdout.splitlines()[-1]
    with tarfile.open(tmp_path / name) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    wanted = {"setup.py", "pyproject.toml", *(name.removeprefix("bundled/") for name in BUNDLED)}
    assert wanted <= members, sorted(wanted - members)


def test_an_editable_install_uses_the_checkouts_files(source: Path, tmp_path: Path) -> None:
    """`pip install -e` (setup.sh) imports ``streamer`` from the checkout and finds models/ and clients/ there.

    Its wheel is installed into a folder whose ``.pth`` file is read by ``site.addsitedir``; the interpreter
    runs with ``-S`` so this venv's own editable install (of the real checkout) stays out of the way, and
    sees this venv's packages (torch, ...) as a plain path entry.
    """
    dist, target = tmp_path / "dist", tmp_path / "site"
    code = f"from setuptools import build_meta; print(build_meta.build_editable({str(dist)!r}))"
    name = run(sys.executable, "-c", code, cwd=source).stdout.splitlines()[-1]
    with zipfile.ZipFile(dist / name) as zf:
        assert not [n for n in zf.namelist() if n.endswith(".nemo")], "an editable install copied the model"
    run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", target, dist / name,
        cwd=tmp_path)
    code = (
        "import site, sys; site.addsitedir(sys.argv[1]); sys.path.append(sys.argv[2]); "
        "import streamer, streamer.resources as r; print(streamer.__file__, r.default_registry(), r.web_root())"
    )
    purelib = sysconfig.get_paths()["purelib"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    lines = run(sys.executable, "-S", "-c", code, target, purelib, cwd=tmp_path, env=env).stdout.split()
    assert lines == [
        str(source / "streamer" / "__init__.py"),
        str(source / "models" / "registry.toml"),
        str(source / "clients" / "web"),
    ]
