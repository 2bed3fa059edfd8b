"""Health endpoints: /health says the process is up; /ready that it can serve requests now."""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.db import connection
from django.http import JsonResponse

from inference.engine import current_engine
from inference.serving.base import preload
from llmservice.lifecycle import lifecycle


async def health(request):
    return JsonResponse({"status": "ok"})


def _db_ok() -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return True


async def ready(request):
    if lifecycle.draining:  # stopping: a load balancer should send new requests elsewhere
        return JsonResponse({"status": "draining"}, status=503)
    try:
        await sync_to_async(_db_ok)()
    except Exception as exc:
        return JsonResponse({"status": "unavailable", "database": str(exc)}, status=503)
    engine = current_engine()
    loaded = engine.loaded() if engine else []
    body = {
        "status": "ok",
        "database": "ok",
        "engine": "started" if engine else "idle",
        "default_model": {"name": preload.model, "status": preload.status, "error": preload.error},
        "loaded_models": [m.name for m in loaded],
        "backends": {m.name: m.backend for m in loaded},
    }
    if preload.status in ("loading", "failed"):
        body["status"] = "loading" if preload.status == "loading" else "unavailable"
        return JsonResponse(body, status=503)
    return JsonResponse(body)
