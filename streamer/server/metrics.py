"""The daemon's Prometheus metrics, kept by ``prometheus_client`` in a registry of the daemon's own.

Every series the daemon exports is declared in :class:`Metrics`, next to the process (CPU, memory, open
file descriptors), Python platform and garbage-collector series of the library's standard collectors.
Each :class:`Metrics` has its own :class:`~prometheus_client.CollectorRegistry`, so two servers in one
process (the tests start many) never share or clash over a series. ``GET /metrics`` answers with
:meth:`Metrics.exposition`: the Prometheus text format, or OpenMetrics when the scraper's ``Accept`` header
asks for it. One family carries stream names as a label (each live stream's lag); it has a series per open
stream only, so it stays bounded by the session cap. Every other series is fixed. Values are updated on the
event loop; a scrape reads them there too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, GCCollector, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest
from prometheus_client.registry import Collector

# The text format without an Accept header: what Prometheus and every scraper read.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# Without this every counter and histogram gains a `<name>_created` gauge (the time it was made), doubling
# the series a scrape returns for a value no dashboard or alert of ours reads. It is a switch of the library,
# for the whole process; the daemon's process exports nothing but its own metrics.
prometheus_client.disable_created_metrics()


# The protocols whose sessions are counted (the ``protocol`` each adapter gives ``SessionCore.connect``): their
# series exist from the start at 0.
PROTOCOLS = ("listen", "deepgram", "openai", "openai_realtime", "wyoming", "hermes", "vosk")


class Counter:
    """A monotonically increasing value, optionally split by one label whose series all exist from the start."""

    def __init__(
        self, registry: CollectorRegistry, name: str, help_text: str, label: str | None = None,
        label_values: Iterable[str] = (),
    ) -> None:
        self.name, self.label, self._registry = name, label, registry
        self._counter = prometheus_client.Counter(name, help_text, [label] if label else [], registry=registry)
        for value in label_values:  # a series at 0 before the first event, so rate() alerts see it
            self._counter.labels(value)

    def inc(self, amount: float = 1.0, label_value: str = "") -> None:
        """Add ``amount`` (to the series of ``label_value`` for a labelled counter)."""
        (self._counter.labels(label_value) if self.label else self._counter).inc(amount)

    def value(self, label_value: str = "") -> float:
        """The current count (0 for a label value never counted)."""
        labels = {self.label: label_value} if self.label else {}
        return self._registry.get_sample_value(self.name, labels) or 0.0


class Gauge:
    """A value that goes up and down: either set, or read from ``source`` at each scrape."""

    def __init__(self, registry: CollectorRegistry, name: str, help_text: str) -> None:
        self.name, self._registry = name, registry
        self._gauge = prometheus_client.Gauge(name, help_text, registry=registry)
        self._source: Callable[[], float] | None = None

    @property
    def source(self) -> Callable[[], float] | None:
        """Where a scrape reads the value (a count kept elsewhere); None: the value last set."""
        return self._source

    @source.setter
    def source(self, source: Callable[[], float]) -> None:
        self._source = source
        self._gauge.set_function(source)

    def set(self, value: float) -> None:
        """Set the value (for a gauge without a ``source``)."""
        self._gauge.set(value)

    def value(self) -> float:
        """The current value, as a scrape would read it."""
        return self._registry.get_sample_value(self.name) or 0.0


class CounterFrom(Collector):
    """A counter whose count is kept elsewhere (the MQTT sink's): ``source`` is read at each scrape."""

    def __init__(self, registry: CollectorRegistry, name: str, help_text: str) -> None:
        self.name, self.help = name, help_text
        self.source: Callable[[], float] = lambda: 0.0
        registry.register(self)

    def value(self) -> float:
        """The current count."""
        return float(self.source())

    def collect(self) -> Iterator[Metric]:
        """The one sample, for the registry."""
        yield CounterMetricFamily(self.name.removesuffix("_total"), self.help, value=self.value())


class GaugeFamily(Collector):
    """Gauges split by one label, all read from ``source`` at each scrape (series come and go with it)."""

    def __init__(self, registry: CollectorRegistry, name: str, help_text: str, label: str) -> None:
        self.name, self.help, self.label = name, help_text, label
        self.source: Callable[[], dict[str, float]] = dict
        registry.register(self)

    def values(self) -> dict[str, float]:
        """``{label value: value}`` now."""
        return dict(self.source())

    def collect(self) -> Iterator[Metric]:
        """One sample per label value, for the registry."""
        family = GaugeMetricFamily(self.name, self.help, labels=[self.label])
        for key, value in sorted(self.values().items()):
            family.add_metric([key], value)
        yield family


class Metrics:
    """The daemon's metrics (``architecture.md`` §6). Gauges read live state through the callables given."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, open fds
        PlatformCollector(registry=r)  # python_info
        GCCollector(registry=r)  # python_gc_*
        self.streams = Gauge(r, "streamer_streams", "Open audio streams (WebSocket sessions, microphone, file).")
        self.sessions_total = Counter(
            r, "streamer_sessions_total", "Sessions started, by the protocol they came in on.", "protocol", PROTOCOLS
        )
        self.sessions_resumed_total = Counter(
            r, "streamer_sessions_resumed_total", "/v1/listen sessions resumed on a new connection after a drop."
        )
        self.sessions_held = Gauge(
            r, "streamer_sessions_held", "/v1/listen sessions waiting for their client to reconnect (resume window)."
        )
        self.sessions_refused_total = Counter(
            r, "streamer_sessions_refused_total", "Connections refused because a cap was reached.", "endpoint"
        )
        self.subscribers = Gauge(r, "streamer_caption_subscribers", "Open /v1/captions subscriptions.")
        self.slow_consumers_total = Counter(
            r, "streamer_slow_consumers_total", "WebSocket clients closed (1008) for not reading their results."
        )
        self.audio_seconds_total = Counter(
            r, "streamer_audio_seconds_total", "Audio given to the recognizer, seconds."
        )
        self.audio_dropped_seconds_total = Counter(
            r, "streamer_audio_dropped_seconds_total", "Oldest audio dropped because a stream fell behind, seconds."
        )
        self.step_seconds = Histogram(
            "streamer_step_seconds",
            "Wall time of one scheduling round on the inference thread (feature extraction, encoder, decoder).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.batch_size = Histogram(
            "streamer_batch_size", "Streams per scheduling round.", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.real_time_factor = Gauge(
            r,
            "streamer_real_time_factor",
            "Inference seconds per second of audio, averaged over recent rounds (below 1: faster than real time).",
        )
        self.partials_total = Counter(r, "streamer_partials_total", "Partial results produced.")
        self.finals_total = Counter(r, "streamer_finals_total", "Final results produced.")
        self.protocol_errors_total = Counter(
            r, "streamer_protocol_errors_total", "Error messages sent to clients, by code.", "code"
        )
        self.mqtt_outbox_depth = Gauge(r, "streamer_mqtt_outbox_depth", "Finals waiting for the MQTT broker.")
        self.mqtt_connected = Gauge(r, "streamer_mqtt_connected", "1 while connected to the MQTT broker.")
        self.mqtt_finals_published_total = CounterFrom(
            r, "streamer_mqtt_finals_published_total", "Finals the MQTT broker acknowledged (PUBACK)."
        )
        self.mqtt_finals_dropped_total = CounterFrom(
            r,
            "streamer_mqtt_finals_dropped_total",
            "Finals dropped, oldest first, because the MQTT outbox was full while the broker was unreachable.",
        )
        self.mqtt_finals_unsaved = Gauge(
            r,
            "streamer_mqtt_finals_unsaved",
            "Finals for MQTT not yet committed to the journal on disk (a crash now would lose them).",
        )
        self.mqtt_finals_recovered = Gauge(
            r, "streamer_mqtt_finals_recovered", "Finals found in the MQTT outbox journal at start (left by a crash)."
        )
        self.ready = Gauge(r, "streamer_ready", "1 once the model is warm and the daemon accepts audio.")
        self.sessions_active = Gauge(
            r, "streamer_sessions_active",
            "Started sessions of every protocol, held ones included: what counts against the capacity.",
        )
        self.capacity_sessions = Gauge(
            r, "streamer_capacity_sessions",
            "Sessions this box takes: admission.capacity_streams (configured or measured), else server.max_sessions.",
        )
        self.load_ratio = Gauge(
            r, "streamer_load_ratio", "streamer_sessions_active / streamer_capacity_sessions (1: full)."
        )
        self.auth_failures_total = Counter(
            r,
            "streamer_auth_failures_total",
            "Requests refused for their token: HTTP 401 (missing, invalid) or 400 (ambiguous: more than one).",
            "reason",
            ("missing", "invalid", "ambiguous"),
        )
        self.session_journal_unsaved = Gauge(
            r,
            "streamer_session_journal_unsaved",
            "Writes of resume tokens and finals (what a resume after a restart replays) not yet on disk.",
        )
        self.stream_lag_seconds = GaugeFamily(
            r,
            "streamer_stream_lag_seconds",
            "Audio each live stream has received and not yet recognized (how far behind real time it is), seconds.",
            "stream",
        )
        self.max_stream_lag_seconds = Gauge(
            r, "streamer_max_stream_lag_seconds", "The largest streamer_stream_lag_seconds (0 with no live stream)."
        )
        self.connections_refused_total = Counter(
            r,
            "streamer_connections_refused_total",
            "Requests refused before any endpoint saw them: HTTP 403 for their Origin or Host, HTTP 431 for a "
            "request head too large, or closed at once because server.max_handshakes were open.",
            "reason",
            ("origin", "host", "request_too_large", "handshakes"),
        )
        self.accept_errors_total = Counter(
            r, "streamer_accept_errors_total", "accept() calls that failed for want of file descriptors or memory."
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
        """Count one partial or final (the fan-out calls this for each)."""
        (self.finals_total if msg.type == "final" else self.partials_total).inc()

    def render(self) -> str:
        """Every series in the Prometheus text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry).decode()

    def exposition(self, accept: str | None) -> tuple[str, str]:
        """The body and ``Content-Type`` of a scrape: OpenMetrics when ``accept`` asks for it, else the text format.

        Args:
            accept: the request's ``Accept`` header, if it sent one.
        """
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry).decode(), content_type
