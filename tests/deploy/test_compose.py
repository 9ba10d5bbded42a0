"""docker-compose.yml (GPU), docker-compose.cpu.yml and docker-compose.multi-gpu.yml, checked offline with
``docker-compose config`` (Debian's docker-compose 1.29 needs no engine for it), against the service's real
settings and routes and against the Prometheus and Grafana files they mount."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy.wiring import (
    COMPOSE_CPU,
    COMPOSE_GPU,
    COMPOSE_MULTI_GPU,
    DCGM_PORT,
    DCGM_SERVICE,
    ENV_EXAMPLE,
    PROMETHEUS_CONFIG,
    ROOT,
    SERVICE,
    check_settings,
    compose_config,
    compose_env,
    container_env,
    docker_run_args,
    env_names_in,
    gpu_devices,
    grpc_port,
    health_path,
    metrics_path,
    mounts,
    parse_env_file,
    run,
    seconds,
    service_port,
    setting_env_names,
    tool,
)

from service.config import BATCHING_FIELDS, env_name

GPU = (COMPOSE_GPU,)
CPU = (COMPOSE_CPU,)
MULTI_GPU = (COMPOSE_GPU, COMPOSE_MULTI_GPU)
VARIANTS = {"gpu": GPU, "cpu": CPU, "multi-gpu": MULTI_GPU}


def services(files: tuple[Path, ...]) -> dict[str, Any]:
    """Resolved services (docker-compose 1.29's `config` lists profiled services too)."""
    return compose_config(*files)["services"]


def igcv2_services(files: tuple[Path, ...]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services(files).items() if name == SERVICE or name.startswith(f"{SERVICE}-")}


# ----------------------------------------------------------------------------- every variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_is_valid(variant, tmp_path):
    env, empty = compose_env(tmp_path)
    args = [tool("docker-compose"), "--project-directory", str(ROOT), "--env-file", str(empty)]
    for path in VARIANTS[variant]:
        args += ["-f", str(path)]
    result = run([*args, "config", "-q"], env=env)
    assert result.returncode == 0 and not result.stdout, result.stderr


def test_dcgm_exporter_runs_only_under_the_gpu_metrics_profile():
    dcgm = services(GPU)[DCGM_SERVICE]
    assert dcgm["profiles"] == ["gpu-metrics"]
    assert str(DCGM_PORT) in [str(p) for p in dcgm.get("expose", [])] + [
        str(p.get("target")) for p in dcgm.get("ports", [])
    ]
    assert any(d.get("driver") == "nvidia" for d in gpu_devices(dcgm))
    profiled = {name for name, svc in services(GPU).items() if svc.get("profiles")}
    assert profiled == {DCGM_SERVICE}, "everything else starts with a plain `docker compose up -d`"


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_port_health_and_policies(variant):
    port = service_port()
    for name, svc in igcv2_services(VARIANTS[variant]).items():
        env = container_env(svc)
        assert env.get(env_name("port"), str(port)) == str(port), f"{name}: IGCV2_PORT is the service's port"
        assert env.get(env_name("host")) == "0.0.0.0", f"{name}: listens beyond loopback inside the container"
        assert env.get(env_name("grpc_port"), str(grpc_port())) == str(grpc_port()), f"{name}: gRPC on its port"
        assert [p["target"] for p in svc["ports"]] == [port, grpc_port()], f"{name}: publishes HTTP and gRPC"
        check = " ".join(svc["healthcheck"]["test"])
        assert f"127.0.0.1:{port}{health_path('ready')}" in check, f"{name}: healthcheck on readiness"
        assert seconds(svc["healthcheck"]["start_period"]) >= 300, f"{name}: start period covers warm-up"
        assert svc["restart"] in {"unless-stopped", "always"}
        # Draining on SIGTERM must finish before docker's SIGKILL.
        shutdown = float(env.get(env_name("shutdown_timeout_s"), 30))
        assert seconds(svc.get("stop_grace_period", "10s")) > shutdown, f"{name}: stop_grace_period > drain time"


@pytest.mark.parametrize("variant", VARIANTS)
def test_models_read_only_and_compile_cache_on_a_volume(variant):
    config = compose_config(*VARIANTS[variant])
    for name, svc in igcv2_services(VARIANTS[variant]).items():
        env, volumes = container_env(svc), mounts(svc)
        store = env[env_name("model_store")]
        assert store == "/models" and volumes[store] == (str(ROOT / "model_store"), "ro"), (
            f"{name}: the repo's model_store/ mounted read-only at /models by default"
        )
        for variable in (env_name("compile_cache"), "TORCHINDUCTOR_CACHE_DIR"):
            cache_dir = env[variable]
            cache_mounts = [t for t in volumes if cache_dir == t or cache_dir.startswith(t.rstrip("/") + "/")]
            assert cache_mounts, f"{name}: {variable} is on a volume"
            source = volumes[cache_mounts[0]][0]
            assert source in config.get("volumes", {}), (
                f"{name}: {variable} is on a named volume (kept across restarts)"
            )


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_is_locked_down(variant):
    for name, svc in igcv2_services(VARIANTS[variant]).items():
        assert svc.get("read_only") is True, name
        assert svc.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
        assert "user" not in svc or not str(svc["user"]).startswith(("0", "root")), name
        # The only writable path but the volumes. torch's loader of CUDA packages loads libraries from it,
        # which Docker's default tmpfs options (noexec) forbid; CPU packages load from memory.
        assert svc.get("tmpfs") == (["/tmp"] if variant == "cpu" else ["/tmp:exec"]), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_container_settings_are_real_and_valid(variant):
    for name, svc in igcv2_services(VARIANTS[variant]).items():
        values = {k: v for k, v in container_env(svc).items() if k.startswith("IGCV2_")}
        check_settings(values, f"{variant} {name} environment")
        assert not set(values) & {env_name(f) for f in BATCHING_FIELDS}, (
            f"{name}: a batching setting in the default environment overrides every model's serving section"
        )


@pytest.mark.parametrize("path", [COMPOSE_GPU, COMPOSE_CPU, COMPOSE_MULTI_GPU, ENV_EXAMPLE], ids=lambda p: p.name)
def test_every_igcv2_variable_named_is_a_setting(path):
    unknown = sorted(env_names_in(path) - set(setting_env_names()))
    assert not unknown, f"{path.name} names {unknown}, which service.config.Settings does not have"


@pytest.mark.parametrize("variant", VARIANTS)
def test_images_are_pinned(variant):
    for name, svc in services(VARIANTS[variant]).items():
        image = svc["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag and "/" not in tag and tag != "latest", f"{name}: pin the image tag ({image})"


# ----------------------------------------------------------------------------- GPU and CPU variants


def test_gpu_service_reserves_one_nvidia_gpu():
    (device,) = gpu_devices(services(GPU)[SERVICE])
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device.get("count") == 1 or len(device.get("device_ids", [])) == 1


def test_gpu_image_uses_a_cuda_torch_and_cpu_image_the_cpu_one():
    assert services(GPU)[SERVICE]["build"]["args"]["TORCH_BUILD"] == "cuda"
    cpu = services(CPU)[SERVICE]["build"]["args"]
    assert cpu["TORCH_BUILD"] == "cpu" and cpu["PIP_EXTRA_INDEX_URL"].endswith("/whl/cpu")


def test_a_gpu_host_runs_several_workers_and_a_cpu_host_one():
    """One process leaves a GPU mostly idle (benchmarks/RESULTS.md); on a CPU the model takes the cores."""
    for name, svc in igcv2_services(MULTI_GPU).items():
        assert int(container_env(svc)[env_name("workers")]) > 1, name
    assert env_name("workers") not in container_env(services(CPU)[SERVICE])


def test_cpu_variant_needs_no_gpu():
    for name, svc in services(CPU).items():
        assert not gpu_devices(svc), f"{name} reserves a GPU in the CPU variant"
    assert container_env(services(CPU)[SERVICE])[env_name("device")] == "cpu"
    assert DCGM_SERVICE not in services(CPU)


DIFFERS_BY_DESIGN = {"image", "build", "deploy", "ports", "tmpfs"}  # tmpfs: exec for CUDA packages only


def comparable(service: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in service.items() if k not in DIFFERS_BY_DESIGN}
    by_design = {env_name("device"), env_name("workers")}  # one process per CPU host, several per GPU
    kept["environment"] = {k: v for k, v in container_env(service).items() if k not in by_design}
    return kept


def test_cpu_variant_is_the_gpu_stack_without_the_gpu():
    gpu, cpu = services(GPU), services(CPU)
    assert comparable(cpu[SERVICE]) == comparable(gpu[SERVICE])
    assert set(cpu) == set(gpu) - {DCGM_SERVICE}

    def monitoring(service: dict[str, Any]) -> dict[str, Any]:
        return {k: sorted(v) if k == "volumes" else v for k, v in service.items() if k != "depends_on"}

    for name in set(cpu) - {SERVICE}:
        assert monitoring(cpu[name]) == monitoring(gpu[name]), f"{name} differs between the variants"


def test_multi_gpu_replicas_match_the_service_with_their_own_gpu_and_port():
    replicas = igcv2_services(MULTI_GPU)
    assert len(replicas) >= 2
    base = replicas[SERVICE]
    devices, host_ports = set(), set()
    for name, svc in replicas.items():
        assert comparable(svc) == comparable(base), f"{name} drifted from {SERVICE}"
        assert svc["image"] == base["image"]
        (device,) = gpu_devices(svc)
        devices.add(tuple(device.get("device_ids", [])) or ("count", device.get("count")))
        host_ports.update(p["published"] for p in svc["ports"])
    assert len(devices) == len(replicas) and len(host_ports) == 2 * len(replicas), "one GPU and two host ports each"


# ----------------------------------------------------------------------------- .env.example


def test_env_example_documents_every_setting():
    text = ENV_EXAMPLE.read_text()
    missing = sorted(name for name in setting_env_names() if name not in text)
    assert not missing, f".env.example does not mention {missing}"


def test_env_example_active_values_are_valid_and_leave_batching_to_the_models():
    values = parse_env_file(ENV_EXAMPLE)
    settings = {k: v for k, v in values.items() if k.startswith("IGCV2_")}
    check_settings(settings, ".env.example")
    assert not set(settings) & {env_name(f) for f in BATCHING_FIELDS}, (
        "batching settings stay commented out: set, they override every model's serving section"
    )
    for key, value in values.items():
        assert "#" not in value, f"{key}: env files keep a trailing comment as part of the value"


# ----------------------------------------------------------------------------- Prometheus and Grafana


def prometheus_config() -> dict[str, Any]:
    return yaml.safe_load(PROMETHEUS_CONFIG.read_text())


def scrape_targets(job: dict[str, Any]) -> list[str]:
    return [t for sc in job.get("static_configs", []) for t in sc.get("targets", [])] + [
        f"{name}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for name in sd.get("names", [])
    ]


def test_prometheus_mounts_its_config_and_alert_rules():
    prometheus = services(GPU)["prometheus"]
    volumes = mounts(prometheus)
    flags = dict(arg.split("=", 1) for arg in prometheus["command"] if "=" in arg)
    config_in_container = Path(flags["--config.file"])
    directory = str(config_in_container.parent)
    assert volumes[directory] == (str(PROMETHEUS_CONFIG.parent), "ro")
    assert (PROMETHEUS_CONFIG.parent / config_in_container.name).is_file()
    rules = prometheus_config().get("rule_files", [])
    assert rules and all((PROMETHEUS_CONFIG.parent / rule).is_file() for rule in rules), "alert rules mounted too"


def test_prometheus_scrapes_the_service_metrics_route_and_dcgm():
    jobs = prometheus_config()["scrape_configs"]
    port = service_port()
    service_jobs = [j for j in jobs if f"{SERVICE}:{port}" in scrape_targets(j)]
    assert service_jobs, f"Prometheus scrapes {SERVICE}:{port} (the compose service and its port)"
    for job in service_jobs:
        assert job.get("metrics_path", "/metrics") == metrics_path()
    assert any(f"{DCGM_SERVICE}:{DCGM_PORT}" in scrape_targets(j) for j in jobs)
    names = set(services(GPU))
    for job in jobs:
        for target in scrape_targets(job):
            assert target.split(":")[0] in names, f"scrape target {target} is no compose service"


def test_grafana_is_provisioned_from_the_repository():
    grafana = services(GPU)["grafana"]
    volumes = mounts(grafana)
    provisioning = ROOT / "docker" / "grafana" / "provisioning"
    assert volumes["/etc/grafana/provisioning"] == (str(provisioning), "ro")
    providers = [
        p for f in (provisioning / "dashboards").glob("*.y*ml") for p in yaml.safe_load(f.read_text())["providers"]
    ]
    dashboards = ROOT / "docker" / "grafana" / "dashboards"
    for provider in providers:
        assert volumes[provider["options"]["path"]] == (str(dashboards), "ro"), "the provider's folder is mounted"
    env = container_env(grafana)
    home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert (dashboards / Path(home).name).is_file()
    anonymous = env.get("GF_AUTH_ANONYMOUS_ENABLED") == "true" and env.get("GF_AUTH_ANONYMOUS_ORG_ROLE") == "Viewer"
    assert anonymous or "GF_SECURITY_ADMIN_PASSWORD" in env
    assert "${GRAFANA_ADMIN_PASSWORD" in COMPOSE_GPU.read_text(), "the admin password comes from the environment"
    datasources = [
        d for f in (provisioning / "datasources").glob("*.y*ml") for d in yaml.safe_load(f.read_text())["datasources"]
    ]
    prometheus_port = services(GPU)["prometheus"]["ports"][0]["target"]
    assert any(d["url"] == f"http://prometheus:{prometheus_port}" for d in datasources)


def test_the_image_test_runs_the_cpu_service_as_compose_does():
    """docker/test-image.sh runs the container with these options: the compose file's lockdown, volumes and
    environment, on the host's network and the loopback only."""
    (svc,) = igcv2_services(CPU).values()
    args = docker_run_args(svc, 41234, 41235, "test-cache")
    assert {"--network=host", "--read-only", "--tmpfs=/tmp", "--cap-drop=ALL"} <= set(args)
    assert "--security-opt=no-new-privileges:true" in args and "--stop-timeout=45" in args
    assert f"--volume={ROOT / 'model_store'}:/models:ro" in args and "--volume=test-cache:/cache:rw" in args
    env = dict(a.removeprefix("--env=").split("=", 1) for a in args if a.startswith("--env="))
    ports = {env_name("port"): "41234", env_name("grpc_port"): "41235"}
    assert env == {**container_env(svc), env_name("host"): "127.0.0.1", **ports}


def test_the_image_test_refuses_a_compose_key_it_cannot_translate():
    (svc,) = igcv2_services(CPU).values()
    with pytest.raises(AssertionError, match="ulimits"):
        docker_run_args({**svc, "ulimits": {"nofile": 1024}}, 41234, 41235, "test-cache")
