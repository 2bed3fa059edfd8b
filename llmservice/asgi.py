"""ASGI entry point: daphne serves HTTP (API, SSE, admin) and websockets through channels."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmservice.settings")
django_asgi_app = get_asgi_application()

from django.core import signals  # noqa: E402
from django.db import close_old_connections, reset_queries  # noqa: E402

# Django resets a reused thread's database connection when a request starts. Under ASGI a request's
# synchronous code runs in a thread of its own, new for each request, so there is nothing to
# reset, and running these (in that thread) cost every API request a thread start and a switch
# before its view. `request_finished` still closes what the request's thread opened.
signals.request_started.disconnect(close_old_connections)
signals.request_started.disconnect(reset_queries)

from concurrent.futures import ThreadPoolExecutor  # noqa: E402

from asgiref.sync import ThreadSensitiveContext  # noqa: E402
from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import WebsocketDenier  # noqa: E402
from django.conf import settings  # noqa: E402

from analytics.middleware import SCOPE_KEY, record_unserved  # noqa: E402
from inference.engine import announced  # noqa: E402
from inference.serving.base import holds_released  # noqa: E402
from llmservice.dashboard.routing import websocket_urlpatterns  # noqa: E402
from llmservice.lifecycle import lifecycle  # noqa: E402
from llmservice.middleware import API_PREFIX  # noqa: E402

GENERATION_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses"}
)
# Django runs each request's thread-sensitive synchronous code (closing the response, the async
# ORM's writes) on a thread of the request's own, started and joined for every request. API
# requests have little such code, and it needs no thread of its own: they share this one.
_API_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="api-sync")


async def http_app(scope, receive, send):
    """Django, with:
    - requests counted, because a stop waits for them (llmservice/server.py);
    - models loaded for the request let go when it ends, if it never started on them;
    - a row for every `/v1` request, even one that ended before the analytics middleware saw it
      (its client left while Django read the body, say);
    - generation requests announced to the engine the moment they arrive: parsing and
      authenticating a burst takes a few ms per request, and the batch should not start without
      the rest of it (inference/backends/step_loop.py, _gather_burst)."""
    lifecycle.in_flight += 1
    status = None

    async def sending(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        await send(message)

    api = scope["path"].startswith(API_PREFIX)
    try:
        if api:
            async with ThreadSensitiveContext(executor=_API_THREAD):
                return await _django(scope, receive, sending)
        return await _django(scope, receive, sending)
    finally:
        try:
            if api:
                stats = scope.get(SCOPE_KEY)
                if stats is None or not stats.recorded:
                    await record_unserved(scope, status)
        finally:
            lifecycle.in_flight -= 1  # after its row: a stop waits for that too


async def _django(scope, receive, send):
    with holds_released():
        if scope["method"] == "POST" and scope["path"].rstrip("/") in GENERATION_PATHS:
            with announced():
                return await django_asgi_app(scope, receive, send)
        return await django_asgi_app(scope, receive, send)


def same_origin(app):
    """Websockets from the page's own origin only (or LLM_SERVICE_CSRF_TRUSTED_ORIGINS). Channels'
    AllowedHostsOriginValidator lets any origin in under ALLOWED_HOSTS "*" (the default here), so
    another site open in the operator's browser could read the status with their session."""

    async def validated(scope, receive, send):
        headers = dict(scope["headers"])
        origin = headers.get(b"origin", b"").decode("latin-1")
        host = headers.get(b"host", b"").decode("latin-1")
        _, _, netloc = origin.partition("://")
        if (host and netloc == host) or origin in settings.CSRF_TRUSTED_ORIGINS:
            return await app(scope, receive, send)
        return await WebsocketDenier()(scope, receive, send)

    return validated


application = ProtocolTypeRouter(
    {
        "http": http_app,
        # The dashboard's live status: staff sessions (the consumer checks) of its own pages.
        "websocket": same_origin(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)

if settings.PRELOAD_DEFAULT_MODEL:
    from inference.serving.base import start_preload

    start_preload()
