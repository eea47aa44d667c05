"""The deployment examples in deploy/: they parse, their config is valid, and the
Kubernetes and Compose files agree with it. No Docker engine or cluster is needed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.config import (
    FileSinkConfig,
    HttpSinkConfig,
    RedisStoreConfig,
    RelayConfig,
    SqliteStoreConfig,
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

# Several relays on one Redis (docs/scaling-out.md).
SCALING_OUT = DEPLOY / "scaling-out"
REDIS_RELAY_YAML = SCALING_OUT / "relay.yaml"
REDIS_COMPOSE = SCALING_OUT / "docker-compose.yaml"
REPLICAS = DEPLOY / "kubernetes" / "relay-replicas.yaml"
REDIS_PASSWORD = "0123456789abcdef"  # a dummy, which no output may show
REDIS_ENV = {**ENV, "RELAY_REDIS_URL": f"redis://:{REDIS_PASSWORD}@redis:6379/0"}
# The keys of the Secret `relay` that relay-replicas.yaml reads (and does not create).
REPLICA_SECRET_KEYS = {"qingstor-token", "signing-secret", "redis-url"}


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
    assert isinstance(loaded.store, SqliteStoreConfig)
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


# --- several relays on one Redis: deploy/scaling-out/ and relay-replicas.yaml -------------


def redis_config() -> RelayConfig:
    return load_config(REDIS_RELAY_YAML, env=REDIS_ENV)


def replicas(kind: str) -> dict[str, Any]:
    found = [doc for doc in documents(REPLICAS) if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in {REPLICAS.name}"
    document: dict[str, Any] = found[0]
    return document


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = documents(REDIS_COMPOSE)[0]["services"]
    return services


def compose_relays() -> dict[str, Any]:
    return {name: s for name, s in compose_services().items() if s.get("image") == "relay:local"}


def compose_env(value: str, given: dict[str, str]) -> str:
    """A Compose environment value as Compose expands it, `${VAR:?...}` and `${VAR}`
    taken from `given`."""
    return re.sub(r"\$\{(\w+)(?::[?-][^}]*)?\}", lambda m: given[m.group(1)], value)


def test_scaling_out_relay_yaml_passes_check_config_without_showing_the_password():
    result = run_cli("check-config", str(REDIS_RELAY_YAML), cwd=ROOT, env=REDIS_ENV)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert "store redis at redis://redis:6379/0 (prefix 'relay')" in result.stdout
    assert REDIS_PASSWORD not in result.stdout + result.stderr


def test_scaling_out_relay_yaml_refuses_to_start_without_its_secrets():
    empty = {name: "" for name in REDIS_ENV}
    result = run_cli("check-config", str(REDIS_RELAY_YAML), cwd=ROOT, env=empty)
    assert result.returncode == 2
    for path in ("store.url", "sources.qingstor.token", "sinks.app.signing_secret"):
        assert path in result.stderr


def test_scaling_out_relay_yaml_is_what_the_examples_expect():
    loaded = redis_config()
    assert isinstance(loaded.store, RedisStoreConfig)
    assert loaded.store.url.get_secret_value() == REDIS_ENV["RELAY_REDIS_URL"]
    assert loaded.store.prefix == "relay"
    assert loaded.server.port == 8080
    # Config changes roll out by restarting the replicas, so they never differ for long.
    assert not loaded.server.watch_config
    # Nothing written to disk: the examples run without a volume on a read-only root.
    assert not any(isinstance(sink, FileSinkConfig) for sink in loaded.sinks.values())
    assert loaded.server.workers == 0  # with workers, metrics files would need /tmp
    app = loaded.sinks["app"]
    assert isinstance(app, HttpSinkConfig)
    assert app.url.get_secret_value() == "http://app:9000/events"
    assert app.signing_secret


def test_compose_runs_two_relays_whose_environment_makes_the_config_valid():
    relays = compose_relays()
    assert len(relays) >= 2
    published = set()
    dummies = {"RELAY_REDIS_PASSWORD": REDIS_PASSWORD, **ENV}
    for name, relay in relays.items():
        assert "./relay.yaml:/etc/relay/relay.yaml:ro" in relay["volumes"], name
        assert relay["read_only"] is True
        assert "tmpfs" not in relay  # relay on Redis, without file sinks, writes nothing
        assert parse_duration(relay["stop_grace_period"]) > redis_config().server.drain_timeout
        assert relay["depends_on"]["redis"]["condition"] == "service_healthy"
        env = relay["environment"]
        for value in env.values():
            assert re.search(r"\$\{\w+:\?", value), "every secret is required (`:?`)"
        expanded = {var: compose_env(value, dummies) for var, value in env.items()}
        assert expanded["RELAY_REDIS_URL"] == f"redis://:{REDIS_PASSWORD}@redis:6379/0"
        result = run_cli("check-config", str(REDIS_RELAY_YAML), cwd=ROOT, env=expanded)
        assert result.returncode == 0, result.stderr
        [port] = relay["ports"]
        host, _, container = port.rpartition(":")
        assert host.startswith("127.0.0.1:"), "published on the host's loopback only"
        assert int(container) == redis_config().server.port
        published.add(host)
    assert len(published) == len(relays), "each relay publishes its own port"


def test_compose_redis_keeps_what_relay_acknowledges():
    redis = compose_services()["redis"]
    assert redis["image"].startswith("redis:7")
    command = " ".join(redis["command"])
    for setting in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert setting in command
    assert "requirepass" not in command  # the password is not on the command line
    assert "ports" not in redis  # only the relays reach it
    assert any(v.startswith("redis-data:/data") for v in redis["volumes"])
    assert redis["read_only"] is True


def test_replicas_configmap_holds_exactly_the_scaling_out_relay_yaml(tmp_path):
    embedded = replicas("ConfigMap")["data"]["relay.yaml"]
    assert embedded == REDIS_RELAY_YAML.read_text()
    copy = tmp_path / "relay.yaml"
    copy.write_text(embedded)
    result = run_cli("check-config", str(copy), cwd=ROOT, env=REDIS_ENV)
    assert result.returncode == 0, result.stderr


def test_replicas_roll_one_pod_at_a_time_under_a_disruption_budget():
    deployment = replicas("Deployment")["spec"]
    assert deployment["replicas"] == 3
    assert deployment["strategy"]["type"] == "RollingUpdate"
    assert deployment["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    labels = deployment["selector"]["matchLabels"]
    assert labels.items() <= deployment["template"]["metadata"]["labels"].items()
    budget = replicas("PodDisruptionBudget")["spec"]
    assert budget["selector"]["matchLabels"] == labels
    assert budget["maxUnavailable"] == 1
    assert replicas("Service")["spec"]["selector"] == labels
    pod = deployment["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > redis_config().server.drain_timeout


def test_replicas_read_a_secret_they_never_create():
    # Re-applying the file must never reset the Secret: it is created by hand.
    assert not [doc for doc in documents(REPLICAS) if doc.get("kind") == "Secret"]
    relay = relay_container(replicas("Deployment")["spec"]["template"]["spec"])
    given = {var["name"] for var in relay["env"]}
    read = set()
    for var in relay["env"]:
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            assert ref["name"] == "relay"
            read.add(ref["key"])
    assert read == REPLICA_SECRET_KEYS
    # Every variable the config requires (no default) comes from the Deployment.
    required = set(re.findall(r"\$\{(\w+)\}", REDIS_RELAY_YAML.read_text()))
    assert required <= given


def test_replica_pods_mount_only_the_config_and_probe_the_right_paths():
    pod = replicas("Deployment")["spec"]["template"]["spec"]
    relay = relay_container(pod)
    configmap = replicas("ConfigMap")["metadata"]["name"]
    assert [v["configMap"]["name"] for v in pod["volumes"]] == [configmap]
    [mount] = relay["volumeMounts"]
    assert mount["mountPath"] == IMAGE_CONFIG_DIR
    assert mount.get("readOnly") is True
    assert "subPath" not in mount
    port = redis_config().server.port
    ports = {p["name"]: p["containerPort"] for p in relay["ports"]}
    assert ports["http"] == port
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = relay[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == port
    effective = {**pod.get("securityContext", {}), **relay["securityContext"]}
    assert effective["runAsNonRoot"] is True
    assert effective["runAsUser"] == IMAGE_USER
    assert effective["readOnlyRootFilesystem"] is True
    assert effective["allowPrivilegeEscalation"] is False
    assert effective["capabilities"]["drop"] == ["ALL"]
