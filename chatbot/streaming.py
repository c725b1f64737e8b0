"""The listener: one request's events from the channel layer, as the SSE view, the JSON view and
the WebSocket consumer consume them.

`recommendation_events(request)` joins the session's group on a fresh channel BEFORE dispatching
the task, then yields the request's events in order: `chat.queued`, `chat.token`s, and exactly one
terminal event (`chat.done` or `chat.error`), after which it ends. While nothing arrives it yields
`Ping` every `ping_interval_s` so the caller can keep the connection alive. Every failure becomes a
terminal `chat.error`: no live worker (503), no worker took the request (503), the worker that took
it stopped sending heartbeats (503), deadline (504), Redis or any other exception (500). If the
consumer stops iterating before the terminal event (client gone, stop pressed), the request is
cancelled in the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from chatbot import contract
from chatbot.services import recommendation_cancel, recommendation_dispatch, worker_alive
from inference.types import TERMINAL_TYPES, FinishReason, GenerationRequest

logger = logging.getLogger(__name__)
LIVENESS_CHECK_INTERVAL_S = 1.0  # how often a waiting listener checks its worker's heartbeat


@dataclass(frozen=True)
class Ping:
    """Nothing arrived for `ping_interval_s`; the caller may send a keep-alive."""


def _error(request: GenerationRequest, seq: int, status: int, message: str, reason: FinishReason) -> dict[str, Any]:
    return {
        "type": "chat.error",
        "request_id": request.request_id,
        "seq": seq,
        "status": status,
        "message": message,
        "finish_reason": reason.value,
    }


async def _receive_forever(layer: Any, channel: str, inbox: asyncio.Queue[dict[str, Any] | BaseException]) -> None:
    """Move messages from the channel to `inbox`. channels-redis may lose messages of a process-local
    channel when `receive()` is cancelled, so it runs in one task that is cancelled only at the end."""
    try:
        while True:
            inbox.put_nowait(await layer.receive(channel))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - handed to the listener, which ends the stream with an error
        inbox.put_nowait(exc)


async def recommendation_events(request: GenerationRequest) -> AsyncIterator[dict[str, Any] | Ping]:
    """Dispatch `request` and yield its events until (and including) exactly one terminal event."""
    layer = get_channel_layer()
    ping_interval = settings.LEAFRESH_PING_INTERVAL_S
    accept_deadline = time.monotonic() + settings.LEAFRESH_ACCEPT_TIMEOUT_S
    total_deadline = time.monotonic() + request.total_timeout_s + 5  # the engine's own deadline comes first
    # The default prefix: channels-redis polls every process-local channel through one shared name.
    channel = await layer.new_channel()
    inbox: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
    receiver: asyncio.Task[None] | None = None
    last_seq = 0
    accepted = False
    worker: str | None = None  # who took the request, from chat.queued
    next_liveness_check = 0.0
    finished = False
    try:
        await layer.group_add(request.group, channel)
        receiver = asyncio.create_task(_receive_forever(layer, channel, inbox))
        if not await worker_alive():
            finished = True
            yield _error(request, 1, 503, contract.MESSAGE_NO_WORKER, FinishReason.ERROR)
            return
        await sync_to_async(recommendation_dispatch, thread_sensitive=False)(request=request)
        while True:
            now = time.monotonic()
            deadline = total_deadline if accepted else min(total_deadline, accept_deadline)
            if now >= deadline:
                finished = True
                if accepted:
                    yield _error(request, last_seq + 1, 504, contract.MESSAGE_TIMEOUT, FinishReason.DEADLINE)
                else:
                    yield _error(request, last_seq + 1, 503, contract.MESSAGE_NO_WORKER, FinishReason.ERROR)
                return
            if worker and now >= next_liveness_check:
                next_liveness_check = now + LIVENESS_CHECK_INTERVAL_S
                if not await worker_alive(name=worker):
                    finished = True
                    yield _error(request, last_seq + 1, 503, contract.MESSAGE_WORKER_LOST, FinishReason.ERROR)
                    return
            try:
                message = await asyncio.wait_for(inbox.get(), timeout=min(ping_interval, deadline - now))
            except TimeoutError:
                yield Ping()
                continue
            if isinstance(message, BaseException):
                raise message
            if message.get("request_id") != request.request_id:
                continue  # another request of the same session
            seq = int(message.get("seq", 0))
            if seq <= last_seq:
                continue  # a duplicate delivery
            last_seq = seq
            accepted = True
            if message.get("type") == "chat.queued":
                worker = message.get("worker") or None
            if message.get("type") in TERMINAL_TYPES:
                finished = True
                yield message
                return
            yield message
    except Exception:
        if finished:
            raise
        logger.exception("listener failed for request %s", request.request_id)
        finished = True
        yield _error(request, last_seq + 1, 500, contract.MESSAGE_INTERNAL, FinishReason.ERROR)
    finally:
        if receiver is not None:
            receiver.cancel()
        if not finished:
            logger.info("listener of request %s ended before its terminal event: cancelling it", request.request_id)
            try:
                await asyncio.shield(recommendation_cancel(request_id=request.request_id))
            except BaseException:  # noqa: BLE001 - best effort while the client goes away
                logger.warning("could not send cancel for request %s", request.request_id)
        try:
            await asyncio.shield(layer.group_discard(request.group, channel))
        except BaseException:  # noqa: BLE001
            pass
