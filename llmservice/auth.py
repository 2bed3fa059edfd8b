"""Bearer API keys: rows in the database (hashed) plus an optional key from LLM_SERVICE_API_KEY."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from django.conf import settings
from django.http import HttpRequest
from django.utils import timezone
from ninja.security import HttpBearer

from llmservice.errors import APIError
from llmservice.lookups import shared_query
from llmservice.models import ApiKey, hash_key
from llmservice.ratelimit import limiter


@dataclass(frozen=True)
class Caller:
    """Who is calling: a key row, or the environment's key (key_id None)."""

    key_id: int | None
    name: str
    allowed_models: tuple[str, ...] = ()


class AuthError(APIError):
    def __init__(self, message: str) -> None:
        super().__init__(401, message, type="invalid_request_error", code="invalid_api_key")


def _is_env_key(token: str) -> bool:
    return bool(settings.API_KEY) and hmac.compare_digest(token.encode(), settings.API_KEY.encode())


async def _key_row(token: str) -> ApiKey | None:
    digest = hash_key(token)
    return await shared_query(
        ("api-key", digest), lambda: ApiKey.objects.active().filter(hashed_key=digest).first()
    )


async def identify(authorization: str | None, x_api_key: str | None) -> Caller | None:
    """Whose key a request's headers present (Bearer, or Anthropic's x-api-key), without checking
    it further: analytics' owner for requests that ended before authentication did."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    token = token or (x_api_key or "").strip()
    if not token:
        return None
    if _is_env_key(token):
        return Caller(None, "env")
    key = await _key_row(token)
    return Caller(key.pk, key.name) if key is not None else None


class BearerKey(HttpBearer):
    async def authenticate(self, request: HttpRequest, token: str) -> Caller:
        if _is_env_key(token):
            return Caller(None, "env")
        key = await _key_row(token)
        if key is not None and not key.is_active:
            raise AuthError("This API key has expired. Create a new one in the dashboard.")
        if key is None:
            shown = token[:7] + "*" * 4 + token[-4:] if len(token) > 11 else "*" * len(token)
            raise AuthError(
                f"Incorrect API key provided: {shown}. You can create a key in the dashboard "
                "or with `manage.py create_api_key`."
            )
        # Whose request it is, for analytics, even when the limit below refuses it.
        request.llm_caller = Caller(key.pk, key.name)
        hit = limiter.check(key.pk, key.rpm_limit, key.tpm_limit)
        if hit is not None:
            kind, wait = hit
            limit = key.rpm_limit if kind == "requests" else key.tpm_limit
            raise APIError(
                429,
                f"Rate limit reached for this key on {kind} per minute: limit {limit}. "
                f"Please try again in {wait:.1f}s.",
                type="rate_limit_exceeded",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(max(1, int(wait + 0.999)))},
            )
        now = timezone.now()
        # last_used_at is for humans: one write per key per minute, not one per request.
        if key.last_used_at is None or key.last_used_at < now - timezone.timedelta(minutes=1):
            await ApiKey.objects.filter(pk=key.pk).aupdate(last_used_at=now)
        return Caller(key.pk, key.name, tuple(key.allowed_models or ()))

    async def __call__(self, request: HttpRequest):  # type: ignore[override]
        header = request.headers.get("Authorization")
        if not header and request.headers.get("x-api-key"):  # Anthropic's clients send this
            return await self.authenticate(request, request.headers["x-api-key"].strip())
        if not header:
            raise AuthError(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), "
                "or in an x-api-key header."
            )
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("Malformed Authorization header: expected `Bearer YOUR_KEY`.")
        return await self.authenticate(request, token.strip())
