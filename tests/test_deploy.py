"""The deployment examples in deploy/: they parse, their config is valid, and the
Kubernetes and Compose files agree with it. No Docker engine or cluster is needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.config import (
    FileSinkConfig,
    HttpSinkConfig,
    RelayConfig,
    load_config,
    parse_duration,
)
from tests.processes import run_cli

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RELAY_YAML = DEPLOY / "config" / "relay.yaml"
COMPOSE = DEPLOY / "docker-compose.yaml"
KUBERNETES = DEPLOY / "kubernetes" / "relay-sidecar.yaml"

ENV = {
    "RELAY_QINGSTOR_TOKEN": "x",
    "RELAY_SIGNING_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
}
IMAGE_CONFIG_DIR = "/etc/relay"  # the image's RELAY_CONFIG is /etc/relay/relay.yaml
IMAGE_USER = 10001


def documents(path: Path) -> list[Any]:
    with path.open() as file:
        return [doc for doc in yaml.safe_load_all(file) if doc is not None]


def config() -> RelayConfig:
    return load_config(RELAY_YAML, env=ENV)


def kubernetes(kind: str) -> dict[str, Any]:
    found = [doc for doc in documents(KUBERNETES) if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in {KUBERNETES.name}"
    document: dict[str, Any] = found[0]
    return document


def relay_container(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod["containers"] if c["name"] == "relay")


@pytest.mark.parametrize(
    "path",
    sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml")),
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_every_yaml_file_parses(path):
    assert documents(path)


def test_relay_yaml_passes_check_config():
    result = run_cli("check-config", str(RELAY_YAML), cwd=ROOT, env=ENV)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_relay_yaml_refuses_to_start_without_its_secrets():
    empty = {name: "" for name in ENV}
    result = run_cli("check-config", str(RELAY_YAML), cwd=ROOT, env=empty)
    assert result.returncode == 2
    assert "sources.qingstor.token" in result.stderr
    assert "sinks.app.signing_secret" in result.stderr


def test_relay_yaml_is_what_the_examples_expect():
    loaded = config()
    assert loaded.server.watch_config
    assert loaded.server.port == 8080
    assert str(loaded.store.path) == "/data/relay.db"
    archive, app = loaded.sinks["archive"], loaded.sinks["app"]
    assert isinstance(archive, FileSinkConfig)
    assert str(archive.path) == "/data/events.jsonl"
    assert isinstance(app, HttpSinkConfig)
    # The compose service; Kubernetes sets RELAY_APP_URL.
    assert app.url.get_secret_value() == "http://app:9000/events"
    assert app.signing_secret


def test_configmap_holds_exactly_deploy_relay_yaml(tmp_path):
    embedded = kubernetes("ConfigMap")["data"]["relay.yaml"]
    assert embedded == RELAY_YAML.read_text()
    copy = tmp_path / "relay.yaml"
    copy.write_text(embedded)
    result = run_cli("check-config", str(copy), cwd=ROOT, env=ENV)
    assert result.returncode == 0, result.stderr


def test_secret_holds_the_keys_the_deployment_reads():
    keys = set(kubernetes("Secret")["stringData"])
    pod = kubernetes("Deployment")["spec"]["template"]["spec"]
    for container in pod["containers"]:
        for var in container.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                assert ref["name"] == "relay"
                assert ref["key"] in keys


def test_deployment_is_one_pod_recreated():
    spec = kubernetes("Deployment")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"
    claim = kubernetes("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_grace_period_exceeds_drain_timeout():
    pod = kubernetes("Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config().server.drain_timeout


def test_relay_mounts_the_configmap_as_a_directory():
    pod = kubernetes("Deployment")["spec"]["template"]["spec"]
    configmap = kubernetes("ConfigMap")["metadata"]["name"]
    volumes = {v["name"] for v in pod["volumes"] if v.get("configMap", {}).get("name") == configmap}
    mounts = [m for m in relay_container(pod)["volumeMounts"] if m["name"] in volumes]
    assert len(mounts) == 1
    # A subPath mount is a copy: it never sees ConfigMap updates, so --watch could not.
    assert "subPath" not in mounts[0]
    assert "subPathExpr" not in mounts[0]
    assert mounts[0]["mountPath"] == IMAGE_CONFIG_DIR
    assert mounts[0].get("readOnly") is True


def test_relay_mounts_the_claim_at_data_and_watches():
    pod = kubernetes("Deployment")["spec"]["template"]["spec"]
    claim = kubernetes("PersistentVolumeClaim")["metadata"]["name"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    relay = relay_container(pod)
    data = [m for m in relay["volumeMounts"] if m["mountPath"] == "/data"]
    assert len(data) == 1
    assert volumes[data[0]["name"]]["persistentVolumeClaim"]["claimName"] == claim
    assert relay["args"] == ["serve", "--watch"]


def test_relay_runs_as_non_root_on_a_read_only_root():
    pod = kubernetes("Deployment")["spec"]["template"]["spec"]
    # The container's settings override the pod's.
    effective = {**pod.get("securityContext", {}), **relay_container(pod)["securityContext"]}
    assert effective["runAsNonRoot"] is True
    assert effective["runAsUser"] == IMAGE_USER
    assert effective["runAsGroup"] == IMAGE_USER
    assert pod["securityContext"]["fsGroup"] == IMAGE_USER
    assert effective["readOnlyRootFilesystem"] is True
    assert effective["allowPrivilegeEscalation"] is False
    assert effective["capabilities"]["drop"] == ["ALL"]


def test_relay_probes_use_the_right_paths_and_port():
    pod = kubernetes("Deployment")["spec"]["template"]["spec"]
    relay = relay_container(pod)
    ports = {p["name"]: p["containerPort"] for p in relay["ports"]}
    assert ports["http"] == config().server.port
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = relay[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == config().server.port
    service = kubernetes("Service")["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in service] == [(80, "http")]


def test_compose_mounts_the_config_and_outlasts_the_drain():
    relay = documents(COMPOSE)[0]["services"]["relay"]
    # The folder, so that an edit saved by rename reaches the container (watch_config).
    assert "./config:/etc/relay:ro" in relay["volumes"]
    assert sorted(p.name for p in (DEPLOY / "config").iterdir()) == ["relay.yaml"]
    assert any(v.startswith("relay-data:/data") for v in relay["volumes"])
    assert parse_duration(relay["stop_grace_period"]) > config().server.drain_timeout
    assert relay["read_only"] is True
    assert "tmpfs" not in relay  # relay writes nothing outside /data
    for name in ENV:
        assert relay["environment"][name].startswith(f"${{{name}:?")
