"""HTTP adapters: the SSE GET and JSON POST endpoints of the Spring contract, health, and the page.

Thin: parse -> check (chatbot.contract) -> build (chatbot.services) -> stream (chatbot.streaming)
-> encode (chatbot.sse). Invalid input is answered with 400 before any stream starts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET

from chatbot import contract, sse
from chatbot.contract import ContractError
from chatbot.selectors import NotConfiguredError, category_list_active
from chatbot.services import PresetAnswer, recommendation_build_base_info, recommendation_build_free_text
from chatbot.streaming import Ping, answer_events
from inference.types import GenerationRequest

logger = logging.getLogger(__name__)
MAX_BODY_BYTES = 8 * 1024
REQUEST_ID_HEADER = "X-Request-ID"  # the generation's id, as the worker's logs name it


def _params(request: HttpRequest) -> dict[str, Any]:
    """GET query parameters, or a POST's JSON object body. Raises ContractError on a bad body."""
    if request.method == "GET":
        return request.GET.dict()
    if len(request.body) > MAX_BODY_BYTES:
        raise ContractError(["body"], f"{contract.MESSAGE_INVALID} 본문이 너무 큽니다.")
    try:
        body = json.loads(request.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ContractError(["body"], f"{contract.MESSAGE_INVALID} 본문은 JSON 객체여야 합니다.") from None
    if not isinstance(body, dict):
        raise ContractError(["body"], f"{contract.MESSAGE_INVALID} 본문은 JSON 객체여야 합니다.")
    return body


async def _sse_body(generation: GenerationRequest | PresetAnswer) -> AsyncIterator[bytes]:
    """The event stream: `challenge` deltas, then exactly one `close` or `error`, then the end.

    Other events (`chat.queued`, the WebSocket's `chat.challenge` cards) are not part of the SSE contract.
    """
    last_id = 0
    try:
        async with aclosing(answer_events(generation)) as events:
            async for item in events:
                if isinstance(item, Ping):
                    yield sse.PING
                    continue
                kind = item["type"]
                if kind not in ("chat.token", "chat.done", "chat.error"):
                    continue
                last_id = int(item["seq"])
                if kind == "chat.token":
                    data = contract.envelope(200, contract.MESSAGE_TOKEN, item["text"])
                    yield sse.encode_event(event_id=last_id, event="challenge", data=data)
                elif kind == "chat.done":
                    data = contract.envelope(200, contract.MESSAGE_DONE, item["data"])
                    yield sse.encode_event(event_id=last_id, event="close", data=data)
                    return
                elif kind == "chat.error":
                    data = contract.envelope(int(item["status"]), item["message"], None)
                    yield sse.encode_event(event_id=last_id, event="error", data=data)
                    return
    except Exception:  # under daphne an exception here would leave the response open
        logger.exception("SSE stream failed for request %s", generation.request_id)
        data = contract.envelope(500, contract.MESSAGE_INTERNAL, None)
        yield sse.encode_event(event_id=last_id + 1, event="error", data=data)


def _json(payload: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> JsonResponse:
    """A JSON response with Korean kept readable (not \\u-escaped)."""
    return JsonResponse(payload, status=status, headers=headers, json_dumps_params={"ensure_ascii": False})


async def _answer_json(generation: GenerationRequest | PresetAnswer) -> JsonResponse:
    """Wait for the terminal event and answer one JSON document."""
    headers = {REQUEST_ID_HEADER: generation.request_id}
    async with aclosing(answer_events(generation)) as events:
        async for item in events:
            if isinstance(item, Ping):
                continue
            if item["type"] == "chat.done":
                return _json(contract.envelope(200, contract.MESSAGE_DONE, item["data"]), headers=headers)
            if item["type"] == "chat.error":
                status = int(item["status"])
                return _json(contract.envelope(status, item["message"], None), status=status, headers=headers)
    return _json(contract.envelope(500, contract.MESSAGE_INTERNAL, None), status=500, headers=headers)


async def _recommend(request: HttpRequest, build: Callable[[dict[str, Any]], GenerationRequest | PresetAnswer]) -> HttpResponse:
    if request.method not in ("GET", "POST"):
        message = "GET(SSE) 또는 POST(JSON)만 지원합니다."
        return _json(contract.envelope(405, message, None), status=405, headers={"Allow": "GET, POST"})
    try:
        generation = await sync_to_async(build)(_params(request))
    except ContractError as exc:
        return _json(exc.envelope(), status=exc.status)
    except NotConfiguredError:
        logger.exception("recommendation is not configured")
        return _json(contract.envelope(503, contract.MESSAGE_NO_WORKER, None), status=503)
    if request.method == "POST":
        return await _answer_json(generation)
    response = StreamingHttpResponse(_sse_body(generation), content_type=sse.CONTENT_TYPE)
    for name, value in sse.HEADERS.items():
        response[name] = value
    response[REQUEST_ID_HEADER] = generation.request_id
    return response


@csrf_exempt
async def base_info(request: HttpRequest) -> HttpResponse:
    """`/ai/chatbot/recommendation/base-info`: sessionId, location, workType, category (Korean label)."""
    return await _recommend(request, lambda params: recommendation_build_base_info(checked=contract.check_base_info(params)))


@csrf_exempt
async def free_text(request: HttpRequest) -> HttpResponse:
    """`/ai/chatbot/recommendation/free-text`: sessionId, message."""
    return await _recommend(request, lambda params: recommendation_build_free_text(checked=contract.check_free_text(params)))


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """200 while the web process is up."""
    return JsonResponse({"status": "ok"})


@require_GET
def index(request: HttpRequest) -> HttpResponse:
    """The minimal chat page (WebSocket)."""
    categories = [{"code": c.code, "label": c.label} for c in category_list_active()]
    return render(request, "chatbot/index.html", {"categories": categories})
