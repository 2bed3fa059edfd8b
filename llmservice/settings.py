"""Django settings for llm-service.

Everything an operator may change comes from `LLM_SERVICE_*` environment variables, all read here
through the table in llmservice/env.py: a bad value of any of them stops the process at start with
a message naming the variable, instead of surfacing as a confusing failure later.
"""

from __future__ import annotations

import logging
import secrets
import shutil
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from llmservice import env

BASE_DIR = Path(__file__).resolve().parent.parent

# --- service configuration: every variable, its type, default and meaning is in llmservice/env.py

try:
    CONFIG = env.read_all()
except env.ConfigError as exc:
    raise ImproperlyConfigured(str(exc)) from None

HOST = CONFIG["HOST"]
PORT = CONFIG["PORT"]
DATA_DIR = CONFIG["DATA_DIR"]
MODELS_DIR = CONFIG["MODELS_DIR"] or DATA_DIR / "models"
API_KEY = CONFIG["API_KEY"]
BACKEND = CONFIG["BACKEND"]
REDIS_URL = CONFIG["REDIS_URL"]
MAX_QUEUE = CONFIG["MAX_QUEUE"]
MAX_BATCH_SIZE = CONFIG["MAX_BATCH_SIZE"]
PREFILL_BATCH_SIZE = CONFIG["PREFILL_BATCH_SIZE"]
PROMPT_CACHE_ENTRIES = CONFIG["PROMPT_CACHE_ENTRIES"]
MAX_LOADED_MODELS = CONFIG["MAX_LOADED_MODELS"]
MEMORY_BUDGET_GB = CONFIG["MEMORY_BUDGET_GB"]
MAX_REQUEST_MB = CONFIG["MAX_REQUEST_MB"]
DATA_UPLOAD_MAX_MEMORY_SIZE = int(MAX_REQUEST_MB * 1024 * 1024)
SHUTDOWN_GRACE_SECONDS = CONFIG["SHUTDOWN_GRACE_SECONDS"]
ADMIN_PASSWORD = CONFIG["ADMIN_PASSWORD"]
METRICS_TOKEN = CONFIG["METRICS_TOKEN"]
HSTS_SECONDS = CONFIG["HSTS_SECONDS"]
SECURE_HSTS_SECONDS = HSTS_SECONDS
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if HSTS_SECONDS else None
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
ANALYTICS_RETENTION_DAYS = CONFIG["ANALYTICS_RETENTION_DAYS"]
RESPONSES_TTL_DAYS = CONFIG["RESPONSES_TTL_DAYS"]
PRELOAD_DEFAULT_MODEL = CONFIG["PRELOAD_DEFAULT_MODEL"]
DEMO_GGUF = CONFIG["DEMO_GGUF"]
DEMO_MODEL = CONFIG["DEMO_MODEL"]
LOG_LEVEL = CONFIG["LOG_LEVEL"].upper()
LOG_PROMPTS = CONFIG["LOG_PROMPTS"]
OPENBLAS = CONFIG["OPENBLAS"]
SGEMM = CONFIG["SGEMM"]
SGEMM_THREADS = CONFIG["SGEMM_THREADS"]
LLAMACPP_THREADS = CONFIG["LLAMACPP_THREADS"]
# llama.cpp's llama-server: the configured one must exist; else the build of `make setup`, else
# PATH's; None when there is none (then GGUF files are converted for mlx, as before).
LLAMA_SERVER = CONFIG["LLAMA_SERVER"]
if LLAMA_SERVER is not None and not LLAMA_SERVER.is_file():
    raise ImproperlyConfigured(f"LLM_SERVICE_LLAMA_SERVER: {LLAMA_SERVER} does not exist")
if LLAMA_SERVER is None and env.llama_server_build().is_file():
    LLAMA_SERVER = env.llama_server_build()
if LLAMA_SERVER is None and shutil.which("llama-server"):
    LLAMA_SERVER = Path(shutil.which("llama-server"))
DEBUG = CONFIG["DEBUG"]
ALLOWED_HOSTS = CONFIG["ALLOWED_HOSTS"]
CSRF_TRUSTED_ORIGINS = CONFIG["CSRF_TRUSTED_ORIGINS"]


def _secret_key() -> str:
    if CONFIG["SECRET_KEY"]:
        return CONFIG["SECRET_KEY"]
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

# Django's own, as subclasses that keep API requests off threads (llmservice/middleware.py).
MIDDLEWARE = [
    "llmservice.middleware.SecurityMiddleware",
    "llmservice.middleware.StaticFilesMiddleware",  # WhiteNoise, async
    "analytics.middleware.RequestAnalyticsMiddleware",
    "llmservice.middleware.OpenAIErrorsMiddleware",
    "llmservice.middleware.SessionMiddleware",
    "llmservice.middleware.CommonMiddleware",
    "llmservice.middleware.CsrfViewMiddleware",
    "llmservice.middleware.AuthenticationMiddleware",
    "llmservice.middleware.MessageMiddleware",
    "llmservice.middleware.XFrameOptionsMiddleware",
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
LOGIN_FAILURE_LIMIT = CONFIG["LOGIN_FAILURE_LIMIT"]
LOGIN_LOCKOUT_MINUTES = CONFIG["LOGIN_LOCKOUT_MINUTES"]
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

    url = CONFIG["DATABASE_URL"]
    if url is None:
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{DATA_DIR / 'db.sqlite3'}"
    try:
        config = dj_database_url.parse(url, conn_max_age=0)
    except Exception as exc:  # dj-database-url raises several types for a bad URL
        raise ImproperlyConfigured(
            f"{env.PREFIX}DATABASE_URL is not a valid database URL: {exc}"
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
        # Off (above CRITICAL) unless enabled: prompts and answers are the users' data.
        "llmservice.prompts": {"level": "INFO" if LOG_PROMPTS else logging.CRITICAL + 1},
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
# The same for httpx: the llamacpp backend polls its runners' health while they start.
LOGGING["loggers"].setdefault("httpx", {"level": "WARNING"})

# Periodic upkeep, run by the worker's embedded beat (see llmservice/celery.py).
CELERY_BEAT_SCHEDULE = {
    "prune-request-analytics": {"task": "analytics.prune_request_logs", "schedule": 3600.0},
}
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")
