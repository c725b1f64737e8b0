"""The GPU worker's single runtime, built from Django settings (see inference.worker)."""

from __future__ import annotations

import logging
from pathlib import Path

from django.conf import settings

from inference.loading import ModelSettings
from inference.remote import RemoteSettings
from inference.worker import WorkerRuntime, WorkerSettings

logger = logging.getLogger(__name__)
_runtime: WorkerRuntime | None = None


class RuntimeNotStartedError(RuntimeError):
    """A generation task ran in a process that has no engine (not a `-Q gpu` worker)."""


def model_source() -> str:
    """`LEAFRESH_MODEL`, or the locally built demo model's directory when it is empty."""
    return settings.LEAFRESH_MODEL or str(settings.LEAFRESH_DEMO_MODEL_DIR)


def model_settings() -> ModelSettings:
    """How to load the configured model (LEAFRESH_MODEL, or the demo model), from the Django settings.

    Raises RuntimeError when no model is configured and the demo model is not built.
    """
    source = model_source()
    if not settings.LEAFRESH_MODEL and not Path(source).is_dir():
        raise RuntimeError(f"the demo model is not built at {source}: run `python manage.py train_demo_model`")
    return ModelSettings(
        source=source,
        cache_dir=settings.HF_CACHE_DIR,
        quantization=settings.LEAFRESH_QUANTIZATION,
        dtype=settings.LEAFRESH_DTYPE,
        device=settings.LEAFRESH_DEVICE,
        hf_token=settings.HF_TOKEN,
    )


def remote_settings() -> RemoteSettings:
    """How to reach the remote OpenAI-compatible server (LEAFRESH_OPENAI_*). History tokens are
    counted with the tokenizer of LEAFRESH_MODEL when it is a local folder, else of the demo model
    when it is built, else estimated (inference.remote.estimate_tokens)."""
    candidates = [settings.LEAFRESH_MODEL, str(settings.LEAFRESH_DEMO_MODEL_DIR)]
    tokenizer_dir = next((c for c in candidates if c and Path(c).is_dir()), None)
    return RemoteSettings(
        base_url=settings.LEAFRESH_OPENAI_BASE_URL,
        api_key=settings.LEAFRESH_OPENAI_API_KEY,
        model=settings.LEAFRESH_OPENAI_MODEL,
        json_schema=settings.LEAFRESH_OPENAI_JSON_SCHEMA,
        timeout_s=settings.LEAFRESH_OPENAI_TIMEOUT_S,
        tokenizer_dir=tokenizer_dir,
    )


def worker_settings() -> WorkerSettings:
    """WorkerSettings from the Django settings module (LEAFRESH_BACKEND picks the local model or a
    remote server)."""
    remote = settings.LEAFRESH_BACKEND == "openai"
    return WorkerSettings(
        model=None if remote else model_settings(),
        backend=settings.LEAFRESH_BACKEND,
        remote=remote_settings() if remote else None,
        redis_url=settings.REDIS_URL,
        channel_layer=settings.CHANNEL_LAYERS["default"],
        max_running=settings.LEAFRESH_MAX_RUNNING,
        max_waiting=settings.LEAFRESH_MAX_WAITING,
        flush_interval_s=settings.LEAFRESH_FLUSH_INTERVAL_S,
        max_events_per_s=settings.LEAFRESH_MAX_EVENTS_PER_S,
        heartbeat_ttl_s=settings.LEAFRESH_HEARTBEAT_TTL_S,
        # Refresh well inside the TTL, so one late beat never looks like a dead worker.
        heartbeat_interval_s=min(2.0, settings.LEAFRESH_HEARTBEAT_TTL_S / 3),
        heartbeat_prefix=settings.LEAFRESH_HEARTBEAT_PREFIX,
        metrics_prefix=settings.LEAFRESH_METRICS_PREFIX,
        registry_key=settings.LEAFRESH_WORKER_REGISTRY_KEY,
    )


def runtime_start() -> WorkerRuntime:
    """Start the process's runtime once (idempotent)."""
    global _runtime
    if _runtime is None:
        if settings.LEAFRESH_TORCH_THREADS > 0 and settings.LEAFRESH_BACKEND == "local":
            import torch

            torch.set_num_threads(settings.LEAFRESH_TORCH_THREADS)
        runtime = WorkerRuntime(worker_settings())
        runtime.start()
        _runtime = runtime
    return _runtime


def runtime_get() -> WorkerRuntime:
    """The started runtime. Raises RuntimeNotStartedError outside a GPU worker."""
    if _runtime is None:
        raise RuntimeNotStartedError("no generation engine in this process (start it with -Q gpu)")
    return _runtime


def runtime_stop() -> None:
    """Stop the runtime if it was started."""
    global _runtime
    if _runtime is not None:
        _runtime.stop()
        _runtime = None
