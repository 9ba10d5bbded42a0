"""POST /classify against the real server on loopback: correctness, batching, every documented error."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from live_server import LiveServer, live_server
from prometheus_client.parser import text_string_to_metric_families
from samples import (
    DEFAULT_MODEL,
    assert_matches_offline,
    default_model_store,
    encode,
    fashion_pngs,
    multipart,
    offline_probabilities,
)

N_IMAGES = 1000


def classify_all(server: LiveServer, pngs: list[bytes], per_request: int, concurrency: int) -> list[dict]:
    """Send ``pngs`` in requests of ``per_request`` images, ``concurrency`` at a time; results in order."""
    chunks = [pngs[i : i + per_request] for i in range(0, len(pngs), per_request)]
    with server.client() as client, ThreadPoolExecutor(concurrency) as pool:

        def send(chunk: list[bytes]) -> list[dict]:
            response = client.post("/classify", params={"top_k": 10}, files=multipart(chunk))
            assert response.status_code == 200, response.text
            return response.json()["results"]

        return [result for results in pool.map(send, chunks) for result in results]


def batch_histogram(server: LiveServer) -> dict[str, float]:
    """igcv2_batch_size bucket counts of the default model, as the server reports them."""
    text = httpx.get(server.url + "/metrics").text
    return {
        sample.labels["le"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "igcv2_batch_size"
        for sample in family.samples
        if sample.name == "igcv2_batch_size_bucket" and sample.labels["model"] == DEFAULT_MODEL
    }


@pytest.mark.timeout(1500)  # a cold inductor cache compiles each bucket on two cores
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_served_predictions_equal_offline(tmp_path: Path, compiled: bool) -> None:
    store = default_model_store(tmp_path)
    expected = offline_probabilities(store, N_IMAGES)
    env = {"IGCV2_MODEL_STORE": str(store), "IGCV2_COMPILE": str(compiled).lower(), "IGCV2_MAX_BATCH_SIZE": "4"}
    with live_server(tmp_path, env, timeout=1400) as server:
        results = classify_all(server, fashion_pngs(N_IMAGES), per_request=5, concurrency=4)
        models = httpx.get(server.url + "/models").json()["models"]
    assert_matches_offline(results, expected)
    assert models[0]["compiled"] is compiled
    for result in results:
        ids = [p["class_id"] for p in result["predictions"]]
        scores = [p["score"] for p in result["predictions"]]
        assert sorted(ids) == list(range(10)) and scores == sorted(scores, reverse=True)


@pytest.fixture(scope="module")
def eager_server(tmp_path_factory: pytest.TempPathFactory):
    tmp_path = tmp_path_factory.mktemp("classify")
    env = {
        "IGCV2_MODEL_STORE": str(default_model_store(tmp_path)),
        "IGCV2_COMPILE": "false",
        "IGCV2_MAX_BATCH_SIZE": "16",
        "IGCV2_MAX_IMAGES_PER_REQUEST": "12",
        "IGCV2_MAX_QUEUE_SIZE": "10",
        "IGCV2_MAX_IMAGE_PIXELS": "1000000",
        "IGCV2_MAX_BODY_BYTES": "2000000",
    }
    with live_server(tmp_path, env) as server:
        yield server


def test_one_request_at_a_time_runs_batches_of_one(eager_server: LiveServer) -> None:
    before = batch_histogram(eager_server)
    with eager_server.client() as client:
        for png in fashion_pngs(20):
            assert client.post("/classify", files=multipart([png])).status_code == 200
    after = batch_histogram(eager_server)
    assert after["+Inf"] - before.get("+Inf", 0) == 20
    assert after["1.0"] - before.get("1.0", 0) == 20, "a lone request must not wait for company"


def test_concurrent_load_forms_batches(eager_server: LiveServer) -> None:
    before = batch_histogram(eager_server)
    pngs = fashion_pngs(64)
    with eager_server.client() as client, ThreadPoolExecutor(8) as pool:  # 8 in flight < queue bound 10

        def send(png: bytes) -> int:
            return client.post("/classify", files=multipart([png])).status_code

        codes = list(pool.map(send, pngs * 4))
    assert codes == [200] * len(codes)
    after = batch_histogram(eager_server)
    batches = after["+Inf"] - before.get("+Inf", 0)
    singles = after["1.0"] - before.get("1.0", 0)
    assert batches < len(codes), "every image ran alone: no batching happened"
    assert singles < batches


def test_raw_image_body(eager_server: LiveServer) -> None:
    png = fashion_pngs(1)[0]
    response = httpx.post(eager_server.url + "/classify?top_k=3", content=png, headers={"content-type": "image/png"})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == DEFAULT_MODEL and body["version"] >= 1
    assert len(body["results"]) == 1 and len(body["results"][0]["predictions"]) == 3


def big_png(side: int) -> bytes:
    return encode(np.full((side, side, 1), 128, np.uint8))


ERROR_CASES = {
    "corrupt bytes": ({"files": [("file", ("a.png", b"\x89PNG\r\n\x1a\n garbage", "image/png"))]}, {}, 400),
    "truncated png": ({"files": [("file", ("t.png", fashion_pngs(1)[0][:60], "image/png"))]}, {}, 400),
    "text file": ({"files": [("file", ("a.txt", b"hello, world", "text/plain"))]}, {}, 415),
    "text declared as image": ({"files": [("file", ("a.png", b"hello, world", "image/png"))]}, {}, 400),
    "json body": ({"content": b"{}", "headers": {"content-type": "application/json"}}, {}, 415),
    "no file part": ({"files": [("image", ("a.png", fashion_pngs(1)[0], "image/png"))]}, {}, 400),
    "form without files": ({"data": {"x": "1"}}, {}, 415),
    "unknown model": ({"files": multipart(fashion_pngs(1))}, {"model": "no-such-model"}, 404),
    "path traversal": ({"files": multipart(fashion_pngs(1))}, {"model": "../model_store"}, 404),
    "unknown version": ({"files": multipart(fashion_pngs(1))}, {"version": 999}, 404),
    "bad version": ({"files": multipart(fashion_pngs(1))}, {"version": "one"}, 422),
    "top_k zero": ({"files": multipart(fashion_pngs(1))}, {"top_k": 0}, 422),
    "top_k above classes": ({"files": multipart(fashion_pngs(1))}, {"top_k": 11}, 422),
    "too many images": ({"files": multipart(fashion_pngs(13))}, {}, 413),
    "too many pixels": ({"files": multipart([big_png(1100)])}, {}, 413),
    "body over limit": ({"content": b"\0" * 2_100_000, "headers": {"content-type": "image/png"}}, {}, 413),
    "more images than the queue holds": ({"files": multipart(fashion_pngs(11))}, {}, 413),  # no retry would help
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_documented_errors(eager_server: LiveServer, case: str) -> None:
    kwargs, params, status = ERROR_CASES[case]
    with eager_server.client() as client:
        response = client.post("/classify", params=params, **kwargs)
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/json"
        message = response.json()["error"]
        assert isinstance(message, str) and len(message) > 10
        if status == 503:
            assert int(response.headers["retry-after"]) >= 1
        good = client.post("/classify", files=multipart(fashion_pngs(1)))
        assert good.status_code == 200, "the server must keep serving after an error"


def test_expired_deadline_is_504_and_never_computed(eager_server: LiveServer) -> None:
    before = batch_histogram(eager_server)["+Inf"]
    with eager_server.client() as client:
        response = client.post("/classify", files=multipart(fashion_pngs(2)), headers={"X-Request-Timeout": "1e-9"})
        assert response.status_code == 504
        assert "deadline" in response.json()["error"]
        metrics = client.get("/metrics").text
    assert batch_histogram(eager_server)["+Inf"] == before, "an expired request reached the model"
    assert re.search(r'igcv2_rejected_images_total\{[^}]*reason="deadline"[^}]*\} [1-9]', metrics)
    assert re.search(r'igcv2_requests_total\{code="504",endpoint="/classify",model="igcv2-fashion"\} [1-9]', metrics)


def test_models_and_health_routes(eager_server: LiveServer) -> None:
    with eager_server.client() as client:
        assert client.get("/health/live").json()["status"] == "live"
        assert client.get("/health/ready").status_code == 200
        listing = client.get("/models").json()
        assert listing["default_model"] == DEFAULT_MODEL
        detail = client.get(f"/models/{DEFAULT_MODEL}").json()
        assert detail["versions"][0]["labels"][7] == "Sneaker"
        assert detail["versions"][0]["input"]["height"] == 28
        assert client.get("/models/nope").status_code == 404
        assert client.get("/docs").status_code == 200
        assert "/classify" in client.get("/openapi.json").json()["paths"]
