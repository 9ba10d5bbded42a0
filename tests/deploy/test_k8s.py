"""deploy/k8s: every overlay renders offline (kubectl kustomize), validates strictly against the Kubernetes
schemas (kubernetes-validate), and is wired to the service's real port, routes, settings and metrics. The
custom resources (PodMonitor, ServingRuntime, InferenceService) have no schema there: their apiVersion,
kind and required fields are checked here, and the KServe container against the core Container schema."""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
from deploy.wiring import (
    DOCKERFILE,
    K8S,
    OVERLAYS,
    check_settings,
    containers,
    default,
    env_names_in,
    env_values,
    get_status,
    grpc_port,
    health_path,
    kustomize,
    metrics_path,
    one,
    route_paths,
    service_port,
    setting_env_names,
)

from service.config import BATCHING_FIELDS, env_name

KSERVE = K8S / "kserve"
RENDERED = {
    **{f"overlays/{name}": K8S / "overlays" / name for name in OVERLAYS},
    "base": K8S / "base",
    "kserve": KSERVE,
}
CRDS = {
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("serving.kserve.io/v1alpha1", "ServingRuntime"),
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"),
    ("serving.kserve.io/v1beta1", "InferenceService"),
}
# Oldest Kubernetes still commonly run, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.29.0", "latest")


def docs(name: str) -> tuple[dict[str, Any], ...]:
    return kustomize(RENDERED[name])


def pod_spec(name: str) -> dict[str, Any]:
    return one(docs(name), "Deployment")["spec"]["template"]["spec"]


def server(spec: dict[str, Any]) -> dict[str, Any]:
    (container,) = spec["containers"]
    return container


def validate(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    if version == "latest":
        version = kubernetes_validate.latest_version()
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        first = str(exc).splitlines()[0]
        raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']} invalid for {version}: {first}") from None


def dockerfile_uid() -> int:
    users = re.findall(r"^USER\s+(\d+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    return int(users[-1])


# ----------------------------------------------------------------------------- render and validate


def test_there_is_a_gpu_overlay():
    assert "gpu" in OVERLAYS


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", list(RENDERED))
def test_renders_and_validates_strictly(name, version):
    rendered = docs(name)
    assert rendered
    for doc in rendered:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue
        validate(doc, version)


@pytest.mark.parametrize("name", list(RENDERED))
def test_custom_resources_are_known_kinds(name):
    builtin_groups = ("v1", "apps/v1", "autoscaling/v2", "policy/v1")
    for doc in docs(name):
        if doc["apiVersion"] not in builtin_groups:
            assert (doc["apiVersion"], doc["kind"]) in CRDS, f"unexpected {doc['apiVersion']} {doc['kind']}"
        assert doc["metadata"]["name"]


@pytest.mark.parametrize("name", list(RENDERED))
def test_images_are_pinned(name):
    for doc in docs(name):
        spec = doc.get("spec", {})
        specs = [spec.get("template", {}).get("spec", {}), spec]
        for s in specs:
            for container in [*s.get("initContainers", []), *s.get("containers", [])]:
                repository, _, tag = container["image"].rpartition(":")
                assert repository and tag and "/" not in tag and tag != "latest", container["image"]


# ----------------------------------------------------------------------------- the Deployment


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_the_service_health_routes(overlay):
    container = server(pod_spec(f"overlays/{overlay}"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": service_port(), "grpc": grpc_port()}, "the service's two ports"
    assert env_values(container).get(env_name("grpc_port"), str(grpc_port())) == str(grpc_port())
    ready, live = health_path("ready"), health_path("live")
    expected = {"startupProbe": ready, "readinessProbe": ready, "livenessProbe": live}
    for probe, path in expected.items():
        action = container[probe]["httpGet"]
        assert action["path"] == path, f"{probe} asks {action['path']}, the service's route is {path}"
        assert action["port"] in ports or action["port"] == service_port()
    # What the probes see on a fresh process: alive at once, ready only after loading and warm-up.
    assert get_status(live) == 200 and get_status(ready) == 503
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "startup allows 10+ min of warm-up"


def test_gpu_overlay_requests_one_gpu_and_tolerates_gpu_nodes():
    spec = pod_spec("overlays/gpu")
    resources = server(spec)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 and resources["requests"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec.get("tolerations", []))
    assert env_values(server(spec))[env_name("device")].startswith("cuda")


def test_cpu_overlay_needs_no_gpu():
    rendered = docs("overlays/cpu")
    assert "nvidia.com/gpu" not in str(rendered)
    container = server(pod_spec("overlays/cpu"))
    assert [e["value"] for e in container["env"] if e["name"] == env_name("device")] == ["cpu"]
    assert container["image"].endswith("-cpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_security_non_root_read_only(overlay):
    spec = pod_spec(f"overlays/{overlay}")
    pod_security = spec["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == dockerfile_uid(), "the image's own user"
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    for container in containers(spec):
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
    container = server(spec)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    env = env_values(container)
    store = env[env_name("model_store")]
    assert mounts[store].get("readOnly") is True, "the model store is mounted read-only"
    for variable in (env_name("compile_cache"), "TORCHINDUCTOR_CACHE_DIR"):
        assert any(env[variable].startswith(path.rstrip("/") + "/") for path in mounts), f"{variable} is on a volume"
    assert "/tmp" in mounts, "a writable /tmp (the root filesystem is read-only; compilers need one)"
    namespace = one(docs(f"overlays/{overlay}"), "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_real_and_valid(overlay):
    rendered = docs(f"overlays/{overlay}")
    spec = pod_spec(f"overlays/{overlay}")
    configmaps = {d["metadata"]["name"]: d["data"] for d in rendered if d["kind"] == "ConfigMap"}
    values = {k: v for k, v in env_values(server(spec)).items() if k.startswith("IGCV2_")}
    for source in server(spec).get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            assert name in configmaps, f"envFrom names ConfigMap {name}, which the overlay does not render"
            values |= configmaps[name]
    check_settings(values, f"{overlay} Deployment")
    assert not set(values) & {env_name(f) for f in BATCHING_FIELDS}, (
        "a batching setting here would override every model's own serving section"
    )


def test_every_igcv2_variable_in_the_manifests_is_a_setting():
    known = set(setting_env_names())
    for path in K8S.rglob("*"):
        if path.is_file():
            unknown = sorted(env_names_in(path) - known)
            assert not unknown, f"{path.relative_to(K8S)} names {unknown}, which are not settings"


def serving_container(name: str) -> dict[str, Any]:
    return kserve("ServingRuntime")["spec"]["containers"][0] if name == "kserve" else server(pod_spec(name))


@pytest.mark.parametrize("name", [*(f"overlays/{overlay}" for overlay in OVERLAYS), "kserve"])
def test_thread_pools_follow_the_pods_cpu_request(name):
    """No CPU limit, so the container cannot see its request: IGCV2_CPUS carries it in (the kubelet
    rounds it up to whole cores), or the pools would be sized for every core of the node."""
    container = serving_container(name)
    (entry,) = [e for e in container["env"] if e["name"] == env_name("cpus")]
    ref = entry["valueFrom"]["resourceFieldRef"]
    assert ref["resource"] == "requests.cpu" and str(ref["divisor"]) == "1"
    assert ref.get("containerName", container["name"]) == container["name"]
    request = str(container["resources"]["requests"]["cpu"])
    cores = math.ceil(int(request[:-1]) / 1000 if request.endswith("m") else float(request))
    settings = check_settings({env_name("cpus"): str(cores)}, name)
    assert settings.cores == cores and settings.decode_workers == max(2, cores)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_the_drain(overlay):
    rendered = docs(f"overlays/{overlay}")
    spec = pod_spec(f"overlays/{overlay}")
    data = {k: v for d in rendered if d["kind"] == "ConfigMap" for k, v in d["data"].items()}
    drain = float(data.get(env_name("shutdown_timeout_s"), default("shutdown_timeout_s")))
    pre_stop = server(spec)["lifecycle"]["preStop"]
    sleep = int(pre_stop["exec"]["command"][-1]) if "exec" in pre_stop else pre_stop["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] > sleep + drain


# ----------------------------------------------------------------------------- Service, HPA, PDB, monitor


def pod_labels(name: str) -> dict[str, str]:
    return one(docs(name), "Deployment")["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_reaches_the_pods(overlay):
    name = f"overlays/{overlay}"
    service = one(docs(name), "Service")
    assert selects(service["spec"]["selector"], pod_labels(name))
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {n: p["port"] for n, p in ports.items()} == {"http": service_port(), "grpc": grpc_port()}
    container_ports = {p["name"] for p in server(pod_spec(name))["ports"]}
    assert all(p["targetPort"] in container_ports for p in ports.values())
    assert ports["grpc"]["appProtocol"] == "grpc", "an L7 proxy or mesh must know the port speaks gRPC"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_scales_the_deployment_on_real_metrics(overlay):
    from prometheus_client.metrics import MetricWrapperBase

    from service import metrics

    name = f"overlays/{overlay}"
    hpa = one(docs(name), "HorizontalPodAutoscaler")
    deployment = one(docs(name), "Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    exported = {m._name for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Pods":
            assert metric["pods"]["metric"]["name"] in exported, "a metric the service exports"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budget_covers_the_pods(overlay):
    name = f"overlays/{overlay}"
    pdb = one(docs(name), "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(name))
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_operator_scrapes_the_metrics_route(overlay):
    name = f"overlays/{overlay}"
    monitors = [d for d in docs(name) if d["apiVersion"] == "monitoring.coreos.com/v1"]
    (monitor,) = monitors
    assert monitor["kind"] in {"PodMonitor", "ServiceMonitor"}
    spec = monitor["spec"]
    if monitor["kind"] == "PodMonitor":
        endpoints, labels = spec["podMetricsEndpoints"], pod_labels(name)
        ports = {p["name"] for p in server(pod_spec(name))["ports"]}
    else:
        endpoints, labels = spec["endpoints"], one(docs(name), "Service")["metadata"]["labels"]
        ports = {p["name"] for p in one(docs(name), "Service")["spec"]["ports"]}
    assert selects(spec["selector"]["matchLabels"], labels)
    assert endpoints and all(e["port"] in ports and e.get("path", "/metrics") == metrics_path() for e in endpoints)


# ----------------------------------------------------------------------------- components/models-pvc


def with_components(tmp_path: Path, overlay: str, *components: str) -> tuple[dict[str, Any], ...]:
    """``overlay`` with ``components`` added, rendered and validated strictly."""
    folder = tmp_path / "with-components"
    folder.mkdir()
    relative = Path(os.path.relpath(K8S, folder))
    listed = "".join(f"  - {relative / 'components' / c}\n" for c in components)
    (folder / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: igcv2\n"
        f"resources:\n  - {relative / 'overlays' / overlay}\ncomponents:\n{listed}"
    )
    rendered = kustomize(folder)
    for doc in rendered:
        if (doc["apiVersion"], doc["kind"]) not in CRDS:
            validate(doc, "latest")
    return rendered


def test_models_pvc_component_mounts_a_claim_read_only(tmp_path: Path):
    rendered = with_components(tmp_path, "gpu", "models-pvc")
    spec = one(rendered, "Deployment")["spec"]["template"]["spec"]
    claim = one(rendered, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in spec["volumes"]}
    mount = next(m for m in server(spec)["volumeMounts"] if m["mountPath"] == "/models")
    assert volumes[mount["name"]]["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}
    assert mount["readOnly"] is True and "initContainers" not in spec


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_compile_cache_pvc_component_shares_the_compile_cache_among_replicas(tmp_path: Path, overlay: str):
    rendered = with_components(tmp_path, overlay, "models-pvc", "compile-cache-pvc")
    spec = one(rendered, "Deployment")["spec"]["template"]["spec"]
    claims = {c["metadata"]["name"]: c for c in rendered if c["kind"] == "PersistentVolumeClaim"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    container = server(spec)
    env, mounts = env_values(container), {m["mountPath"]: m for m in container["volumeMounts"]}
    cache = next(path for path in mounts if env[env_name("compile_cache")].startswith(path.rstrip("/") + "/"))
    claim = volumes[mounts[cache]["name"]]["persistentVolumeClaim"]
    assert claims[claim["claimName"]]["spec"]["accessModes"] == ["ReadWriteMany"], "every replica's pod mounts it"
    assert not claim.get("readOnly") and not mounts[cache].get("readOnly"), "the first pod to need a package writes it"
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(cache.rstrip("/") + "/")
    assert volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["readOnly"] is True, "both components apply"


# ----------------------------------------------------------------------------- KServe


def kserve(kind: str) -> dict[str, Any]:
    return one(docs("kserve"), kind)


def test_inference_service_uses_the_runtime_with_the_v2_protocol():
    isvc, runtime = kserve("InferenceService"), kserve("ServingRuntime")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {(f["name"], f.get("version")) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"].get("version")) in formats
    assert model["storageUri"], "where the model store comes from"


def test_kserve_applies_on_a_fresh_cluster():
    """Everything it names is in it: the namespace, and the claim its storageUri reads the store from."""
    rendered = docs("kserve")
    assert one(rendered, "Namespace")["metadata"]["name"] == kserve("InferenceService")["metadata"]["namespace"]
    claim = kserve("InferenceService")["spec"]["predictor"]["model"]["storageUri"].removeprefix("pvc://").split("/")[0]
    assert one(rendered, "PersistentVolumeClaim")["metadata"]["name"] == claim


def test_kserve_runtime_container_is_the_service_image_and_wiring():
    runtime = kserve("ServingRuntime")["spec"]
    (container,) = runtime["containers"]
    assert container["name"] == "kserve-container"
    deployment_image = server(pod_spec("overlays/gpu"))["image"]
    assert container["image"] == deployment_image, "the same image as the Deployment"
    # One port (Knative routes one per container): HTTP; gRPC is served too, routed by an InferenceService (h2c).
    assert [p["containerPort"] for p in container["ports"]] == [service_port()]
    assert env_values(container)[env_name("grpc_port")] == str(grpc_port())
    assert set(runtime["protocolVersions"]) == {"v2", "grpc-v2"}
    annotations = runtime.get("annotations", {})
    assert annotations.get("prometheus.kserve.io/port") == str(service_port())
    assert annotations.get("prometheus.kserve.io/path") == metrics_path()
    env = env_values(container)
    check_settings({k: v for k, v in env.items() if k.startswith("IGCV2_")}, "ServingRuntime")
    assert env[env_name("model_store")] == "/mnt/models", "where KServe puts the storageUri's content"
    assert container["readinessProbe"]["httpGet"]["path"] == health_path("ready")
    assert container["livenessProbe"]["httpGet"]["path"] == health_path("live")
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == dockerfile_uid()
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/tmp" in mounts
    for variable in (env_name("compile_cache"), "TORCHINDUCTOR_CACHE_DIR"):
        assert any(env[variable].startswith(m + "/") for m in mounts), f"{variable} is on a volume"


def test_kserve_runtime_container_is_a_valid_pod_container():
    """ServingRuntime embeds core Containers and Volumes: validate them as a Pod would be."""
    runtime = copy.deepcopy(kserve("ServingRuntime")["spec"])
    for container in runtime["containers"]:
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in container:  # Knative fills the port in; a plain Pod must name it
                container[probe]["httpGet"].setdefault("port", container["ports"][0]["containerPort"])
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "kserve-runtime"},
        "spec": {"containers": runtime["containers"], "volumes": runtime.get("volumes", [])},
    }
    for version in KUBERNETES_VERSIONS:
        validate(pod, version)


def test_app_serves_the_v2_protocol_kserve_routes_to():
    v2 = sorted(p for p in route_paths() if p.startswith("/v2"))
    if not v2:
        pytest.skip("the service has no /v2 routes yet (Open Inference Protocol, issue 5)")
    assert "/v2/health/ready" in v2 and any(p.endswith("/infer") for p in v2), v2
