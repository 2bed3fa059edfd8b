"""Records every `/v1` request, streams included, when it ends (completed, failed or cancelled)."""

from __future__ import annotations

import asyncio
import json

from asgiref.sync import iscoroutinefunction, markcoroutinefunction

from analytics.recorder import recorder
from inference.types import RequestStats
from llmservice.auth import identify
from llmservice.middleware import API_PREFIX


def endpoint_name(path: str) -> str:
    rest = path[len(API_PREFIX) :].strip("/")
    if rest.startswith("models"):
        return "models"
    if rest.startswith("responses"):
        return "responses"
    known = ("chat/completions", "completions", "messages", "messages/count_tokens", "embeddings")
    return rest.replace("/", ".") if rest in known else "other"


def _error_type(response) -> str:
    try:
        return json.loads(response.content)["error"]["type"] or ""
    except (ValueError, KeyError, TypeError):
        return "http_error"


SCOPE_KEY = "llm_service.stats"


async def record_unserved(scope: dict, status: int | None) -> None:
    """A `/v1` request that ended without a row: its client left before Django served it (before
    the view started, or before a stream's first byte), or Django answered it before this
    middleware (`status`). Recorded all the same, once: cancelled when no answer was sent."""
    stats = scope.get(SCOPE_KEY)
    if stats is None:
        stats = RequestStats(endpoint=endpoint_name(scope["path"]), status_code=status or 499)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        _owned(stats, await identify(headers.get("authorization"), headers.get("x-api-key")))
        stats.cancelled = status is None
        if status is not None and status >= 400:
            stats.error_type = "http_error"
    else:  # seen by the middleware, so a stream whose body never started: its client left
        stats.cancelled = True
    recorder.record(stats)


class RequestAnalyticsMiddleware:
    async_capable = True
    sync_capable = False

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    async def __call__(self, request):
        if not request.path.startswith(API_PREFIX):
            return await self.get_response(request)
        stats = RequestStats(endpoint=endpoint_name(request.path))
        request.llm_stats = stats
        request.scope[SCOPE_KEY] = stats
        try:
            response = await self.get_response(request)
        except asyncio.CancelledError:
            # The client left before the answer: Django cancels the view.
            stats.cancelled, stats.status_code = True, 499
            await self._identify(request, stats)
            recorder.record(stats)
            raise
        stats.status_code = response.status_code
        await self._identify(request, stats)
        if response.status_code >= 400 and not response.streaming:
            stats.error_type = _error_type(response)
        if response.streaming:
            # Its own iterator, not `streaming_content`, which would add a second layer of
            # Django's bytes conversion to every event of the stream.
            response.streaming_content = _recorded(response._iterator, stats)
        else:
            recorder.record(stats)
        return response

    @staticmethod
    async def _identify(request, stats: RequestStats) -> None:
        caller = getattr(request, "auth", None) or getattr(request, "llm_caller", None)
        if caller is None and stats.status_code == 499:
            # Ended before authentication finished: still the presented key's request.
            caller = await identify(
                request.headers.get("Authorization"), request.headers.get("x-api-key")
            )
        _owned(stats, caller)


def _owned(stats: RequestStats, caller) -> None:
    if caller is not None:
        stats.key_id, stats.key_name = caller.key_id, caller.name


async def _recorded(content, stats: RequestStats):
    try:
        async for chunk in content:
            yield chunk
    except (asyncio.CancelledError, GeneratorExit):
        stats.cancelled = True
        raise
    finally:
        recorder.record(stats)
