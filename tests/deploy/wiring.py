"""Helpers for the deployment tests: what the service really uses, and the deployment files rendered.

The truth is the service itself: its settings (``service.config.Settings``, ``env_name``) and the routes of
the app ``service.app.create_app`` builds. The deployment files are checked against those, never against a
copied list.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import Settings, env_name

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
COMPOSE_GPU = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
COMPOSE_MULTI_GPU = ROOT / "docker-compose.multi-gpu.yml"
PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus" / "prometheus.yml"
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())

SERVICE = "igcv2"  # the compose service / Kubernetes name Prometheus and the dashboard rely on
DCGM_SERVICE, DCGM_PORT = "dcgm-exporter", 9400

# An IGCV2_* name anywhere in a file (not a longer name ending in one).
ENV_NAME = re.compile(r"(?<![A-Za-z0-9_])IGCV2_[A-Z0-9_]+")


# ----------------------------------------------------------------------------- the service's truth


def setting_env_names() -> dict[str, str]:
    """{IGCV2_* variable: Settings field} for every setting."""
    return {env_name(field): field for field in Settings.model_fields}


def default(field: str) -> Any:
    info = Settings.model_fields[field]
    return info.default_factory() if info.default_factory else info.default


def service_port() -> int:
    return default("port")


def grpc_port() -> int:
    """The Open Inference Protocol over gRPC's port (Triton's)."""
    return default("grpc_port")


def check_settings(values: dict[str, str], where: str) -> Settings:
    """Every IGCV2_* name is a setting and every value is one the service accepts."""
    known = setting_env_names()
    unknown = sorted(set(values) - set(known))
    assert not unknown, f"{where}: {unknown} are not settings of service.config.Settings"
    try:
        return Settings(_env_file=None, **{known[name]: value for name, value in values.items()})
    except Exception as exc:  # pydantic's ValidationError, shown with where it came from
        raise AssertionError(f"{where}: the service rejects these settings: {exc}") from exc


def env_names_in(path: Path) -> set[str]:
    return set(ENV_NAME.findall(path.read_text()))


@cache
def _app() -> Any:
    """The real app, built but not started (no lifespan: no model is loaded)."""
    from service.app import create_app

    return create_app(Settings(_env_file=None, device="cpu", decode_threads=1))


@cache
def route_paths() -> frozenset[str]:
    """Paths the app routes: its OpenAPI document plus the routes kept out of it (/metrics)."""
    app = _app()
    documented = set(app.openapi()["paths"])
    return frozenset(documented | {route.path for route in app.routes if hasattr(route, "path")})


@cache
def get_status(path: str) -> int:
    """Status of GET path on the app before any model is loaded (probes see exactly this at start)."""
    import asyncio

    import httpx

    async def get() -> int:
        transport = httpx.ASGITransport(app=_app(), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://igcv2") as client:
            return (await client.get(path)).status_code

    return asyncio.run(get())


def health_path(kind: str) -> str:
    """The app's own liveness or readiness route (kind: 'live' or 'ready'), outside /v2."""
    found = sorted(p for p in route_paths() if p.endswith(f"/{kind}") and "health" in p and not p.startswith("/v2"))
    assert len(found) == 1, f"expected one {kind} health route, the app has {found}"
    return found[0]


def metrics_path() -> str:
    assert "/metrics" in route_paths(), "the app serves no /metrics route"
    return "/metrics"


# ----------------------------------------------------------------------------- tools


def tool(name: str) -> str:
    """A command-line tool from PATH or next to this interpreter (.venv/bin), else skip the test."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed (make test installs it)")
    return found


def run(args: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False)


# ----------------------------------------------------------------------------- docker compose


def compose_env(tmp_dir: Path) -> tuple[dict[str, str], Path]:
    """A clean environment for docker-compose: no stray IMAGE=... from the caller, no local .env."""
    empty = tmp_dir / "empty.env"
    empty.write_text("")
    env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}
    return env, empty


@cache
def compose_config(*files: Path) -> dict[str, Any]:
    """``docker-compose config`` of these files: interpolated, merged, env files read in."""
    import tempfile

    binary = tool("docker-compose")
    with tempfile.TemporaryDirectory() as tmp:
        env, empty = compose_env(Path(tmp))
        args = [binary, "--project-directory", str(ROOT), "--env-file", str(empty)]
        for path in files:
            args += ["-f", str(path)]
        result = run([*args, "config"], env=env)
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


def container_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines (what docker compose reads); comments and blank lines skipped."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=value: {line!r}"
            values[key.strip()] = value
    return values


def seconds(duration: str | int) -> float:
    """Compose durations as docker-compose config prints them: 600, '600s', '10m', '1m30s', '1h'."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(a + b for a, b in parts) == duration, f"unreadable duration {duration!r}"
    return sum(float(value) * units[unit] for value, unit in parts)


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """{container path: (source, mode)} of a resolved service's volumes."""
    found = {}
    for spec in service.get("volumes", []):
        if isinstance(spec, dict):
            found[spec["target"]] = (spec.get("source", ""), "ro" if spec.get("read_only") else "rw")
        else:
            source, target, *mode = spec.split(":")
            found[target] = (source, mode[0] if mode else "rw")
    return found


# Keys of the compose service that docker/test-image.sh does not take over, and why.
NOT_RUN_AS_COMPOSED = {
    "build": "the script builds the image itself, offline",
    "image": "the script names the image it built",
    "ports": "the container is on the host's network, on a free loopback port",
    "healthcheck": "the image's own: the same probe, but following IGCV2_PORT instead of a fixed 8000",
    "restart": "the script stops and starts the container itself",
}


def docker_run_args(service: dict[str, Any], port: int, grpc_port: int, cache_volume: str) -> list[str]:
    """``docker run`` options that run a resolved compose service as compose would, except: on the host's
    network at 127.0.0.1:``port`` (gRPC: ``grpc_port``), and with ``cache_volume`` for its named volume. A
    key this does not translate fails here rather than being left out of the test."""
    translated = {"environment", "volumes", "read_only", "tmpfs", "cap_drop", "security_opt", "stop_grace_period"}
    untranslated = sorted(set(service) - translated - set(NOT_RUN_AS_COMPOSED))
    assert not untranslated, f"docker_run_args does not translate the compose keys {untranslated}"
    env = {**container_env(service), env_name("host"): "127.0.0.1"}
    env |= {env_name("port"): str(port), env_name("grpc_port"): str(grpc_port)}
    args = ["--network=host", *(f"--env={key}={value}" for key, value in env.items())]
    for target, (source, mode) in mounts(service).items():
        args.append(f"--volume={source if source.startswith('/') else cache_volume}:{target}:{mode}")
    args += ["--read-only"] if service.get("read_only") else []
    args += [f"--tmpfs={path}" for path in service.get("tmpfs", [])]
    args += [f"--cap-drop={capability}" for capability in service.get("cap_drop", [])]
    args += [f"--security-opt={option}" for option in service.get("security_opt", [])]
    if "stop_grace_period" in service:
        args.append(f"--stop-timeout={round(seconds(service['stop_grace_period']))}")
    return args


# ----------------------------------------------------------------------------- Kubernetes


@cache
def kustomize(directory: Path) -> tuple[dict[str, Any], ...]:
    """``kubectl kustomize`` of a directory (offline), as a tuple of documents."""
    result = run([tool("kubectl"), "kustomize", str(directory)])
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def one(docs: Iterable[dict[str, Any]], kind: str, api_version: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (api_version is None or d["apiVersion"] == api_version)]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def containers(pod_spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod_spec.get("initContainers", [])
    yield from pod_spec["containers"]


def env_values(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}
