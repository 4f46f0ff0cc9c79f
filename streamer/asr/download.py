"""Find model files: local paths, the bundled registry, and cached Hugging Face Hub downloads.

Downloads use the stdlib (``urllib``) from ``$HF_ENDPOINT`` (default https://huggingface.co) with
``$HF_TOKEN`` as a bearer token, into ``$STREAMER_CACHE`` (default ``~/.cache/streamer``). A file
appears in the cache only once complete (written beside it, then renamed), so a cached file is
trusted as is and never fetched again; ``$HF_HUB_OFFLINE=1`` never touches the network.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamer.errors import CheckpointError
from streamer.resources import default_registry

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<revision>[\w./-]+))?$")
# Files of a transformers-format repository; the first two groups need one match each.
_HF_REQUIRED = (("config.json",), ("model.safetensors", "model.safetensors.index.json"))
_HF_OPTIONAL = ("tokenizer.model", "tokenizer.json", "preprocessor_config.json", "processor_config.json")
_COMPLETE = ".streamer-complete"  # marks a finished transformers-format download
_TIMEOUT_S = 60.0
_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    """One model in ``models/registry.toml``: a local ``path`` or a Hub ``repo`` + ``filename``."""

    name: str
    path: Path | None = None
    repo: str | None = None
    filename: str | None = None
    revision: str = "main"


def cache_dir() -> Path:
    """Where downloads go: ``$STREAMER_CACHE`` or ``~/.cache/streamer``."""
    return Path(os.environ.get("STREAMER_CACHE") or Path.home() / ".cache" / "streamer")


def read_registry(path: str | os.PathLike[str] | None = None) -> dict[str, RegistryEntry]:
    """Entries of the registry file; a relative ``path`` is relative to the directory above ``models/``.

    Raises:
        CheckpointError: the file is not valid TOML or an entry has neither a path nor a repo.
    """
    path = Path(path) if path is not None else default_registry()
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CheckpointError(f"cannot read the model registry {path}: {exc}") from exc
    entries = {}
    for name, entry in (data.get("models") or {}).items():
        if not isinstance(entry, dict) or not (
            entry.get("path") or (entry.get("repo") and entry.get("filename"))
        ):
            raise CheckpointError(f"{path}: model {name!r} needs `path`, or `repo` and `filename`")
        local = entry.get("path")
        entries[name] = RegistryEntry(
            name=name,
            path=(path.parent.parent / local) if local else None,
            repo=entry.get("repo"),
            filename=entry.get("filename"),
            revision=str(entry.get("revision", "main")),
        )
    return entries


def _is_offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def resolve(
    spec: str, *, registry: str | os.PathLike[str] | None = None, offline: bool | None = None
) -> Path:
    """The local file or directory for ``spec``: a path, a registry name, or ``owner/name[@revision]``.

    Raises:
        CheckpointError: nothing matches, or a download is needed and impossible.
    """
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if spec.endswith(".nemo") or spec.startswith((".", "/", "~")):  # meant as a path, not a name
        raise CheckpointError(f"model file not found: {spec}")
    entries = read_registry(registry)
    match = _REPO_ID.match(spec)
    entry = entries.get(spec) or next(
        (e for e in entries.values() if match and e.repo == match["repo"] and not match["revision"]), None
    )
    if entry is not None and entry.path is not None:
        if entry.path.exists():
            return entry.path
        if entry.repo is None:
            raise CheckpointError(
                f"registry model {entry.name!r} should be at {entry.path}, which does not exist"
            )
    if entry is not None and entry.repo and entry.filename:
        return download(entry.repo, entry.filename, revision=entry.revision, offline=offline)
    if match:
        return download_repo(match["repo"], revision=match["revision"] or "main", offline=offline)
    known = ", ".join(sorted(entries)) or "none"
    raise CheckpointError(
        f"no model {spec!r}: not a file, not in the registry (known: {known}), "
        "not a Hugging Face id (owner/name)"
    )


def _url(repo: str, filename: str, revision: str) -> str:
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    quoted = "/".join(urllib.parse.quote(part, safe="") for part in (revision, filename))
    return f"{endpoint}/{repo}/resolve/{quoted}"


def _cached_path(repo: str, filename: str, revision: str) -> Path:
    return cache_dir() / "hub" / repo.replace("/", "--") / revision.replace("/", "--") / filename


def download(
    repo: str, filename: str, *, revision: str = "main", offline: bool | None = None, progress: bool = True
) -> Path:
    """The cached copy of ``filename`` from Hub repository ``repo``, downloading it first if needed.

    Raises:
        CheckpointError: not cached, and offline or the download failed (the reason is in the message).
    """
    target = _cached_path(repo, filename, revision)
    if target.is_file():
        return target
    url = _url(repo, filename, revision)
    if _is_offline(offline):
        raise CheckpointError(
            f"{repo}/{filename} is not in the cache ({target}) and downloads are off "
            "(HF_HUB_OFFLINE); download it elsewhere and pass its path"
        )
    try:
        _fetch(url, target, progress)
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the response's socket
        hint = " (set HF_TOKEN for gated or private models)" if exc.code in (401, 403) else ""
        raise CheckpointError(f"cannot download {url}: HTTP {exc.code} {exc.reason}{hint}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CheckpointError(
            f"cannot download {url}: {reason}; nothing cached at {target}. Connect to the network, or "
            "download the file yourself and pass its path"
        ) from exc
    return target


def _fetch(url: str, target: Path, progress: bool) -> None:
    """Stream ``url`` into ``target`` atomically, with a progress bar on stderr."""
    from tqdm import tqdm  # noqa: PLC0415

    request = urllib.request.Request(url, headers={"User-Agent": "streamer"})
    if token := os.environ.get("HF_TOKEN"):
        request.add_header("Authorization", f"Bearer {token}")
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s to %s", url, target)
    with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with (
                os.fdopen(fd, "wb") as out,
                tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    desc=target.name,
                    disable=not progress,
                    leave=False,
                ) as bar,
            ):
                while block := response.read(_BLOCK_BYTES):
                    out.write(block)
                    bar.update(len(block))
            if total is not None and Path(tmp).stat().st_size != total:
                raise OSError(f"connection closed after {Path(tmp).stat().st_size} of {total} bytes")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def download_repo(repo: str, *, revision: str = "main", offline: bool | None = None) -> Path:
    """A model from a Hub id not in the registry: ``<name>.nemo`` (NeMo's convention), else HF files.

    Returns:
        The ``.nemo`` file, or the cache directory holding the transformers-format files.

    Raises:
        CheckpointError: neither layout could be fetched.
    """
    nemo = _cached_path(repo, f"{repo.rsplit('/', 1)[-1]}.nemo", revision)
    directory = nemo.parent
    if nemo.is_file():
        return nemo
    if (directory / _COMPLETE).is_file():  # a transformers-format download finished earlier
        return directory
    errors: list[str] = []
    try:
        return download(repo, nemo.name, revision=revision, offline=offline)
    except CheckpointError as exc:
        errors.append(str(exc))
    try:
        for group in _HF_REQUIRED:
            _first_available(repo, group, revision, offline)
        for name in _HF_OPTIONAL:
            _first_available(repo, (name,), revision, offline, required=False)
        if (index := directory / "model.safetensors.index.json").is_file():
            for shard in sorted(set(json.loads(index.read_text()).get("weight_map", {}).values())):
                download(repo, shard, revision=revision, offline=offline)
    except CheckpointError as exc:
        errors.append(str(exc))
        raise CheckpointError(f"cannot get {repo}: " + " | ".join(errors)) from exc
    (directory / _COMPLETE).touch()
    return directory


def _first_available(
    repo: str, names: tuple[str, ...], revision: str, offline: bool | None, required: bool = True
) -> Any:
    last: CheckpointError | None = None
    for name in names:
        try:
            return download(repo, name, revision=revision, offline=offline)
        except CheckpointError as exc:
            last = exc
    if required and last is not None:
        raise last
    return None
