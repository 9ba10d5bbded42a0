"""What /v2 added below the routes, in-process: the runner's FP32 (already normalised) entry
point, batches that never mix input kinds, Triton-style statistics, and the admin key."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from igcv2.artifact import InputSpec
from service import oip
from service.app import create_app
from service.batching import DynamicBatcher
from service.client import Client
from service.config import Settings
from service.engine import Engine
from service.errors import BadInput, DeadlineExceeded, TooLarge
from service.runtime import ModelRunner, RuntimeOptions


def normalise(images: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """What a client sends as ``normalized``: (x / 255 - mean) / std, NCHW float32."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def test_normalized_entry_point_equals_the_uint8_path(make_tiny_artifact: Any) -> None:
    artifact = make_tiny_artifact()
    spec = artifact.config.input
    runner = ModelRunner(artifact, RuntimeOptions(device=torch.device("cpu"), compile=False, max_batch_size=4))
    try:
        images = np.random.default_rng(0).integers(0, 256, (3, spec.height, spec.width, spec.channels), np.uint8)
        tensors = normalise(images, spec.mean, spec.std)
        from_uint8 = runner.executor.submit(runner.predict, list(images)).result()
        from_float = runner.executor.submit(runner.predict_normalized, list(tensors)).result()
        np.testing.assert_allclose(from_float, from_uint8, rtol=1e-5, atol=1e-5)

        a, b = (runner.executor.submit(runner.run, list(x)).result() for x in (images, tensors))  # run() picks by dtype
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match=r"allowed 1\.\.4"):
            runner.predict_normalized(list(np.repeat(tensors, 2, axis=0)))
    finally:
        runner.close()


def test_batches_hold_one_input_kind_and_statistics_count_them() -> None:
    seen: list[list[np.dtype]] = []

    def infer(items: list[np.ndarray]) -> np.ndarray:
        seen.append([x.dtype for x in items])
        time.sleep(0.01)
        return np.stack([np.full(3, float(x.ravel()[0])) for x in items])

    instance = SimpleNamespace(executor=ThreadPoolExecutor(1), run=infer)

    async def scenario() -> DynamicBatcher:
        batcher = DynamicBatcher(
            [instance], max_batch_size=8, max_queue_delay_s=0.05, max_queue_size=16, model="kinds", version=1
        )
        batcher.start()
        deadline = time.monotonic() + 10
        requests = [
            [np.full((2, 2, 1), 1, np.uint8)] * 2,
            [np.full((1, 2, 2), 2.5, np.float32)],
            [np.full((2, 2, 1), 3, np.uint8)] * 3,
            [np.full((1, 2, 2), 4.5, np.float32)] * 2,
        ]
        results = await asyncio.gather(*(batcher.submit(r, deadline) for r in requests))
        for request, outputs in zip(requests, results, strict=True):
            assert [o[0] for o in outputs] == [float(x.ravel()[0]) for x in request]  # each got its own answer
        with pytest.raises(DeadlineExceeded):
            await batcher.submit([np.zeros((2, 2, 1), np.uint8)], time.monotonic() - 1)
        with pytest.raises(TooLarge, match="queues at most 16"):
            await batcher.submit([np.zeros((2, 2, 1), np.uint8)] * 17, deadline)
        await batcher.close(5)
        return batcher

    batcher = asyncio.run(scenario())
    assert all(len(set(kinds)) == 1 for kinds in seen), seen
    # A batch takes the oldest image's kind from the whole queue; the other kind keeps its place at the head
    # for the next batch. Alternating kinds used to end a batch at each change: four batches, not two.
    assert [len(k) for k in seen] == [5, 3] and seen[0][0] == np.uint8
    stats = batcher.stats.triton("kinds", 1)
    inference = stats["inference_stats"]
    assert stats["version"] == "1" and stats["inference_count"] == 8 and stats["execution_count"] == 2
    assert inference["success"]["count"] == 4 and inference["fail"]["count"] == 2
    assert inference["queue"]["count"] == 4 and inference["compute_infer"]["count"] == 4
    assert inference["compute_infer"]["ns"] >= 4 * 10_000_000  # each request waited for its 10 ms batch
    assert [(b["batch_size"], b["compute_infer"]["count"]) for b in stats["batch_stats"]] == [(3, 1), (5, 1)]
    assert stats["last_inference"] > 0


def test_an_over_the_limit_request_is_refused_on_its_header(tmp_path: Path) -> None:
    """The image count limit (413) and the model's layout (400) are checked before any value is
    converted: here the values would be refused too (two elements, one a string), so the answer
    says which check came first. A 28 MiB body of 19132 images held the event loop for 2 s."""
    spec = InputSpec(height=28, width=28, channels=1, mean=[0.5], std=[0.25])
    served = SimpleNamespace(name="m", version=1, ready_config=SimpleNamespace(input=spec, labels=list("0123456789")))
    engine = Engine(Settings(model_store=tmp_path, compile=False), SimpleNamespace(resolve=lambda name, v: served))

    def infer(tensor: dict[str, Any], **extra: Any) -> None:
        body = json.dumps({"inputs": [{**tensor, "data": [0, "not a number"]}], **extra}).encode()
        request = oip.parse_request(body, None, engine.settings.max_images_per_request)
        asyncio.run(engine.infer_oip(request, "m", None, None, Client()))

    image = {"name": "image", "datatype": "UINT8", "shape": [19132, 28, 28, 1]}
    try:
        with pytest.raises(TooLarge, match="19132 images in one request; the limit is 64"):
            infer(image)
        with pytest.raises(BadInput, match="unknown input 'bogus'"):
            infer({**image, "name": "bogus"})
        with pytest.raises(BadInput, match="unknown output 'OUTPUT__0'"):
            infer({**image, "shape": [1, 28, 28, 1]}, outputs=[{"name": "OUTPUT__0"}])
    finally:
        engine.close()


def call(settings: Settings, requests: list[tuple[str, str, str | None]]) -> list[httpx.Response]:
    """Send ``(method, path, bearer token)`` requests to the app in-process, without its lifespan:
    no model is needed to see which key opens which door (the store is empty)."""

    async def send() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [
                await client.request(method, path, headers={"Authorization": f"Bearer {key}"} if key else {})
                for method, path, key in requests
            ]

    return asyncio.run(send())


def test_admin_key_guards_the_repository_and_passes_the_api_key_check(tmp_path: Path) -> None:
    settings = Settings(model_store=tmp_path, api_key="user-key", admin_key="admin-key", compile=False)
    load, unload = "/v2/repository/models/absent/load", "/v2/repository/models/absent/unload"
    requests = [
        ("GET", "/v2/health/live", None),  # open path
        ("GET", "/v2", None),
        ("GET", "/v2", "admin-key"),  # the admin key passes the API key check too
        ("POST", load, None),  # the API key check comes first
        ("POST", load, "user-key"),  # a user key is not the admin key
        ("POST", load, "admin-key"),  # both checks passed; the store has no such model
        ("POST", unload, "admin-key"),
        ("POST", "/v2/repository/index", "user-key"),
    ]
    codes = [r.status_code for r in call(settings, requests)]
    assert codes == [200, 401, 200, 401, 403, 404, 404, 200]


def test_admin_key_alone(tmp_path: Path) -> None:
    settings = Settings(model_store=tmp_path, admin_key="admin-key", compile=False)
    load = "/v2/repository/models/absent/load"
    missing, wrong, right = call(settings, [("POST", load, None), ("POST", load, "wrong"), ("POST", load, "admin-key")])
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "admin key" in missing.json()["error"]
    assert wrong.status_code == 403 and right.status_code == 404
