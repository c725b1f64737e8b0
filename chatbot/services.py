"""Business logic of a recommendation: build the generation request (with the session's history
and retrieved passages for free text), dispatch it, cancel it; re-index knowledge documents.

Adapters (SSE views, the WebSocket consumer) call these; they hold no logic of their own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.conf import settings

from chatbot import contract
from chatbot.contract import BaseInfoInput, ContractError, FreeTextInput
from chatbot.conversation import SessionContext, TurnDraft, session_context
from chatbot.knowledge import KnowledgeUnavailableError
from chatbot.models import Category, PromptTemplate
from chatbot.prompts import build_messages, category_list_text, context_text, conversation_query, profile_text
from chatbot.redis_client import async_redis, worker_heartbeats
from chatbot.selectors import (
    NotConfiguredError,
    categories_for_message,
    category_get_active,
    category_keyword_lists,
    category_list_active,
    generation_settings_get,
    moderation_terms,
    prompt_get_active,
)
from inference.answer import answer_schema
from inference.types import CONTROL_GROUP, GenerationRequest, SamplingParams

if TYPE_CHECKING:  # qdrant-client stays out of every process's start-up
    from chatbot.knowledge.store import Hit

logger = logging.getLogger(__name__)
GENERATE_TASK = "chatbot.generate"
INDEX_TASK = "chatbot.index_document"


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
    history: list[dict[str, str]] | None = None,
) -> GenerationRequest:
    """`categories`: the active categories (one read, so the enum and the labels agree). Without a
    `category_code` the model chooses each challenge's category: the schema's enum of their labels."""
    labels = {c.code: c.label for c in categories}
    return GenerationRequest(
        request_id=uuid.uuid4().hex,
        group=session_group_name(session_id),
        messages=messages,
        schema=answer_schema(category_labels=list(labels.values()) if category_code is None else None),
        sampling=_sampling(),
        default_category=category_code,
        category_labels=labels,
        created_at=time.time(),
        ttft_timeout_s=settings.LEAFRESH_TTFT_TIMEOUT_S,
        total_timeout_s=settings.LEAFRESH_TOTAL_TIMEOUT_S,
        history=history or [],
        history_budget_tokens=settings.LEAFRESH_HISTORY_TOKEN_BUDGET if history else 0,
    )


@dataclass(frozen=True)
class Recommendation:
    """A request ready to answer: `item` the generation (or a polite preset answer), `turn` what the
    session will record about it when it ends."""

    item: GenerationRequest | PresetAnswer
    turn: TurnDraft

    @property
    def request_id(self) -> str:
        return self.item.request_id


def base_info_user_text(*, location: str, work_type: str, category_label: str) -> str:
    """A base-info request in words, as the session's history shows it."""
    return f"거주 지역: {location}, 근무 형태: {work_type}, 카테고리: {category_label}. 이 조건에 맞는 챌린지를 추천해 주세요."


def recommendation_build_base_info(*, checked: BaseInfoInput, prompt: PromptTemplate | None = None) -> Recommendation:
    """The generation request for a base-info recommendation (reads the database), with the mode's
    active prompt or the given version of it (the admin's "try it").

    Raises ContractError (400, invalidFields=["category"]) for an unknown or inactive category,
    and selectors.NotConfiguredError when the mode has no active prompt.
    """
    active = category_list_active()  # one read: the checked category and the labels agree
    category = category_get_active(label_or_code=checked.category, categories=active)
    if category is None:
        raise ContractError(["category"], "알 수 없는 카테고리입니다. 확인할 항목: category")
    prompt = prompt or prompt_get_active(mode="base_info")
    fields = {"location": checked.location, "workType": checked.work_type, "category": category.label}
    messages = build_messages(system=prompt.system, user_template=prompt.user_template, fields=fields)
    generation = _request(session_id=checked.session_id, messages=messages, categories=active, category_code=category.code)
    turn = TurnDraft(
        session_id=checked.session_id,
        mode="base_info",
        user_text=base_info_user_text(location=checked.location, work_type=checked.work_type, category_label=category.label),
        inputs=fields,
        prompt_id=prompt.pk,
        prompt_version=prompt.version,
        base_info={"location": checked.location, "work_type": checked.work_type, "category": category.code},
    )
    return Recommendation(item=generation, turn=turn)


@dataclass(frozen=True)
class FreeTextPlan:
    """A free-text request's database reads, before retrieval: the checked input, the active prompt,
    the active categories (display order), the session's context, and the retrieval `query`."""

    checked: FreeTextInput
    prompt: PromptTemplate
    categories: list[Category]
    context: SessionContext
    query: str


def recommendation_plan_free_text(
    *, checked: FreeTextInput, prompt: PromptTemplate | None = None, context: SessionContext | None = None
) -> FreeTextPlan | Recommendation:
    """The database part of a free-text request (blocking): a polite preset Recommendation when the
    message is abusive or off-topic (moderation terms in the database), else a FreeTextPlan with the
    mode's active prompt or the given version of it. `context` replaces the session's own (read from
    the database when None): the OpenAI-compatible API brings its conversation in the request.

    Raises selectors.NotConfiguredError when the mode has no active prompt or no category is active.
    """
    verdict = moderation_verdict(message=checked.message)
    if verdict is not None:
        reply = contract.REPLY_ABUSE if verdict == "abuse" else contract.REPLY_OFF_TOPIC
        preset = PresetAnswer(request_id=uuid.uuid4().hex, answer={"recommend": reply, "challenges": []}, reason=verdict)
        inputs = {"message": checked.message, "moderation": verdict}
        turn = TurnDraft(session_id=checked.session_id, mode="free_text", user_text=checked.message, inputs=inputs)
        return Recommendation(item=preset, turn=turn)
    active = category_list_active()  # display order: one grammar for every message
    if not active:
        raise NotConfiguredError("no active category")
    prompt = prompt or prompt_get_active(mode="free_text")
    if context is None:
        context = session_context(session_id=checked.session_id, max_turns=settings.LEAFRESH_HISTORY_MAX_TURNS)
    query = conversation_query(checked.message, context.user_texts, category_keyword_lists(active))
    return FreeTextPlan(checked=checked, prompt=prompt, categories=active, context=context, query=query)


def recommendation_build_free_text(*, plan: FreeTextPlan, passages: list[Hit]) -> Recommendation:
    """The free-text generation request from a plan and the passages retrieved for its query.

    The model chooses each challenge's category from the active categories (an enum of their labels
    in the grammar); the prompt lists them, those the query's keywords suggest first, then those of
    the passages. The session's base-info goes into the system message, the passages before the
    message as delimited, untrusted context, and the recent turns into the request's history.
    """
    labels = {c.code: c.label for c in plan.categories}
    passages = [p for p in passages if p.category in labels]  # not those of a since deactivated category
    ranked = categories_for_message(message=plan.query, categories=plan.categories, hints=[p.category for p in passages])
    fields = {"message": plan.checked.message, "categories": category_list_text([c.label for c in ranked])}
    context = context_text([(labels[p.category], p.title, p.text) for p in passages])
    messages = build_messages(
        system=plan.prompt.system,
        user_template=plan.prompt.user_template,
        fields=fields,
        profile=profile_text(plan.context.base_info),
        context=context,
    )
    generation = _request(
        session_id=plan.checked.session_id,
        messages=messages,
        categories=plan.categories,
        category_code=None,
        history=plan.context.history,
    )
    turn = TurnDraft(
        session_id=plan.checked.session_id,
        mode="free_text",
        user_text=plan.checked.message,
        inputs={"message": plan.checked.message, "retrieved": ",".join(str(p.id) for p in passages)},
        prompt_id=plan.prompt.pk,
        prompt_version=plan.prompt.version,
    )
    return Recommendation(item=generation, turn=turn)


async def recommendation_prepare(
    *,
    mode: str,
    params: dict[str, Any],
    challenge_cards: bool = False,
    prompt: PromptTemplate | None = None,
    context: SessionContext | None = None,
) -> Recommendation:
    """Check the input and build a recommendation; for free text, retrieve passages first.

    `mode` base_info or free_text; `params` the contract's fields (sessionId, ...); `prompt` a
    version of the mode's prompt to use instead of the active one; `context` (free text) the
    conversation to use instead of the session's stored one. Database reads run in the thread
    for sync code; embedding and the Qdrant query in a worker thread of their own.
    Raises ContractError (400), selectors.NotConfiguredError, ValueError for a prompt of another
    mode, and for free text KnowledgeUnavailableError when Qdrant cannot be reached.
    """
    from chatbot.knowledge.indexing import knowledge_search

    if prompt is not None and prompt.mode != mode:
        raise ValueError(f"prompt {prompt.pk} is for mode {prompt.mode}, not {mode}")
    if mode == "base_info":
        built = await database_sync_to_async(recommendation_build_base_info)(
            checked=contract.check_base_info(params), prompt=prompt
        )
    else:
        plan = await database_sync_to_async(recommendation_plan_free_text)(
            checked=contract.check_free_text(params), prompt=prompt, context=context
        )
        if isinstance(plan, Recommendation):
            return plan
        k = settings.LEAFRESH_RETRIEVAL_K
        passages = await sync_to_async(knowledge_search, thread_sensitive=False)(plan.query, k=k) if k > 0 else []
        built = await database_sync_to_async(recommendation_build_free_text)(plan=plan, passages=passages)
    if challenge_cards and isinstance(built.item, GenerationRequest):
        built = dataclasses.replace(built, item=dataclasses.replace(built.item, challenge_cards=True))
    return built


def prepare_failure(exc: Exception) -> tuple[int, str]:
    """The status and Korean message for a `recommendation_prepare` failure other than a
    ContractError (which carries its own): 503 when no prompt or category is configured or the
    knowledge base is unavailable, else 500. Logs it."""
    if isinstance(exc, NotConfiguredError):
        logger.error("recommendation is not configured: %s", exc)
        return 503, contract.MESSAGE_NO_WORKER
    if isinstance(exc, KnowledgeUnavailableError):
        logger.error("knowledge base unavailable: %s", exc)
        return 503, contract.MESSAGE_KNOWLEDGE_UNAVAILABLE
    logger.error("could not prepare the recommendation", exc_info=exc)
    return 500, contract.MESSAGE_INTERNAL


def knowledge_reindex_later(*, document_id: int) -> None:
    """Queue the re-indexing of a saved or deleted knowledge document (Celery task on queue `cpu`).

    A broker failure is logged, not raised: the document is saved, and `build_index` repairs the
    index.
    """
    from celery_app import app

    try:
        app.send_task(INDEX_TASK, args=[document_id], queue="cpu")
    except Exception:
        logger.exception("could not queue re-indexing of knowledge document %s; run build_index", document_id)


def recommendation_dispatch(*, request: GenerationRequest) -> None:
    """Send the request to the GPU worker (Celery task on queue `gpu`). Blocking: Redis I/O."""
    from celery_app import app

    app.send_task(GENERATE_TASK, args=[request.to_dict()], queue="gpu")


async def recommendation_cancel(*, request_id: str) -> None:
    """Ask every GPU worker to cancel a request (a broadcast on the channel layer)."""
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    await layer.group_send(CONTROL_GROUP, {"type": "engine.cancel", "request_id": request_id})


ANY_ALIVE_CACHE_S = 1.0  # a positive "some worker is alive" answer is reused this long
NAMED_ALIVE_CACHE_S = 0.5  # a named worker's answer is shared by every listener waiting on it this long
_any_alive_seen_at = -ANY_ALIVE_CACHE_S
_named_alive: dict[str, tuple[float, bool]] = {}


async def worker_alive(*, name: str | None = None) -> bool:
    """True when the named GPU worker's heartbeat (or, with no name, any worker's) has not expired.

    A named worker's answer is reused for NAMED_ALIVE_CACHE_S: with hundreds of streams each checking
    every second, one Redis read per worker and half second serves them all.
    """
    client = async_redis()
    prefix = settings.LEAFRESH_HEARTBEAT_PREFIX
    now = time.monotonic()
    if name:
        checked = _named_alive.get(name)
        if checked is not None and now - checked[0] < NAMED_ALIVE_CACHE_S:
            return checked[1]
        alive = bool(await client.exists(prefix + name))
        _named_alive[name] = (time.monotonic(), alive)
        if len(_named_alive) > 1000:  # workers come and go: forget the answers that have expired
            for stale in [n for n, (at, _) in _named_alive.items() if now - at >= NAMED_ALIVE_CACHE_S]:
                del _named_alive[stale]
        return alive
    if now - _any_alive_seen_at < ANY_ALIVE_CACHE_S:
        return True  # a heartbeat was seen a moment ago: spare Redis two reads per request
    if await worker_heartbeats():
        _remember_alive(now)
        return True
    return False


def _remember_alive(now: float) -> None:
    global _any_alive_seen_at
    _any_alive_seen_at = now
