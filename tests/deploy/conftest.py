"""Fixtures for the deployment tests: the manifests of deploy/ and real servers.

The server helpers (``ServerProcess``, ``serve_args``, ``server_env``, ``RedisServer``)
are tests/server/conftest.py's, loaded by path as tests/load/conftest.py does (a
conftest is not importable as a module under ``--import-mode=importlib``).
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"


def _load_server_helpers() -> ModuleType:
    """tests/server/conftest.py as a plain module (its ServerProcess and helpers)."""
    path = Path(__file__).resolve().parents[1] / "server" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_riskwire_deploy_server_helpers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


helpers = _load_server_helpers()
ServerProcess = helpers.ServerProcess
StartServer = Callable[..., ServerProcess]


class Manifests:
    """Every document of deploy/kubernetes/*.yaml (the kustomization aside)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files = sorted(p for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")
        self.documents: list[tuple[Path, dict[str, Any]]] = []
        for path in self.files:
            for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
                if doc is not None:
                    self.documents.append((path, doc))

    def all(self, kind: str) -> list[dict[str, Any]]:
        """The documents of one kind."""
        return [doc for _, doc in self.documents if doc["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        """The document of ``kind`` named ``name`` (fails when absent)."""
        for doc in self.all(kind):
            if doc["metadata"]["name"] == name:
                return doc
        raise AssertionError(f"no {kind} named {name!r} in {self.folder}")

    def container(self, kind: str, name: str, container: str | None = None) -> dict[str, Any]:
        """A container of a workload's pod template (the first one by default)."""
        containers = self.get(kind, name)["spec"]["template"]["spec"]["containers"]
        if container is None:
            return containers[0]
        return next(c for c in containers if c["name"] == container)


@pytest.fixture(scope="session")
def manifests() -> Manifests:
    """The Kubernetes manifests, parsed."""
    return Manifests(KUBERNETES)


def pod_environment(
    manifests: Manifests,
    *,
    paths: dict[str, str],
    secrets: dict[tuple[str, str], str],
    overrides: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment the riskwire container gets in Kubernetes, for a local process.

    ConfigMap entries (``envFrom``), then the container's ``env`` with the downward API
    and Secret references resolved (``secrets[(name, key)]``) and ``$(VAR)`` expanded.
    Values that are paths under a key of ``paths`` (a mount point in the pod) are moved
    to the local folder it maps to; ``overrides`` apply last.
    """
    container = manifests.container("Deployment", "riskwire")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        data = manifests.get("ConfigMap", source["configMapRef"]["name"])["data"]
        env.update({k: str(v) for k, v in data.items()})
    limits = container["resources"]["limits"]
    fields = {
        "metadata.name": "riskwire-7d9f8b6c5d-x2x4q",
        "metadata.namespace": "riskwire",
        "spec.nodeName": "node-1",
    }
    for item in container.get("env", []):
        if "value" in item:
            value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
        elif "resourceFieldRef" in item["valueFrom"]:
            ref = item["valueFrom"]["resourceFieldRef"]
            assert ref["resource"] == "limits.cpu" and str(ref.get("divisor", "1")) == "1"
            value = str(math.ceil(_cpu(limits["cpu"])))  # the downward API rounds up
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            value = secrets[(ref["name"], ref["key"])]
        else:
            value = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
        env[item["name"]] = value
    for name, value in env.items():
        for mount, local in sorted(paths.items(), key=lambda kv: -len(kv[0])):
            if value == mount or value.startswith(mount + "/"):
                env[name] = local + value[len(mount) :]
                break
    env.update(overrides or {})
    return env


def _cpu(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


@pytest.fixture(scope="session")
def pod_env() -> Callable[..., dict[str, str]]:
    """:func:`pod_environment`, for test modules."""
    return pod_environment


@pytest.fixture(scope="session")
def start_deploy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    """Factory ``start(models, *args, env=, wait=, profile=, workers=, port=)``: a server.

    Profile "test" and 2 workers unless told (``workers=None``: the environment's count).
    ``env`` goes over tests/server/conftest.py's ``server_env`` (no inherited
    RISKWIRE_*, a snapshot path, free admin and metrics ports). ``wait``: until SERVING
    (plaintext health). Servers still running at the end of the session are stopped
    (SIGTERM, then SIGKILL).
    """
    started: list[ServerProcess] = []

    def start(
        models: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
        profile: str = "test",
        workers: int | None = 2,
        port: int | None = None,
    ) -> ServerProcess:
        snapshot = tmp_path_factory.mktemp("deploy-state") / "cards.snapshot"
        port = port or helpers.free_port()
        args = ["--profile", profile, *extra]
        if workers is not None:
            args += ["--workers", str(workers)]
        args = helpers.serve_args(models, port, *args)
        server = helpers.ServerProcess(args, helpers.server_env(snapshot, env), port, snapshot)
        started.append(server)
        if wait:
            server.wait_serving(workers=workers)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server_helpers() -> SimpleNamespace:
    """tests/server/conftest.py's helpers (free_port, local_pool, RedisServer, …)."""
    return SimpleNamespace(
        free_port=helpers.free_port,
        local_pool=helpers.local_pool,
        RedisServer=helpers.RedisServer,
        ServerProcess=helpers.ServerProcess,
    )


@pytest.fixture(scope="session")
def pod_secrets(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """What the pod's Secrets hold, made locally.

    ``tls``: a folder laid out like the riskwire-tls Secret (tls.crt, tls.key, ca.crt;
    a dev CA, the server certificate names localhost and 127.0.0.1); ``keys_json``: the
    riskwire-api-keys document, holding one ``score`` key for client "payments", ``key``.
    """
    from riskwire.clients.certs_cli import generate_dev_certificates
    from riskwire.server.auth import create_key

    folder = tmp_path_factory.mktemp("pod-secrets")
    made = generate_dev_certificates(folder / "certs")
    tls = folder / "tls"
    tls.mkdir()
    for role, name in (
        ("server_cert", "tls.crt"),
        ("server_key", "tls.key"),
        ("ca_cert", "ca.crt"),
    ):
        (tls / name).write_bytes(Path(made[role]).read_bytes())
    key = create_key(folder / "keys.json", "payments", "score")
    return SimpleNamespace(tls=tls, key=key, keys_json=(folder / "keys.json").read_text())
