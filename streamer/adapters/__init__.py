"""Other protocols' wire formats on the session core (:mod:`streamer.session`): each adapter translates its
protocol's messages into core calls and the core's events into its protocol's messages, and nothing more
(``architecture.md`` §5). Protocol v1 (``/v1/listen``) is :mod:`streamer.server.listen`; here are Wyoming
(Home Assistant), Hermes (Rhasspy, over MQTT), the Vosk server protocol and the OpenAI-compatible API.
"""
