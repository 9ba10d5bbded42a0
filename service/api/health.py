"""Liveness (the process answers) and readiness (every configured model loaded and warmed up, in
every worker when there are several)."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from service.api.schemas import Health
from service.registry import ModelRegistry, State

router = APIRouter(tags=["health"])


def waiting_for(app: FastAPI) -> list[str]:
    """What readiness still waits for (empty: ready): this worker's models, then the other workers."""
    registry: ModelRegistry = app.state.registry
    waiting = [] if registry.is_ready() else (
        [f"{m.name} v{m.version} {m.state}" for m in registry.all() if m.state is not State.READY]
        or ["models not loaded yet"])
    return waiting + (app.state.workers.waiting() if app.state.workers else [])


@router.api_route("/health/live", methods=["GET", "HEAD"], response_model=Health)
async def live() -> dict:
    return {"status": "live"}


@router.api_route("/health/ready", methods=["GET", "HEAD"], response_model=Health,
                  responses={503: {"description": "Not ready yet"}})
async def ready(request: Request) -> JSONResponse:
    registry: ModelRegistry = request.app.state.registry
    models = [{"name": m.name, "version": m.version, "state": str(m.state), "reason": m.reason} for m in registry.all()]
    waiting = waiting_for(request.app)
    if not waiting and not request.app.state.draining:
        return JSONResponse({"status": "ready", "models": models})
    status = "draining" if request.app.state.draining else "not ready"
    return JSONResponse(
        {"error": f"{status}: {', '.join(waiting) or 'shutting down'}", "models": models}, status_code=503,
        headers={"Retry-After": "1" if request.app.state.draining else "5"},
    )
