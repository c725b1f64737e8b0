"""Rate limits on generation requests, per chat session and per client address, shared by every web
process through Redis (the `limits` library, sliding-window counters).

LEAFRESH_RATE_LIMIT_SESSION and LEAFRESH_RATE_LIMIT_ADDRESS take the `limits` notation
("20/minute", "5/second;100/hour"); an empty value turns that limit off. When Redis cannot be
reached the request is let through (the listener then reports the outage itself).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
import weakref

from django.conf import settings
from limits import RateLimitItem, parse_many
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from chatbot.redis_client import async_redis

logger = logging.getLogger(__name__)


class RateLimited(Exception):
    """A limit was reached: `scope` "session" or "address"; `retry_after_s` whole seconds until the
    window lets a request through again (at least 1)."""

    def __init__(self, scope: str, retry_after_s: int) -> None:
        super().__init__(scope, retry_after_s)
        self.scope = scope
        self.retry_after_s = retry_after_s

    @property
    def message(self) -> str:
        """The Korean message for the client (safe to show)."""
        return f"요청이 너무 많습니다. {self.retry_after_s}초 후에 다시 시도해 주세요."


_limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SlidingWindowCounterRateLimiter] = weakref.WeakKeyDictionary()


def _limiter() -> SlidingWindowCounterRateLimiter:
    """One limiter per event loop, on the loop's shared Redis pool (chatbot.redis_client)."""
    loop = asyncio.get_running_loop()
    limiter = _limiters.get(loop)
    if limiter is None:
        storage = RedisStorage(
            "async+" + settings.REDIS_URL,
            implementation="redispy",
            key_prefix=f"{settings.LEAFRESH_REDIS_PREFIX}:ratelimit",
            connection_pool=async_redis().connection_pool,
        )
        limiter = _limiters[loop] = SlidingWindowCounterRateLimiter(storage)
    return limiter


@functools.cache
def _limits(setting: str) -> list[RateLimitItem]:
    return parse_many(setting) if setting.strip() else []


async def rate_limit_check(*, session_id: str | None, address: str | None) -> None:
    """Count one generation request against its session's limit and, when `address` is given, its
    client address's (API-key holders such as the Spring backend send every user's requests from
    one address, so the views pass None for them). Raises RateLimited when a limit is exhausted.
    """
    checks = [("session", session_id, _limits(settings.LEAFRESH_RATE_LIMIT_SESSION))] if session_id else []
    if address:
        checks.append(("address", address, _limits(settings.LEAFRESH_RATE_LIMIT_ADDRESS)))
    if not any(items for _, _, items in checks):
        return
    limiter = _limiter()
    try:
        for scope, key, items in checks:
            for item in items:
                if not await limiter.hit(item, scope, key):
                    stats = await limiter.get_window_stats(item, scope, key)
                    raise RateLimited(scope, max(1, math.ceil(stats.reset_time - time.time())))
    except RateLimited:
        raise
    except Exception:
        logger.warning("rate limit check failed; letting the request through", exc_info=True)
