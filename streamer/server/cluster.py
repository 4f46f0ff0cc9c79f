"""[cluster] for the composition root: builds the stream-name leases (`streamer.server.stream_leases`), the
results bus (`streamer.server.results_bus`) and, with ``resume_secret``, cross-replica resume and drain
(`streamer.session.failover`) from the settings. Imported only when ``cluster.enabled``; a daemon
without it makes no store connection and no MQTT subscription.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

from streamer.errors import ConfigError
from streamer.server.mqtt import make_tls_context
from streamer.server.results_bus import ResultsBus
from streamer.server.stream_leases import StreamLeases

if TYPE_CHECKING:
    from streamer.engine.scheduler import Scheduler
    from streamer.server.fanout import Hub
    from streamer.server.mqtt import MqttSink
    from streamer.session.failover import Failover
    from streamer.settings import Settings

logger = logging.getLogger(__name__)


def node_id(settings: Settings) -> str:
    """This replica's name: ``cluster.node_id``, else the host name."""
    return settings.cluster.node_id or socket.gethostname()


def make_leases(settings: Settings, mqtt: MqttSink | None) -> StreamLeases:
    """The stream-name leases of this replica (no connection is made before the first claim).

    Raises:
        ConfigError: [mqtt] is off (the cluster's results travel on its broker).
    """
    cluster = settings.cluster
    if mqtt is None:
        raise ConfigError("cluster.enabled needs mqtt.enabled: replicas exchange results through the [mqtt] broker "
                          "(set mqtt.enabled = true and its host and port)")
    password = cluster.store_password.get_secret_value() if cluster.store_password else None
    leases = StreamLeases(cluster.store_url, node_id(settings), mqtt.run_id, cluster.lease_ttl_s,
                          prefix=settings.mqtt.prefix.strip("/"), password=password)
    logger.info("cluster: node %s, stream leases in %s (ttl %g s), results bus on MQTT %s:%d", leases.node_id,
                cluster.store_url, cluster.lease_ttl_s, settings.mqtt.host, settings.mqtt.port)
    return leases


def make_bus(settings: Settings, mqtt: MqttSink, hub: Hub, scheduler: Scheduler) -> ResultsBus:
    """The results bus: the other replicas' results, from the [mqtt] broker, to this replica's caption viewers."""
    m = settings.mqtt
    channels = scheduler.channels
    return ResultsBus(
        hub, lambda stream: stream in channels, mqtt.run_id, m.host, m.port, prefix=m.prefix,
        tls_context=make_tls_context(m.ca_file, m.cert_file, m.key_file) if m.tls else None, username=m.username,
        password=m.password.get_secret_value() if m.password else None, keepalive_s=m.keepalive_s,
    )


def make_failover(settings: Settings, leases: StreamLeases) -> Failover | None:
    """Resume on any replica and drain at SIGTERM, when ``cluster.resume_secret`` (or its file) is set; else None
    (resume tokens are this replica's alone, as on a single daemon).

    Raises:
        ConfigError: the secret's file cannot be read, or the secret is too short.
    """
    cluster = settings.cluster
    secret = cluster.resume_secret_bytes()
    if secret is None:
        logger.info("cluster: no resume_secret: a session resumes only on its own replica")
        return None
    if settings.server.resume_window_s <= 0:
        raise ConfigError("cluster.resume_secret needs server.resume_window_s above 0: sessions are resumed on "
                          "another replica within that window")
    from streamer.server.session_facts import SessionFacts
    from streamer.session.failover import Failover
    from streamer.session.resume_token import TokenSigner

    password = cluster.store_password.get_secret_value() if cluster.store_password else None
    facts = SessionFacts(cluster.store_url, settings.server.resume_window_s + cluster.lease_ttl_s,
                         settings.server.max_pending_messages, prefix=settings.mqtt.prefix.strip("/"),
                         password=password)
    logger.info("cluster: sessions resume on any replica (facts in %s for %g s after their replica's last word)",
                cluster.store_url, facts.ttl_s)
    return Failover(TokenSigner(secret, cluster.resume_token_ttl_s), facts, leases, leases.node_id,
                    cluster.lease_ttl_s + 1.0)
