"""Response bodies, so /docs shows the contract of DESIGN.md section 4, and the request header
both inference routes take."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Header
from pydantic import BaseModel

from service.config import MAX_REQUEST_TIMEOUT_S

RequestTimeout = Annotated[
    float | None, Header(gt=0, le=MAX_REQUEST_TIMEOUT_S, description="Deadline in seconds for this request.")
]


class ErrorBody(BaseModel):
    error: str


class Prediction(BaseModel):
    label: str
    class_id: int
    score: float


class ImageResult(BaseModel):
    filename: str
    predictions: list[Prediction]


class ClassifyResponse(BaseModel):
    model: str
    version: int
    results: list[ImageResult]


class ModelList(BaseModel):
    default_model: str
    models: list[dict[str, Any]]


class ModelDetail(BaseModel):
    name: str
    versions: list[dict[str, Any]]


class Health(BaseModel):
    status: str
    models: list[dict[str, Any]] = []


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "Undecodable or malformed input",
        401: "Missing or wrong API key",
        404: "Unknown model or version",
        413: "Body, pixels or image count over the limit",
        415: "Unsupported media type",
        422: "Bad parameter",
        503: "Queue full or model not ready (Retry-After says when to retry)",
        504: "Deadline passed before the image was computed",
    }.items()
}
