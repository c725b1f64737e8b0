"""The OpenAI-compatible API on the same engine: `GET /v1/models`, `GET /v1/models/<id>` and
`POST /v1/chat/completions`, streamed (`data:` chunks, then `data: [DONE]`) or not.

One model is served, LEAFRESH_OPENAI_API_MODEL (default `leafresh`): the free-text recommendation
that the chat widget and the Spring contract give (moderation, retrieval, the admin's active
prompt, three challenges), answered as the text the contract streams, or with
`response_format={"type": "json_object"}` as the answer's JSON (`{"recommend", "challenges"}`).
Like OpenAI's API it is stateless: the last message is the user's message and the earlier user and
assistant messages are its history (the GPU worker keeps what fits the history token budget). The
system prompt is the admin's, so `system` and `developer` messages are refused.

Formats follow OpenAI's API reference (Chat Completions: the chat completion object, the chunk
object, `stream_options.include_usage`; errors as `{"error": {"message", "type", "param", "code"}}`).
Every stream chunk has the same `id` and `created`; the role comes only in the first chunk; the
last choice chunk has the `finish_reason`; with include_usage a chunk with no choices and the usage
follows. A failure after the stream began is one `data: {"error": {...}}` event, as vLLM sends it
(the official client raises it as an APIError), then `data: [DONE]`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chatbot import contract, sse
from chatbot.contract import ContractError
from chatbot.conversation import SessionContext
from chatbot.ratelimit import RateLimited, rate_limit_check
from chatbot.selectors import NotConfiguredError, prompt_get_active
from chatbot.services import PresetAnswer, Recommendation, prepare_failure, recommendation_prepare
from chatbot.streaming import Ping, answer_events
from inference.types import FinishReason, GenerationRequest
from leafresh.logs import request_id_bind

logger = logging.getLogger(__name__)
MAX_BODY_BYTES = 64 * 1024  # the conversation comes with every request
SESSION_PREFIX = "v1-"  # the sessions these requests are recorded under (one per request)


# --- the request (pydantic checks it; unknown fields are refused, not ignored) ---
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    """A text part of a message's content (`[{"type": "text", "text": ...}]`)."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One message of `messages`. `name` is accepted and not used."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        """The content as one string (text parts joined with line breaks)."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class StreamOptions(_Strict):
    """`stream_options`: `include_usage` adds a usage chunk before `[DONE]`."""

    include_usage: bool = False


class ResponseFormat(_Strict):
    """`response_format`: `text` (the default) or `json_object` (the answer's JSON as the content)."""

    type: Literal["text", "json_object"]


class ChatCompletionRequest(_Strict):
    """The supported subset of OpenAI's chat completion request (README "OpenAI-compatible API").

    Ranges are OpenAI's: temperature 0-2, top_p in (0, 1]. `max_tokens` (or its newer name
    `max_completion_tokens`) caps the completion in tokens, at most the admin's max_new_tokens.
    `user` is the end user's id: requests with one are rate-limited per user as a chat session is.
    `metadata` and `store` are accepted and not used; penalties only as 0; `n` only as 1.
    """

    model: str
    messages: list[ChatMessage] = Field(min_length=1, max_length=200)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    n: Literal[1] | None = None
    presence_penalty: Literal[0] | None = None
    frequency_penalty: Literal[0] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = Field(default=None, max_length=100)
    metadata: dict[str, str] | None = None
    store: bool | None = None


class ApiError(Exception):
    """An OpenAI-style error answer: HTTP `status`, `type` (invalid_request_error, rate_limit_error,
    server_error, ...), the offending `param` (dotted path) and a `code`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_response(error: ApiError, headers: dict[str, str] | None = None) -> JsonResponse:
    headers = {**error.headers, **(headers or {})}
    return JsonResponse(error.body(), status=error.status, headers=headers, json_dumps_params={"ensure_ascii": False})


def _server_error(status: int, message: str, code: str) -> ApiError:
    kind = "rate_limit_error" if status == 429 else "invalid_request_error" if status < 500 else "server_error"
    return ApiError(status, message, type_=kind, code=code)


def parse_chat_request(raw: bytes) -> ChatCompletionRequest:
    """The checked request body. Raises ApiError (400, with the first offending field as `param`)."""
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes", code="request_too_large")
    try:
        body = ChatCompletionRequest.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        what = f"unsupported field {param!r}" if first["type"] == "extra_forbidden" else first["msg"]
        raise ApiError(400, f"invalid request: {what}", param=param) from None
    if body.model != settings.LEAFRESH_OPENAI_API_MODEL:
        raise ApiError(404, f"the model {body.model!r} does not exist", param="model", code="model_not_found")
    for index, message in enumerate(body.messages):
        if message.role in ("system", "developer"):
            raise ApiError(
                400,
                f"{message.role} messages are not supported: the system prompt is managed in the admin",
                param=f"messages.{index}.role",
            )
    if body.messages[-1].role != "user":
        raise ApiError(400, "the last message must be the user's", param=f"messages.{len(body.messages) - 1}.role")
    return body


def _history(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The messages before the last as history (the newest LEAFRESH_HISTORY_MAX_TURNS turns)."""
    history = [{"role": m.role, "content": m.text} for m in messages[:-1] if m.text.strip()]
    user_turns = [i for i, m in enumerate(history) if m["role"] == "user"]
    keep = user_turns[-settings.LEAFRESH_HISTORY_MAX_TURNS :] if settings.LEAFRESH_HISTORY_MAX_TURNS > 0 else []
    return history[keep[0] :] if keep else []


def _with_sampling(recommendation: Recommendation, body: ChatCompletionRequest) -> Recommendation:
    """The request's sampling fields over the admin's settings (max tokens: the smaller)."""
    item = recommendation.item
    if not isinstance(item, GenerationRequest):
        return recommendation
    sampling = item.sampling
    cap = body.max_completion_tokens or body.max_tokens
    sampling = dataclasses.replace(
        sampling,
        temperature=sampling.temperature if body.temperature is None else body.temperature,
        top_p=sampling.top_p if body.top_p is None else body.top_p,
        seed=body.seed,
        max_new_tokens=min(sampling.max_new_tokens, cap) if cap else sampling.max_new_tokens,
    )
    return dataclasses.replace(recommendation, item=dataclasses.replace(item, sampling=sampling))


# --- events -> completion pieces ---
@dataclass(frozen=True)
class Delta:
    """New content text."""

    text: str


@dataclass(frozen=True)
class Finish:
    """The end of the choice: OpenAI's `finish_reason` and the usage (tokens)."""

    reason: str
    usage: dict[str, int]


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def completion_pieces(
    recommendation: Recommendation, *, json_answer: bool
) -> AsyncIterator[Delta | Finish | ApiError | Ping]:
    """A recommendation's events as completion pieces: Deltas, then exactly one Finish or ApiError
    (Pings while nothing arrives; a failure inside is an ApiError 500). The answer's text streams as it is generated, or with
    `json_answer` comes whole as its JSON at the end. An answer cut off at the token limit is a
    Finish `length` (its text so far was sent; its usage is not known: zeros); an abusive message's
    polite reply finishes with `content_filter`. The turn is recorded (chatbot.streaming.answer_events).
    """
    item = recommendation.item
    try:
        async with aclosing(answer_events(recommendation)) as events:
            async for event in events:
                if isinstance(event, Ping):
                    yield event
                    continue
                kind = event["type"]
                if kind == "chat.token" and not json_answer:
                    yield Delta(event["text"])
                elif kind == "chat.done":
                    if json_answer:
                        yield Delta(json.dumps(event["data"], ensure_ascii=False))
                    usage = event.get("usage") or {}
                    abuse = isinstance(item, PresetAnswer) and item.reason == "abuse"
                    reason = "content_filter" if abuse else "stop"
                    yield Finish(reason, _usage(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)))
                    return
                elif kind == "chat.error":
                    if event.get("finish_reason") == FinishReason.LENGTH.value:
                        yield Finish("length", _usage(0, 0))
                    else:
                        yield _server_error(int(event["status"]), event["message"], str(event.get("finish_reason") or "error"))
                    return
    except Exception:  # a bug or a lost Redis: one error piece, never a stream that just stops
        logger.exception("completion of request %s failed", recommendation.request_id)
    yield _server_error(500, contract.MESSAGE_INTERNAL, "error")


# --- responses ---
def _completion_id(recommendation: Recommendation) -> str:
    return "chatcmpl-" + recommendation.request_id


async def _complete(recommendation: Recommendation, body: ChatCompletionRequest, json_answer: bool) -> HttpResponse:
    """The whole completion as one chat completion object (or the error's status and body)."""
    created = int(time.time())
    headers = {sse.REQUEST_ID_HEADER: recommendation.request_id}
    text: list[str] = []
    async for piece in completion_pieces(recommendation, json_answer=json_answer):
        if isinstance(piece, Delta):
            text.append(piece.text)
        elif isinstance(piece, ApiError):
            return _error_response(piece, headers)
        elif isinstance(piece, Finish):
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(text), "refusal": None},
                "logprobs": None,
                "finish_reason": piece.reason,
            }
            completion = {
                "id": _completion_id(recommendation),
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "choices": [choice],
                "usage": piece.usage,
            }
            return JsonResponse(completion, headers=headers, json_dumps_params={"ensure_ascii": False})
    raise AssertionError("completion_pieces ends with a Finish or an ApiError")


async def _stream(
    recommendation: Recommendation, body: ChatCompletionRequest, pieces: AsyncIterator[Any], first: Any
) -> AsyncIterator[bytes]:
    """The chunk stream: the role chunk, content chunks, the finish chunk, the usage chunk (when
    asked), then `[DONE]`; or an error event then `[DONE]`. Comment pings keep the connection alive."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    head = {
        "id": _completion_id(recommendation),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.model,
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        data = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if include_usage:
            data["usage"] = None
        return sse.encode_data(data)

    async with aclosing(pieces):
        yield chunk({"role": "assistant", "content": ""})
        piece = first
        while True:
            if isinstance(piece, Ping):
                yield sse.PING
            elif isinstance(piece, Delta):
                yield chunk({"content": piece.text})
            elif isinstance(piece, Finish):
                yield chunk({}, piece.reason)
                if include_usage:
                    yield sse.encode_data({**head, "choices": [], "usage": piece.usage})
                break
            elif isinstance(piece, ApiError):
                yield sse.encode_data(piece.body())
                break
            piece = await anext(pieces)  # completion_pieces ends with a Finish or an ApiError
    yield sse.DONE


async def _prepare(request: HttpRequest, body: ChatCompletionRequest) -> Recommendation:
    """The recommendation for the request's last message, with its history. Raises ApiError."""
    message = body.messages[-1].text
    session_id = SESSION_PREFIX + uuid.uuid4().hex[:22]
    api_client = getattr(request, "api_client", False)
    try:
        await rate_limit_check(
            session_id=f"{SESSION_PREFIX}user:{body.user}" if body.user else None,
            address=None if api_client else request.META.get("REMOTE_ADDR"),
        )
        context = SessionContext(history=_history(body.messages))
        recommendation = await recommendation_prepare(
            mode="free_text", params={"sessionId": session_id, "message": message}, context=context
        )
    except ContractError as exc:
        param = f"messages.{len(body.messages) - 1}.content"
        raise ApiError(400, exc.message, param=param, code="invalid_message") from None
    except RateLimited as exc:
        headers = {"Retry-After": str(exc.retry_after_s)}
        raise ApiError(429, exc.message, type_="rate_limit_error", code="rate_limit_exceeded", headers=headers) from None
    except Exception as exc:  # noqa: BLE001 - prepare_failure logs it
        status, text = prepare_failure(exc)
        raise _server_error(status, text, "unavailable" if status == 503 else "error") from None
    return _with_sampling(recommendation, body)


@csrf_exempt
async def chat_completions(request: HttpRequest) -> HttpResponse:
    """`POST /v1/chat/completions` (OpenAI's Chat Completions). A stream's status waits for its first
    piece (at most one ping interval): a request no worker can take is a 503 answer, not a stream
    that fails; after that the stream starts and pings keep it open while the answer is generated."""
    if request.method != "POST":
        return _error_response(ApiError(405, "use POST", code="method_not_allowed"), {"Allow": "POST"})
    try:
        body = parse_chat_request(request.body)
        recommendation = await _prepare(request, body)
    except ApiError as exc:
        return _error_response(exc)
    request_id_bind(recommendation.request_id)  # this request's log lines from now on carry its generation's id
    json_answer = body.response_format is not None and body.response_format.type == "json_object"
    if not body.stream:
        return await _complete(recommendation, body, json_answer)
    pieces = completion_pieces(recommendation, json_answer=json_answer)
    first = await anext(pieces)
    if isinstance(first, ApiError):  # nothing was generated: answer with the status itself
        await pieces.aclose()
        return _error_response(first, {sse.REQUEST_ID_HEADER: recommendation.request_id})
    return sse.streaming_response(_stream(recommendation, body, pieces, first), recommendation.request_id)


def _model_object(created: int) -> dict[str, Any]:
    return {"id": settings.LEAFRESH_OPENAI_API_MODEL, "object": "model", "created": created, "owned_by": "leafresh"}


def _model_created() -> int:
    """When the served model last changed: the active free-text prompt's creation (Unix seconds)."""
    try:
        return int(prompt_get_active(mode="free_text").created_at.timestamp())
    except NotConfiguredError:
        return 0


async def models(request: HttpRequest) -> HttpResponse:
    """`GET /v1/models`: the one model served."""
    if request.method != "GET":
        return _error_response(ApiError(405, "use GET", code="method_not_allowed"), {"Allow": "GET"})
    created = await sync_to_async(_model_created)()
    return JsonResponse({"object": "list", "data": [_model_object(created)]})


async def model(request: HttpRequest, model_id: str) -> HttpResponse:
    """`GET /v1/models/<id>`: the model, or 404 for any other id."""
    if request.method != "GET":
        return _error_response(ApiError(405, "use GET", code="method_not_allowed"), {"Allow": "GET"})
    if model_id != settings.LEAFRESH_OPENAI_API_MODEL:
        return _error_response(ApiError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found"))
    return JsonResponse(_model_object(await sync_to_async(_model_created)()))
