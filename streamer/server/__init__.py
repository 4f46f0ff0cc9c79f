"""streamer.server."""
