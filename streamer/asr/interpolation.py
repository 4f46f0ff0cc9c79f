"""OmegaConf ``${a.b}`` interpolations in a NeMo ``model_config.yaml``, resolved without OmegaConf.

Shape legend::

    B streams in the batch   S audio samples (16 kHz)   M mel frames (10 ms)   F mel bins   U emitted tokens
    T encoder frames (80 ms, after 8x subsampling)      D encoder width   P prediction/joint width
    L layers   H heads   K conv kernel   C cached left-context encoder frames   V vocab incl. blank
    N TDT durations
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from streamer.errors import CheckpointError

_INTERPOLATION = re.compile(r"\$\{([^${}]+)\}")
_UNRESOLVED = object()


def resolve_interpolations(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Replace OmegaConf ``${a.b}`` references by the values they point at.

    Paths are looked up from the root of ``raw``; a leading ``model.`` is dropped when the root is the
    model section (training configs say ``${model.sample_rate}``). Resolver calls (``${oc.env:X}``)
    and paths that lead nowhere are left as they are: they only matter if a field we read holds one.

    Raises:
        CheckpointError: the references form a cycle.
    """

    def lookup(path: str, seen: frozenset[str]) -> Any:
        if path in seen:
            raise CheckpointError(f"model_config.yaml: interpolation ${{{path}}} refers to itself")
        parts = path.split(".")
        for candidate in (parts, parts[1:] if parts[0] == "model" else None):
            node: Any = raw
            for part in candidate or ():
                if isinstance(node, Mapping) and part in node:
                    node = node[part]
                elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                    node = node[int(part)]
                else:
                    break
            else:
                if candidate:
                    return resolve(node, seen | {path})
        return _UNRESOLVED

    def resolve(node: Any, seen: frozenset[str]) -> Any:
        if isinstance(node, Mapping):
            return {key: resolve(value, seen) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value, seen) for value in node]
        if not isinstance(node, str) or "${" not in node:
            return node
        whole = _INTERPOLATION.fullmatch(node.strip())
        if whole and ":" not in whole.group(1):
            value = lookup(whole.group(1).strip(), seen)
            return node if value is _UNRESOLVED else value

        def substitute(match: re.Match[str]) -> str:
            value = lookup(match.group(1).strip(), seen) if ":" not in match.group(1) else _UNRESOLVED
            return match.group(0) if value is _UNRESOLVED else str(value)

        return _INTERPOLATION.sub(substitute, node)

    return resolve(raw, frozenset())
