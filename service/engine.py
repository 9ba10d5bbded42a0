"""The engine behind the routes: decode in a thread pool, batch, infer, shape top-k answers.

It knows nothing of HTTP: routes hand it uploads and parameters, it returns plain data or
raises :mod:`service.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from igcv2.names import MODEL_NAME
from igcv2.store import InputSpec, versions
from service import metrics, oip
from service.catalog import Catalog, ServedModel, State, validate_name
from service.client import Client
from service.config import Settings
from service.errors import BadInput, InvalidParameter, NotFound, TooLarge, Unavailable
from service.imaging import check_media_type, load_image, open_image

DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class Upload:
    filename: str
    content_type: str | None
    data: bytes


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class Engine:
    def __init__(self, settings: Settings, registry: Catalog) -> None:
        self.settings = settings
        self.registry = registry
        self.decode_pool = ThreadPoolExecutor(max_workers=settings.decode_workers, thread_name_prefix="decode")

    def check_count(self, n: int) -> None:
        if n == 0:
            raise BadInput("no image in the request: send multipart 'file' parts or a raw image/* body")
        if n > self.settings.max_images_per_request:
            raise TooLarge(f"{n} images in one request; the limit is {self.settings.max_images_per_request}")

    async def decode(self, spec: InputSpec, model: str, uploads: list[Upload], out: np.ndarray) -> None:
        """Decode and fit every upload to the model's input, into ``out`` (one row per upload).

        Headers are read and limits checked on the event loop. Images of at most
        ``inline_decode_pixels`` are decoded there too: handing a 28x28 PNG to a thread costs
        more loop time than decoding it. Larger ones go to the decode pool, in parallel.
        """
        limit = self.settings.max_image_pixels
        loop = asyncio.get_running_loop()
        histogram = metrics.PREPROCESS_DURATION.labels(model=model)

        def load(index: int, upload: Upload, image: Image.Image, header_s: float) -> None:
            started = time.perf_counter()
            out[index] = load_image(image, spec, limit, upload.filename)
            histogram.observe(header_s + time.perf_counter() - started)

        opened = []  # every header first: a request with one bad image decodes none of the others
        for upload in uploads:
            started = time.perf_counter()
            check_media_type(upload.content_type)
            image = open_image(upload.data, spec, limit, upload.filename)
            opened.append((upload, image, time.perf_counter() - started))
        pooled = []
        for index, (upload, image, header_s) in enumerate(opened):
            if image.width * image.height <= self.settings.inline_decode_pixels:
                load(index, upload, image, header_s)
            else:
                pooled.append(loop.run_in_executor(self.decode_pool, load, index, upload, image, header_s))
        await asyncio.gather(*pooled)

    async def classify(
        self,
        uploads: list[Upload],
        model: str | None,
        version: int | None,
        top_k: int | None,
        timeout_s: float | None,
        client: Client,
    ) -> dict[str, Any]:
        """Top-``top_k`` predictions per upload (default: 5, or every class of a smaller model); the
        deadline runs from the ``client``'s arrival."""
        served = self.registry.resolve(model or self.settings.default_model, version)
        self.check_count(len(uploads))
        labels = served.ready_config.labels
        top_k = min(DEFAULT_TOP_K, len(labels)) if top_k is None else top_k
        if top_k > len(labels):
            raise InvalidParameter(f"top_k={top_k} exceeds the {len(labels)} classes of {served.name}")
        spec = served.ready_config.input
        with served.admitted(len(uploads), timeout_s, client.arrival) as (deadline, room):
            images = room.buffer((spec.height, spec.width, spec.channels), np.dtype(np.uint8))
            await self.decode(spec, served.name, uploads, images)
            logits = await served.infer(images, deadline, room, client)
        results = []
        for upload, row in zip(uploads, logits, strict=True):
            probs = softmax(row.astype(np.float64))
            best = np.argsort(-probs, kind="stable")[:top_k]
            results.append(
                {
                    "filename": upload.filename,
                    "predictions": [{"label": labels[i], "class_id": int(i), "score": float(probs[i])} for i in best],
                }
            )
        return {"model": served.name, "version": served.version, "results": results}

    # ----- Open Inference Protocol (/v2) -----

    async def infer_oip(
        self, request: oip.InferRequest, model: str, version: int | None, timeout_s: float | None, client: Client
    ) -> oip.InferResponse:
        """An inference request of the Open Inference Protocol: its images go through the same
        decode pool and dynamic batcher as /classify's (the two routes share batches)."""
        timeouts = [t for t in (request.timeout_s, timeout_s) if t is not None]
        served = self.registry.resolve(model, version)
        config = served.ready_config
        tensor = oip.model_input(request, config.input)
        requested = oip.resolve_outputs(request)
        self.check_count(oip.batch_size(tensor))
        with served.admitted(oip.batch_size(tensor), min(timeouts) if timeouts else None, client.arrival) as (
            deadline,
            room,
        ):
            if tensor.name == oip.ENCODED:
                files = oip.encoded_images(tensor)
                uploads = [Upload(f"{oip.ENCODED}[{i}]", None, f) for i, f in enumerate(files)]
                spec = config.input
                images = room.buffer((spec.height, spec.width, spec.channels), np.dtype(np.uint8))
                await self.decode(spec, served.name, uploads, images)
            else:
                values = oip.image_arrays(tensor)
                images = room.buffer(values.shape[1:], values.dtype)
                images[...] = values
            logits = np.stack(await served.infer(images, deadline, room, client))
        if not np.isfinite(logits).all():  # only far-out ``normalized`` values get here; JSON cannot carry inf/NaN
            raise BadInput(
                f"the model's outputs overflow for this input: {oip.NORMALIZED!r} values lie far "
                "outside the range of a normalised image"
            )
        values = {oip.LOGITS: logits, oip.PROBABILITIES: softmax(logits.astype(np.float64)).astype(np.float32)}
        outputs = oip.make_outputs(requested, values, config.labels)
        return oip.InferResponse(served.name, served.version, outputs, request.id)

    # ----- protocol documents, for both wires (service/api/v2.py, service/grpc) -----

    def check_ready(self) -> None:
        """503, naming what it waits for, until every configured model is loaded and warmed up."""
        if not self.registry.is_ready():
            raise Unavailable(f"not ready: {', '.join(self.registry.not_ready()) or 'models not loaded yet'}", 5)

    def model_ready(self, name: str, version: int | None) -> dict[str, Any]:
        """The version (default: the newest ready one) when it can serve; 404 unknown, 503 not ready."""
        served = self.registry.resolve(name, version)
        if served.state is not State.READY:
            raise Unavailable(served.not_ready_message(), 5)
        return {"name": served.name, "version": str(served.version), "ready": True}

    def model_metadata(self, name: str, version: int | None) -> dict[str, Any]:
        served = self.registry.resolve(name, version)
        config = served.ready_config
        versions = [served.version] if version else [m.version for m in self.loaded(name) if m.state is State.READY]
        return oip.model_metadata(served.name, versions, config)

    def model_config(self, name: str, version: int | None) -> dict[str, Any]:
        return oip.model_config(self.registry.resolve(name, version))

    async def model_statistics(self, name: str | None, version: int | None) -> list[dict[str, Any]]:
        """Triton's statistics of the model's loaded versions, or of every loaded model (``name`` None)."""
        return await self.registry.statistics(self.loaded(name, version) if name else self.registry.all())

    def model_label(self, name: str) -> str:
        """A bounded metrics label: the model's name if it is loaded, else 'unknown'."""
        return self.registry.known_model_label(name)

    def loaded(self, name: str, version: int | None = None) -> list[ServedModel]:
        """The loaded (registered) versions of a model, or the one named; 404 when there is none."""
        validate_name(name)
        found = [m for m in self.registry.all() if m.name == name and version in (None, m.version)]
        if not found:
            self.registry.resolve(name, version)  # raises the registry's precise 404
            raise NotFound(f"model {name!r} is not loaded")
        return found

    def repository_index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """Every version in the model store and every loaded one, with Triton's state names."""
        states = {State.READY: "READY", State.LOADING: "LOADING", State.FAILED: "UNAVAILABLE"}
        entries = {
            (m.name, m.version): {
                "name": m.name,
                "version": str(m.version),
                "state": states[m.state],
                "reason": m.reason or "",
            }
            for m in self.registry.all()
        }
        store = self.registry.store
        folders = store.iterdir() if store.is_dir() else ()
        names = [p.name for p in folders if p.is_dir() and MODEL_NAME.fullmatch(p.name)]
        for name in names:
            for version in versions(store / name):
                entries.setdefault(
                    (name, version),
                    {"name": name, "version": str(version), "state": "UNAVAILABLE", "reason": "not loaded"},
                )
        found = [entries[k] for k in sorted(entries)]
        return [e for e in found if e["state"] == "READY"] if ready_only else found

    async def load_model(self, name: str) -> ServedModel:
        """Load a model's newest version without a restart; every other model keeps serving meanwhile."""
        validate_name(name)
        if not versions(self.registry.store / name):
            raise NotFound(f"model {name!r} not found in the model store")
        return await self.registry.load(name)

    async def unload_model(self, name: str) -> None:
        """Stop serving every version of a model once its queued requests are answered; other
        models and their queues are untouched. Unloading a model that is not loaded is a no-op."""
        validate_name(name)
        if name not in self.registry.names() and not versions(self.registry.store / name):
            raise NotFound(f"unknown model {name!r}: not loaded and not in the model store")
        with contextlib.suppress(NotFound):  # not loaded (or unloaded meanwhile)
            await self.registry.unload(name)

    def close(self) -> None:
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
