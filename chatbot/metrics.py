"""`/metrics`: the web process's own metrics plus every live GPU worker's, in Prometheus text format.

Each worker stores its registry's exposition in Redis beside its heartbeat, with the same TTL
(inference.worker); a dead worker's figures disappear with its key. The collector parses every live
worker's text and merges families of the same name (each sample already has its `worker` label).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import redis
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)


class WorkerMetricsCollector(Collector):
    """Collects the metric families that live GPU workers published to Redis."""

    def __init__(self, redis_url: str, prefix: str, registry_key: str) -> None:
        self._client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._prefix = prefix.encode()
        self._registry_key = registry_key

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        try:
            names = self._client.zrange(self._registry_key, 0, -1)  # the workers (inference.worker)
            texts = self._client.mget([self._prefix + name for name in names]) if names else []
        except redis.RedisError:
            logger.warning("could not read the workers' metrics from Redis", exc_info=True)
            return
        for text in texts:
            if text is None:  # a dead worker's: expired with its heartbeat
                continue
            for family in text_string_to_metric_families(text.decode()):
                if family.name in merged:
                    merged[family.name].samples.extend(family.samples)
                else:
                    merged[family.name] = family
        yield from merged.values()


_registry: CollectorRegistry | None = None


def metrics_registry() -> CollectorRegistry:
    """The web process's default registry with the workers' collector added (once)."""
    global _registry
    if _registry is None:
        collector = WorkerMetricsCollector(
            settings.REDIS_URL, settings.LEAFRESH_METRICS_PREFIX, settings.LEAFRESH_WORKER_REGISTRY_KEY
        )
        REGISTRY.register(collector)
        _registry = REGISTRY
    return _registry


def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text exposition (version 0.0.4)."""
    return HttpResponse(generate_latest(metrics_registry()), content_type="text/plain; version=0.0.4; charset=utf-8")
