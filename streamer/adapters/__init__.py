"""Other protocols' wire formats on the session core (:mod:`streamer.session`): each adapter translates its
protocol's messages into core calls and the core's events into its protocol's messages, and nothing more.
Protocol v1 (``/v1/listen``) is :mod:`streamer.server.listen`.
"""
