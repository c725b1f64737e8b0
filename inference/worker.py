"""The GPU worker's runtime: model, engine, publisher, cancel listener and heartbeat, started once.

The Celery worker (celery_app, solo pool, queue `gpu`) starts one `WorkerRuntime` before it
consumes tasks; a task only calls `runtime.engine.submit(...)` and returns, so the solo pool is
never held while a request generates. Events go from the engine thread to a publisher child process
(PublisherProcess), so sending them never competes with the engine for the GIL. Cancels arrive as `engine.cancel` messages on the
channel-layer group `CONTROL_GROUP`, which every GPU worker joins. The heartbeat is a Redis key
`heartbeat_prefix + worker name` with a short TTL, refreshed every `heartbeat_interval_s`; its value
is JSON `{"name", "model", "running", "waiting", "at"}`.

With the `openai` backend (WorkerSettings.backend) no model is loaded: the engine is an
inference.remote.RemoteEngine streaming from an OpenAI-compatible server, and the heartbeat's
`model` is the remote model's name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from inference.engine import Engine
from inference.loading import LoadedModel, ModelSettings, load_model
from inference.metrics import EngineMetrics
from inference.publisher import LoopThread, PublisherProcess, build_channel_layer
from inference.remote import RemoteEngine, RemoteSettings
from inference.types import CONTROL_GROUP

logger = logging.getLogger(__name__)
# A worker name not heard of for this long leaves the registry (a killed worker's name stays until
# then; readers skip it, since its heartbeat key has expired). Generous: worker clocks may differ.
REGISTRY_FORGET_S = 3600.0


@dataclass(frozen=True)
class WorkerSettings:
    """Everything the runtime needs, read from Django settings by celery_app.

    channel_layer: the CHANNEL_LAYERS entry (`{"BACKEND": dotted path, "CONFIG": {...}}`).
    heartbeat_prefix: the heartbeat key's prefix (LEAFRESH_HEARTBEAT_PREFIX).
    metrics_prefix: the prefix of the key holding the worker's metrics exposition (same TTL).
    registry_key: a sorted set of worker names scored by their last beat (Unix seconds): readers list
    the workers from it instead of scanning the keyspace; names silent for REGISTRY_FORGET_S are pruned.
    heartbeat_ttl_s: how long a heartbeat stays valid; listeners treat a worker whose key has
    expired as dead.
    backend: `local` (load `model`, run inference.engine) or `openai` (stream from the server
    `remote` describes; `model` is not used).
    """

    model: ModelSettings | None
    redis_url: str
    channel_layer: dict[str, Any]
    max_running: int = 8
    max_waiting: int = 64
    flush_interval_s: float = 0.04
    max_events_per_s: float = 400.0
    heartbeat_interval_s: float = 2.0
    heartbeat_ttl_s: float = 10.0
    heartbeat_prefix: str = "leafresh:worker:"
    metrics_prefix: str = "leafresh:metrics:"
    registry_key: str = "leafresh:workers"
    name: str = ""
    backend: str = "local"
    remote: RemoteSettings | None = None


def _exit_worker() -> None:
    """The publisher is gone: no event can reach a listener. Exit, so that the heartbeat expires (the
    listeners end with 503 and new requests fail fast) and the supervisor can start a fresh worker."""
    logger.critical("exiting the GPU worker: its publisher process died")
    logging.shutdown()
    os._exit(70)  # EX_SOFTWARE


class WorkerRuntime:
    """Owns the loaded model and the engine thread for the life of the worker process."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.name = settings.name or f"{socket.gethostname()}:{os.getpid()}"
        self.loaded: LoadedModel | None = None
        self.engine: Engine | RemoteEngine | None = None
        self.model_name = ""  # the heartbeat's `model`: the loaded model's or the remote one's name
        self._loop = LoopThread("leafresh-control")
        self._control: Any = None
        self._control_task: asyncio.Task[None] | None = None
        self.publisher: PublisherProcess | None = None

    def start(self) -> None:
        """Load the model (once), start the engine, the publisher, the cancel listener and heartbeat.

        Raises inference.loading.ModelLoadError if the model cannot be loaded, and
        inference.remote.RemoteBackendError if the remote server's model cannot be named.
        """
        started = time.monotonic()
        remote = self.settings.backend == "openai"
        if not remote:
            assert self.settings.model is not None, "the local backend needs model settings"
            self.loaded = load_model(self.settings.model)
        layer = build_channel_layer(self.settings.channel_layer)
        self.publisher = PublisherProcess(
            self.settings.channel_layer,
            flush_interval_s=self.settings.flush_interval_s,
            max_events_per_s=self.settings.max_events_per_s,
            worker=self.name,
            on_broken=_exit_worker,
        )
        self.metrics = EngineMetrics(worker=self.name)
        bounds = {"max_running": self.settings.max_running, "max_waiting": self.settings.max_waiting, "metrics": self.metrics}
        if remote:
            assert self.settings.remote is not None, "the openai backend needs remote settings"
            self.engine = RemoteEngine(self.settings.remote, self.publisher, **bounds)
            self.engine.start()
            self.model_name = self.engine.model
        else:
            assert self.loaded is not None
            self.engine = Engine(self.loaded, self.publisher, **bounds)
            self.engine.start()
            self.model_name = self.loaded.name
        ready = self._loop.submit(self._join_control_group(layer))
        ready.result(timeout=30)
        self._control = self._loop.submit(self._control_forever(layer))
        logger.info("worker %s ready with %s in %.1f s", self.name, self.model_name, time.monotonic() - started)

    def stop(self) -> None:
        """Stop the engine (in-flight requests get an `error` event), flush events, drop the heartbeat."""
        if self.engine is not None:
            self.engine.stop()
        if self.publisher is not None:
            try:
                self.publisher.stop(timeout=5)
            except Exception:  # noqa: BLE001
                logger.warning("could not flush all events at shutdown")
        try:
            self._loop.submit(self._shutdown()).result(timeout=5)
        except Exception:
            logger.warning("unclean control shutdown", exc_info=True)
        self._loop.stop()

    async def _join_control_group(self, layer: Any) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(self.settings.redis_url)
        self._channel = await layer.new_channel()  # default prefix (see chatbot.streaming)
        await layer.group_add(CONTROL_GROUP, self._channel)
        await self._beat()

    async def _beat(self) -> None:
        assert self.engine is not None
        if self.publisher is not None and not self.publisher.alive() and not self.publisher.closing:
            # Events can no longer reach anyone, even while no request is running: exit (the heartbeat
            # expires, listeners end with 503, and the supervisor starts a fresh worker).
            _exit_worker()
        running, waiting = self.engine.load
        payload = {"name": self.name, "model": self.model_name, "running": running, "waiting": waiting, "at": time.time()}
        key = self.settings.heartbeat_prefix + self.name
        ttl_ms = int(self.settings.heartbeat_ttl_s * 1000)
        now = time.time()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(key, json.dumps(payload, ensure_ascii=False), px=ttl_ms)
            pipe.set(self.settings.metrics_prefix + self.name, self.metrics.exposition(), px=ttl_ms)
            pipe.zadd(self.settings.registry_key, {self.name: now})
            pipe.zremrangebyscore(self.settings.registry_key, "-inf", now - REGISTRY_FORGET_S)
            await pipe.execute()

    async def _shutdown(self) -> None:
        if self._control_task is not None:
            self._control_task.cancel()
            await asyncio.gather(self._control_task, return_exceptions=True)
        await self._redis.delete(self.settings.heartbeat_prefix + self.name, self.settings.metrics_prefix + self.name)
        await self._redis.zrem(self.settings.registry_key, self.name)
        await self._redis.aclose()

    async def _control_forever(self, layer: Any) -> None:
        self._control_task = asyncio.current_task()  # type: ignore[assignment]

        async def heartbeat() -> None:
            beats = 0
            while True:
                await asyncio.sleep(self.settings.heartbeat_interval_s)
                try:
                    await self._beat()
                    beats += 1
                    if beats % 30 == 0:  # group membership expires (channels-redis group_expiry)
                        await layer.group_add(CONTROL_GROUP, self._channel)
                except Exception:
                    logger.warning("heartbeat failed", exc_info=True)

        beat_task = asyncio.create_task(heartbeat())
        try:
            while True:
                try:
                    message = await layer.receive(self._channel)
                except Exception:
                    logger.warning("control channel receive failed", exc_info=True)
                    await asyncio.sleep(1)
                    continue
                if message.get("type") == "engine.cancel" and self.engine is not None:
                    self.engine.cancel(str(message.get("request_id", "")))
        finally:
            beat_task.cancel()
            await asyncio.gather(beat_task, return_exceptions=True)
