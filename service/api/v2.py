"""Open Inference Protocol (KServe v2 / Triton HTTP) under /v2: health, metadata, inference, and
Triton's model configuration, statistics and model repository extensions.

Handlers parse, call the engine (service.oip owns the wire format) and shape the answer; errors
leave as ``{"error": "..."}``, as the protocol and every other route of the service do.
"""

from __future__ import annotations

import json
import zlib
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.responses import Response

from service import oip
from service.api.routing import Router
from service.api.schemas import ERROR_RESPONSES, RequestTimeout
from service.auth import check_admin
from service.client import client_of
from service.engine import Engine
from service.errors import BadInput, TooLarge, Unavailable, UnsupportedMediaType

router = Router(tags=["v2 (Open Inference Protocol)"], responses=ERROR_RESPONSES)
ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing API key, or missing admin key when IGCV2_ADMIN_KEY is set"},
    403: {"description": "Wrong admin key"},
}
TENSOR_SCHEMA = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": list(oip.DATATYPES)},
        "parameters": {"type": "object"},
        "data": {"type": "array"},
    },
}
INFER_BODY = {  # documents the JSON form in /docs; the handler reads the raw body (binary extension)
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {"type": "array", "minItems": 1, "items": TENSOR_SCHEMA},
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
                            },
                        },
                    },
                }
            }
        },
    },
}


def path_parameters(*names: str) -> dict[str, Any]:
    """``openapi_extra`` declaring the path parameters a handler reads from ``request.path_params``
    (one handler serves several route shapes), so /openapi.json describes every {parameter} of every path."""
    return {
        "parameters": [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in names]
    }


def version_number(request: Request, name: str) -> int | None:
    """The ``/versions/{version}`` path segment, if the route has one. Read from the path, so it is never
    a query parameter."""
    return oip.model_version(name, request.path_params.get("version"))


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


def require_admin(request: Request) -> None:
    """Load/unload need ``Authorization: Bearer <admin key>`` when IGCV2_ADMIN_KEY is set."""
    key = request.app.state.settings.admin_key
    check_admin(request.headers.get("authorization", ""), key.get_secret_value() if key else None)


async def read_body(request: Request) -> bytes:
    """The request body, inflated when the client compressed it (tritonclient's
    request_compression_algorithm), never past the body limit."""
    body = await request.body()
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"unsupported Content-Encoding {encoding!r}: send gzip, deflate or none")
    limit = request.app.state.settings.max_body_bytes
    inflater = zlib.decompressobj(wbits=47)  # 32 + 15: a gzip or zlib header, detected
    try:
        inflated = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadInput(f"body is not valid {encoding} data: {exc}") from exc
    if len(inflated) > limit:
        raise TooLarge(f"body inflates past the limit of {limit} bytes")
    if not inflater.eof:
        raise BadInput(f"truncated {encoding} body")
    if inflater.unused_data:
        raise BadInput(f"{len(inflater.unused_data)} bytes follow the end of the {encoding} stream")
    return inflated


async def json_parameters(request: Request) -> dict[str, Any]:
    """The optional JSON object body of the repository calls (empty body: {})."""
    body = await read_body(request)
    if not body.strip():
        return {}
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, 5000-digit ints
        raise BadInput(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise BadInput("request body must be a JSON object")
    return document


# ----- server -----


@router.get("/v2")
async def server_metadata(request: Request) -> dict:
    return oip.server_metadata(request.app.version)


@router.api_route("/v2/health/live", methods=["GET", "HEAD"])
async def server_live() -> dict:
    return {"live": True}


@router.api_route("/v2/health/ready", methods=["GET", "HEAD"])
async def server_ready(request: Request) -> dict:
    """200 once every configured model is loaded and warmed up; 503 (with the reason) before, and while draining."""
    if request.app.state.draining:
        raise Unavailable("server is shutting down", 1)
    engine_of(request).check_ready()
    return {"ready": True}


# ----- models (statistics first: /v2/models/stats is not a model named "stats") -----


@router.get("/v2/models/stats")
@router.get("/v2/models/{name}/stats", openapi_extra=path_parameters("name"))
@router.get("/v2/models/{name}/versions/{version}/stats", openapi_extra=path_parameters("name", "version"))
async def model_statistics(request: Request) -> dict:
    """Triton's statistics extension: request counts, queue and compute time (ns) per version."""
    name = request.path_params.get("name")
    return {
        "model_stats": await engine_of(request).model_statistics(name, version_number(request, name) if name else None)
    }


@router.get("/v2/models/{name}")
@router.get("/v2/models/{name}/versions/{version}", openapi_extra=path_parameters("version"))
async def model_metadata(request: Request, name: str) -> dict:
    return engine_of(request).model_metadata(name, version_number(request, name))


@router.get("/v2/models/{name}/ready")
@router.get("/v2/models/{name}/versions/{version}/ready", openapi_extra=path_parameters("version"))
async def model_ready(request: Request, name: str) -> dict:
    """200 when the version (default: the newest ready one) can serve; 404 unknown, 503 not ready."""
    return engine_of(request).model_ready(name, version_number(request, name))


@router.get("/v2/models/{name}/config")
@router.get("/v2/models/{name}/versions/{version}/config", openapi_extra=path_parameters("version"))
async def model_config(request: Request, name: str) -> dict:
    """Triton's model configuration extension (max_batch_size, inputs, outputs, dynamic_batching)."""
    return engine_of(request).model_config(name, version_number(request, name))


@router.post("/v2/models/{name}/infer", openapi_extra=INFER_BODY)
@router.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=INFER_BODY | path_parameters("version"))
async def infer(
    request: Request,
    name: str,
    x_request_timeout: RequestTimeout = None,
    inference_header_content_length: Annotated[
        str | None, Header(description="Size of the JSON header when binary tensor data follows it.")
    ] = None,
) -> Response:
    """Classify a batch: one input (``image`` UINT8 NHWC, ``normalized`` FP32 NCHW or ``encoded``
    BYTES), outputs ``probabilities`` / ``logits``, optionally as top-k classification strings."""
    engine = engine_of(request)
    parsed = oip.parse_request(
        await read_body(request), inference_header_content_length, engine.settings.max_images_per_request
    )
    answer = await engine.infer_oip(
        parsed, name, version_number(request, name), x_request_timeout, client_of(request.scope)
    )
    body, header_length = oip.encode_response(answer)
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(
        body, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(header_length)}
    )


# ----- model repository -----


@router.post("/v2/repository/index")
async def repository_index(request: Request) -> list[dict[str, Any]]:
    """Every version in the store or loaded, with Triton's states (READY, LOADING, UNAVAILABLE)."""
    ready = (await json_parameters(request)).get("ready", False)
    if not isinstance(ready, bool):
        raise BadInput(f"'ready' must be true or false, got {ready!r}")
    return engine_of(request).repository_index(ready_only=ready)


@router.post("/v2/repository/models/{name}/load", dependencies=[Depends(require_admin)], responses=ADMIN_RESPONSES)
async def load_model(request: Request, name: str) -> dict:
    """Load the newest version of ``name`` from the store; other models keep serving meanwhile."""
    parameters = (await json_parameters(request)).get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadInput("'parameters' must be a JSON object")
    oip.refuse_load_parameters(list(parameters))
    served = await engine_of(request).load_model(name)
    return {"name": served.name, "version": str(served.version), "state": "READY"}


@router.post("/v2/repository/models/{name}/unload", dependencies=[Depends(require_admin)], responses=ADMIN_RESPONSES)
async def unload_model(request: Request, name: str) -> dict:
    """Unload every version of ``name`` after its queued requests are answered."""
    await json_parameters(request)  # {"parameters": {"unload_dependents": ...}}: no model here has dependents
    await engine_of(request).unload_model(name)
    return {"name": name, "state": "UNAVAILABLE"}
