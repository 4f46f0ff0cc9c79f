"""streamer.audio."""
