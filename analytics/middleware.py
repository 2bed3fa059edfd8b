"""Records every `/v1` request, streams included, when it ends (completed, failed or cancelled)."""

from __future__ import annotations

import asyncio
import json

from asgiref.sync import iscoroutinefunction, markcoroutinefunction

from analytics.recorder import recorder
from inference.types import RequestStats


def endpoint_name(path: str) -> str:
    rest = path[len("/v1/") :].strip("/")
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


class RequestAnalyticsMiddleware:
    async_capable = True
    sync_capable = False

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    async def __call__(self, request):
        if not request.path.startswith("/v1/"):
            return await self.get_response(request)
        stats = RequestStats(endpoint=endpoint_name(request.path))
        request.llm_stats = stats
        try:
            response = await self.get_response(request)
        except asyncio.CancelledError:
            # The client left before the answer: Django cancels the view.
            stats.cancelled, stats.status_code = True, 499
            self._identify(request, stats)
            recorder.record(stats)
            raise
        stats.status_code = response.status_code
        self._identify(request, stats)
        if response.status_code >= 400 and not response.streaming:
            stats.error_type = _error_type(response)
        if response.streaming:
            response.streaming_content = _recorded(response.streaming_content, stats)
        else:
            recorder.record(stats)
        return response

    @staticmethod
    def _identify(request, stats: RequestStats) -> None:
        caller = getattr(request, "auth", None)
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
