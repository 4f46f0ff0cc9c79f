"""Errors that reach users. Each message says what went wrong and what to do about it."""


class StreamerError(Exception):
    """Root of every error that streamer raises on purpose."""


class ConfigError(StreamerError):
    """A setting or a command-line value is invalid."""


class CheckpointError(StreamerError):
    """A model file cannot be read."""


class UnsupportedCheckpointError(CheckpointError):
    """A model file is readable but describes something streamer does not implement."""


class AudioError(StreamerError):
    """An audio file or an audio frame cannot be decoded."""


class ProtocolError(StreamerError):
    """A client sent a message that breaks the wire protocol."""


class SynthesisError(StreamerError):
    """A TTS engine (training corpus synthesis) failed or is not installed."""
