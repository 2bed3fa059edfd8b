"""Keep every `/v1/*` answer JSON (ninja gives a plain-text 405 and Django an HTML 404), and serve
static files and API requests without taking them through threads."""

from __future__ import annotations

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.contrib.auth import middleware as auth
from django.contrib.messages import middleware as messages
from django.contrib.sessions import middleware as sessions
from django.http import HttpRequest, HttpResponse
from django.middleware import clickjacking, common, csrf, security
from whitenoise.middleware import WhiteNoiseMiddleware

from llmservice.errors import APIError

# Where the NinjaAPI is mounted (llmservice/urls.py): the requests that authenticate by key.
API_PREFIX = "/v1/"


def _rewrite(request: HttpRequest, response: HttpResponse) -> HttpResponse:
    if not request.path.startswith(API_PREFIX) or response.status_code not in (404, 405):
        return response
    if response.get("Content-Type", "").startswith("application/json"):
        return response
    if response.status_code == 405:
        allowed = response.get("Allow", "")
        error = APIError(
            405,
            f"Method {request.method} is not allowed on {request.path}."
            + (f" Allowed: {allowed}." if allowed else ""),
            headers={"Allow": allowed} if allowed else None,
        )
    else:
        error = APIError(
            404, f"Unknown request URL: {request.method} {request.path}.", code="unknown_url"
        )
    return error.response()


class ResponseMiddleware:
    """A middleware that only looks at responses, sync or async as the chain is."""

    async_capable = True
    sync_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest):
        if self.is_async:
            return self._acall(request)
        return self.process(request, self.get_response(request))

    async def _acall(self, request: HttpRequest):
        return self.process(request, await self.get_response(request))

    def process(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        raise NotImplementedError


class OpenAIErrorsMiddleware(ResponseMiddleware):
    def process(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        return _rewrite(request, response)


class StaticFilesMiddleware(WhiteNoiseMiddleware):
    """WhiteNoise, async. WhiteNoise's own middleware is sync-only, so under ASGI Django ran it in
    a thread, with a hop back to the event loop for the rest of the chain, for every request: the
    API's included. Looking a path up and opening the file are quick; Django's ASGI handler sends
    the response as before (it reads a file response's synchronous iterator in a thread)."""

    async_capable = True
    sync_capable = False

    def __init__(self, get_response):
        super().__init__(get_response)
        markcoroutinefunction(self)

    async def __call__(self, request: HttpRequest):
        if self.autorefresh:
            static_file = self.find_file(request.path_info)
        else:
            static_file = self.files.get(request.path_info)
        if static_file is not None:
            return self.serve(static_file, request)
        return await self.get_response(request)


# The dashboard's pages load their scripts and styles from our own static files only (no inline
# scripts, no CDN); its live data comes over this origin's websocket and fetches.
DASHBOARD_CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",  # style attributes in Django admin's widgets
        "img-src 'self' data:",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "base-uri 'self'",
        "form-action 'self'",
    ]
)


class DashboardSecurityHeadersMiddleware(ResponseMiddleware):
    """A Content-Security-Policy on the dashboard's (admin's) pages."""

    def process(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        if request.path.startswith("/admin") and "Content-Security-Policy" not in response:
            response["Content-Security-Policy"] = DASHBOARD_CSP
        return response


# Under ASGI, Django's own middleware (MiddlewareMixin) runs each of its hooks in a thread: a switch
# there and back per hook and request, on every API request's way to its first token. Those whose
# hooks only read and write headers run on the event loop; the dashboard's (sessions, CSRF,
# logins, messages) are skipped for API requests, which authenticate by key and set no cookies.


class _OnTheLoop:
    """For a MiddlewareMixin whose hooks do no I/O."""

    async def __acall__(self, request: HttpRequest):
        response = None
        if hasattr(self, "process_request"):
            response = self.process_request(request)
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            response = self.process_response(request, response)
        return response


class _DashboardOnly:
    """For a MiddlewareMixin the API does not use."""

    def __init__(self, get_response):
        super().__init__(get_response)
        if self.async_mode and hasattr(self, "process_view"):
            view_hook = sync_to_async(self.process_view, thread_sensitive=True)

            async def process_view(request: HttpRequest, *args):
                if request.path.startswith(API_PREFIX):
                    return None
                return await view_hook(request, *args)

            self.process_view = process_view

    async def __acall__(self, request: HttpRequest):
        if request.path.startswith(API_PREFIX):
            return await self.get_response(request)
        return await super().__acall__(request)


class SecurityMiddleware(_OnTheLoop, security.SecurityMiddleware):
    pass


class CommonMiddleware(_OnTheLoop, common.CommonMiddleware):
    pass


class XFrameOptionsMiddleware(_OnTheLoop, clickjacking.XFrameOptionsMiddleware):
    pass


class SessionMiddleware(_DashboardOnly, sessions.SessionMiddleware):
    pass


class CsrfViewMiddleware(_DashboardOnly, csrf.CsrfViewMiddleware):
    pass


class AuthenticationMiddleware(_DashboardOnly, auth.AuthenticationMiddleware):
    pass


class MessageMiddleware(_DashboardOnly, messages.MessageMiddleware):
    pass
