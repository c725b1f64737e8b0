"""HTTP adapters: the SSE GET and JSON POST endpoints of the Spring contract, health, the chat
widget's page, and the admin's "try it" stream.

Thin: parse -> check (chatbot.contract) -> build (chatbot.services) -> stream (chatbot.streaming)
-> encode (chatbot.sse). Invalid input is answered with 400 before any stream starts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from chatbot import contract, sse
from chatbot.auth import trial_permitted
from chatbot.contract import ContractError
from chatbot.conversation import session_clear, session_transcript, widget_session_id
from chatbot.knowledge import KnowledgeUnavailableError
from chatbot.models import PromptTemplate
from chatbot.observability import readiness_report
from chatbot.ratelimit import RateLimited, rate_limit_check
from chatbot.replay import ReplayLog
from chatbot.seed import LOCATIONS, WORK_TYPES
from chatbot.selectors import category_list_active
from chatbot.services import Recommendation, prepare_failure, recommendation_prepare
from chatbot.streaming import Ping, answer_events
from chatbot.trial import prompt_trial_events
from leafresh.logs import request_id_bind

logger = logging.getLogger(__name__)
MAX_BODY_BYTES = 8 * 1024
RESUME_POLL_S = 0.05  # how often a resumed stream looks for new events in the replay log


def _params(request: HttpRequest) -> dict[str, Any]:
    """GET query parameters, or a POST's JSON object body. Raises ContractError on a bad body."""
    if request.method == "GET":
        return contract.query_params(request.META.get("QUERY_STRING", ""))
    if len(request.body) > MAX_BODY_BYTES:
        raise ContractError(["body"], f"{contract.MESSAGE_INVALID} 본문이 너무 큽니다.")
    try:
        body = json.loads(request.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ContractError(["body"], f"{contract.MESSAGE_INVALID} 본문은 JSON 객체여야 합니다.") from None
    if not isinstance(body, dict):
        raise ContractError(["body"], f"{contract.MESSAGE_INVALID} 본문은 JSON 객체여야 합니다.")
    return body


def _sse_frame(item: dict[str, Any]) -> tuple[int, str, dict[str, Any]] | None:
    """An event as the SSE contract sends it, `(id, event, data)`; None for events that are not part
    of it (`chat.queued`, the WebSocket's `chat.challenge` cards)."""
    kind = item["type"]
    if kind == "chat.token":
        return int(item["seq"]), "challenge", contract.envelope(200, contract.MESSAGE_TOKEN, item["text"])
    if kind == "chat.done":
        return int(item["seq"]), "close", contract.envelope(200, contract.MESSAGE_DONE, item["data"])
    if kind == "chat.error":
        return int(item["seq"]), "error", contract.envelope(int(item["status"]), item["message"], None)
    return None


async def _quietly(action: Awaitable[Any], what: str) -> Any:
    """Run a replay-log action; a Redis failure only costs the ability to resume."""
    try:
        return await action
    except Exception:
        logger.warning("replay log: could not %s", what, exc_info=True)
        return None


@dataclass
class _Relay:
    """Between a stream's pump and its HTTP response: encoded events (None ends them), and when the
    client went away."""

    queue: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    gone_at: float | None = None


_pumps: set[asyncio.Task[None]] = set()  # pumps still running (referenced until they end)


async def _pump(generation: Recommendation, relay: _Relay, log: ReplayLog) -> None:
    """Move a generation's events to its response and its replay log, ending after exactly one
    terminal event. Once the client has gone, it goes on for LEAFRESH_RESUME_GRACE_S, and longer while
    a reconnected client reads the log; then it stops, which cancels the generation."""
    last_id = 0

    async def emit(frame: bytes) -> None:
        relay.queue.put_nowait(frame)
        await _quietly(log.append(frame), "record an event")

    try:
        async with aclosing(answer_events(generation)) as events:
            async for item in events:
                if isinstance(item, Ping):
                    relay.queue.put_nowait(sse.PING)
                elif (frame := _sse_frame(item)) is not None:
                    last_id, name, data = frame
                    await emit(sse.encode_event(event_id=last_id, event=name, data=data))
                    if name in sse.TERMINAL_EVENTS:
                        return
                gone = relay.gone_at
                if gone is not None and time.monotonic() - gone >= settings.LEAFRESH_RESUME_GRACE_S:
                    if not await _quietly(log.held(), "check for a reconnected client"):
                        logger.info("request %s: the client left and did not come back", generation.request_id)
                        return  # closing the events cancels the generation
    except Exception:  # under daphne an exception here would leave the response open
        logger.exception("SSE stream failed for request %s", generation.request_id)
        await emit(_error_frame(500, contract.MESSAGE_INTERNAL, event_id=last_id + 1))
    finally:
        relay.queue.put_nowait(None)


async def _sse_body(generation: Recommendation) -> AsyncIterator[bytes]:
    """The event stream: `challenge` deltas, then exactly one `close` or `error`, then the end.

    The events come from a pump task (`_pump`) that also records them for a reconnect
    (chatbot.replay): when this client goes away the generation waits a moment for it to come back.
    """
    relay = _Relay()
    log = ReplayLog(generation.turn.session_id)
    await _quietly(log.start(generation.request_id), "start the log")
    task = asyncio.create_task(_pump(generation, relay, log))
    _pumps.add(task)
    task.add_done_callback(_pumps.discard)
    try:
        while (chunk := await relay.queue.get()) is not None:
            yield chunk
    finally:
        relay.gone_at = time.monotonic()  # the client left (or the stream ended): the pump decides


async def _resume_body(log: ReplayLog, request_id: str, after_id: int, frames: list[bytes]) -> AsyncIterator[bytes]:
    """The events of a logged stream after `after_id` (starting with `frames`, read already), then
    those still to come, to the terminal one.

    Ends with an `error` when the session starts another stream meanwhile (409) or nothing more is
    logged for LEAFRESH_STALL_TIMEOUT_S (504: the relay that wrote the log is gone).
    """
    index = 0
    last_id = after_id
    idle_since = pinged_at = time.monotonic()
    logged = request_id
    while True:
        if logged != request_id:  # the session started another stream: its events are not this one's
            yield _error_frame(409, contract.MESSAGE_RESUME_REPLACED, event_id=last_id + 1)
            return
        index += len(frames)
        for frame in frames:
            event_id, event = sse.decode_head(frame)
            if event_id <= last_id:
                continue
            last_id = event_id
            yield frame
            if event in sse.TERMINAL_EVENTS:
                return
        now = time.monotonic()
        if frames:
            idle_since = now
        elif now - idle_since > settings.LEAFRESH_STALL_TIMEOUT_S:
            yield _error_frame(504, contract.MESSAGE_TIMEOUT, event_id=last_id + 1)
            return
        if now - pinged_at >= settings.LEAFRESH_PING_INTERVAL_S:
            pinged_at = now
            yield sse.PING
        await asyncio.sleep(RESUME_POLL_S)
        logged, frames = await log.follow(index)


async def _resume(params: dict[str, Any], last_event_id: str) -> HttpResponse:
    """A GET with `Last-Event-ID`: what the session's latest stream sent after that id, then the rest
    of it (from any web process). 204 when there is nothing to resume (no stream logged, or it had
    already ended at that id); 400 for a bad sessionId or Last-Event-ID."""
    session_id = contract.check_session_id(params)
    try:
        after_id = int(last_event_id)
    except ValueError:
        raise ContractError(["Last-Event-ID"], f"{contract.MESSAGE_INVALID} Last-Event-ID는 정수여야 합니다.") from None
    log = ReplayLog(session_id)
    request_id, frames = await log.follow(0)
    if request_id is None:
        return HttpResponse(status=204)
    ended = [event_id for event_id, event in map(sse.decode_head, frames) if event in sse.TERMINAL_EVENTS]
    if ended and ended[0] <= after_id:
        return HttpResponse(status=204)  # the client saw the end: EventSource stops reconnecting on 204
    return sse.streaming_response(_resume_body(log, request_id, after_id, frames), request_id)


def _json(payload: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> JsonResponse:
    """A JSON response with Korean kept readable (not \\u-escaped)."""
    return JsonResponse(payload, status=status, headers=headers, json_dumps_params={"ensure_ascii": False})


async def _answer_json(generation: Recommendation) -> JsonResponse:
    """Wait for the terminal event and answer one JSON document."""
    headers = {sse.REQUEST_ID_HEADER: generation.request_id}
    async with aclosing(answer_events(generation)) as events:
        async for item in events:
            if isinstance(item, Ping):
                continue
            frame = _sse_frame(item)
            if frame is not None and frame[1] in sse.TERMINAL_EVENTS:  # the envelope the stream would close with
                envelope = frame[2]
                return _json(envelope, status=envelope["status"], headers=headers)
    return _json(contract.envelope(500, contract.MESSAGE_INTERNAL, None), status=500, headers=headers)


def _error_frame(status: int, message: str, *, event_id: int = 1) -> bytes:
    """One encoded `error` event with the envelope."""
    return sse.encode_event(event_id=event_id, event="error", data=contract.envelope(status, message, None))


async def _sse_error(status: int, message: str) -> AsyncIterator[bytes]:
    """A stream of one `error` event: a failure after the input was accepted (e.g. Qdrant down)."""
    yield _error_frame(status, message)


def _limited_address(request: HttpRequest) -> str | None:
    """The client address to rate-limit by; None for an API-key holder (chatbot.auth)."""
    return None if getattr(request, "api_client", False) else request.META.get("REMOTE_ADDR")


async def _recommend(request: HttpRequest, mode: str) -> HttpResponse:
    if request.method not in ("GET", "POST"):
        message = "GET(SSE) 또는 POST(JSON)만 지원합니다."
        return _json(contract.envelope(405, message, None), status=405, headers={"Allow": "GET, POST"})
    try:
        params = _params(request)
        if request.method == "GET" and "Last-Event-ID" in request.headers:
            return await _resume(params, request.headers["Last-Event-ID"])
        await rate_limit_check(
            session_id=contract.clean_field(params.get("sessionId"), contract.LIMITS["sessionId"]),
            address=_limited_address(request),
        )
        generation = await recommendation_prepare(mode=mode, params=params)
        request_id_bind(generation.request_id)  # this request's log lines from now on carry its generation's id
    except ContractError as exc:
        return _json(exc.envelope(), status=exc.status)
    except RateLimited as exc:
        headers = {"Retry-After": str(exc.retry_after_s)}
        return _json(contract.envelope(429, exc.message, None), status=429, headers=headers)
    except Exception as exc:  # noqa: BLE001 - prepare_failure logs it; the envelope, never Django's HTML page
        status, message = prepare_failure(exc)
        if request.method == "GET" and isinstance(exc, KnowledgeUnavailableError):
            return sse.streaming_response(_sse_error(status, message))  # the input was fine: an in-stream error
        return _json(contract.envelope(status, message, None), status=status)
    if request.method == "POST":
        return await _answer_json(generation)
    return sse.streaming_response(_sse_body(generation), generation.request_id)


@csrf_exempt
async def base_info(request: HttpRequest) -> HttpResponse:
    """`/ai/chatbot/recommendation/base-info`: sessionId, location, workType, category (Korean label)."""
    return await _recommend(request, "base_info")


@csrf_exempt
async def free_text(request: HttpRequest) -> HttpResponse:
    """`/ai/chatbot/recommendation/free-text`: sessionId, message."""
    return await _recommend(request, "free_text")


@csrf_exempt
async def session_messages(request: HttpRequest, session_id: str) -> HttpResponse:
    """`/ai/chatbot/sessions/<sessionId>/messages`: GET the session's turns (oldest first) in the
    usual envelope (404 for an unknown session); DELETE clears the session (204, or 404)."""
    if contract.clean_field(session_id, contract.LIMITS["sessionId"]) is None:
        message = f"{contract.MESSAGE_INVALID} 확인할 항목: sessionId"
        return _json(contract.envelope(400, message, {"invalidFields": ["sessionId"]}), status=400)
    if request.method == "GET":
        transcript = await sync_to_async(session_transcript)(session_id=session_id)
        if transcript is None:
            return _json(contract.envelope(404, contract.MESSAGE_NO_SESSION, None), status=404)
        return _json(contract.envelope(200, contract.MESSAGE_SESSION, transcript))
    if request.method == "DELETE":
        if not await sync_to_async(session_clear)(session_id=session_id):
            return _json(contract.envelope(404, contract.MESSAGE_NO_SESSION, None), status=404)
        return HttpResponse(status=204)
    message = "GET 또는 DELETE만 지원합니다."
    return _json(contract.envelope(405, message, None), status=405, headers={"Allow": "GET, DELETE"})


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """200 while the web process is up."""
    return JsonResponse({"status": "ok"})


@require_GET
@never_cache
async def readyz(request: HttpRequest) -> JsonResponse:
    """200 `{"status": "ready", ...}` when a GPU worker with its model loaded is alive and Redis and
    the database answer; 503 `{"status": "not_ready", "failed": [...], ...}` otherwise. The body is
    chatbot.observability.readiness_report's; it takes LEAFRESH_READY_TIMEOUT_S at most."""
    ready, body = await readiness_report()
    return _json(body, status=200 if ready else 503)


@require_GET
@never_cache
def index(request: HttpRequest) -> HttpResponse:
    """The chat widget (WebSocket), with this browser's conversation so far, so a refresh keeps it."""
    session_id = widget_session_id(request.session)
    transcript = session_transcript(session_id=session_id) or {"turns": []}
    widget = {
        "sessionId": session_id,
        "categories": [{"code": c.code, "label": c.label} for c in category_list_active()],
        "turns": transcript["turns"],
        "messageMaxChars": contract.LIMITS["message"],
    }
    context = {"widget": widget, "categories": widget["categories"], "locations": LOCATIONS, "work_types": WORK_TYPES}
    return render(request, "chatbot/index.html", context)


@require_POST
def new_conversation(request: HttpRequest) -> HttpResponse:
    """Start a new conversation in the widget: a new chat session for this browser (the old one's
    turns stay in the database). CSRF-protected form POST; redirects to the widget."""
    widget_session_id(request.session, renew=True)
    return HttpResponseRedirect("/")


async def prompt_trial_stream(request: HttpRequest, prompt_id: int) -> HttpResponse:
    """The admin's "try it" stream for a prompt version (chatbot.trial events as SSE).

    The inputs are the mode's fields as query parameters. Every refusal is a stream of one `error`
    event (the page's EventSource cannot read an HTTP error's body): 403 unless the user may try
    prompts (chatbot.auth.trial_permitted) or when the browser says the request came from another
    site (`Sec-Fetch-Site`: a trial runs a generation), 404 for an unknown version, 400 bad input.
    """
    user = await request.auser()
    foreign = request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none")
    if foreign or not await sync_to_async(trial_permitted)(user):
        return sse.streaming_response(_sse_error(403, "이 프롬프트를 시험할 권한이 없습니다. 관리자로 다시 로그인해 주세요."))
    prompt = await PromptTemplate.objects.filter(pk=prompt_id).afirst()
    if prompt is None:
        return sse.streaming_response(_sse_error(404, "그런 프롬프트 버전이 없습니다."))

    async def body() -> AsyncIterator[bytes]:  # prompt_trial_events turns every failure into its `error` event
        event_id = 0
        async with aclosing(prompt_trial_events(prompt=prompt, inputs=request.GET.dict())) as events:
            async for item in events:
                if item is None:
                    yield sse.PING
                    continue
                event_id += 1
                yield sse.encode_event(event_id=event_id, event=item.event, data=item.data)

    return sse.streaming_response(body())
