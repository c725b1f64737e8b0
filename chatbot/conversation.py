"""Conversations in the database: sessions, their turns, and what a free-text prompt takes from them.

The web process records a turn when its answer ends (completed, stopped or failed) and reads the
recent completed turns when it builds the next free-text request, so a conversation survives
restarts and any web process can serve any session.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction
from django.utils import timezone

from chatbot.models import Category, ChatSession, Turn
from chatbot.selectors import category_get_active

Message = dict[str, str]


@dataclass(frozen=True)
class TurnDraft:
    """What is known of a turn before its answer: the session, mode, the user's text and inputs,
    the prompt version, and for a base-info request the base-info to remember on the session
    (`{"location", "work_type", "category"}`, category as the code)."""

    session_id: str
    mode: str
    user_text: str
    inputs: dict[str, str] = field(default_factory=dict)
    prompt_id: int | None = None
    prompt_version: int | None = None
    base_info: dict[str, str] | None = None


@dataclass(frozen=True)
class TurnOutcome:
    """How a turn ended. `finish_reason` as inference.types.FinishReason; `answer` the close data
    (None unless completed); `started_at` Unix seconds; `ttft_s`/`duration_s` seconds from then."""

    finish_reason: str
    answer_text: str
    started_at: float
    duration_s: float
    answer: dict[str, Any] | None = None
    error_status: int | None = None
    ttft_s: float | None = None
    usage: dict[str, int] = field(default_factory=dict)
    model: str = ""


@dataclass(frozen=True)
class SessionContext:
    """What a free-text prompt takes from a session: its base-info (location, work type, category
    label; None when it was never given) and its completed turns as chat messages (oldest first, at
    most the requested number of turns)."""

    base_info: dict[str, str] | None = None
    history: list[Message] = field(default_factory=list)

    @property
    def user_texts(self) -> list[str]:
        """The turns' user texts, oldest first."""
        return [m["content"] for m in self.history if m["role"] == "user"]


def _stamp(unix: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(unix, tz=dt.UTC)


def turn_record(*, draft: TurnDraft, request_id: str, outcome: TurnOutcome) -> Turn:
    """Store a finished turn (creating its session, and remembering base-info when it has some)."""
    with transaction.atomic():
        session, _ = ChatSession.objects.get_or_create(session_id=draft.session_id)
        # Only the columns this turn changes: a turn of another mode ending at the same moment must
        # not write back stale base-info.
        changes: dict[str, Any] = {"updated_at": timezone.now()}  # the session's last activity
        if draft.base_info is not None:
            changes |= {k: draft.base_info[k] for k in ("location", "work_type", "category")}
        ChatSession.objects.filter(pk=session.pk).update(**changes)
        return Turn.objects.create(
            session=session,
            request_id=request_id,
            mode=draft.mode,
            user_text=draft.user_text,
            inputs=draft.inputs,
            answer_text=outcome.answer_text,
            answer=outcome.answer,
            prompt_id=draft.prompt_id,
            prompt_version=draft.prompt_version,
            model=outcome.model[:200],
            finish_reason=outcome.finish_reason,
            error_status=outcome.error_status,
            prompt_tokens=outcome.usage.get("prompt_tokens"),
            completion_tokens=outcome.usage.get("completion_tokens"),
            history_turns=outcome.usage.get("history_turns"),
            ttft_ms=None if outcome.ttft_s is None else round(outcome.ttft_s * 1000, 1),
            duration_ms=round(outcome.duration_s * 1000, 1),
            created_at=_stamp(outcome.started_at),
            completed_at=_stamp(outcome.started_at + outcome.duration_s),
        )


def session_context(*, session_id: str, max_turns: int) -> SessionContext:
    """The session's base-info and its last `max_turns` completed turns that recommended something
    (stopped, failed and polite-reply turns are left out of prompts)."""
    session = ChatSession.objects.filter(session_id=session_id).first()
    if session is None:
        return SessionContext()
    base_info = None
    if session.location or session.work_type or session.category:
        # The cached active categories first; a category deactivated since needs a read of its own.
        category = category_get_active(label_or_code=session.category) or Category.objects.filter(code=session.category).first()
        label = category.label if category is not None else session.category
        base_info = {"location": session.location, "work_type": session.work_type, "category": label}
    turns = list(
        session.turns.filter(finish_reason="stop", answer__isnull=False)
        .exclude(answer__challenges=[])
        .order_by("-created_at", "-id")[: max(max_turns, 0)]
    )
    turns.reverse()
    history: list[Message] = []
    for turn in turns:
        history += [{"role": "user", "content": turn.user_text}, {"role": "assistant", "content": turn.answer_text}]
    return SessionContext(base_info=base_info, history=history)


def _turn_json(turn: Turn) -> dict[str, Any]:
    return {
        "requestId": turn.request_id,
        "mode": turn.mode,
        "userText": turn.user_text,
        "inputs": turn.inputs,
        "answerText": turn.answer_text,
        "answer": turn.answer,
        "finishReason": turn.finish_reason,
        "errorStatus": turn.error_status,
        "promptVersion": turn.prompt_version,
        "model": turn.model,
        "promptTokens": turn.prompt_tokens,
        "completionTokens": turn.completion_tokens,
        "historyTurns": turn.history_turns,
        "ttftMs": turn.ttft_ms,
        "durationMs": turn.duration_ms,
        "createdAt": turn.created_at.isoformat(),
        "completedAt": turn.completed_at.isoformat(),
    }


def session_transcript(*, session_id: str) -> dict[str, Any] | None:
    """The session as JSON-ready data (base-info and every turn, oldest first), or None if unknown."""
    session = ChatSession.objects.filter(session_id=session_id).first()
    if session is None:
        return None
    return {
        "sessionId": session.session_id,
        "baseInfo": {"location": session.location, "workType": session.work_type, "category": session.category},
        "turns": [_turn_json(t) for t in session.turns.order_by("created_at", "id")],
    }


def session_clear(*, session_id: str) -> bool:
    """Delete the session and its turns. False when there was no such session."""
    deleted, _ = ChatSession.objects.filter(session_id=session_id).delete()
    return deleted > 0


WIDGET_SESSION_KEY = "leafresh_chat_session_id"  # the widget's chat session, kept in the Django session
WIDGET_SESSION_PREFIX = "web-"  # chat sessions of the widget; a socket may join one only from its own browser


def widget_session_id(django_session: MutableMapping[str, Any], *, renew: bool = False) -> str:
    """The chat session of a browser: a random id (`web-` + 22 URL-safe characters) kept in its
    Django session (`request.session`), made on first use or when `renew` is set."""
    session_id = django_session.get(WIDGET_SESSION_KEY)
    if renew or not isinstance(session_id, str) or not session_id:
        session_id = django_session[WIDGET_SESSION_KEY] = WIDGET_SESSION_PREFIX + secrets.token_urlsafe(16)
    return session_id


def widget_session_allowed(django_session: MutableMapping[str, Any] | None, session_id: str) -> bool:
    """Whether a client holding `django_session` may use chat session `session_id`: widget sessions
    (`web-…`) only from the browser they were made for; other ids (the Spring backend's) are not
    bound to a browser. Reads the session store (blocking)."""
    if not session_id.startswith(WIDGET_SESSION_PREFIX):
        return True
    return django_session is not None and django_session.get(WIDGET_SESSION_KEY) == session_id
