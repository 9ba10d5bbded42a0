"""Security: API and admin keys, no secret in logs or answers, model names that cannot leave the
store, nothing that unpickles, a non-root container with a read-only model mount."""

from __future__ import annotations

import ast
import json
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from e2e.reliability import error_message, fast_env, http_request, raw_request
from live_server import ROOT, LiveServer, live_server
from samples import DEFAULT_MODEL, default_model_store, fashion_pngs, multipart

from igcv2.artifact import save_artifact, versions
from igcv2.data import FASHION_MNIST_LABELS
from igcv2.networks import build

API_KEY = "api-" + secrets.token_urlsafe(24)
ADMIN_KEY = "admin-" + secrets.token_urlsafe(24)
PROTECTED = [
    ("GET", "/models"),
    ("GET", f"/models/{DEFAULT_MODEL}"),
    ("GET", "/docs"),
    ("GET", "/redoc"),
    ("GET", "/openapi.json"),
    ("GET", "/v2"),
    ("GET", f"/v2/models/{DEFAULT_MODEL}"),
    ("POST", "/v2/repository/index"),
]
OPEN = ["/health/live", "/health/ready", "/metrics", "/v2/health/live", "/v2/health/ready"]


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A store with the default model, and beside it (outside the store) a perfectly loadable
    model "evil": if any route followed a ../ name, it would load and show up in /models."""
    root = tmp_path_factory.mktemp("security")
    source = default_model_store(root / "source")
    store = root / "store"
    shutil.copytree(source / DEFAULT_MODEL, store / DEFAULT_MODEL)
    save_artifact(
        build("igcv2_fashion"),
        root / "outside" / "evil",
        name="evil",
        labels=FASHION_MNIST_LABELS,
        architecture={"builder": "igcv2_fashion", "kwargs": {}},
        untrained=True,
        input_spec={"height": 28, "width": 28, "channels": 1, "mean": [0.286], "std": [0.353]},
    )
    return store, root / "outside"


@pytest.fixture(scope="module")
def server(layout: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    env = fast_env(layout[0], api_key=API_KEY, admin_key=ADMIN_KEY, log_level="debug")
    with live_server(tmp_path_factory.mktemp("security-server"), env) as running:
        yield running


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_protected_routes_need_the_api_key(server: LiveServer) -> None:
    with server.client() as client:
        for method, path in PROTECTED:
            for headers in (
                {},
                bearer("wrong"),
                bearer(API_KEY + "x"),
                bearer(API_KEY[:-1]),
                {"Authorization": f"Basic {API_KEY}"},
                {"Authorization": API_KEY},
            ):
                response = client.request(method, path, headers=headers)
                assert "missing or invalid API key" in error_message(response, 401), (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
            for key in (API_KEY, ADMIN_KEY):  # the admin key is a key too
                response = client.request(method, path, headers=bearer(key))
                assert response.status_code == 200, (method, path, response.text[:300])
        response = client.post("/classify", files=multipart(fashion_pngs(1)))
        error_message(response, 401)
        assert client.post("/classify", files=multipart(fashion_pngs(1)), headers=bearer(API_KEY)).status_code == 200


def test_health_and_metrics_stay_open(server: LiveServer) -> None:
    with server.client() as client:
        for path in OPEN:
            assert client.get(path).status_code == 200, path


@pytest.mark.parametrize(
    "path",
    [
        "/health/../models",
        "/metrics/../models",
        "/health/live/../../models",
        "/v2/health/../../models",
        "/%68ealth/../models",
        "//models",
        "/models/",
    ],
)
def test_open_prefixes_do_not_open_other_routes(server: LiveServer, path: str) -> None:
    response = raw_request(server, http_request("GET", path))
    assert response.status is not None and response.status in (401, 404), (path, response.head)
    assert b"default_model" not in response.body


def test_repository_control_needs_the_admin_key(server: LiveServer) -> None:
    with server.client() as client:
        for action in ("load", "unload"):
            path = f"/v2/repository/models/{DEFAULT_MODEL}/{action}"
            error_message(client.post(path), 401)
            error_message(client.post(path, headers=bearer(API_KEY)), 401, 403)
        loaded = client.post(f"/v2/repository/models/{DEFAULT_MODEL}/load", headers=bearer(ADMIN_KEY))
        assert loaded.status_code == 200, loaded.text  # already loaded: a no-op that says READY
    assert_model_served(server)


def assert_model_served(server: LiveServer) -> None:
    response = httpx.post(server.url + "/classify", files=multipart(fashion_pngs(1)), headers=bearer(API_KEY))
    assert response.status_code == 200, response.text


TRAVERSALS = [
    "..",
    "%2e%2e",
    ".%2e",
    "%2e%2e%2f",
    "..%2f",
    "..%2f..%2foutside%2fevil",
    "%2e%2e%2foutside%2fevil",
    "..%2Foutside%2Fevil",
    "..%5coutside%5cevil",
    "%252e%252e%252foutside%252fevil",
    "....%2f%2foutside%2fevil",
    ".evil",
    "evil%00",
    "%00",
    "~",
    "outside%2fevil",
]
INFER_BODY = json.dumps(
    {"inputs": [{"name": "image", "shape": [1, 28, 28, 1], "datatype": "UINT8", "data": [0] * 784}]}
).encode()
NAME_ROUTES = [
    ("GET", "/models/{}"),
    ("GET", "/v2/models/{}"),
    ("GET", "/v2/models/{}/ready"),
    ("GET", "/v2/models/{}/config"),
    ("GET", "/v2/models/{}/stats"),
    ("GET", "/v2/models/{}/versions/1"),
    ("POST", "/v2/models/{}/infer"),
    ("POST", "/v2/repository/models/{}/load"),
    ("POST", "/v2/repository/models/{}/unload"),
    ("POST", "/classify?model={}"),
]


@pytest.mark.parametrize(("method", "route"), NAME_ROUTES, ids=[r for _, r in NAME_ROUTES])
def test_model_names_cannot_leave_the_store(server: LiveServer, method: str, route: str) -> None:
    body, headers = b"", bearer(ADMIN_KEY)  # the admin key passes every check but the name's own
    if route.startswith("/classify"):
        body, headers = fashion_pngs(1)[0], {**headers, "Content-Type": "image/png"}
    elif route.endswith("/infer"):
        body, headers = INFER_BODY, {**headers, "Content-Type": "application/json"}
    if not route.endswith("/unload"):  # the request is right: only the name makes it fail
        control = raw_request(server, http_request(method, route.format(DEFAULT_MODEL), body, headers))
        assert control.status == 200, (route, control.head, control.body[:300])
    for name in [*TRAVERSALS, "../outside/evil"]:
        response = raw_request(server, http_request(method, route.format(name), body, headers))
        assert response.status in (404, 422), (route, name, response.status, response.body[:300])
    listing = httpx.get(server.url + "/models", headers=bearer(API_KEY)).json()
    assert [m["name"] for m in listing["models"]] == [DEFAULT_MODEL]
    index = httpx.post(server.url + "/v2/repository/index", headers=bearer(API_KEY)).json()
    assert {entry["name"] for entry in index} == {DEFAULT_MODEL}


def test_keys_never_appear_in_answers_or_logs(server: LiveServer) -> None:
    """Run after the other tests of this module (pytest keeps file order): every request they made,
    good and bad, is in the log by now."""
    answers = []
    with server.client() as client:
        for path in [
            "/models",
            f"/models/{DEFAULT_MODEL}",
            "/openapi.json",
            "/v2",
            "/metrics",
            "/health/ready",
            f"/v2/models/{DEFAULT_MODEL}/config",
            f"/v2/models/{DEFAULT_MODEL}",
        ]:
            answers.append(client.get(path, headers=bearer(API_KEY)))
        answers.append(client.get("/models", headers=bearer(API_KEY + "-wrong")))
        answers.append(client.post("/classify", files=multipart(fashion_pngs(1)), headers=bearer(API_KEY)))
        answers.append(
            client.post(
                "/classify", params={"model": "nope"}, files=multipart(fashion_pngs(1)), headers=bearer(API_KEY)
            )
        )
    for response in answers:
        text = response.text + str(response.headers)
        assert API_KEY not in text and ADMIN_KEY not in text, response.request.url
    assert_serving_with_key(server)
    log = server.log()
    assert "DEBUG" in log or "INFO" in log  # the log is being written
    for key in (API_KEY, ADMIN_KEY):
        assert key not in log and key[4:20] not in log


def assert_serving_with_key(server: LiveServer) -> None:
    assert server.process.poll() is None
    assert_model_served(server)


# ----- static checks of the sources and the deployment files -----

UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_loads(source: str) -> list[str]:
    """Imports of unpickling modules and calls that unpickle: torch.load without
    weights_only=True, numpy.load with allow_pickle=True, pandas.read_pickle."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"line {node.lineno}: import {n}" for n in names if n and n.split(".")[0] in UNPICKLERS]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            keywords = {k.arg: k.value for k in node.keywords}

            def is_true(name: str, keywords: dict = keywords) -> bool:
                return isinstance(keywords.get(name), ast.Constant) and keywords[name].value is True

            if owner == "torch" and node.func.attr == "load" and not is_true("weights_only"):
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
            if owner in ("np", "numpy") and node.func.attr == "load" and is_true("allow_pickle"):
                found.append(f"line {node.lineno}: numpy.load with allow_pickle=True")
            if node.func.attr == "read_pickle":
                found.append(f"line {node.lineno}: read_pickle")
    return found


def test_the_unpickling_check_catches_what_it_should() -> None:
    assert unsafe_loads("import torch\nx = torch.load(f, weights_only=True)\n") == []
    assert len(unsafe_loads("import pickle\nfrom dill import loads\n")) == 2
    assert len(unsafe_loads("torch.load(f)\ntorch.load(f, weights_only=False)\nnp.load(f, allow_pickle=True)\n")) == 3


def test_nothing_unpickles() -> None:
    sources = sorted((ROOT / "igcv2").rglob("*.py")) + sorted((ROOT / "service").rglob("*.py"))
    assert len(sources) > 10
    problems = [f"{path.relative_to(ROOT)} {p}" for path in sources for p in unsafe_loads(path.read_text())]
    assert not problems, problems
    mentions = [
        f"{path.relative_to(ROOT)}:{i}"
        for path in sources
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"torch\.load\(", line) and "weights_only=True" not in line
    ]
    assert not mentions, f"torch.load without weights_only=True on the same line: {mentions}"


def test_container_runs_as_non_root() -> None:
    lines = [line.strip() for line in (ROOT / "docker" / "Dockerfile").read_text().splitlines()]
    last_stage = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    users = [line.split(None, 1)[1] for line in lines[last_stage:] if line.upper().startswith("USER ")]
    assert users, "the runtime stage has no USER line: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]


@pytest.mark.parametrize("compose_file", ["docker-compose.yml", "docker-compose.cpu.yml"])
def test_compose_mounts_the_model_store_read_only(compose_file: str) -> None:
    service = yaml.safe_load((ROOT / compose_file).read_text())["services"]["igcv2"]
    store = service["environment"]["IGCV2_MODEL_STORE"]
    mounts = []
    for volume in service["volumes"]:
        if isinstance(volume, str):
            parts = re.sub(r"\$\{[^}]*\}", "SOURCE", volume).split(":")  # ${MODEL_DIR:-...} holds a colon
            target = parts[1] if len(parts) > 1 else parts[0]
            mounts.append((target, len(parts) > 2 and "ro" in parts[2].split(",")))
        else:
            mounts.append((volume["target"], bool(volume.get("read_only"))))
    assert (store, True) in mounts, f"{compose_file}: {store} not mounted read-only: {mounts}"


def test_kubernetes_pod_is_non_root_with_a_read_only_model_mount() -> None:
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "base" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    container = next(c for c in pod["containers"] if c["name"] == "igcv2")
    store = next(e["value"] for e in container["env"] if e["name"] == "IGCV2_MODEL_STORE")
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == store)
    assert mount.get("readOnly") is True


def test_store_models_come_only_from_the_store(layout: tuple[Path, Path]) -> None:
    """The fixture's layout is what the traversal test relies on: evil is loadable, outside the store."""
    store, outside = layout
    assert versions(outside / "evil") == [1] and not (store / "evil").exists()
