"""What an operator sees of the web process: per-request metrics and log lines, and readiness.

- `RequestObservabilityMiddleware` counts every HTTP response in `api_requests_total` and times it
  in `http_request_duration_seconds` (the names and labels the first version exported, so its
  dashboards keep working), and logs one `leafresh.request` line when it ends. A streamed response
  ends when its last byte is sent (or its client goes away), not when the view returns.
- `readiness_report` backs `/readyz`: a GPU worker with its model loaded sent a heartbeat within its
  TTL, Redis answers PING and the database answers a query, each check bounded in time.

Labels: `method` (GET, POST, ...; anything else is `other`), `endpoint` (the URL route pattern, e.g.
`ai/chatbot/sessions/<str:session_id>/messages`, never the raw path; `<unmatched>` for a 404 that
matched no route), `status` (the HTTP status; 200 for a stream, whatever its events said).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis
from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.urls import Resolver404, resolve
from prometheus_client import Counter, Histogram

from chatbot.redis_client import async_redis, worker_heartbeats
from chatbot.sse import REQUEST_ID_HEADER
from leafresh.logs import request_context_end, request_context_start

request_logger = logging.getLogger("leafresh.request")
logger = logging.getLogger(__name__)

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "<unmatched>"
QUIET_ENDPOINTS = frozenset({"healthz", "readyz", "metrics"})  # probes and scrapes: DEBUG while they succeed
SESSION_BODY_MAX_BYTES = 64 * 1024  # a JSON body is read for its sessionId only up to this size
# Seconds. Up to LEAFRESH_TOTAL_TIMEOUT_S (180 s by default): a stream lasts as long as its answer.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

REQUESTS = Counter(
    "api_requests_total",
    "HTTP requests answered, by method, URL route and status (counted when the response ends).",
    ["method", "endpoint", "status"],
)
DURATION = Histogram(
    "http_request_duration_seconds",
    "Seconds from a request's arrival to the end of its response (a stream's last byte).",
    ["method", "endpoint", "status"],
    buckets=DURATION_BUCKETS,
)


def session_hash(session_id: object) -> str | None:
    """The first 16 hex digits of the SHA-256 of a session id (str() of it), None for none/empty."""
    if session_id is None or session_id == "":
        return None
    return hashlib.sha256(str(session_id).encode("utf-8")).hexdigest()[:16]


def _endpoint(request: HttpRequest) -> str:
    """The route pattern that served `request` (resolving it here when a middleware answered first)."""
    match = getattr(request, "resolver_match", None)
    if match is None:
        try:
            match = resolve(request.path_info)
        except Resolver404:
            return UNMATCHED
    return match.route


def _session_id(request: HttpRequest) -> object:
    """The request's sessionId: URL kwarg, query parameter or (small) JSON body field; None if none."""
    match = getattr(request, "resolver_match", None)
    if match is not None and match.kwargs.get("session_id"):
        return match.kwargs["session_id"]
    if request.GET.get("sessionId"):
        return request.GET["sessionId"]
    if request.method == "POST" and request.content_type == "application/json":
        try:
            if int(request.META.get("CONTENT_LENGTH") or 0) > SESSION_BODY_MAX_BYTES:
                return None
            body = json.loads(request.body)
        except Exception:  # noqa: BLE001 - an unreadable body has no session to log
            return None
        if isinstance(body, dict):
            return body.get("sessionId")
    return None


class _Exchange:
    """One request's figures, from its arrival to the end of its response."""

    def __init__(self, request: HttpRequest) -> None:
        self.request = request
        self.started = time.perf_counter()
        self.context, self._token = request_context_start()
        self._left = False
        self.first_byte_s: float | None = None
        self.first_event_s: float | None = None

    def finish(self, response: HttpResponse, *, aborted: bool = False) -> None:
        """Count, time and log the exchange (once its response has ended)."""
        request = self.request
        duration_s = time.perf_counter() - self.started
        if response.get(REQUEST_ID_HEADER):
            self.context.request_id = response[REQUEST_ID_HEADER]
        method = request.method if request.method in METHODS else "other"
        endpoint = _endpoint(request)
        status = response.status_code
        REQUESTS.labels(method, endpoint, str(status)).inc()
        DURATION.labels(method, endpoint, str(status)).observe(duration_s)
        fields: dict[str, Any] = {
            "request_id": self.context.request_id,
            "method": method,
            "endpoint": endpoint,
            "status": status,
            "duration_ms": round(duration_s * 1000, 1),
            "client": request.META.get("REMOTE_ADDR"),
        }
        if response.streaming:
            fields["stream"] = True
            fields["aborted"] = aborted
            if self.first_byte_s is not None:
                fields["ttfb_ms"] = round(self.first_byte_s * 1000, 1)
            if self.first_event_s is not None:
                fields["first_event_ms"] = round(self.first_event_s * 1000, 1)
        if (session := session_hash(_session_id(request))) is not None:
            fields["session"] = session
        if status >= 500:
            level = logging.WARNING
        elif endpoint in QUIET_ENDPOINTS and status < 400:
            level = logging.DEBUG
        else:
            level = logging.INFO
        request_logger.log(level, "%s %s %s %.0f ms", method, endpoint or "/", status, fields["duration_ms"], extra=fields)
        self.leave()

    def leave(self) -> None:
        """End the request's log context (once; its line names the id explicitly anyway)."""
        if not self._left:
            self._left = True
            request_context_end(self._token)

    def _chunk_seen(self, chunk: bytes) -> None:
        now = time.perf_counter() - self.started
        if self.first_byte_s is None:
            self.first_byte_s = now
        if self.first_event_s is None and chunk and not chunk.startswith(b":"):  # an SSE comment is a ping
            self.first_event_s = now

    async def follow(self, response: HttpResponse, content: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """`content`, passed through; the exchange ends with it (or when the client goes away)."""
        aborted = True
        try:
            async for chunk in content:
                self._chunk_seen(chunk)
                yield chunk
            aborted = False
        finally:
            self.finish(response, aborted=aborted)

    def follow_sync(self, response: HttpResponse, content: Any) -> Any:
        """The same for a synchronous iterator (WSGI, the test client)."""
        aborted = True
        try:
            for chunk in content:
                self._chunk_seen(chunk)
                yield chunk
            aborted = False
        finally:
            self.finish(response, aborted=aborted)


class RequestObservabilityMiddleware:
    """Metrics and the request log line for every HTTP response (sync and async capable).

    Put it first in MIDDLEWARE, so that its figures cover the responses other middlewares answer
    (401, HTTPS redirects). A streaming response's iterator is wrapped: its figures are taken when it
    ends, so a stream's duration is the whole stream's.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest):
        if self.is_async:
            return self.__acall__(request)
        exchange = _Exchange(request)
        try:
            response = self.get_response(request)
        finally:
            # A sync caller (the test client, WSGI) may never read a stream to its end: the thread's
            # context must not keep this request's id for whatever it logs next.
            exchange.leave()
        return self._follow(exchange, response)

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        # A stream's log context lasts until the stream ends (finish): the tasks it starts inherit it.
        exchange = _Exchange(request)
        response = await self.get_response(request)
        return self._follow(exchange, response)

    @staticmethod
    def _follow(exchange: _Exchange, response: HttpResponse) -> HttpResponse:
        if not response.streaming:
            exchange.finish(response)
        elif response.is_async:
            response.streaming_content = exchange.follow(response, response.streaming_content)
        else:
            response.streaming_content = exchange.follow_sync(response, response.streaming_content)
        return response


# --- readiness (/readyz) ---


def _failure(reason: str, detail: str) -> dict[str, Any]:
    return {"ok": False, "reason": reason, "detail": detail}


async def _bounded(check: Awaitable[dict[str, Any]], what: str, timeout_s: float) -> dict[str, Any]:
    """Run one check for at most `timeout_s`; any failure becomes `{"ok": false, "reason", "detail"}`."""
    started = time.perf_counter()
    try:
        result = await asyncio.wait_for(check, timeout_s)
    except TimeoutError:
        result = _failure("timeout", f"{what} did not answer within {timeout_s:g} s")
    except Exception as exc:  # noqa: BLE001 - a probe reports, it never raises
        logger.warning("readiness: %s failed: %s", what, type(exc).__name__)
        reason = "unreachable" if isinstance(exc, (OSError, redis.ConnectionError)) else "error"
        result = _failure(reason, f"{what} failed: {type(exc).__name__}")
    result["duration_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return result


async def _redis_check() -> dict[str, Any]:
    await async_redis().ping()
    return {"ok": True}


def _database_ping() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


async def _database_check() -> dict[str, Any]:
    await sync_to_async(_database_ping)()
    return {"ok": True}


async def workers_seen() -> list[dict[str, Any]]:
    """The GPU workers whose heartbeat has not expired (Redis keys LEAFRESH_HEARTBEAT_PREFIX + name),
    as `{"name", "model", "running", "waiting", "age_s"}` (age_s: seconds since the beat), by name.

    Raises redis.RedisError when Redis cannot be read.
    """
    now = time.time()
    workers = []
    for value in await worker_heartbeats():
        try:
            beat = json.loads(value)
            workers.append(
                {
                    "name": str(beat["name"]),
                    "model": str(beat.get("model") or ""),
                    "running": int(beat.get("running", 0)),
                    "waiting": int(beat.get("waiting", 0)),
                    "age_s": round(max(0.0, now - float(beat["at"])), 1),
                }
            )
        except (ValueError, KeyError, TypeError):
            logger.warning("readiness: a heartbeat that is not the expected JSON was ignored")
    return sorted(workers, key=lambda worker: worker["name"])


async def readiness_report() -> tuple[bool, dict[str, Any]]:
    """Whether this process can serve generations now, and why (the `/readyz` body).

    Checks, run at once, each bounded by LEAFRESH_READY_TIMEOUT_S: `redis` (PING), `database`
    (SELECT 1), `worker` (a live heartbeat from a worker with a model loaded). Body:
    `{"status": "ready"|"not_ready", "checks": {name: {"ok", "duration_ms", ["reason", "detail"]}},
    "failed": [names], "workers": [...workers_seen()]}`. Reasons: `timeout`, `unreachable` (connection refused or
    lost), `error` (any other failure), and for
    `worker` `no_live_worker` (no heartbeat within its TTL) or `no_model_loaded`.
    """
    timeout_s = settings.LEAFRESH_READY_TIMEOUT_S
    workers: list[dict[str, Any]] = []

    async def worker_check() -> dict[str, Any]:
        workers.extend(await workers_seen())
        if not workers:
            ttl = settings.LEAFRESH_HEARTBEAT_TTL_S
            return _failure("no_live_worker", f"no GPU worker has sent a heartbeat in the last {ttl:g} s")
        if not any(worker["model"] for worker in workers):
            return _failure("no_model_loaded", "no live GPU worker has a model loaded")
        return {"ok": True}

    redis_result, database_result, worker_result = await asyncio.gather(
        _bounded(_redis_check(), "Redis", timeout_s),
        _bounded(_database_check(), "the database", timeout_s),
        _bounded(worker_check(), "the worker heartbeat lookup in Redis", timeout_s),
    )
    checks = {"redis": redis_result, "database": database_result, "worker": worker_result}
    failed = [name for name, result in checks.items() if not result["ok"]]
    body = {"status": "not_ready" if failed else "ready", "checks": checks, "failed": failed, "workers": workers}
    return not failed, body
