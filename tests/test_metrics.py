"""The daemon's Prometheus metrics: the series dashboards read, a registry per daemon, OpenMetrics on request."""

from __future__ import annotations

import asyncio
import sys
import urllib.request

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from streamer.server.metrics import CONTENT_TYPE, Metrics
from tests.test_server import TIMEOUT, Start, recognizer, start_daemon  # noqa: F401  (fixtures)

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

# What the hand-written exporter before prometheus_client served: {family: (type, label)}. Dashboards and
# alerts query these names and labels, so every one must stay.
SERIES = {
    "streamer_streams": ("gauge", None),
    "streamer_sessions_total": ("counter", "protocol"),
    "streamer_sessions_resumed_total": ("counter", None),
    "streamer_sessions_held": ("gauge", None),
    "streamer_sessions_refused_total": ("counter", "endpoint"),
    "streamer_caption_subscribers": ("gauge", None),
    "streamer_slow_consumers_total": ("counter", None),
    "streamer_audio_seconds_total": ("counter", None),
    "streamer_audio_dropped_seconds_total": ("counter", None),
    "streamer_step_seconds": ("histogram", None),
    "streamer_batch_size": ("histogram", None),
    "streamer_real_time_factor": ("gauge", None),
    "streamer_partials_total": ("counter", None),
    "streamer_finals_total": ("counter", None),
    "streamer_protocol_errors_total": ("counter", "code"),
    "streamer_mqtt_outbox_depth": ("gauge", None),
    "streamer_mqtt_connected": ("gauge", None),
    "streamer_mqtt_finals_published_total": ("counter", None),
    "streamer_mqtt_finals_dropped_total": ("counter", None),
    "streamer_mqtt_finals_unsaved": ("gauge", None),
    "streamer_mqtt_finals_recovered": ("gauge", None),
    "streamer_ready": ("gauge", None),
    "streamer_auth_failures_total": ("counter", "reason"),
    "streamer_session_journal_unsaved": ("gauge", None),
    "streamer_stream_lag_seconds": ("gauge", "stream"),
    "streamer_max_stream_lag_seconds": ("gauge", None),
    "streamer_connections_refused_total": ("counter", "reason"),
    "streamer_accept_errors_total": ("counter", None),
    # the load a load balancer and an autoscaler read ([admission], README "Scaling out")
    "streamer_sessions_active": ("gauge", None),
    "streamer_capacity_sessions": ("gauge", None),
    "streamer_load_ratio": ("gauge", None),
}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of a text-format scrape, read with Prometheus's own parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_every_series_keeps_its_name_type_and_label() -> None:
    """The scrape has each family the old exporter had, of the same type, with the same label; nothing else new
    under ``streamer_`` except what a histogram always carries."""
    metrics = Metrics()
    metrics.stream_lag_seconds.source = lambda: {"kitchen": 0.5}
    metrics.sessions_refused_total.inc(label_value="listen")
    metrics.protocol_errors_total.inc(label_value="bad_message")
    # The parser names a counter's family without `_total`, as OpenMetrics does; its sample keeps the suffix.
    families = {f.name + ("_total" if f.type == "counter" else ""): f for f in text_string_to_metric_families(
        metrics.render())}
    ours = {name: f for name, f in families.items() if name.startswith("streamer_")}
    assert set(ours) == set(SERIES)
    for name, (kind, label) in SERIES.items():
        assert ours[name].type == kind, name
        names = {s.name for s in ours[name].samples}
        if kind == "histogram":
            assert names == {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            continue
        assert names == {name}, name  # no `_created` series beside the counters
        assert {tuple(s.labels) for s in ours[name].samples} == {(label,) if label else ()}, name


def test_labelled_series_exist_at_zero_before_their_first_event() -> None:
    """Auth failures and refused connections have every reason at 0 from the start, for rate() alerts."""
    values = samples(Metrics().render())
    for reason in ("missing", "invalid", "ambiguous"):
        assert values["streamer_auth_failures_total", (("reason", reason),)] == 0
    for reason in ("origin", "host", "request_too_large", "handshakes"):
        assert values["streamer_connections_refused_total", (("reason", reason),)] == 0


def test_counts_sources_and_histograms_reach_the_scrape() -> None:
    """Increments, values read from sources at scrape time and cumulative histogram buckets."""
    metrics = Metrics()
    published = [3]
    metrics.mqtt_finals_published_total.source = lambda: published[0]
    metrics.mqtt_connected.source = lambda: 1
    metrics.mqtt_finals_recovered.set(2)
    metrics.protocol_errors_total.inc(label_value="bad_message")
    metrics.protocol_errors_total.inc(2, label_value="bad_message")
    for seconds, batch in ((0.004, 1), (0.03, 3), (0.03, 3), (7.0, 100)):
        metrics.observe_step(seconds, batch, audio_seconds=0.16, dropped_seconds=0.0)
    published[0] = 5  # read when scraped, not when the source was given
    values = samples(metrics.render())
    assert values["streamer_mqtt_finals_published_total", ()] == 5 == metrics.mqtt_finals_published_total.value()
    assert values["streamer_mqtt_connected", ()] == 1 and values["streamer_mqtt_finals_recovered", ()] == 2
    assert values["streamer_protocol_errors_total", (("code", "bad_message"),)] == 3
    assert metrics.protocol_errors_total.value("bad_message") == 3 and metrics.protocol_errors_total.value("x") == 0
    assert values["streamer_audio_seconds_total", ()] == pytest.approx(0.64)
    buckets = {dict(labels)["le"]: v for (name, labels), v in values.items() if name == "streamer_batch_size_bucket"}
    assert [buckets[le] for le in ("1.0", "2.0", "4.0", "64.0", "+Inf")] == [1, 1, 3, 3, 4]
    assert values["streamer_step_seconds_bucket", (("le", "0.005"),)] == 1
    assert values["streamer_step_seconds_bucket", (("le", "2.5"),)] == 3
    assert values["streamer_step_seconds_count", ()] == 4
    assert values["streamer_step_seconds_sum", ()] == pytest.approx(7.064)


def test_stream_names_are_escaped_in_their_label() -> None:
    """A stream name with a quote, a backslash and a newline reads back as itself; closed streams disappear."""
    metrics = Metrics()
    lags = {'say "hi"\\\n': 1.5, "kitchen": 0.25}
    metrics.stream_lag_seconds.source = lambda: dict(lags)
    values = samples(metrics.render())
    assert values["streamer_stream_lag_seconds", (("stream", 'say "hi"\\\n'),)] == 1.5
    del lags["kitchen"]
    assert ("streamer_stream_lag_seconds", (("stream", "kitchen"),)) not in samples(metrics.render())


def test_each_daemon_has_its_own_registry() -> None:
    """Two Metrics in one process count apart (the library's global registry would refuse the second)."""
    first, second = Metrics(), Metrics()
    first.sessions_total.inc(label_value="listen")
    assert first.sessions_total.value("listen") == 1 and second.sessions_total.value("listen") == 0
    assert samples(second.render())["streamer_sessions_total", (("protocol", "listen"),)] == 0


def test_process_and_platform_series_come_with_it() -> None:
    """The standard collectors: Python's version, its garbage collector and (on Linux) the process's resources."""
    values = samples(Metrics().render())
    names = {name for name, _ in values}
    assert "python_info" in names and "python_gc_collections_total" in names
    if sys.platform == "linux":
        assert values["process_resident_memory_bytes", ()] > 0 and values["process_open_fds", ()] > 0


def test_openmetrics_when_the_accept_header_asks_for_it() -> None:
    """Without an Accept header (or with text/plain) the text format; with OpenMetrics' media type, OpenMetrics."""
    metrics = Metrics()
    metrics.sessions_total.inc(label_value="vosk")
    for accept in (None, "", "text/plain", "*/*"):
        body, content_type = metrics.exposition(accept)
        assert content_type == CONTENT_TYPE and content_type.startswith("text/plain; version=0.0.4")
        assert "# EOF" not in body and samples(body)["streamer_sessions_total", (("protocol", "vosk"),)] == 1
    body, content_type = metrics.exposition(OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith("# EOF\n")
    families = {f.name: f for f in parse_openmetrics(body)}
    assert families["streamer_sessions"].type == "counter"  # OpenMetrics names the family without _total
    counted = {s.labels["protocol"]: s.value for s in families["streamer_sessions"].samples}
    assert counted["vosk"] == 1 and sum(counted.values()) == 1 and all(s.name == "streamer_sessions_total"
                                                                        for s in families["streamer_sessions"].samples)


@pytest.mark.slow
async def test_the_daemon_serves_openmetrics_on_request(start_daemon: Start) -> None:  # noqa: F811
    """GET /metrics with OpenMetrics' Accept header gets OpenMetrics from the running daemon."""
    daemon = await start_daemon()

    def get() -> tuple[str, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{daemon.port}/metrics", headers={"Accept": OPENMETRICS})
        with urllib.request.urlopen(request, timeout=10 * TIMEOUT) as response:
            return response.headers.get("Content-Type", ""), response.read().decode()

    content_type, body = await asyncio.to_thread(get)
    assert content_type.startswith("application/openmetrics-text") and body.endswith("# EOF\n")
