"""Protocols other than streamer's own protocol v1, each a thin adapter on the session core (``streamer.session``).

An adapter parses its wire format into core calls and turns the core's events into its own messages; the
core keeps sessions, caps, endpointing, resampling, metrics and the one-final-per-segment rule.
"""
