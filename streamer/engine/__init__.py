"""streamer.engine."""
