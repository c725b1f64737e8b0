"""The replay log of a session's latest SSE stream, in Redis, so that a client that reconnects with
`Last-Event-ID` (EventSource does; the Spring backend may) gets what it missed and then the rest.

Keys, under `{LEAFRESH_REDIS_PREFIX}:replay:{sessionId}:` and expiring LEAFRESH_REPLAY_TTL_S after
the last write: `request` (the stream's request id), `events` (a list of the encoded SSE events,
byte for byte as sent), and `listener` (set for a couple of seconds, again and again, by a
reconnected client's relay: while it exists the generation goes on after the first client left).
"""

from __future__ import annotations

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

    async def append(self, frame: bytes) -> None:
        """Record one encoded event (chatbot.sse.encode_event) as it was sent."""
        async with _redis().pipeline(transaction=False) as pipe:
            pipe.rpush(self._events, frame)
            pipe.pexpire(self._events, self._ttl_ms)
            pipe.pexpire(self._request, self._ttl_ms)
            await pipe.execute()

    async def follow(self, index: int) -> tuple[str | None, list[bytes]]:
        """One poll of a reconnected client, in one round trip: say that it is reading the stream
        (for LISTENER_TTL_MS), and return the logged request id (None: no stream, or expired) and
        the recorded events from position `index` on (0-based), oldest first."""
        async with _redis().pipeline(transaction=False) as pipe:
            pipe.set(self._listener, "1", px=LISTENER_TTL_MS)
            pipe.get(self._request)
            pipe.lrange(self._events, index, -1)
            _, request_id, frames = await pipe.execute()
        return (request_id.decode() if request_id is not None else None), frames

    async def held(self) -> bool:
        """Whether a reconnected client is reading the stream now."""
        return bool(await _redis().exists(self._listener))
