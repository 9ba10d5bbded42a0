"""GET /models and /models/{name}: what is loaded, its state, input spec, labels and metrics."""

from __future__ import annotations

from fastapi import Request

from service.api.routing import Router
from service.api.schemas import ERROR_RESPONSES, ModelDetail, ModelList
from service.catalog import Catalog, validate_name
from service.errors import NotFound

router = Router(tags=["models"])


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> dict:
    registry: Catalog = request.app.state.registry
    return {"default_model": registry.settings.default_model, "models": [m.describe() for m in registry.all()]}


@router.get("/models/{name}", response_model=ModelDetail, responses=ERROR_RESPONSES)
async def get_model(request: Request, name: str) -> dict:
    registry: Catalog = request.app.state.registry
    validate_name(name)
    found = [m.describe() for m in registry.all() if m.name == name]
    if not found:
        raise NotFound(f"unknown model {name!r}; loaded: {', '.join(registry.names()) or 'none'}")
    return {"name": name, "versions": found}
