"""streamer: real-time speech recognition with cache-aware FastConformer and TDT."""

__version__ = "0.1.0"
