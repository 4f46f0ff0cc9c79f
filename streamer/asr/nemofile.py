""".nemo archives: read one into a `Checkpoint`, write one that NeMo 3.0.0's ``restore_from`` loads.

An archive is a tar (gzip before NeMo 1.7) of ``model_config.yaml``, ``model_weights.ckpt`` and the
tokenizer files (nemo-reference.md §9.1).

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import os
import tarfile
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from streamer.asr.checkpoint import (
    FEATURE_BUFFER_KEYS,
    Checkpoint,
    sentencepiece_processor,
    sha256_of,
    with_tokenizer,
)
from streamer.asr.nemoconfig import parse_nemo_config
from streamer.asr.nemoconfigwriter import TOKENIZER_ARTIFACTS, nemo_config_from
from streamer.asr.shapes import check_state_dict
from streamer.errors import CheckpointError


def _open_tar(path: Path) -> tarfile.TarFile:
    """Open a .nemo: uncompressed since NeMo 1.7, gzip before (§9.1)."""
    for mode in ("r:", "r:gz"):
        try:
            return tarfile.open(path, mode)  # noqa: SIM115 - the caller closes it
        except (tarfile.ReadError, gzip.BadGzipFile, EOFError):
            continue
    raise CheckpointError(f"{path} is not a .nemo file (not a tar archive)")


def _member(
    members: dict[str, tarfile.TarInfo], reference: str | None, suffix: str
) -> tarfile.TarInfo | None:
    """Find an artifact: the name the config gives (``nemo:<uuid>_tokenizer.model``), else by suffix."""
    if reference:
        name = os.path.basename(reference.removeprefix("nemo:"))
        if name in members:
            return members[name]
    candidates = sorted(name for name in members if name.endswith(suffix))
    return members[candidates[0]] if candidates else None


def _read_weights(tar: tarfile.TarFile, info: tarfile.TarInfo, path: Path) -> dict[str, Tensor]:
    fileobj = tar.extractfile(info)
    if fileobj is None:
        raise CheckpointError(f"{path}: model_weights.ckpt is not a regular file")
    try:  # the member is seekable, so torch reads it in place without a second copy in memory
        state = torch.load(fileobj, map_location="cpu", weights_only=True)
    except (tarfile.TarError, EOFError, zlib.error):
        raise  # the archive itself is cut short: reported as damaged by the caller
    except Exception as exc:  # torch raises several unrelated types for a bad pickle
        raise CheckpointError(f"{path}: cannot read model_weights.ckpt: {exc}") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]  # a Lightning checkpoint rather than a bare state dict
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: model_weights.ckpt holds a {type(state).__name__}, not a state dict")
    return dict(state)


def load_nemo(path: str | os.PathLike[str], *, require_tokenizer: bool = True) -> Checkpoint:
    """Read a NeMo ``.nemo`` archive (nemo-reference.md §9.1).

    Args:
        path: the ``.nemo`` file.
        require_tokenizer: if False, a missing tokenizer gives ``tokenizer_model=None`` instead of an error.

    Raises:
        CheckpointError: the file is missing, not a tar archive, lacks the config, the weights or the
            tokenizer, or its weights do not fit its config.
        UnsupportedCheckpointError: the model uses something streamer does not implement.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    try:
        raw, tokenizer, state_dict = _read_archive(path)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise CheckpointError(f"{path} is damaged (truncated download?): {exc}") from exc
    try:
        config = parse_nemo_config(raw)
    except CheckpointError as exc:
        raise type(exc)(f"{path}: {exc}") from exc
    if tokenizer is None and require_tokenizer:
        reference = (raw.get("tokenizer") or {}).get("model_path")
        raise CheckpointError(
            f"{path}: no SentencePiece tokenizer in the archive (config says {reference!r})"
        )
    check_state_dict(config, state_dict, str(path))
    config = with_tokenizer(config, tokenizer, str(path))
    return Checkpoint(config, state_dict, tokenizer, raw, str(path), sha256_of([path]))


def _read_archive(path: Path) -> tuple[dict[str, Any], bytes | None, dict[str, Tensor]]:
    """The raw config, the tokenizer (if any) and the weights of a .nemo file."""
    with _open_tar(path) as tar:
        members = {os.path.normpath(m.name): m for m in tar.getmembers() if m.isfile()}
        if "model_config.yaml" not in members:
            raise CheckpointError(f"{path}: no model_config.yaml in the archive; is it a NeMo model?")
        if "model_weights.ckpt" not in members:
            raise CheckpointError(f"{path}: no model_weights.ckpt in the archive")
        try:
            raw = yaml.safe_load(_extract(tar, members["model_config.yaml"]))
        except yaml.YAMLError as exc:
            raise CheckpointError(f"{path}: model_config.yaml is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: model_config.yaml is not a mapping")
        info = _member(members, (raw.get("tokenizer") or {}).get("model_path"), "tokenizer.model")
        tokenizer = _extract(tar, info) if info is not None else None
        return raw, tokenizer, _read_weights(tar, members["model_weights.ckpt"], path)


def _extract(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    fileobj = tar.extractfile(info)
    if fileobj is None:
        raise CheckpointError(f"{tar.name}: {info.name} is not a regular file")
    return fileobj.read()


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(f"./{name}")
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def save_nemo(
    path: str | os.PathLike[str], checkpoint: Checkpoint, *, regenerate_config: bool = False
) -> None:
    """Write ``checkpoint`` as a ``.nemo`` archive that NeMo 3.0.0's ``restore_from`` loads.

    The config written is ``checkpoint.raw_config``, or one generated from ``checkpoint.config`` with
    `nemo_config_from` when ``regenerate_config`` is set or there is none; its tokenizer paths are
    pointed at the archive's own tokenizer files. The file appears atomically.

    Raises:
        CheckpointError: there is no tokenizer, or no mel filterbank/window (HF checkpoints: save the
            state dict of a built model instead, which has computed ones).
    """
    path = Path(path)
    if checkpoint.tokenizer_model is None:
        raise CheckpointError(f"cannot save {path}: the checkpoint has no tokenizer")
    if not checkpoint.has_feature_buffers:
        raise CheckpointError(
            f"cannot save {path}: NeMo needs {' and '.join(FEATURE_BUFFER_KEYS)}; take the state dict "
            "from a built model, which computes them"
        )
    check_state_dict(checkpoint.config, checkpoint.state_dict, str(path))
    # Name the artifacts after the tokenizer's content: the same tokenizer always gets the same names.
    prefix = hashlib.sha256(checkpoint.tokenizer_model).hexdigest()[:32]
    if regenerate_config or not checkpoint.raw_config:
        config = nemo_config_from(checkpoint.config, checkpoint.tokenizer_model, artifact_prefix=prefix)
    else:
        config = copy.deepcopy(checkpoint.raw_config)
        tokenizer = config.setdefault("tokenizer", {"dir": None, "type": "bpe"})
        tokenizer |= {key: f"nemo:{prefix}_{name}" for key, name in TOKENIZER_ARTIFACTS.items()}
    spe_vocab, vocab_txt = _vocab_files(checkpoint.tokenizer_model)
    weights = io.BytesIO()
    torch.save({k: _detached(v) for k, v in checkpoint.state_dict.items()}, weights)
    files = {
        "model_config.yaml": yaml.safe_dump(config, sort_keys=False, allow_unicode=True).encode(),
        "model_weights.ckpt": weights.getvalue(),
        f"{prefix}_tokenizer.model": checkpoint.tokenizer_model,
        f"{prefix}_tokenizer.vocab": spe_vocab,
        f"{prefix}_vocab.txt": vocab_txt,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w:") as tar:
            for name, data in files.items():
                _tar_add(tar, name, data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _detached(tensor: Tensor) -> Tensor:
    """A CPU tensor that owns exactly its data (a view would drag its whole storage into the file)."""
    tensor = tensor.detach().cpu()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def _vocab_files(tokenizer_model: bytes) -> tuple[bytes, bytes]:
    """SentencePiece's ``tokenizer.vocab`` (piece, score) and NeMo's ``vocab.txt`` (BERT-style pieces)."""
    sp = sentencepiece_processor(tokenizer_model, "tokenizer")
    spe, bert = [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        spe.append(f"{piece}\t{sp.get_score(i):g}\n")
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)):
            # NeMo's create_spt_model rule: "▁word" -> "word", "ab" -> "##ab", a bare "▁" stays.
            word = piece[1:] if piece.startswith("▁") else f"##{piece}"
            bert.append(f"{word or piece}\n")
    return "".join(spe).encode(), "".join(bert).encode()
