"""The admin's "try it" for a prompt version: one recommendation with that version, through the same
worker as every other request, as the named events the try page draws.

Events, in order: `queued` {position}, `token` {seq, text} (the rendering deltas), `card` {index,
challenge} as each challenge completes, then exactly one terminal event: `close` {answer, usage,
timings, model, promptVersion, sessionId, measured} or `error` {status, message}. `None` stands for
"nothing arrived for a while" (a keep-alive). The trial runs in a session of its own
(`admin-try-…`), recorded like any other, so its turn shows the version it used.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from chatbot.contract import ContractError
from chatbot.models import PromptTemplate
from chatbot.services import prepare_failure, recommendation_prepare
from chatbot.streaming import Ping, answer_events

TRIAL_SESSION_PREFIX = "admin-try-"
# The inputs each mode takes, as the contract names them.
TRIAL_FIELDS: dict[str, tuple[str, ...]] = {
    PromptTemplate.Mode.BASE_INFO: ("location", "workType", "category"),
    PromptTemplate.Mode.FREE_TEXT: ("message",),
}


@dataclass(frozen=True)
class TrialEvent:
    """One event of a trial: `event` its name, `data` a JSON-ready object."""

    event: str
    data: dict[str, Any]


def _measured(*, completion_tokens: int, first_token_s: float | None, end_s: float) -> dict[str, float | None]:
    """Figures as the web process saw them: time to first token and total time (ms, from the moment
    the request was sent to the worker), and completion tokens per second after the first token."""
    decode_s = end_s - first_token_s if first_token_s is not None else 0.0
    return {
        "ttftMs": round(first_token_s * 1000, 1) if first_token_s is not None else None,
        "durationMs": round(end_s * 1000, 1),
        "tokensPerS": round((completion_tokens - 1) / decode_s, 1) if decode_s > 0 and completion_tokens > 1 else None,
    }


async def prompt_trial_events(*, prompt: PromptTemplate, inputs: dict[str, Any]) -> AsyncIterator[TrialEvent | None]:
    """Answer `inputs` (the mode's fields, see TRIAL_FIELDS) with `prompt`, active or not.

    Bad input, a missing worker or knowledge base, and every failure while streaming end as one
    `error` event; nothing is raised. Use it with `contextlib.aclosing`: closing it early cancels
    the generation in the engine.
    """
    session_id = TRIAL_SESSION_PREFIX + uuid.uuid4().hex[:16]
    params = {name: inputs.get(name) for name in TRIAL_FIELDS[prompt.mode]} | {"sessionId": session_id}
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
    first_token_s: float | None = None
    async with aclosing(answer_events(recommendation)) as events:
        async for item in events:
            if isinstance(item, Ping):
                yield None
                continue
            kind = item["type"]
            if kind == "chat.queued":
                yield TrialEvent("queued", {"position": item["position"]})
            elif kind == "chat.token":
                if first_token_s is None:
                    first_token_s = time.monotonic() - clock
                yield TrialEvent("token", {"seq": item["seq"], "text": item["text"]})
            elif kind == "chat.challenge":
                yield TrialEvent("card", {"index": item["index"], "challenge": item["challenge"]})
            elif kind == "chat.done":
                usage = dict(item.get("usage") or {})
                measured = _measured(
                    completion_tokens=int(usage.get("completion_tokens", 0)),
                    first_token_s=first_token_s,
                    end_s=time.monotonic() - clock,
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
                yield TrialEvent("close", close)
                return
            elif kind == "chat.error":
                yield TrialEvent("error", {"status": int(item["status"]), "message": item["message"]})
                return
