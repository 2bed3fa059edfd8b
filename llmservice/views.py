"""Health endpoints: /health says the process is up; /ready that it can serve."""

from __future__ import annotations

from django.db import connection
from django.http import JsonResponse

from inference.engine import current_engine


async def health(request):
    return JsonResponse({"status": "ok"})


async def ready(request):
    from asgiref.sync import sync_to_async

    def db_ok() -> bool:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True

    try:
        await sync_to_async(db_ok)()
    except Exception as exc:
        return JsonResponse({"status": "unavailable", "database": str(exc)}, status=503)
    engine = current_engine()
    body = {"status": "ok", "database": "ok", "engine": "started" if engine else "idle"}
    if engine:
        body["loaded_models"] = [m["name"] for m in engine.scheduler.loaded()]
    return JsonResponse(body)
