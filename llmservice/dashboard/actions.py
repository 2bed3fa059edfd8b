"""What the dashboard's buttons do to the engine, API keys and downloads: plain functions, no HTTP.

Admin views are sync and, under ASGI, share one thread; a model load may take minutes. So a load
is handed to the scheduler thread and waited for only briefly: the Status and Models pages show
it as loading until it is resident (or show the error it ended with).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from llmservice.models import ApiKey

LOAD_WAIT = 5.0  # seconds a Load click waits before answering "still loading"
UNLOAD_WAIT = 10.0
PLAYGROUND_KEY_TTL = timedelta(hours=12)
PLAYGROUND_PREFIX = "playground:"  # + the username: the keys the playground makes

_loads: dict[str, Future] = {}
_load_errors: dict[str, str] = {}
_lock = threading.Lock()


class ActionError(Exception):
    """A readable reason an action did not happen."""


def loading() -> list[str]:
    with _lock:
        return sorted(name for name, future in _loads.items() if not future.done())


def load_error(name: str) -> str:
    with _lock:
        return _load_errors.get(name, "")


def load_model(row) -> str:
    """Start loading a registry row; returns "loaded" or "loading" (raises ActionError on failure)."""
    from inference.serving.base import engine, spec_from_row
    from models_app.models import LLMModel

    if not row.enabled or row.status != LLMModel.Status.AVAILABLE:
        raise ActionError(f"Model {row.name} is not servable (disabled or {row.status})")
    future = engine().load_in_background(spec_from_row(row))
    name = row.name
    with _lock:
        _loads[name] = future
        _load_errors.pop(name, None)

    def done(f: Future) -> None:
        with _lock:
            if _loads.get(name) is f:
                del _loads[name]
            if not f.cancelled() and f.exception() is not None:
                _load_errors[name] = str(f.exception())

    future.add_done_callback(done)
    try:
        future.result(timeout=LOAD_WAIT)
    except FutureTimeout:
        return "loading"
    except Exception as exc:
        raise ActionError(f"Model {name} failed to load: {exc}") from exc
    return "loaded"


def unload_model(name: str) -> bool:
    """Unload a resident model now; False if it was not loaded. Busy models raise ActionError."""
    from inference.engine import ModelBusy, current_engine

    engine = current_engine()
    if engine is None:
        return False
    try:
        return engine.unload_in_background(name).result(timeout=UNLOAD_WAIT)
    except ModelBusy as exc:
        raise ActionError(
            f"Model {name} is busy: {exc}. Try again when its requests have ended."
        ) from exc
    except FutureTimeout as exc:
        raise ActionError(f"Model {name} did not unload within {UNLOAD_WAIT:.0f} s") from exc


# --- API keys -------------------------------------------------------------------------------------


def playground_key(username: str) -> str:
    """A fresh short-lived key for this user's playground; their earlier playground keys stop working."""
    name = f"{PLAYGROUND_PREFIX}{username}"[:100]
    now = timezone.now()
    with transaction.atomic():
        ApiKey.objects.filter(name=name, revoked_at__isnull=True).update(revoked_at=now)
        key, secret = ApiKey.generate(name)
        key.expires_at = now + PLAYGROUND_KEY_TTL
        key.save(update_fields=["expires_at"])
    return secret


def revoke_key(pk: int) -> ApiKey:
    key = ApiKey.objects.filter(pk=pk).first()
    if key is None:
        raise ActionError(f"there is no API key {pk}")
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
    return key


# --- downloads (the same calls as manage.py pull_model / cancel_download) -----------------------


def start_download(repo_id: str, revision: str, include: list[str], name: str | None):
    from models_app import downloads
    from models_app.tasks import enqueue

    try:
        with transaction.atomic():
            row = downloads.create_download(repo_id, revision=revision, include=include, name=name)
            enqueue(row)  # sent to the worker when this transaction commits
    except downloads.DownloadError as exc:
        raise ActionError(str(exc)) from exc
    row.refresh_from_db()
    return row


def cancel_download(pk: int):
    from models_app import downloads

    try:
        return downloads.request_cancel(pk)
    except downloads.DownloadError as exc:
        raise ActionError(str(exc)) from exc


def retry_download(pk: int):
    from models_app import downloads
    from models_app.models import Download
    from models_app.tasks import enqueue

    row = Download.objects.filter(pk=pk).first()
    if row is None:
        raise ActionError(f"there is no download {pk}")
    try:
        with transaction.atomic():
            enqueue(downloads.prepare_retry(row))
    except downloads.DownloadError as exc:
        raise ActionError(str(exc)) from exc
    row.refresh_from_db()
    return row
