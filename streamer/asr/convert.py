"""Convert a model between a NeMo ``.nemo`` archive and a Hugging Face transformers directory, both ways.

``.nemo`` -> HF: :func:`streamer.asr.hfwriter.write_hf` (refuses models transformers has no class for).
HF -> ``.nemo``: :func:`streamer.asr.hfformat.load_hf`, the mel filterbank and window computed (HF keeps
none; ours equal NeMo's bit for bit), then :func:`streamer.asr.nemofile.save_nemo` with a generated
NeMo config. The destination appears whole or not at all: it is written beside itself and renamed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from streamer.asr.checkpoint import Checkpoint
from streamer.asr.features import Preprocessor
from streamer.asr.hfformat import load_hf
from streamer.asr.hfwriter import write_hf
from streamer.asr.nemofile import load_nemo, save_nemo
from streamer.errors import CheckpointError, ConfigError

Format = Literal["nemo", "hf"]
Progress = Callable[[str], None]


def source_format(src: Path) -> Format:
    """``"hf"`` for a directory with ``config.json``, ``"nemo"`` for a file.

    Raises:
        CheckpointError: ``src`` does not exist, or is a directory without ``config.json``.
    """
    if src.is_dir():
        if not (src / "config.json").is_file():
            raise CheckpointError(f"{src}: a directory without config.json is not a Hugging Face model directory")
        return "hf"
    if src.is_file():
        return "nemo"
    raise CheckpointError(f"{src}: no such file or directory")


def target_format(src: Path, dst: Path, to: Format | None) -> Format:
    """The format to write: the other one than ``src``'s; ``to`` (``--to``) must agree.

    Raises:
        CheckpointError: ``src`` is missing or not a model.
        ConfigError: ``to`` names ``src``'s own format, or ``dst`` looks like the wrong format.
    """
    have = source_format(src)
    want: Format = "hf" if have == "nemo" else "nemo"
    if to is not None and to != want:
        raise ConfigError(
            f"{src} is already {'a .nemo file' if have == 'nemo' else 'a Hugging Face directory'}; "
            f"convert turns one format into the other (--to {want})"
        )
    if want == "hf" and dst.suffix == ".nemo":
        raise ConfigError(f"{dst}: a .nemo source converts to a Hugging Face directory; name a directory")
    return want


def check_destination(dst: Path, force: bool) -> None:
    """Refuse to overwrite ``dst`` (an empty directory is fine) unless ``force``.

    Raises:
        ConfigError: ``dst`` exists and ``force`` is off.
    """
    exists = dst.is_file() or dst.is_symlink() or (dst.is_dir() and any(dst.iterdir()))
    if exists and not force:
        raise ConfigError(f"{dst} exists; pass --force to replace it")


def _replace_path(new: Path, dst: Path) -> None:
    """Move ``new`` to ``dst``, removing whatever ``dst`` was only once ``new`` is in place."""
    umask = os.umask(0)
    os.umask(umask)
    for path in (new, *new.iterdir()) if new.is_dir() else (new,):  # temp files are private: open them up
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{new.name}")
        dst.rename(old)
    new.rename(dst)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def nemo_to_hf(src: Path, dst: Path, say: Progress) -> Checkpoint:
    """Write the ``.nemo`` ``src`` as an HF directory ``dst``; returns the checkpoint read."""
    say(f"reading {src}")
    checkpoint = load_nemo(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".part"))
    try:
        model_type = write_hf(work, checkpoint)
        say(f"writing {dst} (transformers model_type {model_type})")
        _replace_path(work, dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return checkpoint


def hf_to_nemo(src: Path, dst: Path, say: Progress) -> Checkpoint:
    """Write the HF directory ``src`` as the ``.nemo`` ``dst``; returns the checkpoint written."""
    say(f"reading {src}")
    checkpoint = load_hf(src)
    buffers = Preprocessor(checkpoint.config.features).state_dict()
    checkpoint.state_dict |= {f"preprocessor.{key}": value for key, value in buffers.items()}
    say(f"writing {dst} ({checkpoint.config.model_class}; mel filterbank and window computed)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".part")
    os.close(fd)
    work = Path(name)
    try:
        save_nemo(work, checkpoint, regenerate_config=True)
        _replace_path(work, dst)
    except BaseException:
        work.unlink(missing_ok=True)
        raise
    return checkpoint


def convert(src: Path, dst: Path, *, to: Format | None = None, force: bool = False, say: Progress = print) -> Format:
    """Convert ``src`` to the other format at ``dst``; returns the format written.

    Raises:
        CheckpointError: ``src`` is missing or unreadable.
        UnsupportedCheckpointError: the model has no equivalent in the target format.
        ConfigError: ``dst`` exists without ``force``, or the formats do not fit the paths.
    """
    want = target_format(src, dst, to)
    check_destination(dst, force)
    if want == "hf":
        nemo_to_hf(src, dst, say)
    else:
        hf_to_nemo(src, dst, say)
    return want
