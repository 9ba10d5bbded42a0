"""The OpenAPI document of the real app: every operation ID once, and a document a validator accepts."""

from __future__ import annotations

import warnings
from collections import Counter

import schemathesis
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings


def served_openapi() -> dict:
    """GET /openapi.json of the app as the service builds it (no models needed to describe the routes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FastAPI's "Duplicate Operation ID" warning fails the test too
        response = TestClient(create_app(Settings(_env_file=None, device="cpu"))).get("/openapi.json")
    assert response.status_code == 200, response.text
    return response.json()


def test_every_operation_id_is_unique_and_the_document_is_valid() -> None:
    spec = served_openapi()
    operations = {
        (method.upper(), path): operation["operationId"]
        for path, item in spec["paths"].items()
        for method, operation in item.items()
    }
    twice = {name: n for name, n in Counter(operations.values()).items() if n > 1}
    assert not twice, f"operation IDs used more than once: {twice}"
    # The routes that once shared an ID between their methods are documented for both, each with its own ID.
    for path in ("/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"):
        assert operations[("GET", path)].endswith("_get") and operations[("HEAD", path)].endswith("_head")
    schemathesis.openapi.from_dict(spec).validate()  # the OpenAPI 3.1 meta-schema; raises on any violation
