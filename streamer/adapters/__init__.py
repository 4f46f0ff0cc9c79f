"""Protocol adapters on the session core (:mod:`streamer.session`): each turns one wire protocol that users'
clients already speak into core calls, and the core's events into that protocol's messages."""
