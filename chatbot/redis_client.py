"""The web process's asyncio Redis client (liveness checks, replay logs): one per event loop, on a
blocking pool, so a burst of listeners waits a moment for a connection instead of failing.

redis-py 8's asyncio ConnectionPool raises MaxConnectionsError past 100 connections; under 200
concurrent streams (`make soak`) that broke liveness checks. BlockingConnectionPool waits up to
REDIS_POOL_TIMEOUT_S for a free connection instead.
"""

from __future__ import annotations

import asyncio
import weakref

import redis.asyncio as aioredis
from django.conf import settings

REDIS_POOL_TIMEOUT_S = 5.0
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = weakref.WeakKeyDictionary()


def async_redis() -> aioredis.Redis:
    """This event loop's client for REDIS_URL (at most LEAFRESH_REDIS_MAX_CONNECTIONS connections)."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.REDIS_URL,
            max_connections=settings.LEAFRESH_REDIS_MAX_CONNECTIONS,
            timeout=REDIS_POOL_TIMEOUT_S,
            socket_timeout=5,
            socket_connect_timeout=5,
        )
        client = _clients[loop] = aioredis.Redis(connection_pool=pool)
    return client


async def worker_heartbeats() -> list[bytes]:
    """The live GPU workers' heartbeat values (JSON `{"name", "model", "running", "waiting", "at"}`,
    inference.worker), from the worker registry (a sorted set of names) and one MGET: two round
    trips whatever the size of the keyspace. Raises redis.RedisError when Redis cannot be read."""
    client = async_redis()
    names = await client.zrange(settings.LEAFRESH_WORKER_REGISTRY_KEY, 0, -1)
    if not names:
        return []
    values = await client.mget([settings.LEAFRESH_HEARTBEAT_PREFIX.encode() + name for name in names])
    return [value for value in values if value is not None]  # a name whose heartbeat expired: dead
