"""streamer.training."""
