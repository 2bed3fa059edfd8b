"""The effective configuration, as the Settings page shows it: values, never secrets."""

from __future__ import annotations

import os

from django.conf import settings

from inference.backends import cpu_blas
from llmservice.env import env_raw


def _set(value: str, unset: str = "not set") -> str:
    return "set" if value else unset


def _database() -> str:
    db = settings.DATABASES["default"]
    engine = db["ENGINE"].rsplit(".", 1)[-1]
    if engine == "sqlite3":
        return f"sqlite3 ({db['NAME']})"
    return engine  # host, user and password stay out of the page


def effective() -> list[tuple[str, str, str]]:
    """(environment variable, meaning, effective value) rows."""
    s = settings
    preloaded = "openblas" in os.environ.get("LD_PRELOAD", "")
    sgemm = cpu_blas.active()
    budget = f"{s.MEMORY_BUDGET_GB:g} GB" if s.MEMORY_BUDGET_GB else "0 (no budget)"
    return [
        ("LLM_SERVICE_HOST", "bind address", s.HOST),
        ("LLM_SERVICE_PORT", "port", str(s.PORT)),
        ("LLM_SERVICE_DATA_DIR", "database, secret key, state", str(s.DATA_DIR)),
        ("LLM_SERVICE_MODELS_DIR", "imported and downloaded models", str(s.MODELS_DIR)),
        ("LLM_SERVICE_BACKEND", "inference backend", s.BACKEND),
        ("LLM_SERVICE_DATABASE_URL", "database engine", _database()),
        (
            "LLM_SERVICE_REDIS_URL",
            "Redis for Celery and channels",
            _set(s.REDIS_URL, "not set (filesystem task queue, in-process channel layer)"),
        ),
        ("LLM_SERVICE_MAX_QUEUE", "requests waiting to join a batch before 429", str(s.MAX_QUEUE)),
        (
            "LLM_SERVICE_MAX_REQUEST_MB",
            "request bodies past this get 413",
            f"{s.MAX_REQUEST_MB:g} MB",
        ),
        (
            "LLM_SERVICE_SHUTDOWN_GRACE_SECONDS",
            "on SIGTERM/SIGINT, time for requests in flight to finish",
            f"{s.SHUTDOWN_GRACE_SECONDS:g} s",
        ),
        (
            "LLM_SERVICE_LOGIN_FAILURE_LIMIT",
            "wrong dashboard passwords before a user is locked out from an address",
            str(s.LOGIN_FAILURE_LIMIT),
        ),
        (
            "LLM_SERVICE_LOGIN_LOCKOUT_MINUTES",
            "how long such a lockout lasts",
            f"{s.LOGIN_LOCKOUT_MINUTES} min",
        ),
        (
            "LLM_SERVICE_MAX_BATCH_SIZE",
            "sequences per batch (a model's own setting wins)",
            str(s.MAX_BATCH_SIZE),
        ),
        (
            "LLM_SERVICE_PREFILL_BATCH_SIZE",
            "prompts prefilled together on mlx",
            str(s.PREFILL_BATCH_SIZE or "default (4)"),
        ),
        (
            "LLM_SERVICE_PROMPT_CACHE_ENTRIES",
            "finished sequences' KV caches kept per model for prefix reuse",
            str(s.PROMPT_CACHE_ENTRIES),
        ),
        ("LLM_SERVICE_MAX_LOADED_MODELS", "models resident at once", str(s.MAX_LOADED_MODELS)),
        ("LLM_SERVICE_MEMORY_BUDGET_GB", "budget for resident weights", budget),
        (
            "LLM_SERVICE_OPENBLAS",
            "preload OpenBLAS on Linux",
            f"{str(s.OPENBLAS).lower()} (this process: {'OpenBLAS' if preloaded else 'bundled BLAS'})",
        ),
        (
            "LLM_SERVICE_SGEMM",
            "preload llm-service's sgemm for decoding and prefill (x86-64, with OpenBLAS)",
            f"{str(s.SGEMM).lower()} (this process: {'yes' if sgemm else 'no'})",
        ),
        (
            "LLM_SERVICE_SGEMM_THREADS",
            "threads of that sgemm",
            str(s.SGEMM_THREADS or "online CPUs, at most 8"),
        ),
        (
            "LLM_SERVICE_DEMO_MODEL",
            "import the demo model (SmolLM2) on the first serve",
            str(s.DEMO_MODEL).lower(),
        ),
        ("LLM_SERVICE_DEMO_GGUF", "where serve finds the demo GGUF", s.DEMO_GGUF or "from PyPI"),
        (
            "LLM_SERVICE_ADMIN_PASSWORD",
            "password of the first admin user",
            _set(s.ADMIN_PASSWORD, "not set (a random one is printed)"),
        ),
        (
            "LLM_SERVICE_METRICS_TOKEN",
            "bearer token for /metrics",
            _set(s.METRICS_TOKEN, "not set (/metrics is open)"),
        ),
        ("LLM_SERVICE_API_KEY", "extra accepted API key", _set(s.API_KEY)),
        (
            "LLM_SERVICE_HSTS_SECONDS",
            "HSTS on HTTPS responses behind a TLS proxy",
            f"{s.HSTS_SECONDS} s" if s.HSTS_SECONDS else "0 (off)",
        ),
        (
            "LLM_SERVICE_SECRET_KEY",
            "Django's signing key",
            _set(env_raw("SECRET_KEY") or "", "not set (generated once, kept in the data dir)"),
        ),
        (
            "LLM_SERVICE_PRELOAD_DEFAULT_MODEL",
            "load the default model at start",
            str(s.PRELOAD_DEFAULT_MODEL).lower(),
        ),
        (
            "LLM_SERVICE_RESPONSES_TTL_DAYS",
            "stored /v1/responses are kept this long",
            f"{s.RESPONSES_TTL_DAYS} days",
        ),
        (
            "LLM_SERVICE_ANALYTICS_RETENTION_DAYS",
            "request rows kept (days)",
            str(s.ANALYTICS_RETENTION_DAYS),
        ),
        ("LLM_SERVICE_ALLOWED_HOSTS", "accepted Host headers", ", ".join(s.ALLOWED_HOSTS)),
        (
            "LLM_SERVICE_CSRF_TRUSTED_ORIGINS",
            "origins trusted for dashboard forms",
            ", ".join(s.CSRF_TRUSTED_ORIGINS) or "none",
        ),
        ("LLM_SERVICE_LOG_LEVEL", "log level", s.LOG_LEVEL),
        ("LLM_SERVICE_DEBUG", "Django debug mode", str(s.DEBUG).lower()),
    ]
