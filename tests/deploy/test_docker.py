"""docker/Dockerfile and .dockerignore, checked offline (no Docker engine here): hadolint, and the wiring
to the service's real settings and routes (port, health path, IGCV2_* variables, model store, caches)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from deploy.wiring import (
    DOCKERFILE,
    DOCKERIGNORE,
    ROOT,
    check_settings,
    env_names_in,
    grpc_port,
    health_path,
    run,
    service_port,
    setting_env_names,
    tool,
)

from service.config import BATCHING_FIELDS, env_name

# ----------------------------------------------------------------------------- a small Dockerfile reader


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def logical_lines(text: str) -> list[str]:
    """Instructions with continuation lines joined and comments (including parser directives) dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            lines.append(current.strip())
        current = ""
    return lines


def parse_dockerfile(path: Path = DOCKERFILE) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) of a Dockerfile."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(path.read_text()):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            if keyword == "ARG":
                key, _, value = args.partition("=")
                global_args[key] = value
        else:
            stages[-1].instructions.append((keyword, args))
    return global_args, stages


def key_values(args: str) -> dict[str, str]:
    """ENV/ARG/LABEL arguments in KEY=value form (values may be quoted)."""
    pairs = {}
    for token in shlex.split(args):
        key, sep, value = token.partition("=")
        pairs[key] = value if sep else ""
    return pairs


def resolve(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)


GLOBAL_ARGS, STAGES = parse_dockerfile()
TORCH_BUILDS = ("cpu", "cuda")
FINAL = STAGES[-1]
FINAL_ENV = {k: v for args in FINAL.all("ENV") for k, v in key_values(args).items()}


def stage_args(stage: Stage) -> dict[str, str]:
    values = dict(GLOBAL_ARGS)
    for args in stage.all("ARG"):
        key, _, value = args.partition("=")
        values[key] = value
    return values


# ----------------------------------------------------------------------------- lint and shape


def test_hadolint_clean():
    result = run([tool("hadolint"), "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_base_images_are_pinned_tags():
    stage_names = {s.name for s in STAGES if s.name}
    for stage in STAGES:
        image = resolve(stage.base, GLOBAL_ARGS)
        if image in stage_names:
            continue
        name, _, tag = image.rpartition(":")
        assert name and tag and "/" not in tag, f"FROM {image}: pin a tag"
        assert tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), f"FROM {image}: pin a full version"


def test_multi_stage_final_stage_installs_nothing_with_pip():
    assert len(STAGES) >= 2, "build and runtime stages keep compilers' build leftovers and pip caches out"
    copies_from_build = [a for a in FINAL.all("COPY") if a.startswith("--from=")]
    assert any("/opt/venv" in a for a in copies_from_build), "the runtime stage takes the built venv"
    assert not any("pip install" in a for a in FINAL.all("RUN")), "pip belongs to the build stage"


def test_the_build_installs_the_lock_of_its_torch_build_with_hashes():
    build = next(s for s in STAGES if any("--require-hashes" in a for a in s.all("RUN")))
    assert stage_args(build).get("TORCH_BUILD") == "cuda", "the default image is the CUDA one (cpu by build argument)"
    (copied,) = [a for a in build.all("COPY") if "requirements/" in a]
    assert copied.split()[0] == "requirements/service-${TORCH_BUILD}.txt"
    for torch_build in TORCH_BUILDS:
        lock = ROOT / f"requirements/service-{torch_build}.txt"
        assert re.search(r"^torch==2\.13\.0" + (r"\+cpu" if torch_build == "cpu" else r" "), lock.read_text(), re.M)
    (project,) = [a for a in build.all("RUN") if "pip install" in a and "--require-hashes" not in a]
    assert "--no-deps" in project, "the project itself adds nothing the lock did not pin"
    assert "!requirements/service-*.txt" in DOCKERIGNORE.read_text().split()


def test_runtime_has_c_and_cxx_compilers_for_torch_compile():
    installs = " ".join(a for a in FINAL.all("RUN") if "apt-get install" in a).split()
    assert "gcc" in installs, "Triton (torch.compile on GPU) compiles C at run time"
    assert "g++" in installs, "Inductor's CPU kernels are C++"


def test_pip_settings_are_arguments_left_unset_unless_passed():
    """An offline build points pip at a local wheel index through these; declared with a value (even an
    empty one) they would be set in RUN, and an empty PIP_INDEX_URL or PIP_NO_INDEX breaks pip."""
    (build,) = [s for s in STAGES if any("--require-hashes" in a for a in s.all("RUN"))]
    pip_args = [a for a in build.all("ARG") if a.startswith("PIP_")]
    assert sorted(pip_args) == ["PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_NO_INDEX"]
    assert not [a for a in GLOBAL_ARGS if a.startswith("PIP_")], "declared before FROM they would not reach RUN"


def test_compilers_come_from_the_mirror_only_when_the_base_lacks_them():
    """The offline base (docker/local-base.sh) carries them: a build on it needs no Debian mirror."""
    (step,) = [a for a in FINAL.all("RUN") if "apt-get install" in a]
    checked = re.search(r"if ! dpkg -s ([^>]+?) >/dev/null 2>&1; then", step)
    installed = re.search(r"apt-get install -y --no-install-recommends ([^&;]+)", step)
    assert checked and installed and checked[1].split() == installed[1].split()
    assert step.index("then") < step.index("apt-get update") < step.index("fi"), "apt-get runs only inside the if"


def test_the_local_base_has_what_the_dockerfile_takes_from_python_slim():
    script = (ROOT / "docker" / "local-base.sh").read_text()
    included = set(re.search(r"--include=(\S+)", script)[1].split(","))
    (step,) = [a for a in FINAL.all("RUN") if "apt-get install" in a]
    compilers = set(re.search(r"apt-get install -y --no-install-recommends ([^&;]+)", step)[1].split())
    # python on PATH (the RUN steps and the HEALTHCHECK call it), venv, Python.h, pip's TLS certificates.
    assert included >= {"python3", "python-is-python3", "python3-venv", "python3-dev", "ca-certificates"} | compilers
    assert "ENV PATH=" in script, "an imported image has no PATH, and the Dockerfile appends to it"


def test_runs_as_non_root_numeric_user():
    users = FINAL.all("USER")
    assert users, "the runtime stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, "a numeric non-root uid, so Kubernetes' runAsNonRoot can check it"


# ----------------------------------------------------------------------------- wiring to the service


def test_env_settings_are_real_settings_with_valid_values():
    values = {k: v for k, v in FINAL_ENV.items() if k.startswith("IGCV2_")}
    settings = check_settings(values, "Dockerfile ENV")
    assert settings.host == "0.0.0.0", "in a container the service listens on every interface"
    assert not set(values) & {env_name(f) for f in BATCHING_FIELDS}, (
        "an image-level batching setting would override every model's own serving section"
    )
    unknown = sorted(env_names_in(DOCKERFILE) - set(setting_env_names()))
    assert not unknown, f"the Dockerfile names {unknown}, which service.config.Settings does not have"


def test_exposed_ports_are_the_service_ports():
    port, grpc = service_port(), grpc_port()
    assert FINAL.all("EXPOSE") == [f"{port} {grpc}"], "HTTP and gRPC"
    assert FINAL_ENV.get(env_name("port"), str(port)) == str(port)
    assert FINAL_ENV.get(env_name("grpc_port"), str(grpc)) == str(grpc)


def test_healthcheck_probes_the_readiness_route():
    (check,) = FINAL.all("HEALTHCHECK")
    assert health_path("ready") in check, "HEALTHCHECK asks /health/ready (200 only once warmed up)"
    assert env_name("port") in check and f"'{service_port()}'" in check, "it follows IGCV2_PORT, default the port"
    start = re.search(r"--start-period=(\d+)s", check)
    assert start and int(start[1]) >= 300, "the start period leaves room for torch.compile warm-up"


def test_models_come_from_slash_models_and_the_image_carries_the_default_model():
    assert FINAL_ENV.get(env_name("model_store")) == "/models"
    copies = [a.split() for a in FINAL.all("COPY") if not a.startswith("--from")]
    assert any(c[-2].rstrip("/") == "model_store" and c[-1].rstrip("/") == "/models" for c in copies)


def test_compile_caches_live_on_a_volume():
    volumes = " ".join(FINAL.all("VOLUME"))
    for variable in (env_name("compile_cache"), "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        path = FINAL_ENV.get(variable, "")
        assert path and any(path.startswith(v.strip('[]", ')) for v in volumes.split()), f"{variable} on a VOLUME"


def test_command_starts_the_service():
    assert FINAL.all("CMD")[-1] == '["python", "-m", "service"]'


# ----------------------------------------------------------------------------- .dockerignore


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, regex) per line, Docker's syntax: ``*``, ``?``, ``**`` and ``!`` exceptions."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((not negate, re.compile(regex)))
    return rules


def in_build_context(relative: str) -> bool:
    """Whether Docker sends this path: the last rule matching it or one of its parent folders decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for exclude, regex in dockerignore_rules():
        if any(regex.fullmatch(c) for c in candidates):
            excluded = exclude
    return not excluded


@pytest.mark.parametrize(
    "path",
    [
        "pyproject.toml",
        "README.md",
        "igcv2/__init__.py",
        "service/app.py",
        "service/api/health.py",
        "model_store/igcv2-fashion/1/config.json",
        "model_store/igcv2-fashion/1/model.safetensors",
    ],
)
def test_build_context_has_what_the_image_needs(path):
    assert in_build_context(path)


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "service/__pycache__/app.cpython-311.pyc",
        ".pytest_cache/v/cache",
        ".ruff_cache/x",
        ".env",
        "logs/train.log",
        "benchmarks/out/x.json",
        "model_store/igcv2-fashion/.checkpoint.pt",
        "model_store/igcv2-fashion/1/.model.safetensors.tmp-1",
        ".inductor-cache/x",
        ".compile-cache/igcv2-fashion-v1-b1-0123/package.pt2",
    ],
)
def test_build_context_leaves_out_environments_caches_and_tests(path):
    assert not in_build_context(path)


def test_every_copied_source_is_in_the_build_context():
    for stage, torch_build in ((stage, tb) for stage in STAGES for tb in TORCH_BUILDS):
        for args in stage.all("COPY"):
            if args.startswith("--from"):
                continue
            words = [w for w in args.split() if not w.startswith("--")]
            for source in (resolve(w, {**stage_args(stage), "TORCH_BUILD": torch_build}) for w in words[:-1]):
                assert (ROOT / source).exists(), f"COPY {source}: missing from the repository"
                files = [p for p in (ROOT / source).rglob("*.py")] if (ROOT / source).is_dir() else [ROOT / source]
                for file in files[:50]:
                    relative = file.relative_to(ROOT).as_posix()
                    if "__pycache__" not in relative:
                        assert in_build_context(relative), f"{relative} is copied but .dockerignore drops it"


# ----------------------------------------------------------------------------- docker/*.sh (make image-test)

SCRIPTS = sorted((ROOT / "docker").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_are_shellcheck_clean(script):
    result = run([tool("shellcheck"), "--severity=info", str(script)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_test_engine_adds_no_network_plumbing_to_the_host():
    """The engine it starts makes no bridge and no NAT rules; its builds use the host's network (the
    containers too: tests/deploy/test_compose.py)."""
    script = (ROOT / "docker" / "test-image.sh").read_text()
    (dockerd,) = re.findall(r"^\s*dockerd (.*(?:\\\n.*)*)", script, re.M)
    assert {"--storage-driver=vfs", "--bridge=none", "--iptables=false", "--ip-forward=false"} <= set(dockerd.split())
    assert "local args=(--network host -f docker/Dockerfile" in script
