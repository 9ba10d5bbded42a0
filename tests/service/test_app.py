"""The app in-process (TestClient / httpx ASGI transport): API key, body limit, error bodies, draining, metrics labels.

End-to-end behaviour over a real socket lives in tests/e2e; these tests reach what a socket test cannot
see directly: how a streamed body is cut off, and which labels each answer is counted under.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from samples import DEFAULT_MODEL, default_model_store, fashion_pngs, multipart

from igcv2.artifact import CONFIG_FILE, WEIGHTS_FILE, save_artifact, versions
from igcv2.networks import build
from service.api.middleware import classify_target
from service.app import create_app
from service.config import Settings

torch.set_num_threads(1)
KEY = "unit-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 16 * 1024
READY_TIMEOUT_S = 180


def app_settings(store: Path, **kwargs: Any) -> Settings:
    values: dict[str, Any] = {
        "model_store": store,
        "models": DEFAULT_MODEL,
        "compile": False,
        "max_batch_size": 4,
        "max_images_per_request": 4,
        "max_body_bytes": BODY_LIMIT,
        **kwargs,
    }
    return Settings(_env_file=None, **values)


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[None]:
    """Run the app's lifespan on the current loop (the ASGI transport does not) until its models are ready."""
    async with app.router.lifespan_context(app):
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not app.state.registry.is_ready():
            assert time.monotonic() < deadline, "models did not become ready"
            await asyncio.sleep(0.05)
        yield


def hold_model(app: FastAPI) -> threading.Event:
    """Make the default model's instances wait, before each batch, until the returned event is set."""
    release = threading.Event()
    for runner in app.state.registry.resolve(DEFAULT_MODEL).runners:

        def held(inputs: list[Any], run: Callable[[list[Any]], Any] = runner.run) -> Any:
            release.wait(30)
            return run(inputs)

        runner.run = held  # type: ignore[method-assign]
    return release


def wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while client.get("/health/ready").status_code != 200:
        assert time.monotonic() < deadline, client.get("/health/ready").text
        time.sleep(0.05)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return default_model_store(tmp_path_factory.mktemp("app"))


@pytest.fixture(scope="module")
def client(store: Path) -> Iterator[TestClient]:
    """The service with an API key and a small body limit, models loaded (lifespan ran)."""
    with TestClient(create_app(app_settings(store, api_key=KEY))) as test_client:
        wait_ready(test_client)
        yield test_client


def requests_total(endpoint: str, model: str, code: int) -> float:
    labels = {"endpoint": endpoint, "model": model, "code": str(code)}
    return REGISTRY.get_sample_value("igcv2_requests_total", labels) or 0.0


def duration_count(endpoint: str, model: str, code: int) -> float:
    labels = {"endpoint": endpoint, "model": model, "code": str(code)}
    return REGISTRY.get_sample_value("igcv2_request_duration_seconds_count", labels) or 0.0


def assert_error(response: httpx.Response, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) >= {"error"} and isinstance(body["error"], str) and body["error"]
    for fragment in fragments:
        assert fragment in body["error"], body["error"]
    return body["error"]


# ----- API key -----


@pytest.mark.parametrize("path", ["/health/live", "/health/ready", "/metrics"])
def test_health_and_metrics_need_no_key(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/classify"),
        ("GET", "/models"),
        ("GET", f"/models/{DEFAULT_MODEL}"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/no/such/route"),
        ("GET", "/metricsx"),
        ("GET", "/metrics/x"),
    ],
)
def test_every_other_route_needs_the_key(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path)
    assert_error(response, 401, "API key")
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "header", [f"Bearer {KEY}x", "Bearer wrong", f"Basic {KEY}", KEY, "Bearer ", f"{KEY} Bearer", f"Bearer {KEY[:-1]}"]
)
def test_wrong_credentials_are_refused(client: TestClient, header: str) -> None:
    assert_error(client.get("/models", headers={"Authorization": header}), 401)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_key_opens_every_route(client: TestClient, scheme: str) -> None:
    headers = {"Authorization": f"{scheme} {KEY}"}
    assert client.get("/models", headers=headers).json()["models"][0]["name"] == DEFAULT_MODEL
    assert client.get("/docs", headers=headers).status_code == 200
    response = client.post("/classify", params={"top_k": 3}, files=multipart(fashion_pngs(2)), headers=headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == DEFAULT_MODEL
    assert [len(r["predictions"]) for r in body["results"]] == [3, 3]


def test_key_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IGCV2_API_KEY", "from-env")
    monkeypatch.setenv("IGCV2_MODEL_STORE", str(tmp_path))
    unstarted = TestClient(create_app(Settings(_env_file=None)))  # no lifespan: no models, routes still answer
    assert_error(unstarted.get("/models", headers=AUTH), 401)
    assert unstarted.get("/models", headers={"Authorization": "Bearer from-env"}).json()["models"] == []
    assert unstarted.get("/health/live").status_code == 200


def test_no_key_configured_means_open(store: Path) -> None:
    app = create_app(app_settings(store))
    with TestClient(app) as open_client:  # models need not be ready for this
        assert open_client.get("/models").status_code == 200


# ----- body limit -----


def test_declared_content_length_over_the_limit_is_413_before_reading(client: TestClient) -> None:
    before = requests_total("/classify", DEFAULT_MODEL, 413)
    response = client.post("/classify", content=b"\0" * (BODY_LIMIT + 1), headers={**AUTH, "content-type": "image/png"})
    assert_error(response, 413, f"{BODY_LIMIT + 1} bytes", str(BODY_LIMIT))
    assert requests_total("/classify", DEFAULT_MODEL, 413) == before + 1  # counted under its route


def test_chunked_body_without_content_length_over_the_limit_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(BODY_LIMIT // 1024 + 2):
            yield b"\0" * 1024

    response = client.post("/classify", content=chunks(), headers={**AUTH, "content-type": "image/png"})
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "exceeds the limit")


def test_multipart_over_the_limit_is_413(client: TestClient) -> None:
    big = [("file", ("big.png", b"\0" * (BODY_LIMIT + 10), "image/png"))]
    assert_error(client.post("/classify", files=big, headers=AUTH), 413)


def test_chunked_body_is_cut_off_while_streaming(store: Path) -> None:
    """Over the ASGI transport each chunk is its own message: the server stops pulling chunks once
    the body passes the limit (it never buffers the whole body), and a chunked body under the limit
    is served."""
    app = create_app(app_settings(store, api_key=KEY))
    png = fashion_pngs(1)[0]

    async def main() -> None:
        async with running(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                pulled = 0
                total = 100

                async def big() -> AsyncIterator[bytes]:
                    nonlocal pulled
                    for _ in range(total):
                        pulled += 1
                        yield b"\0" * 1024

                response = await http.post("/classify", content=big(), headers={**AUTH, "content-type": "image/png"})
                assert_error(response, 413, "exceeds the limit")
                assert pulled <= BODY_LIMIT // 1024 + 2 < total, f"pulled {pulled} of {total} chunks"

                async def small() -> AsyncIterator[bytes]:
                    for i in range(0, len(png), 100):
                        yield png[i : i + 100]

                response = await http.post("/classify", content=small(), headers={**AUTH, "content-type": "image/png"})
                assert response.status_code == 200, response.text

    asyncio.run(main())


# ----- error bodies -----


@pytest.mark.parametrize(
    ("params", "headers", "status", "fragment"),
    [
        ({"top_k": 0}, {}, 422, "top_k"),
        ({"top_k": "many"}, {}, 422, "top_k"),
        ({"version": 0}, {}, 422, "version"),
        ({}, {"X-Request-Timeout": "soon"}, 422, "x-request-timeout"),
        ({}, {"X-Request-Timeout": "0"}, 422, "x-request-timeout"),
        ({"model": "no-such-model"}, {}, 404, "no-such-model"),
    ],
)
def test_bad_parameters_are_json_errors(
    client: TestClient, params: dict[str, Any], headers: dict[str, str], status: int, fragment: str
) -> None:
    response = client.post("/classify", params=params, files=multipart(fashion_pngs(1)), headers={**AUTH, **headers})
    assert_error(response, status, fragment)


def test_unknown_route_and_wrong_method_are_json_errors(client: TestClient) -> None:
    assert_error(client.get("/no/such/route", headers=AUTH), 404)
    assert_error(client.get("/classify", headers=AUTH), 405)


def test_too_many_images_is_413(client: TestClient) -> None:
    assert_error(client.post("/classify", files=multipart(fashion_pngs(5)), headers=AUTH), 413, "limit is 4")


# ----- draining -----


def test_draining_refuses_new_work_but_stays_live(client: TestClient) -> None:
    before = requests_total("/classify", DEFAULT_MODEL, 503)
    client.app.state.draining = True  # type: ignore[attr-defined]
    try:
        response = client.post("/classify", files=multipart(fashion_pngs(1)), headers=AUTH)
        assert_error(response, 503, "shutting down")
        assert requests_total("/classify", DEFAULT_MODEL, 503) == before + 1
        assert response.headers["retry-after"] == "1"
        assert client.get("/health/live").status_code == 200
        not_ready = client.get("/health/ready")
        assert_error(not_ready, 503, "draining")
        assert not_ready.headers["retry-after"] == "1"
    finally:
        client.app.state.draining = False  # type: ignore[attr-defined]
    assert client.post("/classify", files=multipart(fashion_pngs(1)), headers=AUTH).status_code == 200


# ----- load shedding -----


def test_a_lifespan_left_by_an_error_answers_what_is_queued_without_computing_it(store: Path) -> None:
    """Cancelled (a forced exit) or failed, the lifespan stops at once: queued and computing images get
    503 instead of the drain a normal shutdown does (up to IGCV2_SHUTDOWN_TIMEOUT_S)."""
    app = create_app(app_settings(store, max_batch_size=1, shutdown_timeout_s=60))

    async def scenario() -> tuple[list[httpx.Response], float]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            posts: list[asyncio.Future[httpx.Response]] = []
            try:
                async with running(app):
                    served = app.state.registry.resolve(DEFAULT_MODEL)
                    release = hold_model(app)  # one image computing (held), two queued
                    posts += [
                        asyncio.ensure_future(
                            client.post("/classify", content=png, headers={"content-type": "image/png"})
                        )
                        for png in fashion_pngs(3)
                    ]
                    deadline = time.monotonic() + 10
                    while served.batcher.depth != 2:
                        assert time.monotonic() < deadline, f"queue depth {served.batcher.depth}, expected 2"
                        await asyncio.sleep(0.01)
                    threading.Timer(0.5, release.set).start()  # the held batch ends; nothing after it runs
                    left = time.monotonic()
                    raise RuntimeError("the lifespan is left by an error")
            except RuntimeError:
                pass
            answers = await asyncio.wait_for(asyncio.gather(*posts), 30)
            return answers, time.monotonic() - left

    answers, took = asyncio.run(scenario())
    assert [a.status_code for a in answers] == [503, 503, 503], [a.text for a in answers]
    assert all("shut down before this image was computed" in a.json()["error"] for a in answers)
    assert took < 10


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/classify", b""),
        ("/classify", f"model={DEFAULT_MODEL}&version=1&top_k=3".encode()),
        (f"/v2/models/{DEFAULT_MODEL}/infer", b""),
        (f"/v2/models/{DEFAULT_MODEL}/versions/1/infer", b""),
    ],
)
def test_a_full_queue_is_refused_before_its_body_is_read(store: Path, path: str, query: bytes) -> None:
    """When not one more image fits, the 503 comes before the body is read or the request enters
    FastAPI at all; what was already queued still completes."""
    app = create_app(app_settings(store, max_queue_size=2, max_batch_size=1, max_queue_delay_ms=0))
    png = fashion_pngs(1)[0]
    headers = [(b"host", b"test"), (b"content-type", b"image/png"), (b"content-length", str(len(png)).encode())]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }
    body_reads: list[int] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        body_reads.append(1)
        return {"type": "http.request", "body": png, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def scenario() -> list[int]:
        async with running(app):
            served = app.state.registry.resolve(DEFAULT_MODEL)
            release = hold_model(app)  # one request computing, two queued fill the queue
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

                def post() -> asyncio.Future[httpx.Response]:
                    return asyncio.ensure_future(
                        client.post("/classify", content=png, headers={"content-type": "image/png"})
                    )

                async def depth_reaches(n: int) -> None:
                    deadline = time.monotonic() + 10
                    while served.batcher.depth != n:
                        assert time.monotonic() < deadline, f"queue depth {served.batcher.depth}, expected {n}"
                        await asyncio.sleep(0.01)

                try:
                    queued = [post()]
                    await asyncio.sleep(0.2)
                    await depth_reaches(0)  # the first image is with the (held) model
                    queued += [post(), post()]
                    await depth_reaches(2)
                    await app(scope, receive, send)
                finally:
                    release.set()
                return [response.status_code for response in await asyncio.gather(*queued)]

    assert asyncio.run(scenario()) == [200, 200, 200]
    assert not body_reads, "the refused request's body was read"
    assert "app" not in scope and "route" not in scope, "the refused request entered FastAPI"
    assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
    assert "queue full (2 of 2 images waiting)" in json.loads(sent[1]["body"])["error"]


def test_an_upload_in_progress_holds_no_queue_room(store: Path) -> None:
    """Room is held from a body's arrival, not from the door: a client that uploads slowly (or
    stalls on purpose, up to the body timeout) must not keep others out of an idle model."""
    app = create_app(app_settings(store, max_queue_size=1, max_batch_size=1))
    png = fashion_pngs(1)[0]

    async def scenario() -> tuple[int, int, int]:
        async with running(app):
            batcher = app.state.registry.resolve(DEFAULT_MODEL).batcher
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                rest = asyncio.Event()

                async def slow_body() -> AsyncIterator[bytes]:
                    yield png[:10]
                    await rest.wait()
                    yield png[10:]

                slow = asyncio.ensure_future(
                    client.post("/classify", content=slow_body(), headers={"content-type": "image/png"})
                )
                await asyncio.sleep(0.2)
                held = batcher.admission.reserved
                other = await client.post("/classify", content=png, headers={"content-type": "image/png"})
                rest.set()
                return held, other.status_code, (await slow).status_code

    assert asyncio.run(scenario()) == (0, 200, 200)


# ----- readiness with a broken model -----


def test_a_failing_request_gives_its_queue_room_back(store: Path) -> None:
    """The door holds room for a request until its admission, and admission for its images until
    they are queued; a request refused before admission (a bad parameter, too many images) or
    while decoding (a corrupt second image) must keep neither, or the queue would shrink with every
    bad request."""
    settings = app_settings(store, max_queue_size=2, max_images_per_request=2)
    good, corrupt = fashion_pngs(1)[0], fashion_pngs(1)[0][:60]
    with TestClient(create_app(settings)) as small:
        wait_ready(small)
        for _ in range(3):
            assert_error(small.post("/classify", files=multipart([good, corrupt])), 400)
            assert_error(small.post("/classify?top_k=0", files=multipart([good])), 422)
            assert_error(small.post("/classify", files=multipart([good] * 3)), 413)
        response = small.post("/classify", files=multipart([good, good]))
        assert response.status_code == 200, response.text
        served = small.app.state.registry.resolve(DEFAULT_MODEL)  # type: ignore[attr-defined]
        assert served.batcher.admission.reserved == 0


def test_ready_is_503_while_a_configured_model_failed(store: Path, tmp_path: Path) -> None:
    name = "broken-fashion"  # not the default model's name: its metrics stay the other app's
    source = store / DEFAULT_MODEL / str(versions(store / DEFAULT_MODEL)[-1])
    broken = tmp_path / "store" / name / "1"
    broken.mkdir(parents=True)
    config = json.loads((source / CONFIG_FILE).read_text())
    (broken / CONFIG_FILE).write_text(json.dumps({**config, "name": name, "version": 1}))
    (broken / WEIGHTS_FILE).write_bytes(b"not the weights")
    with TestClient(create_app(app_settings(tmp_path / "store", models=name, default_model=name))) as broken_client:
        deadline = time.monotonic() + 60
        while not broken_client.app.state.registry.started:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        not_ready = broken_client.get("/health/ready")
        assert_error(not_ready, 503, f"not ready: {name} v1 failed")
        assert not_ready.headers["retry-after"] == "5"
        listing = broken_client.get("/models").json()["models"]
        assert listing[0]["state"] == "failed" and "checksum mismatch" in listing[0]["reason"]
        response = broken_client.post("/classify", files=multipart(fashion_pngs(1)))
        assert_error(response, 503, "not ready", "checksum mismatch")
        assert int(response.headers["retry-after"]) >= 1


def test_ready_is_503_while_a_configured_model_is_not_in_the_store(store: Path) -> None:
    # A typo in IGCV2_MODELS (the default model is not loaded: its metrics stay the module's app's).
    settings = app_settings(store, models="igcv2-fashon", default_model="igcv2-fashon")
    with TestClient(create_app(settings)) as typo_client:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not typo_client.app.state.registry.started:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for path in ("/health/ready", "/v2/health/ready"):
            assert_error(typo_client.get(path), 503, "not ready: igcv2-fashon not in the model store")
        assert_error(typo_client.post("/classify", files=multipart(fashion_pngs(1))), 404, "unknown model")


def test_top_k_defaults_to_every_class_of_a_model_with_fewer_than_five(tmp_path: Path) -> None:
    name = "three-classes"
    save_artifact(
        build("igcv2_fashion", num_classes=3),
        tmp_path / name,
        name=name,
        architecture={"builder": "igcv2_fashion", "kwargs": {"num_classes": 3}},
        labels=["a", "b", "c"],
        input_spec={"height": 28, "width": 28, "channels": 1, "mean": [0.3], "std": [0.35]},
        untrained=True,
    )
    with TestClient(create_app(app_settings(tmp_path, models=name, default_model=name))) as three:
        wait_ready(three)
        response = three.post("/classify", files=multipart(fashion_pngs(2)))
        assert response.status_code == 200, response.text
        for result in response.json()["results"]:
            assert sorted(p["label"] for p in result["predictions"]) == ["a", "b", "c"]
        assert_error(
            three.post("/classify", params={"top_k": 4}, files=multipart(fashion_pngs(1))),
            422,
            "top_k=4 exceeds the 3 classes",
        )


# ----- metrics labels -----


def test_metrics_count_answers_by_route_template_model_and_code(client: TestClient) -> None:
    stranger = f"model-{uuid.uuid4().hex[:8]}"
    watched = {
        ("/classify", DEFAULT_MODEL, 200): lambda: client.post(
            "/classify", files=multipart(fashion_pngs(1)), headers=AUTH
        ),
        ("/classify", "unknown", 404): lambda: client.post(
            "/classify", params={"model": stranger}, files=multipart(fashion_pngs(1)), headers=AUTH
        ),
        ("/models/{name}", DEFAULT_MODEL, 200): lambda: client.get(f"/models/{DEFAULT_MODEL}", headers=AUTH),
        ("/models/{name}", "unknown", 404): lambda: client.get(f"/models/{stranger}", headers=AUTH),
        ("/models", "", 401): lambda: client.get("/models"),
        ("unmatched", "", 404): lambda: client.get(f"/{stranger}/x", headers=AUTH),
        ("/health/live", "", 200): lambda: client.get("/health/live"),
    }
    before = {labels: (requests_total(*labels), duration_count(*labels)) for labels in watched}
    for (_, _, code), send in watched.items():
        assert send().status_code == code
    for labels, (count, durations) in before.items():
        assert requests_total(*labels) == count + 1, labels
        assert duration_count(*labels) == durations + 1, labels
    text = client.get("/metrics").text
    assert stranger not in text, "a client-chosen name became a label value"
    assert re.search(r'^igcv2_images_total\{model="igcv2-fashion",version="\d+"\} [1-9]', text, re.M)
    assert re.search(r'^igcv2_preprocess_duration_seconds_count\{model="igcv2-fashion"\} [1-9]', text, re.M)


def test_requests_in_progress_count_every_stage_but_not_probes_or_scrapes(store: Path) -> None:
    """Two requests held at the model count 2, as each probe and scrape sees it while it is answered
    (3 if it counted itself); 0 once all are answered."""
    app = create_app(app_settings(store))

    def in_progress() -> float:
        return REGISTRY.get_sample_value("igcv2_requests_in_progress") or 0.0

    async def seen_while_answering(path: str) -> float:
        """The gauge at the moment ``path``'s response starts, its request still in progress."""
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"test")],
            "client": ("127.0.0.1", 50000),
            "server": ("test", 80),
        }
        seen: list[float] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                assert message["status"] == 200, path
                seen.append(in_progress())

        await app(scope, receive, send)
        return seen[0]

    async def scenario() -> tuple[dict[str, float], float, list[int]]:
        png_type = {"content-type": "image/png"}
        async with running(app):
            before = in_progress()
            release = hold_model(app)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                held = [
                    asyncio.ensure_future(client.post("/classify", content=png, headers=png_type))
                    for png in fashion_pngs(2)
                ]
                try:
                    deadline = time.monotonic() + 10
                    while in_progress() < before + 2:
                        assert time.monotonic() < deadline, f"in progress {in_progress()}, expected {before + 2}"
                        await asyncio.sleep(0.01)
                    during = {
                        path: await seen_while_answering(path) - before
                        for path in ("/metrics", "/health/ready", "/health/live", "/v2/health/ready")
                    }
                finally:
                    release.set()
                codes = [r.status_code for r in await asyncio.gather(*held)]
            return during, in_progress() - before, codes

    during, after, codes = asyncio.run(scenario())
    assert codes == [200, 200]
    assert during == {"/metrics": 2, "/health/ready": 2, "/health/live": 2, "/v2/health/ready": 2}
    assert after == 0


def test_metrics_labels_stay_bounded_under_many_names(client: TestClient) -> None:
    series = len(re.findall(r"^igcv2_requests_total\{", client.get("/metrics").text, re.M))
    for i in range(20):
        client.post(
            "/classify", params={"model": f"x{i}-{uuid.uuid4().hex}"}, files=multipart(fashion_pngs(1)), headers=AUTH
        )
        client.get(f"/random/{uuid.uuid4().hex}", headers=AUTH)
    grown = len(re.findall(r"^igcv2_requests_total\{", client.get("/metrics").text, re.M)) - series
    assert grown <= 2, f"{grown} new series for 40 requests with 40 different names and paths"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", (None, None)),
        (b"model=a&version=2", ("a", "2")),
        (b"model=nosuch&model=igcv2-fashion&version=1&version=2", ("igcv2-fashion", "2")),  # the last, as FastAPI
    ],
)
def test_the_layers_read_the_query_as_the_routes_do(query: bytes, expected: tuple[str | None, str | None]) -> None:
    """Metrics and shedding must name the model the route serves, not another one given first."""
    assert classify_target(query) == expected


@pytest.mark.parametrize("path", ["/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready", "/metrics"])
def test_probes_and_scrapes_answer_head_as_well(client: TestClient, path: str) -> None:
    """Some load balancers check with HEAD; those routes answered 405. Open like their GET."""
    get, head = client.get(path), client.head(path)
    assert head.status_code == get.status_code == 200
    assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
