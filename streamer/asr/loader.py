"""Load a model checkpoint given as a ``.nemo`` path, a Hugging Face directory, a registry name or a Hub id.

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
"""

from __future__ import annotations

import os
import tarfile

from streamer.asr import download
from streamer.asr.checkpoint import Checkpoint
from streamer.asr.hfformat import load_hf
from streamer.asr.nemofile import load_nemo
from streamer.errors import UnsupportedCheckpointError


def load_checkpoint(
    spec: str | os.PathLike[str],
    *,
    registry: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
) -> Checkpoint:
    """Load a model given as a ``.nemo`` path, an HF directory, a registry name or a Hugging Face id.

    Args:
        spec: what ``--model`` says. Existing paths win over names; ``owner/name[@revision]`` that is
            neither a path nor a registry entry is downloaded from the Hugging Face Hub (and cached).
        registry: the registry file (default: :func:`streamer.resources.default_registry`).
        offline: never use the network (default: ``$HF_HUB_OFFLINE``); cached files still work.

    Raises:
        CheckpointError: nothing matches ``spec``, or the download failed with nothing cached.
    """
    path = download.resolve(str(spec), registry=registry, offline=offline)
    if path.is_dir():
        checkpoint = load_hf(path)
    elif path.suffix == ".nemo" or tarfile.is_tarfile(path):
        checkpoint = load_nemo(path)
    else:
        raise UnsupportedCheckpointError(f"{path}: expected a .nemo file or a Hugging Face directory")
    checkpoint.source = str(spec)
    return checkpoint
