"""The shipped Kubernetes manifests (deploy/kubernetes) and HAProxy file agree with each other and with the daemon.

Every YAML parses (PyYAML); the ConfigMap's ``streamer.toml`` loads as the daemon's settings; the Deployment's
ports are those settings' ports; Service, PodDisruptionBudget and autoscaler select or name the Deployment; the
grace period covers the preStop hook, the drain and the flush; and a daemon running those settings answers the
probes' paths and exports the autoscaler's metric in ``/metrics``.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamer.service import FLUSH_TIMEOUT_S, Daemon
from streamer.settings import Settings, load_settings
from tests.test_server import http_get, recognizer  # noqa: F401  (fixtures)

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict[str, Any]]]:
    """``{kind: [documents]}`` of every YAML file under deploy/kubernetes."""
    out: dict[str, list[dict[str, Any]]] = {}
    files = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    assert files
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path.name
            out.setdefault(doc["kind"], []).append(doc)
    return out


@pytest.fixture(scope="module")
def settings(manifests: dict[str, list[dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The ConfigMap's streamer.toml, loaded as ``streamer serve`` loads its config file."""
    (config_map,) = manifests["ConfigMap"]
    path = tmp_path_factory.mktemp("config") / "streamer.toml"
    path.write_text(config_map["data"]["streamer.toml"])
    with pytest.MonkeyPatch.context() as env:
        env.delenv("STREAMER_STATE__DIR", raising=False)  # the tests' own override (conftest)
        return load_settings(path)


def container(manifests: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (deployment,) = manifests["Deployment"]
    (streamer,) = deployment["spec"]["template"]["spec"]["containers"]
    return streamer


def test_every_kind_is_shipped(manifests: dict[str, list[dict[str, Any]]]) -> None:
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap"} <= set(manifests)


def test_ports_match_the_settings(manifests: dict[str, list[dict[str, Any]]], settings: Settings) -> None:
    ports = {p["name"]: p["containerPort"] for p in container(manifests)["ports"]}
    assert ports == {"http": settings.server.port, "agent": settings.admission.agent_port}
    assert settings.server.host == "0.0.0.0"  # reachable from the pod network
    for service in manifests["Service"]:
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, service["metadata"]["name"]
    template = container(manifests)
    (deployment,) = manifests["Deployment"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == settings.server.port
    mounts = {m["name"]: m["mountPath"] for m in template["volumeMounts"]}
    assert template["args"][-1] == f"{mounts['config']}/streamer.toml" and mounts["state"] == settings.state.dir


def test_selectors_and_targets_name_the_deployment(manifests: dict[str, list[dict[str, Any]]]) -> None:
    (deployment,) = manifests["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in manifests["Service"]:
        assert service["spec"]["selector"].items() <= labels.items()
    (pdb,) = manifests["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (hpa,) = manifests["HorizontalPodAutoscaler"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2 and pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]


def test_grace_period_covers_prestop_drain_and_flush(
    manifests: dict[str, list[dict[str, Any]]], settings: Settings
) -> None:
    (deployment,) = manifests["Deployment"]
    grace_s = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    command = container(manifests)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert grace_s > float(command[1]) + settings.admission.drain_timeout_s + FLUSH_TIMEOUT_S


def test_haproxy_file_uses_the_same_ports(settings: Settings) -> None:
    text = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    servers = re.findall(r"^\s*server \S+ [\d.]+:(\d+)", text, flags=re.M)
    assert servers and {int(p) for p in servers} == {settings.server.port}
    assert re.findall(r"agent-port (\d+)", text) == [str(settings.admission.agent_port)]
    assert re.search(r"uri /readyz\b", text) and re.search(r"^\s*balance leastconn$", text, flags=re.M)


async def test_probes_and_the_autoscaler_metric_exist_on_a_running_daemon(
    manifests: dict[str, list[dict[str, Any]]], settings: Settings, recognizer: Any  # noqa: F811
) -> None:
    """The shipped settings (loopback, free ports, no state directory, capacity as configured) on the tiny model:
    the probes' paths answer 200 once ready, and the autoscaler's metric is in /metrics."""
    local = settings.model_copy(update={
        "server": settings.server.model_copy(update={"host": "127.0.0.1", "port": 0}),
        "admission": settings.admission.model_copy(update={"agent_port": 0}),
        "state": settings.state.model_copy(update={"dir": ""}),
    })
    daemon = Daemon(local, recognizer)
    await daemon.start()
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        async with asyncio.timeout(30):
            await daemon.ready.wait()
        probes = container(manifests)
        for probe in ("readinessProbe", "livenessProbe"):
            get = probes[probe]["httpGet"]
            assert get["port"] == "http"
            assert (await http_get(daemon, get["path"]))[0] == 200, probe
        _, _, body = await http_get(daemon, "/metrics")
        (hpa,) = manifests["HorizontalPodAutoscaler"]
        for metric in hpa["spec"]["metrics"]:
            name = metric["pods"]["metric"]["name"]
            assert re.search(rf"^{name} [\d.]+$", body, flags=re.M), f"{name} is not in /metrics"
    finally:
        stop.set()
        async with asyncio.timeout(30):
            assert await task == 0
