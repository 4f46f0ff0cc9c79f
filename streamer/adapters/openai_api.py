"""The OpenAI-compatible API on the daemon's port (``server.openai_api``, on by default).

- ``POST /v1/audio/transcriptions``: a file, answered as ``json``, ``text``, ``srt``, ``vtt``, ``verbose_json`` or
  server-sent events (:mod:`streamer.adapters.openai_files`), through the port's side door for requests with a
  body (:mod:`streamer.server.http_body`);
- ``WS /v1/realtime?intent=transcription``: live audio (:mod:`streamer.adapters.openai_realtime`).

Both are protected by the daemon's tokens like ``/v1/listen`` (the ``openai`` SDK sends its API key as
``Authorization: Bearer``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING

from streamer.adapters.openai_files import TranscriptionsRoute
from streamer.adapters.openai_realtime import serve_realtime

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection

    from streamer.server.http_body import BodyRoutes
    from streamer.session import SessionCore
    from streamer.settings import ServerSettings

TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"
REALTIME_PATH = "/v1/realtime"


def mount(side_door: BodyRoutes, ws_routes: dict[str, Callable[[ServerConnection], Awaitable[None]]],
          core: SessionCore, settings: ServerSettings) -> None:
    """Add the API's routes to the port's side door and WebSocket routes."""
    side_door.add(TRANSCRIPTIONS_PATH, TranscriptionsRoute(core, settings.max_upload_bytes))
    ws_routes[REALTIME_PATH] = partial(serve_realtime, core, settings)
