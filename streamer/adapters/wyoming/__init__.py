"""Wyoming (Home Assistant's protocol for voice services) on the session core: speech-to-text over TCP.

Modules: :mod:`.server` (the port, connection cap, zeroconf via :mod:`.advertise`), :mod:`.connection` (one
client: events to core calls), :mod:`.utterance` (one utterance's session: core events to Wyoming events),
:mod:`.transcript` (streamed deltas that add up to the transcript), :mod:`.outbox` (the send queue),
:mod:`.framing` (reading and writing events within limits), :mod:`.info` (the ``describe`` answer).
"""

from streamer.adapters.wyoming.server import WyomingServer

__all__ = ["WyomingServer"]
