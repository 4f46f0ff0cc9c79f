"""Protocol adapters on the session core (:mod:`streamer.session`): each translates one protocol's wire format into
core calls and the core's events into that protocol's messages, and nothing more (``architecture.md`` §5).
"""
