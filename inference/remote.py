"""The remote generation backend: streams answers from an OpenAI-compatible server (vLLM, TGI,
`transformers serve`) instead of a model loaded in the worker.

`RemoteEngine` has the local engine's interface (start, stop, submit, cancel, load, metrics) and
sends the same events to the same sink (inference.engine.EventSink). Each request is one streamed
`POST /chat/completions` on an asyncio loop in a thread of its own (the official `openai` client,
AsyncOpenAI). The completion's JSON text goes through the local engine's own pieces
(inference.serving.AnswerStream: progressive rendering, challenge cards, the final answer's
validation), so the SSE/WS contract is the same whichever backend generates.

Structured output: with `json_schema` "auto" the request carries `response_format` (type
json_schema, strict) built from the request's schema; a server that rejects the field (a 4xx
naming it, or calling it unsupported) is remembered and the request is sent again without it, with
an instruction to answer in that JSON format appended to the system message instead. "always"
never falls back; "never" only instructs. The answer is validated either way. `stream_options`
(include_usage) is dropped the same way when a server rejects it.

Concurrency: up to `max_running` remote streams at once, `max_waiting` more wait in line (each
told its position), past that a request is refused with 503. Cancel closes the remote stream
(the server sees the client go) and nothing more is published. Deadlines are checked every
DEADLINE_CHECK_S. Connection errors and 5xx answers are retried (tenacity) until the first token;
after that, or when retries run out, the request ends with `error` 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from inference.history import (
    TEMPLATE_OVERHEAD_TOKENS,
    HistoryWindow,
    Message,
    chat_token_counter,
    history_window,
    prompt_messages,
)
from inference.metrics import EngineMetrics
from inference.publisher import LoopThread
from inference.serving import (
    MESSAGE_BUSY,
    MESSAGE_DEADLINE,
    MESSAGE_ERROR,
    MESSAGE_LENGTH,
    MESSAGE_TOO_LONG,
    AnswerStream,
    WaitingLine,
    answer_timings,
    past_deadline,
    request_seed,
)
from inference.types import FinishReason, GenerationRequest

logger = logging.getLogger(__name__)

CONNECT_ATTEMPTS = 3  # tries to open a stream (connection errors, 5xx) before the first token
DEADLINE_CHECK_S = 0.1  # how often running and waiting requests are checked against their deadlines
# Without a local tokenizer, tokens are estimated as UTF-8 bytes / 3: a Hangul syllable (3 bytes)
# counts as one token and ASCII text as one per 3 characters, both on the high side for Llama- and
# Mistral-style vocabularies (history is then cut a little early rather than overflow).
ESTIMATE_BYTES_PER_TOKEN = 3
JSON_INSTRUCTION = "답변은 아래 JSON 스키마를 따르는 JSON 객체 하나로만, 공백과 줄바꿈 없이 출력하세요.\nJSON 스키마: {schema}"
# Words in a 4xx answer that mean the server does not take a field we sent (any server's wording).
UNSUPPORTED_WORDS = ("unsupported", "not supported", "unexpected", "unknown", "not allowed", "extra inputs", "not permitted")
TOO_LONG_WORDS = ("context length", "maximum context", "too long", "max_model_len", "input validation error")


class RemoteBackendError(RuntimeError):
    """The remote server cannot be used (its model list is unreachable or empty at start)."""


@dataclass(frozen=True)
class RemoteSettings:
    """How to reach the server (LEAFRESH_OPENAI_* settings).

    base_url: the API root, e.g. `http://127.0.0.1:8001/v1`. api_key: sent as a Bearer token ("" =
    none). model: the model name to request ("" = the first of GET /models). json_schema: auto |
    always | never. timeout_s: seconds to connect and between two chunks. tokenizer_dir: a local
    model folder whose tokenizer counts history tokens (None = estimate).
    """

    base_url: str
    api_key: str = ""
    model: str = ""
    json_schema: str = "auto"
    timeout_s: float = 30.0
    tokenizer_dir: str | None = None


def estimate_tokens(messages: list[Message]) -> int:
    """Token estimate of chat messages without a tokenizer: UTF-8 bytes / ESTIMATE_BYTES_PER_TOKEN
    per content, rounded up, plus TEMPLATE_OVERHEAD_TOKENS per message."""
    return sum(math.ceil(len(m["content"].encode()) / ESTIMATE_BYTES_PER_TOKEN) + TEMPLATE_OVERHEAD_TOKENS for m in messages)


def token_counter(tokenizer_dir: str | None) -> Callable[[list[Message]], int]:
    """`count(messages)` with the tokenizer of a local model folder (its chat template), or
    `estimate_tokens` when there is none or it cannot be loaded."""
    if tokenizer_dir and Path(tokenizer_dir).is_dir():
        try:
            from transformers import AutoTokenizer

            return chat_token_counter(AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))
        except Exception:
            logger.warning("no tokenizer in %s: history tokens are estimated", tokenizer_dir, exc_info=True)
    return estimate_tokens


def _message(exc: openai.APIStatusError) -> str:
    """The text of a server's error answer (its JSON body or message), for matching words."""
    return f"{exc.message} {json.dumps(exc.body, ensure_ascii=False) if exc.body is not None else ''}".lower()


def _error_summary(exc: openai.APIStatusError) -> str:
    """What may be logged of a server's error answer: its status, the error's `type` and `code`, and
    the names of rejected fields (a FastAPI/pydantic 422's `loc`). Never the body's text, which can
    repeat the request's messages."""
    parts = [str(exc.status_code)]
    if exc.type:
        parts.append(f"type={exc.type}")
    if exc.code:
        parts.append(f"code={exc.code}")
    detail = exc.body.get("detail") if isinstance(exc.body, dict) else None
    if isinstance(detail, list):
        locs = {
            ".".join(str(part) for part in item["loc"])
            for item in detail
            if isinstance(item, dict) and isinstance(item.get("loc"), list | tuple)
        }
        if locs:
            parts.append(f"fields={','.join(sorted(locs))}")
    return " ".join(parts)


def _retryable(exc: BaseException) -> bool:
    """A connection failure, a timeout or a 5xx answer: the server may answer a second try."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code >= 500
    return isinstance(exc, openai.APIConnectionError | httpx.TransportError)


class _Ended(Exception):
    """A request ended with an `error` event (status, message, finish reason)."""

    def __init__(self, status: int, message: str, reason: FinishReason) -> None:
        super().__init__(status, message, reason)
        self.status, self.message, self.reason = status, message, reason


@dataclass
class _Stream:
    """A running request's state."""

    request: GenerationRequest
    answer: AnswerStream
    started_at: float
    history: HistoryWindow = field(default_factory=HistoryWindow)
    task: asyncio.Task[None] | None = None
    chunks: int = 0  # content chunks received (servers send one per token)
    first_token_at: float | None = None
    last_token_at: float = 0.0
    sent_fields: frozenset[str] = frozenset()  # the optional fields its last request carried
    sent_messages: list[Message] = field(default_factory=list)  # the messages its last request carried
    ended: bool = False  # its terminal event was sent (or it was cancelled): publish nothing more


class RemoteEngine:
    """Serves generation requests by streaming them from an OpenAI-compatible server.

    Same interface as inference.engine.Engine: `submit(request)` and `cancel(request_id)` are
    thread-safe and return at once; events go to `sink` from the engine's loop thread.
    """

    def __init__(
        self,
        settings: RemoteSettings,
        sink: Any,
        *,
        max_running: int = 8,
        max_waiting: int = 64,
        metrics: EngineMetrics | None = None,
    ) -> None:
        if settings.json_schema not in ("auto", "always", "never"):
            raise ValueError(f"json_schema must be auto, always or never, not {settings.json_schema!r}")
        self.settings = settings
        self.sink = sink
        self.metrics = metrics or EngineMetrics(worker="remote")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.model = settings.model  # the model name sent (resolved at start when not configured)
        self.use_json_schema = settings.json_schema != "never"  # False once the server rejected it (auto)
        self.use_stream_options = True  # False once the server rejected `stream_options`
        self._count_tokens: Callable[[list[Message]], int] = estimate_tokens
        self._client: openai.AsyncOpenAI | None = None
        self._loop: LoopThread | None = None
        self._running: dict[str, _Stream] = {}
        self._line = WaitingLine(
            sink, self.metrics, max_running=max_running, max_waiting=max_waiting, running=lambda: len(self._running)
        )
        self._waiting = self._line.requests  # in arrival order
        self._ticker: asyncio.Task[None] | None = None
        self._closing = False  # set by stop(): requests arriving from then on are refused

    # --- interface (any thread) ---
    def start(self) -> None:
        """Load the counting tokenizer, open the client, resolve the model name, start the loop.

        Raises RemoteBackendError when no model is configured and the server's model list cannot be
        read (after CONNECT_ATTEMPTS tries) or is empty.
        """
        self._count_tokens = token_counter(self.settings.tokenizer_dir)
        self._loop = LoopThread("leafresh-remote")
        self._loop.submit(self._open()).result()
        logger.info("remote backend %s, model %s, json schema %s", self.settings.base_url, self.model, self.settings.json_schema)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop: running and waiting requests get an `error` 503 (the worker is going away)."""
        if self._loop is None:
            return
        try:
            self._loop.submit(self._shutdown()).result(timeout)
        except Exception:
            logger.warning("remote backend did not stop cleanly", exc_info=True)
        self._loop.stop(timeout)

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; its events go to the sink."""
        assert self._loop is not None, "start() first"
        self._loop.call(self._accept, request)

    def cancel(self, request_id: str) -> None:
        """Cancel a request wherever it is: its remote stream is closed; nothing more is published."""
        assert self._loop is not None, "start() first"
        self._loop.call(self._cancel_now, request_id)

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) counts, read without locking (for heartbeats and metrics)."""
        return len(self._running), len(self._waiting)

    # --- the loop (loop thread only) ---
    async def _open(self) -> None:
        timeout = httpx.Timeout(self.settings.timeout_s, connect=min(self.settings.timeout_s, 5.0))
        self._client = openai.AsyncOpenAI(
            base_url=self.settings.base_url, api_key=self.settings.api_key or "EMPTY", timeout=timeout, max_retries=0
        )
        if not self.model:
            try:
                async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(CONNECT_ATTEMPTS), wait=wait_exponential(multiplier=0.5, max=4), reraise=True
                ):
                    with attempt:
                        models = [model.id async for model in self._client.models.list()]
            except openai.OpenAIError as exc:
                raise RemoteBackendError(f"cannot list the models of {self.settings.base_url}: {type(exc).__name__}") from None
            if not models:
                raise RemoteBackendError(f"{self.settings.base_url} serves no model")
            self.model = models[0]
        self._ticker = asyncio.create_task(self._expire_forever())

    async def _shutdown(self) -> None:
        self._closing = True
        if self._ticker is not None:
            self._ticker.cancel()
        for stream in list(self._running.values()):
            self._fail(stream, 503, MESSAGE_ERROR, FinishReason.ERROR)
        while self._waiting:
            self._refuse(self._waiting.popleft(), 503, MESSAGE_ERROR, FinishReason.ERROR)
        tasks = [s.task for s in self._running.values() if s.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.close()

    def _gauges(self) -> None:
        self.metrics.running.set(len(self._running))
        self.metrics.waiting.set(len(self._waiting))

    def _accept(self, request: GenerationRequest) -> None:
        """As Engine._accept: ignore a redelivery, honour an earlier cancel, refuse past the bounds,
        else queue (a `queued` event) and start what fits."""
        if not self._line.screen(request):
            return
        if self._closing:  # the worker is going away, as Engine.stop
            logger.warning("request %s refused: the remote backend is stopping", request.request_id)
            self._refuse(request, 503, MESSAGE_ERROR, FinishReason.ERROR)
            return
        if self._line.full():
            logger.warning("request %s refused: %d running, %d waiting", request.request_id, *self.load)
            self._refuse(request, 503, MESSAGE_BUSY, FinishReason.ERROR)
            return
        self._line.push(request)
        self._admit()

    def _admit(self) -> None:
        """Start waiting requests while fewer than `max_running` streams are open."""
        started = False
        while self._waiting and len(self._running) < self.max_running:
            request = self._waiting.popleft()
            stream = _Stream(request=request, answer=AnswerStream(request, self.sink), started_at=time.time())
            self._running[request.request_id] = stream
            stream.task = asyncio.create_task(self._serve(stream), name=f"remote-{request.request_id}")
            started = True
        if started:
            self._line.announce()
        self._gauges()

    def _cancel_now(self, request_id: str) -> None:
        stream = self._running.get(request_id)
        if stream is not None:
            if not stream.ended:
                stream.ended = True
                self._finished(stream, FinishReason.CANCELLED)
                self.sink.discard(request_id)
                assert stream.task is not None
                stream.task.cancel()  # closes the HTTP response: the server sees the client go
            return
        if self._line.cancel(request_id):  # out of line, or remembered for a request still to come
            self._gauges()

    async def _expire_forever(self) -> None:
        while True:
            await asyncio.sleep(DEADLINE_CHECK_S)
            try:
                self._expire()
            except Exception:
                logger.exception("deadline check failed")

    def _expire(self) -> None:
        """As Engine._expire: waiting past the first-token deadline, or running past either, is a 504."""
        now = time.time()
        expired = self._line.expire(now)
        for request in expired:
            self._refuse(request, 504, MESSAGE_DEADLINE, FinishReason.DEADLINE)
        if expired:
            self._gauges()
        for stream in list(self._running.values()):
            if not stream.ended and past_deadline(stream.request, now, first_token_at=stream.first_token_at):
                self._fail(stream, 504, MESSAGE_DEADLINE, FinishReason.DEADLINE)

    def _fail(self, stream: _Stream, status: int, message: str, reason: FinishReason) -> None:
        """End a running request with its terminal `error` and close its remote stream."""
        if stream.ended:
            return
        stream.ended = True
        self._finished(stream, reason)
        self.sink.error(stream.request, status, message, reason)
        if stream.task is not None and stream.task is not asyncio.current_task():
            stream.task.cancel()

    def _refuse(self, request: GenerationRequest, status: int, message: str, reason: FinishReason) -> None:
        """End a request that never started (refused, expired while waiting, shutting down)."""
        self.metrics.finished(reason, time.time() - request.created_at)
        self.sink.error(request, status, message, reason)

    def _finished(self, stream: _Stream, reason: FinishReason) -> None:
        self.metrics.finished(reason, time.time() - stream.request.created_at)
        logger.info("request %s finished: %s after %d completion tokens", stream.request.request_id, reason.value, stream.chunks)

    # --- one request ---
    async def _serve(self, stream: _Stream) -> None:
        """Generate one request to its terminal event (or until it is cancelled)."""
        request = stream.request
        try:
            stream.history = history_window(request.history, budget=request.history_budget_tokens, count=self._count_tokens)
            messages = prompt_messages(request.messages, stream.history)
            usage, finish = await self._generate(stream, messages)
            if finish == "length":
                raise _Ended(500, MESSAGE_LENGTH, FinishReason.LENGTH)
            if finish is None:
                raise _Ended(503, MESSAGE_ERROR, FinishReason.ERROR)  # the stream ended without a finish reason
            try:
                answer = stream.answer.finish()
            except ValueError:
                logger.warning("completion of request %s is not a valid answer", request.request_id, exc_info=True)
                raise _Ended(500, MESSAGE_ERROR, FinishReason.ERROR) from None
            if not stream.ended:
                self._done(stream, answer, messages, usage)
        except asyncio.CancelledError:  # cancelled, past a deadline or shutting down
            logger.info("request %s: remote stream closed", request.request_id)
            if not stream.ended:  # cancelled by the loop's own stop, not by cancel/_fail: the worker is going away
                self._fail(stream, 503, MESSAGE_ERROR, FinishReason.ERROR)
        except _Ended as ended:
            self._fail(stream, ended.status, ended.message, ended.reason)
        except (openai.APIError, httpx.HTTPError) as exc:
            logger.warning("remote stream of request %s failed: %s", request.request_id, type(exc).__name__)
            self._fail(stream, *self._status_of(request.request_id, exc))
        except Exception:
            logger.exception("remote generation failed for request %s", request.request_id)
            self._fail(stream, 500, MESSAGE_ERROR, FinishReason.ERROR)
        finally:
            self._running.pop(request.request_id, None)
            self._admit()

    @staticmethod
    def _status_of(request_id: str, exc: BaseException) -> tuple[int, str, FinishReason]:
        """The error event for a server failure: 400 for a prompt the model cannot take, 503 for a
        server that is down, busy or failing, 500 for a request it refused otherwise."""
        if isinstance(exc, openai.APIStatusError) and 400 <= exc.status_code < 500 and exc.status_code != 429:
            if any(word in _message(exc) for word in TOO_LONG_WORDS):
                return 400, MESSAGE_TOO_LONG, FinishReason.ERROR
            logger.error("the server refused request %s: %s", request_id, _error_summary(exc))
            return 500, MESSAGE_ERROR, FinishReason.ERROR
        return 503, MESSAGE_ERROR, FinishReason.ERROR

    async def _generate(self, stream: _Stream, messages: list[Message]) -> tuple[dict[str, int] | None, str | None]:
        """Stream the completion into `stream.answer`; returns (the server's usage or None, its
        finish reason or None). Retries connection errors and 5xx before the first token, and
        resends without an optional field the server rejected: when this 4xx turns a field off, or
        when a field the request carried was turned off meanwhile by another request's 4xx (the
        requests sent before the first rejection came back each get their own)."""
        while True:
            try:
                async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(CONNECT_ATTEMPTS),
                    wait=wait_exponential(multiplier=0.2, max=1),
                    retry=retry_if_exception(lambda exc: _retryable(exc) and stream.first_token_at is None),
                    reraise=True,
                ):
                    with attempt:
                        return await self._stream_once(stream, messages)
            except openai.APIStatusError as exc:
                if stream.first_token_at is not None:
                    raise
                rejected = self._rejected_fields(exc) & stream.sent_fields
                self._drop_fields(rejected, exc)
                off = rejected - self._optional_fields()
                if not off:
                    raise
                logger.info("request %s: sent again without %s", stream.request.request_id, ", ".join(sorted(off)))
        raise AssertionError("unreachable")  # pragma: no cover

    def _optional_fields(self) -> frozenset[str]:
        """The optional fields requests carry now."""
        return frozenset(
            name
            for name, used in (("response_format", self.use_json_schema), ("stream_options", self.use_stream_options))
            if used
        )

    @staticmethod
    def _rejected_fields(exc: openai.APIStatusError) -> frozenset[str]:
        """The optional fields a 4xx turns down: those it names, or both if it only calls a field
        unsupported or unexpected; none for any other error."""
        if not 400 <= exc.status_code < 500:
            return frozenset()
        text = _message(exc)
        named = frozenset(
            name
            for name, words in (("response_format", ("response_format", "json_schema")), ("stream_options", ("stream_options",)))
            if any(word in text for word in words)
        )
        if named:
            return named
        if any(word in text for word in UNSUPPORTED_WORDS):
            return frozenset({"response_format", "stream_options"})
        return frozenset()

    def _drop_fields(self, rejected: frozenset[str], exc: openai.APIStatusError) -> None:
        """Stop sending the rejected optional fields that are still sent (`response_format` only
        with json_schema "auto"); the first drop of each is logged, with no text of the error."""
        dropped = []
        if "response_format" in rejected and self.use_json_schema and self.settings.json_schema == "auto":
            self.use_json_schema = False
            dropped.append("response_format")
        if "stream_options" in rejected and self.use_stream_options:
            self.use_stream_options = False
            dropped.append("stream_options")
        if dropped:
            logger.warning(
                "the server rejected %s (%s): sending without it from now on%s",
                ", ".join(dropped),
                _error_summary(exc),
                "; json schema fallback: the answer format is asked for in the prompt" if "response_format" in dropped else "",
            )

    def _body(self, request: GenerationRequest, messages: list[Message]) -> dict[str, Any]:
        """The chat completion's arguments. top_k and repetition_penalty are not sent: they are not
        OpenAI fields and some servers (transformers serve) refuse unknown fields."""
        sampling = request.sampling
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
            "seed": request_seed(request),  # the server's sampling seed (as the local engine: derived from the id)
        }
        if self.use_stream_options:
            body["stream_options"] = {"include_usage": True}
        if self.use_json_schema:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": request.schema, "strict": True},
            }
        else:
            schema = json.dumps(request.schema, ensure_ascii=False, separators=(",", ":"))
            instruction = JSON_INSTRUCTION.format(schema=schema)
            if messages and messages[0]["role"] == "system":
                body["messages"] = [{"role": "system", "content": f"{messages[0]['content']}\n\n{instruction}"}, *messages[1:]]
            else:
                body["messages"] = [{"role": "system", "content": instruction}, *messages]
        return body

    async def _stream_once(self, stream: _Stream, messages: list[Message]) -> tuple[dict[str, int] | None, str | None]:
        """One streamed chat completion; returns (usage or None, finish reason or None)."""
        assert self._client is not None
        usage: dict[str, int] | None = None
        finish: str | None = None
        body = self._body(stream.request, messages)
        stream.sent_fields = frozenset(body) & {"response_format", "stream_options"}
        stream.sent_messages = body["messages"]
        response = await self._client.chat.completions.create(**body)
        async with response:  # leaving closes the HTTP response (cancel, deadline, error)
            async for chunk in response:
                if chunk.usage is not None:
                    usage = {"prompt_tokens": chunk.usage.prompt_tokens, "completion_tokens": chunk.usage.completion_tokens}
                for choice in chunk.choices:
                    text = choice.delta.content if choice.delta is not None else None
                    if text:
                        self._token(stream, text)
                    if choice.finish_reason is not None:
                        finish = choice.finish_reason
        return usage, finish

    def _token(self, stream: _Stream, text: str) -> None:
        now = time.time()
        if stream.first_token_at is None:
            stream.first_token_at = now
            self.metrics.ttft.observe(now - stream.request.created_at)
        else:
            self.metrics.itl.observe(now - stream.last_token_at)
        stream.last_token_at = now
        stream.chunks += 1
        self.metrics.tokens.inc()
        stream.answer.add(text)

    def _done(self, stream: _Stream, answer: dict[str, Any], messages: list[Message], usage: dict[str, int] | None) -> None:
        request = stream.request
        if usage is None:  # the server sent none: count (tokenizer or estimate)
            completion = [{"role": "assistant", "content": stream.answer.completion}]
            prompt = stream.sent_messages or messages  # as sent: with the fallback's instruction, if any
            usage = {"prompt_tokens": self._count_tokens(prompt), "completion_tokens": self._count_tokens(completion)}
        usage = {**usage, "history_tokens": stream.history.tokens, "history_turns": stream.history.turns}
        timings = answer_timings(
            request, started_at=stream.started_at, first_token_at=stream.first_token_at, tokens=usage["completion_tokens"]
        )
        stream.ended = True
        self._finished(stream, FinishReason.STOP)
        self.sink.done(request, answer, usage=usage, timings=timings, model=self.model)
