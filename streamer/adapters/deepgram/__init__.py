"""The Deepgram-compatible live API, an adapter on the session core: Deepgram clients (``deepgram-sdk``, Pipecat's
``DeepgramSTTService``, LiveKit's ``deepgram.STT``) given this daemon's address work unchanged.

Modules: :mod:`~streamer.adapters.deepgram.request` (which requests are Deepgram's, their query and key: the rule
that shares ``/v1/listen`` with protocol v1 is its docstring), :mod:`~streamer.adapters.deepgram.endpoint` (the
handshake and the port's routing), :mod:`~streamer.adapters.deepgram.connection` (frames to core calls, events to
messages), :mod:`~streamer.adapters.deepgram.messages` (the JSON written). The README's "Deepgram-compatible API"
shows how each client is pointed here.
"""
