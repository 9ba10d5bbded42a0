"""The engine behind the routes: decode in a thread pool, batch, infer, shape top-k answers.

It knows nothing of HTTP: routes hand it uploads and parameters, it returns plain data or
raises :mod:`service.errors`.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from service import metrics
from service.config import Settings
from service.errors import BadInput, InvalidParameter, TooLarge
from service.imaging import check_media_type, decode_image
from service.registry import ModelRegistry, ServedModel


@dataclass(frozen=True)
class Upload:
    filename: str
    content_type: str | None
    data: bytes


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class Engine:
    def __init__(self, settings: Settings, registry: ModelRegistry) -> None:
        self.settings = settings
        self.registry = registry
        threads = settings.decode_threads or max(2, os.cpu_count() or 1)
        self.decode_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")

    def deadline(self, timeout_s: float | None) -> float:
        """Monotonic deadline from the request's own timeout (X-Request-Timeout) or the default."""
        return time.monotonic() + (timeout_s if timeout_s is not None else self.settings.request_timeout_s)

    def check_count(self, n: int) -> None:
        if n == 0:
            raise BadInput("no image in the request: send multipart 'file' parts or a raw image/* body")
        if n > self.settings.max_images_per_request:
            raise TooLarge(f"{n} images in one request; the limit is {self.settings.max_images_per_request}")

    async def decode(self, served: ServedModel, uploads: list[Upload]) -> list[np.ndarray]:
        """Decode and fit every upload to the model's input, in parallel on the decode pool."""
        spec, limit = served.ready_config.input, self.settings.max_image_pixels
        loop = asyncio.get_running_loop()
        histogram = metrics.PREPROCESS_DURATION.labels(model=served.name)

        def one(upload: Upload) -> np.ndarray:
            started = time.perf_counter()
            check_media_type(upload.content_type)
            image = decode_image(upload.data, spec, limit, upload.filename)
            histogram.observe(time.perf_counter() - started)
            return image

        return list(await asyncio.gather(*(loop.run_in_executor(self.decode_pool, one, u) for u in uploads)))

    async def classify(
        self, uploads: list[Upload], model: str | None, version: int | None, top_k: int, timeout_s: float | None
    ) -> dict[str, Any]:
        deadline = self.deadline(timeout_s)
        served = self.registry.resolve(model or self.settings.default_model, version)
        self.check_count(len(uploads))
        labels = served.ready_config.labels
        if top_k > len(labels):
            raise InvalidParameter(f"top_k={top_k} exceeds the {len(labels)} classes of {served.name}")
        images = await self.decode(served, uploads)
        logits = await served.infer(images, deadline)
        results = []
        for upload, row in zip(uploads, logits, strict=True):
            probs = softmax(row.astype(np.float64))
            best = np.argsort(-probs, kind="stable")[:top_k]
            results.append({
                "filename": upload.filename,
                "predictions": [{"label": labels[i], "class_id": int(i), "score": float(probs[i])} for i in best],
            })
        return {"model": served.name, "version": served.version, "results": results}

    def close(self) -> None:
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
