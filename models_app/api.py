"""`GET /v1/models` and `GET /v1/models/{id}`: the registry, live."""

from __future__ import annotations

from django.http import HttpRequest
from ninja import Router

from llmservice.errors import documented, model_not_found
from models_app.models import LLMModel

router = Router(tags=["models"])


def model_object(row: LLMModel) -> dict:
    return {
        "id": row.name,
        "object": "model",
        "created": int(row.created_at.timestamp()),
        "owned_by": "llm-service",
    }


@router.get("/models", openapi_extra=documented())
async def list_models(request: HttpRequest):
    allowed = getattr(request.auth, "allowed_models", ())
    rows = [
        row
        async for row in LLMModel.objects.servable().order_by("name")
        if not allowed or row.name in allowed
    ]
    return {"object": "list", "data": [model_object(r) for r in rows]}


@router.get("/models/{path:model_id}", openapi_extra=documented())
async def retrieve_model(request: HttpRequest, model_id: str):
    row = await LLMModel.objects.servable().afind(model_id)
    allowed = getattr(request.auth, "allowed_models", ())
    if row is None or (allowed and row.name not in allowed):
        raise model_not_found(model_id)
    return model_object(row)
