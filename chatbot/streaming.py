"""The listener: one request's events from the channel layer, as the SSE view, the JSON view and
the WebSocket consumer consume them.

`recommendation_events(request)` joins the session's group on a fresh channel BEFORE dispatching
the task, then yields the request's events in order: `chat.queued`, `chat.token`s, and exactly one
terminal event (`chat.done` or `chat.error`), after which it ends. While nothing arrives it yields
`Ping` every `ping_interval_s` so the caller can keep the connection alive. Every failure becomes a
terminal `chat.error`: no live worker (503), no worker took the request (503), the worker that took
it stopped sending heartbeats (503), no first token or no event for LEAFRESH_STALL_TIMEOUT_S while
the worker lives (504: an event was lost), a gap in the event numbers (502: events were lost),
Redis or any other exception (500). Whenever the stream
ends without the worker's own terminal event (client gone, stop pressed, the listener gave up), the
request is cancelled in the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels_redis.pubsub import RedisPubSubChannelLayer
from django.conf import settings

from chatbot import contract
from chatbot.conversation import TurnOutcome, turn_record
from chatbot.services import PresetAnswer, Recommendation, recommendation_cancel, recommendation_dispatch, worker_alive
from inference.types import TERMINAL_TYPES, FinishReason, GenerationRequest

logger = logging.getLogger(__name__)
LIVENESS_CHECK_INTERVAL_S = 1.0  # how often a waiting listener checks its worker's heartbeat
DEADLINE_GRACE_S = 5.0  # the listener's backstop deadlines trail the engine's own by this much
NOT_ACCEPTED = (503, contract.MESSAGE_NO_WORKER, FinishReason.ERROR)
TIMED_OUT = (504, contract.MESSAGE_TIMEOUT, FinishReason.DEADLINE)


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


_standing: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[str]] = weakref.WeakKeyDictionary()


async def hold_standing_subscription(layer: Any) -> None:
    """Keep the Pub/Sub layer's receiver reading: one subscription held for the event loop's life.

    channels-redis's `RedisPubSubChannelLayer` polls its connection only while it holds a
    subscription and otherwise sleeps 0.1 s between checks (`RedisSingleShardConnection._do_receiving`),
    so the first request after an idle moment would wait up to 100 ms for its first event. A channel
    nobody sends to keeps it subscribed; it costs one idle poll every 0.1 s. Other layers: no-op.
    Concurrent first calls share one subscription (the task is stored before anything awaits).
    """
    if not isinstance(layer, RedisPubSubChannelLayer):
        return
    loop = asyncio.get_running_loop()
    task = _standing.get(loop)
    if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
        task = _standing[loop] = loop.create_task(layer.new_channel("standing."))
    await asyncio.shield(task)


def _raise_if_cancelling() -> None:
    """Raise CancelledError when this task was asked to stop but an await swallowed the request.

    On Python 3.11, `wait_for` and redis-py 8's async commands can complete normally although the
    task was cancelled meanwhile; `Task.cancelling()` still counts the request.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def recommendation_events(request: GenerationRequest) -> AsyncIterator[dict[str, Any] | Ping]:
    """Dispatch `request` and yield its events until (and including) exactly one terminal event.

    Use it with `contextlib.aclosing`, so the cleanup (cancel, group_discard) runs when the caller
    stops early rather than when the generator is garbage-collected.
    """
    layer = get_channel_layer()
    ping_interval = settings.LEAFRESH_PING_INTERVAL_S
    started = time.monotonic()
    accept_deadline = started + settings.LEAFRESH_ACCEPT_TIMEOUT_S
    # The engine enforces the request's own deadlines and reports them; these are the listener's backstop.
    first_token_deadline = started + request.ttft_timeout_s + DEADLINE_GRACE_S
    total_deadline = started + request.total_timeout_s + DEADLINE_GRACE_S
    # The default prefix: channels-redis polls every process-local channel through one shared name.
    await hold_standing_subscription(layer)
    channel = await layer.new_channel()
    inbox: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
    receiver: asyncio.Task[None] | None = None
    last_seq = 0
    accepted = False  # a worker took the request (chat.queued arrived)
    worker: str | None = None  # its name, when it gave one: its heartbeat is watched
    first_token_seen = False
    last_event_at = started
    next_liveness_check = 0.0
    dispatched = False
    worker_done = False  # the worker sent this request's terminal event: nothing to cancel
    terminal_sent = False  # a terminal event was yielded: never yield another

    def fail(status: int, message: str, reason: FinishReason) -> dict[str, Any]:
        nonlocal terminal_sent
        terminal_sent = True
        return _error(request, last_seq + 1, status, message, reason)

    try:
        await layer.group_add(request.group, channel)
        _raise_if_cancelling()
        receiver = asyncio.create_task(_receive_forever(layer, channel, inbox))
        alive = await worker_alive()
        _raise_if_cancelling()
        if not alive:
            yield fail(503, contract.MESSAGE_NO_WORKER, FinishReason.ERROR)
            return
        await sync_to_async(recommendation_dispatch, thread_sensitive=False)(request=request)
        dispatched = True
        _raise_if_cancelling()
        while True:
            now = time.monotonic()
            if not accepted:
                deadline, failure = accept_deadline, NOT_ACCEPTED
            elif not first_token_seen:
                deadline, failure = first_token_deadline, TIMED_OUT
            else:
                deadline, failure = last_event_at + settings.LEAFRESH_STALL_TIMEOUT_S, TIMED_OUT
            deadline = min(deadline, total_deadline)
            if now >= deadline:
                logger.warning("listener of request %s gave up waiting (worker=%s)", request.request_id, worker)
                yield fail(*failure)
                return
            if worker and now >= next_liveness_check:
                next_liveness_check = now + LIVENESS_CHECK_INTERVAL_S
                alive = await worker_alive(name=worker)
                _raise_if_cancelling()
                if not alive:
                    yield fail(503, contract.MESSAGE_WORKER_LOST, FinishReason.ERROR)
                    return
            try:
                async with asyncio.timeout(min(ping_interval, deadline - now)):
                    message = await inbox.get()
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
            if seq > last_seq + 1:  # events were lost: say so rather than show a silently cut text
                logger.warning("request %s: events %d to %d were lost", request.request_id, last_seq + 1, seq - 1)
                yield fail(502, contract.MESSAGE_EVENTS_LOST, FinishReason.ERROR)
                return
            last_seq = seq
            last_event_at = time.monotonic()
            kind = message.get("type")
            if kind == "chat.queued":
                accepted = True
                worker = message.get("worker") or worker
            elif kind == "chat.token":
                first_token_seen = True
            if kind in TERMINAL_TYPES:
                worker_done = terminal_sent = True
                yield message
                return
            yield message
    except Exception:  # Redis loss or a bug: end with an in-band error, never hang
        if terminal_sent:
            raise
        logger.exception("listener failed for request %s", request.request_id)
        yield fail(500, contract.MESSAGE_INTERNAL, FinishReason.ERROR)
    finally:
        if receiver is not None:
            receiver.cancel()
        if dispatched and not worker_done:
            # The client went away, or the listener gave up: the engine must not keep generating.
            logger.info("request %s ended without the worker's terminal event: cancelling it", request.request_id)
            try:
                await asyncio.shield(recommendation_cancel(request_id=request.request_id))
            except BaseException:  # noqa: BLE001 - best effort while the client goes away
                logger.warning("could not send cancel for request %s", request.request_id)
        try:
            await asyncio.shield(layer.group_discard(request.group, channel))
        except BaseException:  # noqa: BLE001
            pass


async def preset_events(preset: PresetAnswer) -> AsyncIterator[dict[str, Any]]:
    """A PresetAnswer as the events of a generated one: one `chat.token` with the reply, then `chat.done`."""
    text = preset.answer["recommend"]
    yield {"type": "chat.token", "request_id": preset.request_id, "seq": 1, "text": text}
    yield {
        "type": "chat.done",
        "request_id": preset.request_id,
        "seq": 2,
        "data": preset.answer,
        "finish_reason": FinishReason.STOP.value,
        "usage": {"prompt_tokens": 0, "completion_tokens": 0},
        "timings": {},
    }


async def answer_events(recommendation: Recommendation) -> AsyncIterator[dict[str, Any] | Ping]:
    """The events of a recommendation, generated (`recommendation_events`) or preset
    (`preset_events`), and its turn recorded in the session when it ends.

    The turn is written before the terminal event is passed on, so a follow-up sent the moment the
    answer closes already sees it in the history. A stream that ends early (client gone, stop) is
    recorded as `cancelled` with the text shown so far. Use it with `contextlib.aclosing`.
    """
    item = recommendation.item
    events = preset_events(item) if isinstance(item, PresetAnswer) else recommendation_events(item)
    started = time.time()
    clock = time.monotonic()
    first_token_s: float | None = None
    text: list[str] = []
    recorded = False

    async def record(event: dict[str, Any] | None) -> None:
        nonlocal recorded
        recorded = True
        kind = event["type"] if event else None
        reason = event.get("finish_reason") if event else FinishReason.CANCELLED.value
        outcome = TurnOutcome(
            finish_reason=str(reason or (FinishReason.STOP.value if kind == "chat.done" else FinishReason.ERROR.value)),
            answer_text="".join(text),
            started_at=started,
            duration_s=time.monotonic() - clock,
            answer=event["data"] if kind == "chat.done" else None,
            error_status=int(event["status"]) if kind == "chat.error" else None,
            ttft_s=first_token_s,
            usage=dict(event.get("usage") or {}) if event else {},
            model=str(event.get("model") or "") if event else "",
        )
        write = asyncio.ensure_future(
            database_sync_to_async(turn_record)(draft=recommendation.turn, request_id=item.request_id, outcome=outcome)
        )
        try:
            # Bounded: a locked database must not hold the terminal event back; the write goes on.
            await asyncio.wait_for(asyncio.shield(write), timeout=settings.LEAFRESH_TURN_RECORD_TIMEOUT_S)
        except TimeoutError:
            logger.warning("recording the turn of request %s is slow; the answer ends without waiting", item.request_id)
        except Exception:  # the answer still reaches the client; the turn is lost from history
            logger.exception("could not record the turn of request %s", item.request_id)

    try:
        async with aclosing(events):
            async for event in events:
                if not isinstance(event, Ping):
                    if event["type"] == "chat.token":
                        if first_token_s is None:
                            first_token_s = time.monotonic() - clock
                        text.append(event["text"])
                    elif event["type"] in TERMINAL_TYPES:
                        await record(event)
                yield event
    finally:
        if not recorded:
            await record(None)
