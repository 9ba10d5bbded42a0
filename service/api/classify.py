"""POST /classify: multipart ``file`` parts (one or many) or a raw ``image/*`` body."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query, Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from service.api.routing import Router
from service.api.schemas import ERROR_RESPONSES, ClassifyResponse, RequestTimeout
from service.client import client_of
from service.engine import Engine, Upload
from service.errors import BadInput, TooLarge, UnsupportedMediaType

router = Router(tags=["classify"])


async def read_uploads(request: Request, max_images: int) -> list[Upload]:
    """The images of a request, whichever of the two accepted shapes it has."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if media == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images, max_fields=max_images + 16)
        except HTTPException as exc:
            if "Too many" in str(exc.detail):
                raise TooLarge(
                    f"too many parts in the form; the limit is {max_images} file parts (images) and "
                    f"{max_images + 16} other fields"
                ) from exc
            raise BadInput(f"malformed multipart body: {exc.detail}") from exc
        uploads = []
        for index, part in enumerate(form.getlist("file")):
            if not isinstance(part, UploadFile):
                raise BadInput(f"form field 'file' #{index + 1} is text, not a file upload")
            uploads.append(Upload(part.filename or f"file{index + 1}", part.content_type, await part.read()))
        await form.close()
        return uploads
    if media.startswith("image/") or media == "application/octet-stream":
        return [Upload("image", media, await request.body())]
    raise UnsupportedMediaType(
        f"unsupported content type {media or 'none'!r}: send multipart/form-data with 'file' parts or an image/* body"
    )


@router.post("/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES)
async def classify(
    request: Request,
    model: Annotated[str | None, Query(description="Model name (default: the configured default model).")] = None,
    version: Annotated[int | None, Query(ge=1, description="Model version (default: the highest loaded).")] = None,
    top_k: Annotated[
        int | None,
        Query(ge=1, le=1000, description="Predictions per image (default: 5, or every class of a model with fewer)."),
    ] = None,
    x_request_timeout: RequestTimeout = None,
) -> dict:
    """Classify one or more images; predictions are sorted by score."""
    engine: Engine = request.app.state.engine
    uploads = await read_uploads(request, engine.settings.max_images_per_request)
    return await engine.classify(uploads, model, version, top_k, x_request_timeout, client_of(request.scope))
