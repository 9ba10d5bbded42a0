"""Faults in the model store: broken artifacts are reported, never served, and never take the
healthy model down with them.

The store is built in tmp_path: the default model (healthy) beside copies damaged in each way an
artifact can break: unreadable weights, a checksum mismatch, config.json that is not JSON or not
the contract, and weights that do not fit the architecture the config names.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2e.reliability import assert_serving, error_message, fast_env
from live_server import LiveServer, live_server
from samples import DEFAULT_MODEL, default_model_store, fashion_pngs, multipart

from igcv2.artifact import CONFIG_FILE, WEIGHTS_FILE, save_artifact, sha256_file, versions
from igcv2.data import FASHION_MNIST_LABELS
from igcv2.networks import build

# model name -> what /models and the log must say about it
BROKEN = {
    "corrupt-weights": "not a readable safetensors file",
    "checksum-mismatch": "checksum mismatch",
    "config-not-json": "is not valid JSON",
    "config-off-contract": "is invalid",
    "weights-misfit": "does not fit architecture",
}


def save(store: Path, name: str, num_classes: int = 10, version: int | None = None) -> Path:
    return save_artifact(
        build("igcv2_fashion", num_classes=num_classes),
        store / name,
        name=name,
        version=version,
        architecture={"builder": "igcv2_fashion", "kwargs": {"num_classes": num_classes}},
        labels=FASHION_MNIST_LABELS[:num_classes],
        input_spec={"height": 28, "width": 28, "channels": 1, "mean": [0.286], "std": [0.353]},
        untrained=True,
    )


def edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / CONFIG_FILE).read_text())
    (path / CONFIG_FILE).write_text(json.dumps(config | changes))


def broken_store(root: Path) -> Path:
    """The healthy default model as v1, a corrupt v2 of it (for the control route), and BROKEN."""
    source = default_model_store(root / "source")
    store = root / "store"
    good = source / DEFAULT_MODEL / str(versions(source / DEFAULT_MODEL)[-1])
    shutil.copytree(good, store / DEFAULT_MODEL / "1")  # copied: the real store is never touched
    edit_config(store / DEFAULT_MODEL / "1", version=1)

    def corrupt_weights(path: Path) -> None:  # garbage with a matching checksum: the parse must fail
        (path / WEIGHTS_FILE).write_bytes(b"\xff" * 64 + b"not safetensors" * 100)
        edit_config(path, weights_sha256=sha256_file(path / WEIGHTS_FILE))

    corrupt_weights(save(store, DEFAULT_MODEL, version=2))
    corrupt_weights(save(store, "corrupt-weights"))
    path = save(store, "checksum-mismatch")
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF  # one bit of one weight: still a valid safetensors file
    (path / WEIGHTS_FILE).write_bytes(bytes(data))
    path = save(store, "config-not-json")
    (path / CONFIG_FILE).write_text((path / CONFIG_FILE).read_text()[:-20])
    path = save(store, "config-off-contract")
    edit_config(path, labels=[], input={"height": 28, "width": 28, "channels": 2, "mean": [0], "std": [1]})
    path = save(store, "weights-misfit", num_classes=5)  # weights of a 5-class head...
    edit_config(path, architecture={"builder": "igcv2_fashion", "kwargs": {}}, labels=FASHION_MNIST_LABELS)
    return store  # ...under a config that builds the 10-class network


def settled(server: LiveServer, timeout: float = 180.0) -> list[dict]:
    """/models once no configured version is still loading."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        models = httpx.get(server.url + "/models", timeout=30).json()["models"]
        if models and all(m["state"] != "loading" for m in models):
            return models
        time.sleep(0.2)
    raise TimeoutError(f"models still loading after {timeout}s:\n{server.log()[-3000:]}")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return broken_store(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    configured = ",".join([f"{DEFAULT_MODEL}:1", *BROKEN])
    with live_server(
        tmp_path_factory.mktemp("faults-server"), fast_env(store, models=configured), ready=False
    ) as running:
        settled(running)
        yield running


def test_broken_models_are_reported_not_ready_with_the_reason(server: LiveServer) -> None:
    models = {m["name"]: m for m in settled(server)}
    assert set(models) == {DEFAULT_MODEL, *BROKEN}
    assert models[DEFAULT_MODEL]["state"] == "ready" and models[DEFAULT_MODEL]["version"] == 1
    for name, reason in BROKEN.items():
        model = models[name]
        assert model["state"] == "failed" and model["ready"] is False, model
        assert reason in model["reason"], f"{name}: {model['reason']}"
        detail = httpx.get(f"{server.url}/models/{name}").json()["versions"][0]
        assert detail["state"] == "failed" and reason in detail["reason"]
    log = server.log()
    for name, reason in BROKEN.items():
        lines = [line for line in log.splitlines() if f"{name} v1 NOT loaded" in line]
        assert lines and reason in lines[0], f"log does not name the reason for {name}"


def test_readiness_reflects_the_configured_broken_models(server: LiveServer) -> None:
    response = httpx.get(server.url + "/health/ready")
    message = error_message(response, 503)
    for name in BROKEN:
        assert f"{name} v1 failed" in message, message


def test_healthy_model_serves_and_broken_ones_answer_503(server: LiveServer) -> None:
    assert_serving(server)
    for name, reason in BROKEN.items():
        response = httpx.post(server.url + "/classify", params={"model": name}, files=multipart(fashion_pngs(1)))
        message = error_message(response, 503)
        assert int(response.headers["retry-after"]) >= 1
        assert name in message and reason in message, message


def test_loading_a_broken_version_fails_and_keeps_the_served_one(server: LiveServer) -> None:
    """POST /v2/repository/models/{name}/load picks the newest version (v2, corrupt): it must fail
    with the reason and leave v1 serving."""
    response = httpx.post(f"{server.url}/v2/repository/models/{DEFAULT_MODEL}/load", timeout=120)
    message = error_message(response, 400, 409, 422)
    assert "not a readable safetensors file" in message and f"{DEFAULT_MODEL}/2" in message, message
    answer = httpx.post(server.url + "/classify", files=multipart(fashion_pngs(1)), timeout=60)
    assert answer.status_code == 200 and answer.json()["version"] == 1, answer.text
    versions_listed = {m["version"]: m["state"] for m in settled(server) if m["name"] == DEFAULT_MODEL}
    assert versions_listed == {1: "ready"}, versions_listed


def test_only_healthy_models_configured_is_ready(store: Path, tmp_path: Path) -> None:
    with live_server(tmp_path, fast_env(store, models=f"{DEFAULT_MODEL}:1")) as healthy:  # waits for 200
        body = httpx.get(healthy.url + "/health/ready").json()
        assert body["status"] == "ready"
        assert [(m["name"], m["state"]) for m in body["models"]] == [(DEFAULT_MODEL, "ready")]
        assert_serving(healthy)
