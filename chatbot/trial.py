"""The admin's "try it" for a prompt version: one recommendation with that version, through the same
worker as every other request, as the named events the try page draws.

Events, in order: `queued` {position}, `token` {seq, text} (the rendering deltas), `card` {index,
challenge} as each challenge completes, then exactly one terminal event: `close` {answer, usage,
timings, model, promptVersion, sessionId, measured} or `error` {status, message}. `None` stands for
"nothing arrived for a while" (a keep-alive). The trial runs in a session of its own
(`admin-try-…`), recorded like any other, so its turn shows the version it used.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from chatbot import contract
from chatbot.contract import ContractError
from chatbot.models import PromptTemplate
from chatbot.services import prepare_failure, recommendation_prepare
from chatbot.streaming import Ping, answer_events

logger = logging.getLogger(__name__)
TRIAL_SESSION_PREFIX = "admin-try-"


@dataclass(frozen=True)
class TrialEvent:
    """One event of a trial: `event` its name, `data` a JSON-ready object."""

    event: str
    data: dict[str, Any]


def _measured(*, completion_tokens: int, first_text_s: float | None, end_s: float) -> dict[str, float | None]:
    """Figures as the web process saw them, from the moment it sent the request to the worker: the
    time to the first text (ms; later than the first token, which may be JSON syntax the reader
    never sees), the total time (ms), and completion tokens per second over the whole request."""
    return {
        "firstTextMs": round(first_text_s * 1000, 1) if first_text_s is not None else None,
        "durationMs": round(end_s * 1000, 1),
        "tokensPerS": round(completion_tokens / end_s, 1) if end_s > 0 and completion_tokens else None,
    }


async def prompt_trial_events(*, prompt: PromptTemplate, inputs: dict[str, Any]) -> AsyncIterator[TrialEvent | None]:
    """Answer `inputs` (the mode's contract fields, e.g. the page's query) with `prompt`, active or not.

    Bad input, a missing worker or knowledge base, and every failure while streaming end as one
    `error` event; nothing but cancellation is raised. Use it with `contextlib.aclosing`: closing it
    early cancels the generation in the engine.
    """
    session_id = TRIAL_SESSION_PREFIX + uuid.uuid4().hex[:16]
    params = {**inputs, "sessionId": session_id}  # the contract's checks read only their mode's fields
    try:
        recommendation = await recommendation_prepare(mode=prompt.mode, params=params, challenge_cards=True, prompt=prompt)
    except ContractError as exc:
        yield TrialEvent("error", {"status": exc.status, "message": exc.message, "invalidFields": exc.invalid_fields})
        return
    except Exception as exc:  # noqa: BLE001 - prepare_failure logs it; one clear error event
        status, message = prepare_failure(exc)
        yield TrialEvent("error", {"status": status, "message": message})
        return
    clock = time.monotonic()
    first_text_s: float | None = None
    try:
        async with aclosing(answer_events(recommendation)) as events:
            async for item in events:
                if isinstance(item, Ping):
                    yield None
                    continue
                kind = item["type"]
                if kind == "chat.queued":
                    yield TrialEvent("queued", {"position": item["position"]})
                elif kind == "chat.token":
                    if first_text_s is None:
                        first_text_s = time.monotonic() - clock
                    yield TrialEvent("token", {"seq": item["seq"], "text": item["text"]})
                elif kind == "chat.challenge":
                    yield TrialEvent("card", {"index": item["index"], "challenge": item["challenge"]})
                elif kind == "chat.done":
                    yield _close_event(item, prompt=prompt, session_id=session_id, first_text_s=first_text_s, clock=clock)
                    return
                elif kind == "chat.error":
                    yield TrialEvent("error", {"status": int(item["status"]), "message": item["message"]})
                    return
    except Exception:
        logger.exception("the trial of prompt %s failed", prompt.pk)
    yield TrialEvent("error", {"status": 500, "message": contract.MESSAGE_INTERNAL})


def _close_event(
    item: dict[str, Any], *, prompt: PromptTemplate, session_id: str, first_text_s: float | None, clock: float
) -> TrialEvent:
    usage = dict(item.get("usage") or {})
    measured = _measured(
        completion_tokens=int(usage.get("completion_tokens", 0)), first_text_s=first_text_s, end_s=time.monotonic() - clock
    )
    close = {
        "answer": item["data"],
        "usage": usage,
        "timings": item.get("timings") or {},
        "model": item.get("model") or "",
        "promptVersion": prompt.version,
        "sessionId": session_id,
        "measured": measured,
    }
    return TrialEvent("close", close)
