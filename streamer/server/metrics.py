"""Prometheus metrics in the text exposition format (version 0.0.4), written by hand.

Every series the daemon exports is declared in :class:`Metrics`; ``GET /metrics`` returns
:meth:`Metrics.render`. One family carries stream names as a label (each live stream's lag); it has a
series per open stream only, so it stays bounded by the session cap. Every other series is fixed.
Values are updated on the event loop only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    """A monotonically increasing value, optionally split by one label with a fixed set of values.

    An unlabelled counter may instead read its value from ``source`` at render time (a count kept elsewhere).
    """

    def __init__(self, name: str, help_text: str, label: str | None = None) -> None:
        self.name, self.help, self.label = name, help_text, label
        self._values: dict[str, float] = {} if label else {"": 0.0}
        self.source: Callable[[], float] | None = None

    def inc(self, amount: float = 1.0, label_value: str = "") -> None:
        self._values[label_value] = self._values.get(label_value, 0.0) + amount

    def value(self, label_value: str = "") -> float:
        if self.source is not None and not self.label:
            return float(self.source())
        return self._values.get(label_value, 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        values = {"": self.value()} if self.source is not None and not self.label else self._values
        for key, value in sorted(values.items()):
            labels = f'{{{self.label}="{key}"}}' if self.label else ""
            lines.append(f"{self.name}{labels} {_number(value)}")
        return lines


class Gauge:
    """A value that goes up and down; either set, or read from ``source`` at render time."""

    def __init__(self, name: str, help_text: str, source: Callable[[], float] | None = None) -> None:
        self.name, self.help, self.source = name, help_text, source
        self._value = 0.0

    def set(self, value: float) -> None:
        self._value = value

    def value(self) -> float:
        return float(self.source()) if self.source is not None else self._value

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {_number(self.value())}"]


class GaugeFamily:
    """Gauges split by one label, all read from ``source`` at render time (series come and go with it)."""

    def __init__(self, name: str, help_text: str, label: str, source: Callable[[], dict[str, float]] | None = None):
        self.name, self.help, self.label, self.source = name, help_text, label, source

    def values(self) -> dict[str, float]:
        return dict(self.source()) if self.source is not None else {}

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge"]
        for key, value in sorted(self.values().items()):
            escaped = key.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            lines.append(f'{self.name}{{{self.label}="{escaped}"}} {_number(value)}')
        return lines


class Histogram:
    """Observations counted in cumulative buckets, with their sum and count."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        self.name, self.help = name, help_text
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self._counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip(self.buckets, self._counts, strict=True):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        lines += [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    """The daemon's metrics (``architecture.md`` §6). Gauges read live state through the callables given."""

    def __init__(self) -> None:
        self.streams = Gauge("streamer_streams", "Open audio streams (WebSocket sessions, microphone, file).")
        self.sessions_total = Counter("streamer_sessions_total", "WebSocket /v1/listen sessions opened.")
        self.sessions_resumed_total = Counter(
            "streamer_sessions_resumed_total", "/v1/listen sessions resumed on a new connection after a drop."
        )
        self.sessions_held = Gauge(
            "streamer_sessions_held", "/v1/listen sessions waiting for their client to reconnect (resume window)."
        )
        self.sessions_refused_total = Counter(
            "streamer_sessions_refused_total", "Connections refused because a cap was reached.", "endpoint"
        )
        self.subscribers = Gauge("streamer_caption_subscribers", "Open /v1/captions subscriptions.")
        self.slow_consumers_total = Counter(
            "streamer_slow_consumers_total", "WebSocket clients closed (1008) for not reading their results."
        )
        self.audio_seconds_total = Counter("streamer_audio_seconds_total", "Audio given to the recognizer, seconds.")
        self.audio_dropped_seconds_total = Counter(
            "streamer_audio_dropped_seconds_total", "Oldest audio dropped because a stream fell behind, seconds."
        )
        self.step_seconds = Histogram(
            "streamer_step_seconds",
            "Wall time of one scheduling round on the inference thread (feature extraction, encoder, decoder).",
            (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.batch_size = Histogram("streamer_batch_size", "Streams per scheduling round.", (1, 2, 4, 8, 16, 32, 64))
        self.real_time_factor = Gauge(
            "streamer_real_time_factor",
            "Inference seconds per second of audio, averaged over recent rounds (below 1: faster than real time).",
        )
        self.partials_total = Counter("streamer_partials_total", "Partial results produced.")
        self.finals_total = Counter("streamer_finals_total", "Final results produced.")
        self.protocol_errors_total = Counter(
            "streamer_protocol_errors_total", "Error messages sent to clients, by code.", "code"
        )
        self.mqtt_outbox_depth = Gauge("streamer_mqtt_outbox_depth", "Finals waiting for the MQTT broker.")
        self.mqtt_connected = Gauge("streamer_mqtt_connected", "1 while connected to the MQTT broker.")
        self.mqtt_finals_published_total = Counter(
            "streamer_mqtt_finals_published_total", "Finals the MQTT broker acknowledged (PUBACK)."
        )
        self.mqtt_finals_dropped_total = Counter(
            "streamer_mqtt_finals_dropped_total",
            "Finals dropped, oldest first, because the MQTT outbox was full while the broker was unreachable.",
        )
        self.mqtt_finals_unsaved = Gauge(
            "streamer_mqtt_finals_unsaved",
            "Finals for MQTT not yet committed to the journal on disk (a crash now would lose them).",
        )
        self.mqtt_finals_recovered = Gauge(
            "streamer_mqtt_finals_recovered", "Finals found in the MQTT outbox journal at start (left by a crash)."
        )
        self.ready = Gauge("streamer_ready", "1 once the model is warm and the daemon accepts audio.")
        self.auth_failures_total = Counter(
            "streamer_auth_failures_total",
            "Requests refused for their token: HTTP 401 (missing, invalid) or 400 (ambiguous: more than one).",
            "reason",
        )
        self.session_journal_unsaved = Gauge(
            "streamer_session_journal_unsaved",
            "Writes of resume tokens and finals (what a resume after a restart replays) not yet on disk.",
        )
        self.stream_lag_seconds = GaugeFamily(
            "streamer_stream_lag_seconds",
            "Audio each live stream has received and not yet recognized (how far behind real time it is), seconds.",
            "stream",
        )
        self.max_stream_lag_seconds = Gauge(
            "streamer_max_stream_lag_seconds", "The largest streamer_stream_lag_seconds (0 with no live stream)."
        )
        for reason in ("missing", "invalid", "ambiguous"):  # every series exists from the start, for rate() alerts
            self.auth_failures_total.inc(0.0, label_value=reason)
        self.connections_refused_total = Counter(
            "streamer_connections_refused_total",
            "Requests refused before any endpoint saw them: HTTP 403 for their Origin or Host, HTTP 431 for a "
            "request head too large, or closed at once because server.max_handshakes were open.",
            "reason",
        )
        for reason in ("origin", "host", "request_too_large", "handshakes"):
            self.connections_refused_total.inc(0.0, label_value=reason)
        self.accept_errors_total = Counter(
            "streamer_accept_errors_total", "accept() calls that failed for want of file descriptors or memory."
        )
        self._rtf_busy_s = 0.0
        self._rtf_audio_s = 0.0

    def observe_step(self, seconds: float, batch_size: int, audio_seconds: float, dropped_seconds: float) -> None:
        """Record one scheduling round."""
        self.step_seconds.observe(seconds)
        self.batch_size.observe(batch_size)
        self.audio_seconds_total.inc(audio_seconds)
        if dropped_seconds:
            self.audio_dropped_seconds_total.inc(dropped_seconds)
        decay = 0.98  # about the last 50 rounds
        self._rtf_busy_s = self._rtf_busy_s * decay + seconds
        self._rtf_audio_s = self._rtf_audio_s * decay + audio_seconds
        if self._rtf_audio_s > 0:
            self.real_time_factor.set(self._rtf_busy_s / self._rtf_audio_s)

    def count_result(self, msg: Any) -> None:
        """Count one partial or final (the hub calls this for each)."""
        (self.finals_total if msg.type == "final" else self.partials_total).inc()

    def render(self) -> str:
        kinds = Counter | Gauge | GaugeFamily | Histogram
        series = [value for value in vars(self).values() if isinstance(value, kinds)]
        lines: list[str] = []
        for s in series:
            lines += s.render()
        return "\n".join(lines) + "\n"
