"""Real inputs for the tests: Fashion-MNIST test images as PNG, and the model store to serve."""

from __future__ import annotations

import io
import shutil
from functools import cache
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from live_server import MODEL_STORE, LiveServer
from PIL import Image
from tritonclient.utils import InferenceServerException

from igcv2.artifact import load_artifact, read_config, save_artifact, versions
from igcv2.data import FASHION_MNIST_LABELS, load_dataset
from igcv2.evaluate import predict_logits
from igcv2.networks import Normalized, build

DEFAULT_MODEL = "igcv2-fashion"
SPARE = "igcv2-spare"  # in v2_store(), not loaded at start: the repository tests load and unload it


@cache
def fashion_test_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` Fashion-MNIST test images (uint8 NHWC) and labels."""
    data = load_dataset("fashion-mnist", "test").subset(n)
    return data.images, data.labels


def encode(image: np.ndarray, fmt: str = "PNG", **save_args: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def fashion_pngs(n: int) -> list[bytes]:
    return [encode(image) for image in fashion_test_images(n)[0]]


def multipart(images: list[bytes], content_type: str = "image/png") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (f"img{i}.png", data, content_type)) for i, data in enumerate(images)]


def offline_probabilities(store: Path, n: int) -> np.ndarray:
    """Float32 probabilities of the served artifact, computed in-process without the service."""
    path = store / DEFAULT_MODEL / str(versions(store / DEFAULT_MODEL)[-1])
    artifact = load_artifact(path)
    spec = artifact.config.input
    logits = predict_logits(Normalized(artifact.model, spec.mean, spec.std), fashion_test_images(n)[0])
    return torch.softmax(logits.double(), 1).numpy()


def assert_matches_offline(results: list[dict], expected: np.ndarray) -> None:
    assert len(results) == len(expected)
    for i, result in enumerate(results):
        predictions = result["predictions"]
        assert next(p["class_id"] for p in predictions) == int(expected[i].argmax()), f"image {i}"
        for p in predictions:
            assert abs(p["score"] - expected[i][p["class_id"]]) < 1e-4, f"image {i} class {p['class_id']}"


def default_model_store(tmp_path: Path) -> Path:
    """The bundled store when it holds the default model; else an untrained model of the same
    shape (for a checkout whose model is still training: serving behaviour does not need accuracy)."""
    if versions(MODEL_STORE / DEFAULT_MODEL):
        return MODEL_STORE
    store = tmp_path / "model_store"
    save_artifact(
        build("igcv2_fashion"),
        store / DEFAULT_MODEL,
        name=DEFAULT_MODEL,
        architecture={"builder": "igcv2_fashion", "kwargs": {}},
        labels=FASHION_MNIST_LABELS,
        input_spec={"height": 28, "width": 28, "channels": 1, "mean": [0.286], "std": [0.353]},
        untrained=True,
    )
    return store


def v2_store(tmp_path: Path) -> Path:
    """The default model (its newest version, copied) and an untrained spare of the same shape."""
    source = default_model_store(tmp_path / "source")
    latest = versions(source / DEFAULT_MODEL)[-1]
    store = tmp_path / "store"
    shutil.copytree(source / DEFAULT_MODEL / str(latest), store / DEFAULT_MODEL / str(latest))
    config = read_config(store / DEFAULT_MODEL / str(latest))
    save_artifact(
        build("igcv2_fashion"),
        store / SPARE,
        name=SPARE,
        architecture={"builder": "igcv2_fashion"},
        labels=config.labels,
        input_spec=config.input.model_dump(),
        untrained=True,
    )
    return store


def classify(server: LiveServer, pngs: list[bytes]) -> list[dict]:
    """/classify's results for ``pngs``, every class scored (top_k 10)."""
    response = httpx.post(server.url + "/classify", params={"top_k": 10}, files=multipart(pngs), timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def probabilities(results: list[dict]) -> np.ndarray:
    """/classify's results as an (images, 10) array of probabilities."""
    out = np.zeros((len(results), 10))
    for i, result in enumerate(results):
        for p in result["predictions"]:
            out[i, p["class_id"]] = p["score"]
    return out


def refusal(call: object) -> tuple[str, str]:
    """(status, message) of the InferenceServerException a tritonclient ``call`` raises (HTTP or gRPC)."""
    with pytest.raises(InferenceServerException) as caught:
        call()  # type: ignore[operator]
    return caught.value.status(), caught.value.message()
