"""The Open Inference Protocol (/v2) against the real server, through the real third-party client
``tritonclient[http]``: metadata, readiness, inference with every input kind (JSON and binary
data), the classification extension, configuration, statistics and the model repository; and the
answers equal /classify's for the same Fashion-MNIST images."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from live_server import LiveServer, live_server
from samples import (
    DEFAULT_MODEL,
    SPARE,
    classify,
    fashion_pngs,
    fashion_test_images,
    probabilities,
    refusal,
    v2_store,
)

ADMIN_KEY = "v2-admin-secret"
N = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp_path = tmp_path_factory.mktemp("v2")
    env = {
        "IGCV2_MODEL_STORE": str(v2_store(tmp_path)),
        "IGCV2_MODELS": DEFAULT_MODEL,
        "IGCV2_COMPILE": "false",
        "IGCV2_ADMIN_KEY": ADMIN_KEY,
        "IGCV2_MAX_BATCH_SIZE": "8",
        "IGCV2_MAX_QUEUE_DELAY_MS": "150",  # long enough for two routes' requests to meet in one batch
        "IGCV2_MAX_IMAGES_PER_REQUEST": "16",
    }
    with live_server(tmp_path, env) as server:
        yield server


@pytest.fixture
def client(server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120.0) as client:
        yield client


def json_body(images: np.ndarray) -> dict:
    """A plain-JSON inference request for uint8 NHWC ``images`` (what curl would send)."""
    return {
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": list(images.shape), "data": images.ravel().tolist()}]
    }


def infer_input(name: str, array: np.ndarray, datatype: str, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def test_server_and_model_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "igcv2"
    assert {"binary_tensor_data", "classification", "model_repository", "statistics", "model_configuration"} <= set(
        metadata["extensions"]
    )

    model = client.get_model_metadata(DEFAULT_MODEL)
    version = model["versions"][-1]
    assert model["name"] == DEFAULT_MODEL and model["versions"] == [version]
    assert {t["name"]: (t["datatype"], t["shape"]) for t in model["inputs"]} == {
        "image": ("UINT8", [-1, 28, 28, 1]),
        "normalized": ("FP32", [-1, 1, 28, 28]),
        "encoded": ("BYTES", [-1, 1]),
    }
    assert {t["name"]: (t["datatype"], t["shape"]) for t in model["outputs"]} == {
        "probabilities": ("FP32", [-1, 10]),
        "logits": ("FP32", [-1, 10]),
    }
    assert client.get_model_metadata(DEFAULT_MODEL, version)["versions"] == [version]
    assert client.is_model_ready(DEFAULT_MODEL) and client.is_model_ready(DEFAULT_MODEL, version)
    assert not client.is_model_ready("no-such-model") and not client.is_model_ready(SPARE)
    assert not client.is_model_ready(DEFAULT_MODEL, "99")
    assert refusal(lambda: client.get_model_metadata("no-such-model"))[0] == "404"
    assert refusal(lambda: client.get_model_metadata(DEFAULT_MODEL, "99"))[0] == "404"
    assert refusal(lambda: client.get_model_metadata(DEFAULT_MODEL, "latest"))[0] == "404"

    config = client.get_model_config(DEFAULT_MODEL)
    assert config["name"] == DEFAULT_MODEL and config["max_batch_size"] == 8
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 150_000
    assert config["dynamic_batching"]["preferred_batch_size"] == [1, 2, 4, 8]
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("image", "TYPE_UINT8", [28, 28, 1]),
        ("normalized", "TYPE_FP32", [1, 28, 28]),
        ("encoded", "TYPE_STRING", [1]),
    ]
    assert [(o["name"], o["dims"]) for o in config["output"]] == [("probabilities", [10]), ("logits", [10])]
    assert config["instance_group"][0]["kind"] == "KIND_CPU"


def test_every_input_kind_equals_classify(server: LiveServer, client: triton.InferenceServerClient) -> None:
    images, _ = fashion_test_images(N)
    pngs = fashion_pngs(N)
    expected = probabilities(classify(server, pngs))
    parameters = client.get_model_config(DEFAULT_MODEL)["parameters"]
    mean, std = (np.array(json.loads(parameters[k]["string_value"]), np.float32) for k in ("mean", "std"))
    normalized = np.ascontiguousarray(((images.astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2))
    cases = [
        ("image", images, "UINT8"),
        ("normalized", normalized, "FP32"),
        ("encoded", np.array(pngs, dtype=object).reshape(N, 1), "BYTES"),
    ]
    for name, array, datatype in cases:
        for binary in (True, False):
            if datatype == "BYTES" and not binary:
                continue  # raw PNG bytes cannot travel as JSON strings: base64, below
            request_id = f"{name}-{'binary' if binary else 'json'}"
            result = client.infer(
                DEFAULT_MODEL,
                [infer_input(name, array, datatype, binary)],
                request_id=request_id,
                outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary)],
                request_compression_algorithm="gzip" if name == "image" and binary else None,
            )
            response = result.get_response()
            assert response["id"] == request_id and response["model_name"] == DEFAULT_MODEL
            got = result.as_numpy("probabilities")
            assert got.dtype == np.float32 and got.shape == (N, 10)
            np.testing.assert_allclose(got, expected, atol=2e-5, err_msg=request_id)

    body = {
        "inputs": [
            {
                "name": "encoded",
                "datatype": "BYTES",
                "shape": [N],
                "data": [base64.b64encode(png).decode() for png in pngs],
            }
        ]
    }
    response = httpx.post(f"{server.url}/v2/models/{DEFAULT_MODEL}/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert output["name"] == "probabilities" and output["shape"] == [N, 10]
    np.testing.assert_allclose(np.array(output["data"]).reshape(N, 10), expected, atol=2e-5)


def test_classification_extension_and_output_selection(
    server: LiveServer, client: triton.InferenceServerClient
) -> None:
    images, _ = fashion_test_images(N)
    expected = classify(server, fashion_pngs(N))
    labels = client.get_model_config(DEFAULT_MODEL)["parameters"]["labels"]["string_value"]
    outputs = [
        triton.InferRequestedOutput("probabilities", class_count=3),
        triton.InferRequestedOutput("logits", binary_data=False),
    ]
    result = client.infer(DEFAULT_MODEL, [infer_input("image", images, "UINT8", True)], outputs=outputs)
    top3 = result.as_numpy("probabilities")
    assert top3.shape == (N, 3)
    for row, want in zip(top3, expected, strict=True):
        parsed = [entry.decode().split(":", 2) for entry in row]
        assert [int(index) for _, index, _ in parsed] == [p["class_id"] for p in want["predictions"][:3]]
        assert [label for _, _, label in parsed] == [p["label"] for p in want["predictions"][:3]]
        assert all(label in labels for _, _, label in parsed)
        for (score, _, _), p in zip(parsed, want["predictions"], strict=False):
            assert len(score.split(".")[1]) == 6 and abs(float(score) - p["score"]) < 1e-5
    logits = result.as_numpy("logits")
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(softmax / softmax.sum(1, keepdims=True), probabilities(expected), atol=2e-5)

    only_logits = client.infer(
        DEFAULT_MODEL,
        [infer_input("image", images[:2], "UINT8", False)],
        outputs=[triton.InferRequestedOutput("logits")],
    )
    assert only_logits.as_numpy("probabilities") is None and only_logits.as_numpy("logits").shape == (2, 10)
    default = client.infer(DEFAULT_MODEL, [infer_input("image", images[:2], "UINT8", True)])  # no outputs named
    assert default.as_numpy("logits") is None and default.as_numpy("probabilities").shape == (2, 10)

    # The binary response, read by hand: Inference-Header-Content-Length splits JSON from data.
    inp = infer_input("image", images[:1], "UINT8", False)
    body, _ = triton.InferenceServerClient.generate_request_body([inp], [triton.InferRequestedOutput("logits")])
    response = httpx.post(f"{server.url}/v2/models/{DEFAULT_MODEL}/infer", content=body, timeout=60)
    header_length = int(response.headers["inference-header-content-length"])
    assert response.headers["content-type"] == "application/octet-stream"
    header = json.loads(response.content[:header_length])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 40 == len(response.content) - header_length
    np.testing.assert_allclose(np.frombuffer(response.content[header_length:], "<f4"), logits[0], atol=1e-5)


def test_protocol_errors(server: LiveServer, client: triton.InferenceServerClient) -> None:
    images, _ = fashion_test_images(2)
    cases = {
        "wrong datatype": ([infer_input("image", images.astype(np.float32), "FP32", True)], None, "400"),
        "wrong shape": ([infer_input("image", images.reshape(2, 1, 28, 28), "UINT8", True)], None, "400"),
        "no batch dimension": ([infer_input("image", images[0], "UINT8", False)], None, "400"),
        "unknown input": ([infer_input("INPUT__0", images, "UINT8", True)], None, "400"),
        "unknown output": (
            [infer_input("image", images, "UINT8", True)],
            [triton.InferRequestedOutput("OUTPUT__0")],
            "400",
        ),
        "undecodable image": (
            [infer_input("encoded", np.array([b"not a png"], dtype=object), "BYTES", True)],
            None,
            "400",
        ),
        "too many images": ([infer_input("image", np.repeat(images, 9, axis=0), "UINT8", True)], None, "413"),
    }
    for case, (inputs, outputs, status) in cases.items():
        assert refusal(lambda i=inputs, o=outputs: client.infer(DEFAULT_MODEL, i, outputs=o))[0] == status, case
    ok = [infer_input("image", images, "UINT8", True)]
    assert refusal(lambda: client.infer("no-such-model", ok))[0] == "404"
    assert refusal(lambda: client.infer(DEFAULT_MODEL, ok, model_version="99"))[0] == "404"
    assert refusal(lambda: client.infer(DEFAULT_MODEL, ok, timeout=1))[0] == "504"  # Triton's timeout, in µs

    response = httpx.post(f"{server.url}/v2/models/{DEFAULT_MODEL}/infer", content=b'{"inputs": [', timeout=30)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]
    # The header is checked before the values, which would be refused too (two elements, one a string).
    refused = {"image": (413, "17 images in one request; the limit is 16"), "bogus": (400, "unknown input 'bogus'")}
    for name, (status, message) in refused.items():
        tensor = {"name": name, "datatype": "UINT8", "shape": [17, 28, 28, 1], "data": [0, "not a number"]}
        response = httpx.post(f"{server.url}/v2/models/{DEFAULT_MODEL}/infer", json={"inputs": [tensor]}, timeout=30)
        assert response.status_code == status and response.json()["error"].startswith(message), response.text
    tensor = {"name": "image", "datatype": "UINT8", "shape": [2, 28, 28, 1], "data": [0, "not a number"]}
    response = httpx.post(f"{server.url}/v2/models/{DEFAULT_MODEL}/infer", json={"inputs": [tensor]}, timeout=30)
    assert response.status_code == 400 and "2 elements in 'data', shape [2, 28, 28, 1] needs 1568" in response.text
    response = httpx.post(
        f"{server.url}/v2/models/{DEFAULT_MODEL}/infer",
        content=b"{}",
        headers={"Inference-Header-Content-Length": "9"},
        timeout=30,
    )
    assert response.status_code == 400 and "Inference-Header-Content-Length" in response.json()["error"]


def test_v2_and_classify_share_batches(server: LiveServer) -> None:
    """One /classify image and one /v2 image sent together run in one batch of two."""
    images, _ = fashion_test_images(1)
    png = fashion_pngs(1)
    body = json_body(images)

    def stats() -> dict:
        return httpx.get(f"{server.url}/v2/models/{DEFAULT_MODEL}/stats", timeout=30).json()["model_stats"][0]

    def v2() -> int:
        return httpx.post(f"{server.url}/v2/models/{DEFAULT_MODEL}/infer", json=body, timeout=60).status_code

    shared = False
    with ThreadPoolExecutor(2) as pool:
        for _ in range(5):  # a loaded machine may delay one request past the 150 ms queue delay; retry
            before = stats()
            barrier = threading.Barrier(2)
            a = pool.submit(lambda wait=barrier.wait: (wait(), classify(server, png))[1])
            b = pool.submit(lambda wait=barrier.wait: (wait(), v2())[1])
            assert len(a.result()) == 1 and b.result() == 200
            after = stats()
            assert after["inference_count"] - before["inference_count"] == 2
            if after["execution_count"] - before["execution_count"] == 1:
                shared = True
                break
    assert shared, "the two routes' images never ran in one batch"


def test_statistics(server: LiveServer, client: triton.InferenceServerClient) -> None:
    images, _ = fashion_test_images(3)
    before = client.get_inference_statistics(DEFAULT_MODEL)["model_stats"][0]
    client.infer(DEFAULT_MODEL, [infer_input("image", images, "UINT8", True)])
    assert (
        refusal(lambda: client.infer(DEFAULT_MODEL, [infer_input("image", images, "UINT8", True)], timeout=1))[0]
        == "504"
    )
    stats = client.get_inference_statistics(DEFAULT_MODEL)["model_stats"]
    assert len(stats) == 1
    after = stats[0]
    assert after["name"] == DEFAULT_MODEL
    assert after["version"] == client.get_model_metadata(DEFAULT_MODEL)["versions"][0]
    inference, previous = after["inference_stats"], before["inference_stats"]
    assert inference["success"]["count"] == previous["success"]["count"] + 1
    assert inference["fail"]["count"] == previous["fail"]["count"] + 1
    assert after["inference_count"] >= before["inference_count"] + 3
    for key in ("success", "queue", "compute_infer"):
        assert inference[key]["ns"] > previous[key]["ns"], key
    assert inference["queue"]["count"] == inference["compute_infer"]["count"] == inference["success"]["count"]
    assert sum(b["compute_infer"]["count"] for b in after["batch_stats"]) == after["execution_count"]
    assert after["last_inference"] > 0
    everything = client.get_inference_statistics()["model_stats"]
    assert [s["name"] for s in everything] == [DEFAULT_MODEL]
    assert refusal(lambda: client.get_inference_statistics("no-such-model"))[0] == "404"


def test_repository_load_and_unload_with_the_admin_key(
    server: LiveServer, client: triton.InferenceServerClient
) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    index = {(e["name"], e["state"]) for e in client.get_model_repository_index()}
    assert index == {(DEFAULT_MODEL, "READY"), (SPARE, "UNAVAILABLE")}
    assert refusal(lambda: client.load_model(SPARE))[0] == "401"
    assert refusal(lambda: client.load_model(SPARE, headers={"Authorization": "Bearer nope"}))[0] == "403"
    assert refusal(lambda: client.unload_model(DEFAULT_MODEL))[0] == "401"
    assert refusal(lambda: client.load_model("no-such-model", headers=admin))[0] == "404"

    # The default model keeps answering while the spare loads and unloads (its queue is its own).
    images, _ = fashion_test_images(2)
    body = json_body(images)
    stop = threading.Event()

    def keep_asking() -> list[int]:
        codes = []
        with server.client() as http:
            while not stop.is_set() or not codes:
                codes.append(http.post(f"/v2/models/{DEFAULT_MODEL}/infer", json=body).status_code)
        return codes

    with ThreadPoolExecutor(2) as pool:
        background = [pool.submit(keep_asking) for _ in range(2)]
        try:
            client.load_model(SPARE, headers=admin)
            assert client.is_model_ready(SPARE)
            result = client.infer(SPARE, [infer_input("image", images, "UINT8", True)])
            assert result.as_numpy("probabilities").shape == (2, 10)
            ready = httpx.post(f"{server.url}/v2/repository/index", json={"ready": True}, timeout=30).json()
            assert {e["name"] for e in ready} == {DEFAULT_MODEL, SPARE}
            client.unload_model(SPARE, headers=admin)
        finally:
            stop.set()
        codes = [code for future in background for code in future.result()]
    assert codes and set(codes) == {200}, codes
    assert not client.is_model_ready(SPARE) and client.is_model_ready(DEFAULT_MODEL)
    assert refusal(lambda: client.infer(SPARE, [infer_input("image", images, "UINT8", True)]))[0] == "404"
    assert {(e["name"], e["state"]) for e in client.get_model_repository_index()} == index
    client.unload_model(SPARE, headers=admin)  # not loaded: nothing to do, as in Triton
    assert refusal(lambda: client.unload_model("no-such-model", headers=admin))[0] == "404"


def test_api_key_without_admin_key(tmp_path: Path) -> None:
    """With only IGCV2_API_KEY set, /v2 needs it (health excepted) and load/unload need nothing more."""
    env = {
        "IGCV2_MODEL_STORE": str(v2_store(tmp_path)),
        "IGCV2_MODELS": DEFAULT_MODEL,
        "IGCV2_COMPILE": "false",
        "IGCV2_API_KEY": "user-key",
    }
    key = {"Authorization": "Bearer user-key"}
    with (
        live_server(tmp_path, env) as server,
        triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120.0) as client,
    ):
        assert client.is_server_live() and client.is_server_ready()  # open paths
        assert refusal(lambda: client.get_server_metadata())[0] == "401"
        assert client.get_server_metadata(headers=key)["name"] == "igcv2"
        client.load_model(SPARE, headers=key)
        images, _ = fashion_test_images(1)
        result = client.infer(SPARE, [infer_input("image", images, "UINT8", True)], headers=key)
        assert result.as_numpy("probabilities").shape == (1, 10)
        client.unload_model(SPARE, headers=key)
        assert not client.is_model_ready(SPARE, headers=key)
