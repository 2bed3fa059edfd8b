"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right status."""

from __future__ import annotations

from typing import Any

from django.http import JsonResponse


class APIError(Exception):
    """An error the API reports to the client in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JsonResponse:
        response = JsonResponse(self.body(), status=self.status)
        for name, value in self.headers.items():
            response[name] = value
        return response


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def not_found(message: str, *, code: str | None = None, param: str | None = None) -> APIError:
    return APIError(404, message, type="invalid_request_error", code=code, param=param)


def model_not_found(name: str) -> APIError:
    return APIError(
        404,
        f"The model `{name}` does not exist or you do not have access to it.",
        type="invalid_request_error",
        param="model",
        code="model_not_found",
    )


# --- how errors are documented in the OpenAPI schema -------------------------------------------

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
ANTHROPIC_ERROR_SCHEMA = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}
ERROR_STATUSES = {
    400: "The request is invalid (the message and `param` say why).",
    401: "No API key, or a wrong or expired one.",
    404: "No such model (or object) for this key.",
    413: "The request body is larger than LLM_SERVICE_MAX_REQUEST_MB.",
    429: "A rate limit or the admission queue is full; Retry-After says when to retry.",
    500: "The server failed; nothing of the request is kept.",
    503: "The model cannot be loaded now; Retry-After says when to retry.",
}


def documented(*, stream: bool = False, anthropic: bool = False) -> dict:
    """An operation's `openapi_extra`: its answer (JSON, or SSE when streamed) and every error
    status it can give, with the error body's shape."""
    ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    if stream:
        ok["content"]["text/event-stream"] = {"schema": {"type": "string"}}
    schema = ANTHROPIC_ERROR_SCHEMA if anthropic else ERROR_SCHEMA
    errors = {
        status: {"description": why, "content": {"application/json": {"schema": schema}}}
        for status, why in ERROR_STATUSES.items()
    }
    return {"responses": {200: ok, **errors}}  # int keys: ninja's own are ints
