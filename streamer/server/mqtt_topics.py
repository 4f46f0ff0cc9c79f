"""What :class:`~streamer.server.mqtt.MqttSink` publishes where: topic levels, payloads, the run id, the status.

Topics are ``<prefix>/<device>/<stream>/partial``, ``.../final`` and ``<prefix>/<device>/status`` (``architecture.md``
§5); a payload is the WebSocket's JSON plus a last field ``run``.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from typing import Any, Final

ONLINE: Final = "online"
OFFLINE: Final = "offline"
_UNSAFE_IN_TOPIC_LEVEL: Final = str.maketrans({"/": "_", "+": "_", "#": "_", "\0": "_"})


def topic_level(name: str) -> str:
    """``name`` made safe as one topic level: ``/``, ``+``, ``#`` and NUL become ``_``; empty becomes ``_``."""
    return name.translate(_UNSAFE_IN_TOPIC_LEVEL) or "_"


def compact_json(event: Mapping[str, Any]) -> str:
    """The WebSocket's encoding of a message (``streamer.protocol``): compact, UTF-8 kept as is."""
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


def new_run_id() -> str:
    """A fresh id for this start of the daemon: its UTC start time (sortable) and 24 random bits, e.g.
    ``20250314T091502Z-3fa9c1``. Compare runs for equality; the time is only a hint (clocks jump)."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"
