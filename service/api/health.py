"""Liveness (the process answers) and readiness (every configured model loaded and warmed up)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from service.api.routing import Router
from service.api.schemas import Health
from service.catalog import Catalog

router = Router(tags=["health"])


@router.api_route("/health/live", methods=["GET", "HEAD"], response_model=Health)
async def live() -> dict:
    return {"status": "live"}


@router.api_route(
    "/health/ready", methods=["GET", "HEAD"], response_model=Health, responses={503: {"description": "Not ready yet"}}
)
async def ready(request: Request) -> JSONResponse:
    registry: Catalog = request.app.state.registry
    models = [{"name": m.name, "version": m.version, "state": str(m.state), "reason": m.reason} for m in registry.all()]
    if registry.is_ready() and not request.app.state.draining:
        return JSONResponse({"status": "ready", "models": models})
    status = "draining" if request.app.state.draining else "not ready"
    waiting = ", ".join(registry.not_ready()) or "models not loaded yet"
    return JSONResponse(
        {"error": f"{status}: {waiting}", "models": models},
        status_code=503,
        headers={"Retry-After": "1" if request.app.state.draining else "5"},
    )
