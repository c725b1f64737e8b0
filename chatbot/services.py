"""Business logic of a recommendation: build the generation request, dispatch it, cancel it.

Adapters (SSE views, the WebSocket consumer) call these; they hold no logic of their own.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from django.conf import settings

from chatbot import contract
from chatbot.contract import BaseInfoInput, ContractError, FreeTextInput
from chatbot.prompts import build_messages, category_list_text
from chatbot.selectors import (
    categories_for_message,
    category_get_active,
    category_list_active,
    generation_settings_get,
    moderation_terms,
    prompt_get_active,
)
from inference.answer import answer_schema
from inference.types import CONTROL_GROUP, GenerationRequest, SamplingParams

GENERATE_TASK = "chatbot.generate"


def session_group_name(session_id: str) -> str:
    """The channel-layer group of a session. Hashed: group names allow only ASCII and < 100 chars."""
    return "session." + hashlib.sha256(session_id.encode()).hexdigest()[:40]


def _sampling() -> SamplingParams:
    row = generation_settings_get()
    return SamplingParams(
        temperature=row.temperature,
        top_p=row.top_p,
        top_k=row.top_k,
        repetition_penalty=row.repetition_penalty,
        max_new_tokens=row.max_new_tokens,
    )


@dataclass(frozen=True)
class PresetAnswer:
    """An answer given without generating: a polite reply to an off-topic or abusive message.

    `answer` is a close payload's `data` with an empty challenge list; `reason` is `off_topic` or
    `abuse`. It streams like a generated answer: one text delta, then the close.
    """

    request_id: str
    answer: dict[str, Any]
    reason: str


def moderation_verdict(*, message: str) -> str | None:
    """`abuse` or `off_topic` when an active term of that kind begins a word of the message
    (case-insensitive; a term of several words matches them in sequence; abuse checked first), else None.

    Word starts, not substrings: Korean words carry particles ("비트코인을"), but a term inside a
    word ("시발점", "페트병 신발" without spaces) must not match.
    """
    text = " ".join(message.lower().split())
    terms = moderation_terms()
    for kind in ("abuse", "off_topic"):
        if any(re.search(r"(?<!\w)" + re.escape(term), text) for term in terms.get(kind, [])):
            return kind
    return None


def _request(
    *,
    session_id: str,
    messages: list[dict[str, str]],
    categories: list[Any],
    category_code: str | None,
    choose_category: bool = False,
) -> GenerationRequest:
    """`categories`: the active categories (one read, so the enum and the labels agree)."""
    labels = {c.code: c.label for c in categories}
    return GenerationRequest(
        request_id=uuid.uuid4().hex,
        group=session_group_name(session_id),
        messages=messages,
        schema=answer_schema(category_labels=list(labels.values()) if choose_category else None),
        sampling=_sampling(),
        default_category=category_code,
        category_labels=labels,
        created_at=time.time(),
        ttft_timeout_s=settings.LEAFRESH_TTFT_TIMEOUT_S,
        total_timeout_s=settings.LEAFRESH_TOTAL_TIMEOUT_S,
    )


def recommendation_build_base_info(*, checked: BaseInfoInput) -> GenerationRequest:
    """The generation request for a base-info recommendation (reads the database).

    Raises ContractError (400, invalidFields=["category"]) for an unknown or inactive category,
    and selectors.NotConfiguredError when the mode has no active prompt.
    """
    category = category_get_active(label_or_code=checked.category)
    if category is None:
        raise ContractError(["category"], "알 수 없는 카테고리입니다. 확인할 항목: category")
    prompt = prompt_get_active(mode="base_info")
    fields = {"location": checked.location, "workType": checked.work_type, "category": category.label}
    messages = build_messages(system=prompt.system, user_template=prompt.user_template, fields=fields)
    return _request(
        session_id=checked.session_id, messages=messages, categories=category_list_active(), category_code=category.code
    )


def recommendation_build_free_text(*, checked: FreeTextInput) -> GenerationRequest | PresetAnswer:
    """The generation request for a free-text recommendation (reads the database), or a polite
    PresetAnswer when the message is abusive or off-topic (moderation terms in the database).

    The model chooses each challenge's category from the active categories (an enum of their
    labels in the grammar); the prompt lists them, those the message's keywords suggest first. Raises
    selectors.NotConfiguredError when the mode has no active prompt or no category is active.
    """
    verdict = moderation_verdict(message=checked.message)
    if verdict is not None:
        reply = contract.REPLY_ABUSE if verdict == "abuse" else contract.REPLY_OFF_TOPIC
        return PresetAnswer(request_id=uuid.uuid4().hex, answer={"recommend": reply, "challenges": []}, reason=verdict)
    active = category_list_active()  # display order: one grammar for every message
    ranked = categories_for_message(message=checked.message, categories=active)
    prompt = prompt_get_active(mode="free_text")
    fields = {"message": checked.message, "categories": category_list_text([(c.code, c.label) for c in ranked])}
    messages = build_messages(system=prompt.system, user_template=prompt.user_template, fields=fields)
    return _request(session_id=checked.session_id, messages=messages, categories=active, category_code=None, choose_category=True)


def recommendation_dispatch(*, request: GenerationRequest) -> None:
    """Send the request to the GPU worker (Celery task on queue `gpu`). Blocking: Redis I/O."""
    from celery_app import app

    app.send_task(GENERATE_TASK, args=[request.to_dict()], queue="gpu")


async def recommendation_cancel(*, request_id: str) -> None:
    """Ask every GPU worker to cancel a request (a broadcast on the channel layer)."""
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    await layer.group_send(CONTROL_GROUP, {"type": "engine.cancel", "request_id": request_id})


_redis: dict[int, Any] = {}
ANY_ALIVE_CACHE_S = 1.0  # a positive "some worker is alive" answer is reused this long
_any_alive_seen_at = -ANY_ALIVE_CACHE_S


async def worker_alive(*, name: str | None = None) -> bool:
    """True when the named GPU worker's heartbeat (or, with no name, any worker's) has not expired."""
    import asyncio

    loop_id = id(asyncio.get_running_loop())
    client = _redis.get(loop_id)
    if client is None:
        client = _redis[loop_id] = aioredis.Redis.from_url(settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
    prefix = settings.LEAFRESH_HEARTBEAT_PREFIX
    if name:
        return bool(await client.exists(prefix + name))
    now = time.monotonic()
    if now - _any_alive_seen_at < ANY_ALIVE_CACHE_S:
        return True  # a heartbeat was seen a moment ago: spare Redis a key scan per request
    async for _ in client.scan_iter(match=prefix + "*", count=100):
        _remember_alive(now)
        return True
    return False


def _remember_alive(now: float) -> None:
    global _any_alive_seen_at
    _any_alive_seen_at = now
