"""The routers every route module uses: one route per HTTP method, so every OpenAPI operation has its own ID."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter


class Router(APIRouter):
    """An APIRouter that registers a route of several methods as one route per method.

    FastAPI derives an operation ID from the route, not the method: a GET+HEAD route documented both
    operations as ``live_health_live_get``, which FastAPI warns about and client generators refuse.
    Apart, they are ``..._get`` and ``..._head``, and requests are routed exactly as before.
    """

    def add_api_route(
        self, path: str, endpoint: Callable[..., Any], *, methods: set[str] | list[str] | None = None, **kwargs: Any
    ) -> None:
        for method in sorted(methods or ["GET"]):
            super().add_api_route(path, endpoint, methods=[method], **kwargs)
