"""The one NinjaAPI serving `/v1`, with every error in its protocol's shape (OpenAI's; Anthropic's
under /v1/messages)."""

from __future__ import annotations

import logging
import re

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpRequest
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError

from llmservice.auth import BearerKey
from llmservice.errors import APIError, error_body

log = logging.getLogger(__name__)

api = NinjaAPI(
    title="llm-service",
    version="1",
    description="OpenAI-compatible API of llm-service",
    urls_namespace="v1",
    auth=BearerKey(),
    docs_url="/docs",
)


def _error_response(request: HttpRequest, body: dict, status: int):
    """An error in the caller's protocol: OpenAI's shape, or Anthropic's under /v1/messages."""
    if request.path.startswith("/v1/messages"):
        from inference.anthropic_protocol import error_body as anthropic_error

        body = anthropic_error(status, body["error"]["message"])
    return api.create_response(request, body, status=status)


def _loc_to_param(loc: list) -> str | None:
    # ninja reports ("body", "payload", "messages", 0, "content"); OpenAI names "messages[0].content".
    parts = [p for p in loc if p not in ("body", "payload", "query", "path")]
    param = ""
    for part in parts:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    return param or None


@api.exception_handler(ValidationError)
def on_validation_error(request: HttpRequest, exc: ValidationError):
    first = exc.errors[0] if exc.errors else {}
    param = _loc_to_param(list(first.get("loc", [])))
    msg = first.get("msg", "Invalid request")
    named = re.match(r"Value error, `([\w.\[\]]+)`", msg)
    if param is None and named:
        # A check across fields (a model validator) names the field its message is about.
        param = named.group(1)
        message = msg.removeprefix("Value error, ")
    elif first.get("type") == "missing" and param is None:
        message = "The request has no body: send a JSON object (Content-Type: application/json)."
    elif first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
    elif first.get("type") == "json_invalid" or param is None:
        message = "We could not parse the JSON body of your request. " + msg
    else:
        message = f"Invalid value for '{param}': {msg}"
    return _error_response(
        request, error_body(message, "invalid_request_error", param, None), status=400
    )


@api.exception_handler(APIError)
def on_api_error(request: HttpRequest, exc: APIError):
    response = _error_response(request, exc.body(), status=exc.status)
    for name, value in exc.headers.items():
        response[name] = value
    return response


@api.exception_handler(AuthenticationError)
def on_auth_error(request: HttpRequest, exc: AuthenticationError):
    return _error_response(
        request,
        error_body("Invalid authentication.", "invalid_request_error", None, "invalid_api_key"),
        status=401,
    )


@api.exception_handler(HttpError)
def on_http_error(request: HttpRequest, exc: HttpError):
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return _error_response(request, error_body(str(exc), kind), status=exc.status_code)


@api.exception_handler(Http404)
def on_404(request: HttpRequest, exc: Http404):
    return _error_response(
        request, error_body(str(exc) or "Not found.", "invalid_request_error"), status=404
    )


@api.exception_handler(RequestDataTooBig)
def on_too_big(request: HttpRequest, exc: RequestDataTooBig):
    limit = settings.MAX_REQUEST_MB
    return _error_response(
        request,
        error_body(
            f"The request body is larger than {limit:g} MB (LLM_SERVICE_MAX_REQUEST_MB).",
            "invalid_request_error",
            None,
            "request_too_large",
        ),
        status=413,
    )


@api.exception_handler(Exception)
def on_server_error(request: HttpRequest, exc: Exception):
    log.exception("unhandled error on %s", request.path)
    return _error_response(
        request,
        error_body("The server had an error while processing your request.", "server_error"),
        status=500,
    )


# Routers register themselves here; imported last so they can import `api` helpers freely.
from inference.api import router as inference_router  # noqa: E402
from models_app.api import router as models_router  # noqa: E402

api.add_router("/", models_router)
api.add_router("/", inference_router)
