"""Other protocols' wire formats on the session core (:mod:`streamer.session`): each adapter translates its
protocol's messages into core calls and the core's events into its protocol's messages, and nothing more
(``architecture.md`` §5). Protocol v1 (``/v1/listen``) is :mod:`streamer.server.listen`; here are, on the main
port, the Deepgram-compatible live API and the OpenAI-compatible file and realtime APIs, and on ports or
brokers of their own Wyoming (Home Assistant), Hermes (Rhasspy, over MQTT) and the Vosk server protocol.
"""
