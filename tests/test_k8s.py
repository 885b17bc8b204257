"""The Kubernetes manifests in config/k8s.

No cluster runs in CI, so each manifest is validated offline against the Kubernetes API's JSON schemas
(shipped inside kubernetes-validate), then read for what the gateway needs from it: probes on the
gateway's real routes, a config file the gateway loads with the variables the pod has, the image's
non-root uid, and a shutdown budget that outlasts the preStop sleep.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml
from litestar.testing import AsyncTestClient

from gateway.app import _HISTORY_DRAIN_SECONDS, create_app
from gateway.settings import BackendSettings, Settings, load_file

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "config" / "k8s"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
# The oldest Kubernetes the manifests need (the native preStop `sleep` action and `matchLabelKeys` are
# on by default from 1.30) and the newest one kubernetes-validate>=1.37 ships schemas for.
K8S_VERSIONS = ("1.30", "1.37")
# What deployment.yaml's terminationGracePeriodSeconds leaves in-flight streams after SIGTERM.
STREAM_GRACE_SECONDS = 30
NAME_LABEL = "app.kubernetes.io/name"


@functools.cache
def _documents(path: Path) -> tuple[dict[str, Any], ...]:
    return tuple(doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc)


def _resource(kind: str) -> dict[str, Any]:
    found = [doc for path in MANIFESTS for doc in _documents(path) if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in config/k8s, found {len(found)}"
    return found[0]


def _pod() -> dict[str, Any]:
    return _resource("Deployment")["spec"]["template"]


def _container() -> dict[str, Any]:
    (container,) = _pod()["spec"]["containers"]
    return container


def _container_port(port: int | str) -> int:
    """A probe's or Service's port, by number or by the name of one of the container's ports."""
    ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    return ports[port] if isinstance(port, str) else port


def _prestop_seconds(container: dict[str, Any]) -> int:
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return pre_stop["sleep"]["seconds"]
    command = pre_stop["exec"]["command"]
    assert command[0].rsplit("/", 1)[-1] == "sleep", command
    return int(command[1])


def _dockerfile_uid() -> int:
    users = re.findall(r"^USER\s+(\d+)", (ROOT / "Dockerfile").read_text(encoding="utf-8"), re.M)
    assert users, "the Dockerfile should name its user by a numeric uid"
    return int(users[-1])


_UNITS = {"m": 1e-3, "": 1.0, "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "k": 1e3, "M": 1e6, "G": 1e9}


def _quantity(value: str | int | float) -> float:
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match and match.group(2) in _UNITS, f"unexpected quantity {value!r}"
    return float(match.group(1)) * _UNITS[match.group(2)]


# --- the API schemas ------------------------------------------------------------------------------


def test_every_manifest_is_there() -> None:
    kinds = {doc["kind"] for path in MANIFESTS for doc in _documents(path)}
    assert kinds == {"Deployment", "Service", "ConfigMap", "Secret", "HorizontalPodAutoscaler", "PodDisruptionBudget"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_follows_the_kubernetes_api(path: Path, version: str) -> None:
    assert _documents(path), f"{path.name} holds no resource"
    errors = []
    for resource in _documents(path):
        what = f"{path.name}: {resource['kind']}/{resource['metadata']['name']}"
        try:
            # strict: an unknown (misspelt) field fails instead of being ignored by the API server.
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            errors.append(f"{what} does not validate against Kubernetes {exc.version}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{what}: {exc.message}")
    # Reported outside the `except`, so the failure is the validator's one-line message and not the
    # whole JSON schema that jsonschema's exception prints.
    assert not errors, "\n".join(errors)


def test_the_validator_rejects_a_misspelt_field() -> None:
    """Guards the test above against a validator that accepts anything."""
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "dta": {"k": "v"}}
    with pytest.raises(kubernetes_validate.ValidationError) as info:
        kubernetes_validate.validate(configmap, K8S_VERSIONS[-1], strict=True)
    assert "'dta' was unexpected" in info.value.message


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["namespace"] == "llm"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    # secret.yaml holds placeholders: `kubectl apply -k` must not overwrite the Secret made with kubectl.
    assert set(resources) == {p.name for p in MANIFESTS} - {"secret.yaml"}


def test_every_resource_carries_the_name_label() -> None:
    for path in MANIFESTS:
        for resource in _documents(path):
            assert resource["metadata"]["labels"][NAME_LABEL] == "llm-gateway", path.name


# --- probes ---------------------------------------------------------------------------------------


def test_probes_point_at_the_gateway_routes_and_port() -> None:
    container = _container()
    expected = {"livenessProbe": "/health", "readinessProbe": "/ready", "startupProbe": "/health"}
    (port,) = (p["containerPort"] for p in container["ports"])
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert _container_port(get["port"]) == port, probe
    args = container["args"]
    assert args[0] == "serve"
    assert int(args[args.index("--port") + 1]) == port
    assert args[args.index("--host") + 1] == "0.0.0.0"
    # Startup waits for the first model discovery (up to [timeouts] connect): leave it time.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30


async def test_probe_paths_answer_200() -> None:
    container = _container()
    paths = {container[probe]["httpGet"]["path"] for probe in ("livenessProbe", "readinessProbe", "startupProbe")}
    app = create_app(Settings(backends=[BackendSettings(name="mock", kind="mock")]))
    async with AsyncTestClient(app=app) as client:
        for path in sorted(paths):
            response = await client.get(path)
            assert response.status_code == 200, (path, response.text)


# --- the config and the Secret --------------------------------------------------------------------


def _pod_environment() -> dict[str, str]:
    """The variables the gateway's container gets: the Secret's (envFrom) and its own env."""
    container = _container()
    secret = _resource("Secret")
    refs = [source["secretRef"]["name"] for source in container["envFrom"]]
    assert refs == [secret["metadata"]["name"]]
    env = dict(secret["stringData"])
    env.update({var["name"]: var["value"] for var in container.get("env", []) if "value" in var})
    return env


def test_secret_is_a_placeholder_template() -> None:
    secret = _resource("Secret")
    assert secret["metadata"]["name"] == "llm-gateway-secrets"
    assert secret["type"] == "Opaque"
    assert {"REDIS_URL", "OPENAI_API_KEY"} <= set(secret["stringData"])
    assert secret["stringData"]["OPENAI_API_KEY"] == "replace-me"
    assert "kubectl" in (K8S / "secret.yaml").read_text(encoding="utf-8")


def test_configmap_is_mounted_where_the_args_point() -> None:
    pod, container, configmap = _pod(), _container(), _resource("ConfigMap")
    args = container["args"]
    config = Path(args[args.index("--config") + 1])
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (mount,) = (m for m in container["volumeMounts"] if m["mountPath"] == str(config.parent))
    assert mount.get("readOnly") is True
    assert volumes[mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"] == "llm-gateway-config"
    assert config.name in configmap["data"]


def test_configmap_config_loads_with_the_pod_environment(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(_resource("ConfigMap")["data"]["gateway.toml"], encoding="utf-8")
    env = _pod_environment()
    # Only what the pod has: a ${VAR} without default that the pod lacks would fail here.
    settings = load_file(path, environ=env)
    assert settings.redis.url == env["REDIS_URL"]
    assert settings.logging.level == env["LOG_LEVEL"]
    assert settings.server.port == _container()["ports"][0]["containerPort"]
    remote = [b for b in settings.backends if b.kind != "mock"]
    assert [b.kind for b in remote] == ["vllm"]
    for backend in remote:
        assert backend.models is None, "models should be discovered"
        host = urlparse(backend.base_url).hostname or ""
        assert host.endswith(".svc.cluster.local"), f"{backend.name}: {host} is not a cluster DNS name"
    assert settings.health.require_redis is False
    assert settings.history == type(settings.history)()


# --- safety, shutdown, resources ------------------------------------------------------------------


def test_runs_as_the_image_user_on_a_read_only_root() -> None:
    pod, container = _pod()["spec"], _container()
    uid = _dockerfile_uid()
    for context in (pod["securityContext"], container["securityContext"]):
        assert context["runAsNonRoot"] is True
        assert context.get("runAsUser", uid) == uid != 0
        assert context["seccompProfile"]["type"] == "RuntimeDefault"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "add" not in security["capabilities"]
    # A read-only root needs a writable /tmp.
    volumes = {v["name"]: v for v in pod["volumes"]}
    (tmp,) = (m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in volumes[tmp["name"]]


def test_grace_period_outlasts_prestop_streams_and_history_drain() -> None:
    pod, container = _pod()["spec"], _container()
    grace, pre_stop = pod["terminationGracePeriodSeconds"], _prestop_seconds(container)
    assert pre_stop > 0
    assert grace > pre_stop
    assert grace >= pre_stop + STREAM_GRACE_SECONDS + _HISTORY_DRAIN_SECONDS


def test_resources_are_requested_and_limited() -> None:
    resources = _container()["resources"]
    for name in ("cpu", "memory"):
        request, limit = resources["requests"][name], resources["limits"][name]
        assert 0 < _quantity(request) <= _quantity(limit), name


def test_replicas_spread_across_nodes() -> None:
    spec = _pod()["spec"]
    labels = _pod()["metadata"]["labels"]
    spreads = [
        c["labelSelector"]["matchLabels"]
        for c in spec.get("topologySpreadConstraints", [])
        if c["topologyKey"] == "kubernetes.io/hostname"
    ]
    anti = spec.get("affinity", {}).get("podAntiAffinity", {})
    terms = [*anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])]
    terms += [t["podAffinityTerm"] for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])]
    spreads += [t["labelSelector"]["matchLabels"] for t in terms if t["topologyKey"] == "kubernetes.io/hostname"]
    assert spreads, "no topology spread constraint or pod anti-affinity across nodes"
    assert all(selector.items() <= labels.items() for selector in spreads)


# --- what selects the pods ------------------------------------------------------------------------


def test_deployment_selects_its_own_pods() -> None:
    deployment = _resource("Deployment")
    labels = _pod()["metadata"]["labels"]
    assert deployment["metadata"]["name"] == "llm-gateway"
    assert deployment["spec"]["replicas"] == 2
    assert labels[NAME_LABEL] == "llm-gateway"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_service_targets_the_container_port() -> None:
    service = _resource("Service")["spec"]
    assert service.get("type", "ClusterIP") == "ClusterIP"
    assert service["selector"].items() <= _pod()["metadata"]["labels"].items()
    (port,) = service["ports"]
    assert (port["name"], port["port"]) == ("http", 80)
    assert _container_port(port["targetPort"]) == _container()["ports"][0]["containerPort"] == 8000


def test_hpa_scales_the_deployment_on_cpu() -> None:
    hpa, deployment = _resource("HorizontalPodAutoscaler"), _resource("Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "llm-gateway")
    assert target["name"] == deployment["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    # Utilization is a share of the request, so the container must request CPU.
    assert "cpu" in _container()["resources"]["requests"]


def test_pdb_keeps_a_replica_and_lets_drains_through() -> None:
    pdb, hpa = _resource("PodDisruptionBudget")["spec"], _resource("HorizontalPodAutoscaler")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= _pod()["metadata"]["labels"].items()
    assert pdb["minAvailable"] == 1
    # minAvailable must stay below the replica count, or no pod could ever be evicted.
    assert pdb["minAvailable"] < min(hpa["minReplicas"], _resource("Deployment")["spec"]["replicas"])
