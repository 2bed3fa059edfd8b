"""The status snapshot the Status and Models pages show: engine, models, downloads, preload.

One plain dict (JSON-ready), built by `snapshot()` for the websocket push and the polling view.
It never starts the engine: before the first load it reports the configured backend.
"""

from __future__ import annotations

import importlib.metadata
import time
from functools import lru_cache

from django.conf import settings

from inference.engine import current_engine
from inference.serving.base import preload
from llmservice import dashboard
from llmservice.dashboard import actions
from models_app.models import Download, LLMModel

RECENT_DOWNLOADS = 20


@lru_cache(maxsize=1)
def version() -> str:
    try:
        return importlib.metadata.version("llm-service")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@lru_cache(maxsize=1)
def configured_backend() -> str:
    if settings.BACKEND != "auto":
        return settings.BACKEND
    from inference.backends import detect_backend

    return f"auto ({detect_backend()})"


def download_dict(row: dict) -> dict:
    total, done, status = row["bytes_total"], row["bytes_done"], row["status"]
    if status == Download.Status.COMPLETED:
        percent = 100.0
    elif total:
        percent = min(100.0, 100.0 * done / total)
    else:
        percent = None
    running = status == Download.Status.RUNNING
    return {
        "id": row["id"],
        "repo_id": row["repo_id"],
        "revision": row["revision"],
        "name": row["name"],
        "status": status,
        "percent": percent,
        "bytes_done": done,
        "bytes_total": total,
        "rate": row["rate"] if running else 0.0,
        "eta_seconds": row["eta_seconds"] if running else None,
        "files_done": row["files_done"],
        "files_total": row["files_total"],
        "error": row["error"],
        "cancel_requested": row["cancel_requested"],
    }


def downloads(limit: int = RECENT_DOWNLOADS) -> list[dict]:
    rows = Download.objects.values(
        "id",
        "repo_id",
        "revision",
        "name",
        "status",
        "bytes_done",
        "bytes_total",
        "rate",
        "eta_seconds",
        "files_done",
        "files_total",
        "error",
        "cancel_requested",
    )[:limit]
    return [download_dict(r) for r in rows]


def snapshot() -> dict:
    """Everything the live pages show, as of now (a few cheap queries; no engine start)."""
    engine = current_engine()
    stats = engine.stats() if engine else None
    now = time.time()
    default = LLMModel.objects.filter(is_default=True).values_list("name", flat=True).first()
    return {
        "time": now,
        "version": version(),
        "engine": "started" if stats else "idle",
        "backend": stats.backend if stats else configured_backend(),
        "device": (stats.device or "(not started)") if stats else "(engine not started)",
        "backends": stats.backends if stats else {},
        "loaded_models": [
            {
                "name": m.name,
                "backend": m.backend,
                "memory_bytes": m.memory_bytes,
                "running": m.running,
                "waiting": m.waiting,
                "pinned": m.pinned,
                "idle_seconds": m.idle_seconds,
                "context_length": m.context_length,
            }
            for m in (stats.loaded_models if stats else [])
        ],
        "loading_models": actions.loading(),
        "running": stats.running if stats else 0,
        "queued": stats.queued if stats else 0,
        "tokens_generated": stats.tokens_generated if stats else 0,
        "tokens_per_second": None,  # filled in by whoever compares two snapshots
        "uptime_seconds": now - dashboard.STARTED_AT,
        "default_model": {
            "name": default,
            "preload": preload.status if default else "none",
            "error": preload.error,
        },
        "downloads": downloads(),
    }


class TokenRate:
    """Tokens per second from the change of `tokens_generated` between two snapshots."""

    def __init__(self) -> None:
        self._last: tuple[int, float] | None = None

    def update(self, data: dict) -> dict:
        tokens, at = data["tokens_generated"], data["time"]
        last, self._last = self._last, (tokens, at)
        if last is not None and at > last[1]:
            data["tokens_per_second"] = round(max(0, tokens - last[0]) / (at - last[1]), 1)
        return data
