"""Find model files: local paths, the bundled registry, and Hugging Face Hub downloads.

Downloads go through ``huggingface_hub`` into Hugging Face's own cache, so a model fetched here is shared
with NeMo, transformers and the ``hf`` command line, and theirs with us: ``$HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``. The library brings revisions, ``$HF_TOKEN``,
``$HF_ENDPOINT`` (a mirror, or the tests' loopback server), resumable and Xet-backed transfers and retries
on a flaky network. A file already in the cache is used as is, without asking the Hub whether the revision
moved on (a daemon restart never waits for the network), and ``$HF_HUB_OFFLINE=1`` never touches it. The
environment is read on every call, not once at import as ``huggingface_hub`` does.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

import streamer
from streamer.errors import CheckpointError
from streamer.resources import default_registry

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<revision>[\w./-]+))?$")
# Files of a transformers-format repository; the first two groups need one match each.
_HF_REQUIRED = (("config.json",), ("model.safetensors", "model.safetensors.index.json"))
_HF_OPTIONAL = ("tokenizer.model", "tokenizer.json", "preprocessor_config.json", "processor_config.json")
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    """One model in ``models/registry.toml``: a local ``path`` or a Hub ``repo`` + ``filename``."""

    name: str
    path: Path | None = None
    repo: str | None = None
    filename: str | None = None
    revision: str = "main"


def hub_cache_dir() -> Path:
    """Hugging Face's cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else the library's default."""
    if cache := os.environ.get("HF_HUB_CACHE"):
        return Path(cache).expanduser()
    if home := os.environ.get("HF_HOME"):
        return Path(home).expanduser() / "hub"
    return Path(hf_constants.HF_HUB_CACHE)


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or hf_constants.ENDPOINT).rstrip("/")


def _is_offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE or hf_constants.HF_HUB_OFFLINE


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


def cached(repo: str, filename: str, revision: str = "main") -> Path | None:
    """The cached copy of ``filename`` at ``revision``, if a download finished earlier; never uses the network."""
    found = try_to_load_from_cache(repo, filename, cache_dir=hub_cache_dir(), revision=revision)
    return Path(found) if isinstance(found, str) else None


def _known_missing(repo: str, filename: str, revision: str) -> bool:
    """Whether an earlier download found that ``filename`` does not exist at ``revision`` (the Hub said so)."""
    found = try_to_load_from_cache(repo, filename, cache_dir=hub_cache_dir(), revision=revision)
    return found is not None and not isinstance(found, str)


def download(repo: str, filename: str, *, revision: str = "main", offline: bool | None = None) -> Path:
    """The cached copy of ``filename`` from Hub repository ``repo``, downloading it first if needed.

    Raises:
        CheckpointError: not cached, and offline or the download failed (the reason is in the message).
    """
    if (path := cached(repo, filename, revision)) is not None:
        return path
    cache = hub_cache_dir()
    url = hf_hub_url(repo, filename, revision=revision, endpoint=_endpoint())
    if _is_offline(offline):
        raise CheckpointError(
            f"{repo}/{filename} is not in the cache ({cache}) and downloads are off "
            "(HF_HUB_OFFLINE); download it elsewhere and pass its path"
        )
    logger.info("downloading %s into %s", url, cache)
    try:
        return Path(
            hf_hub_download(
                repo, filename, revision=revision, cache_dir=cache, endpoint=_endpoint(),
                library_name="streamer", library_version=streamer.__version__,
            )
        )
    except LocalEntryNotFoundError as exc:  # the Hub was unreachable (after the library's retries)
        reason = exc.__cause__ or exc
        raise CheckpointError(
            f"cannot download {url}: {reason}; nothing cached in {cache}. Connect to the network, or "
            "download the file yourself and pass its path"
        ) from exc
    except HfHubHTTPError as exc:
        response = exc.response
        code = response.status_code if response is not None else "error"
        phrase = getattr(response, "reason_phrase", "") if response is not None else str(exc)
        hint = " (set HF_TOKEN for gated or private models)" if code in (401, 403) else ""
        raise CheckpointError(f"cannot download {url}: HTTP {code} {phrase}{hint}") from exc
    except OSError as exc:  # the cache cannot be written (full disk, read-only, permissions)
        raise CheckpointError(f"cannot download {url} into {cache}: {exc}") from exc


def _cached_hf_dir(repo: str, revision: str) -> Path | None:
    """The cached transformers-format snapshot of ``repo``, if an earlier download of it finished.

    Finished means: the config and every weight file are cached, and each optional file is cached or known
    to be missing from the repository; their common snapshot directory is the model.
    """
    config = cached(repo, "config.json", revision)
    if config is None:
        return None
    if cached(repo, "model.safetensors", revision) is None:
        index = cached(repo, "model.safetensors.index.json", revision)
        if index is None:
            return None
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        if any(cached(repo, shard, revision) is None for shard in shards):
            return None
    for name in _HF_OPTIONAL:
        if cached(repo, name, revision) is None and not _known_missing(repo, name, revision):
            return None
    return config.parent


def download_repo(repo: str, *, revision: str = "main", offline: bool | None = None) -> Path:
    """A model from a Hub id not in the registry: ``<name>.nemo`` (NeMo's convention), else HF files.

    Returns:
        The ``.nemo`` file, or the cache's snapshot directory holding the transformers-format files.

    Raises:
        CheckpointError: neither layout could be fetched.
    """
    nemo = f"{repo.rsplit('/', 1)[-1]}.nemo"
    if (path := cached(repo, nemo, revision)) is not None:
        return path
    if (directory := _cached_hf_dir(repo, revision)) is not None:
        return directory
    errors: list[str] = []
    try:
        return download(repo, nemo, revision=revision, offline=offline)
    except CheckpointError as exc:
        if isinstance(exc.__cause__, LocalEntryNotFoundError):
            raise  # the Hub is unreachable: the transformers files would fail alike, after as many retries
        errors.append(str(exc))
    try:
        config = _first_available(repo, _HF_REQUIRED[0], revision, offline)
        _first_available(repo, _HF_REQUIRED[1], revision, offline)
        for name in _HF_OPTIONAL:
            try:
                download(repo, name, revision=revision, offline=offline)
            except CheckpointError:
                pass  # optional: the Hub said it is missing (the cache remembers that) or it could not be had
        if (index := cached(repo, "model.safetensors.index.json", revision)) is not None:
            for shard in sorted(set(json.loads(index.read_text()).get("weight_map", {}).values())):
                download(repo, shard, revision=revision, offline=offline)
    except CheckpointError as exc:
        errors.append(str(exc))
        raise CheckpointError(f"cannot get {repo}: " + " | ".join(errors)) from exc
    return config.parent


def _first_available(repo: str, names: tuple[str, ...], revision: str, offline: bool | None) -> Path:
    """The first of ``names`` the repository has (each alternative tried in turn)."""
    last = CheckpointError(f"{repo}: none of {', '.join(names)}")
    for name in names:
        try:
            return download(repo, name, revision=revision, offline=offline)
        except CheckpointError as exc:
            last = exc
    raise last
