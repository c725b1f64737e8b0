"""The replay log of a session's latest SSE stream, in Redis, so that a client that reconnects with
`Last-Event-ID` (EventSource does; the Spring backend may) gets what it missed and then the rest.

Keys, under `{LEAFRESH_REDIS_PREFIX}:replay:{sessionId}:` and expiring LEAFRESH_REPLAY_TTL_S after
the last write: `request` (the stream's request id), `events` (a list of `{"id", "event", "data"}`
JSON objects, exactly as sent), and `listener` (set for a couple of seconds, again and again, by a
reconnected client's relay: while it exists the generation goes on after the first client left).
"""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings

from chatbot.redis_client import async_redis as _redis

LISTENER_TTL_MS = 2000  # a relay refreshes its `listener` key more often than this


class ReplayLog:
    """A session's replay log. Every method does Redis I/O and may raise redis.RedisError."""

    def __init__(self, session_id: str) -> None:
        base = f"{settings.LEAFRESH_REDIS_PREFIX}:replay:{session_id}:"
        self._request, self._events, self._listener = base + "request", base + "events", base + "listener"
        self._ttl_ms = int(settings.LEAFRESH_REPLAY_TTL_S * 1000)

    async def start(self, request_id: str) -> None:
        """Begin the log of a new stream (the session's earlier one is forgotten)."""
        async with _redis().pipeline(transaction=True) as pipe:
            pipe.delete(self._events, self._listener)
            pipe.set(self._request, request_id, px=self._ttl_ms)
            await pipe.execute()

    async def append(self, *, event_id: int, event: str, data: dict[str, Any]) -> None:
        """Record one event as it was sent."""
        record = json.dumps({"id": event_id, "event": event, "data": data}, ensure_ascii=False)
        async with _redis().pipeline(transaction=True) as pipe:
            pipe.rpush(self._events, record)
            pipe.pexpire(self._events, self._ttl_ms)
            pipe.pexpire(self._request, self._ttl_ms)
            await pipe.execute()

    async def request_id(self) -> str | None:
        """The request whose stream is logged, or None (no stream, or expired)."""
        value = await _redis().get(self._request)
        return value.decode() if value is not None else None

    async def events_from(self, index: int) -> list[dict[str, Any]]:
        """The recorded events from position `index` on (0-based), oldest first."""
        return [json.loads(raw) for raw in await _redis().lrange(self._events, index, -1)]

    async def hold(self) -> None:
        """Say that a client is reading this stream again (for LISTENER_TTL_MS)."""
        await _redis().set(self._listener, "1", px=LISTENER_TTL_MS)

    async def held(self) -> bool:
        """Whether a reconnected client is reading the stream now."""
        return bool(await _redis().exists(self._listener))
