"""Typed requests, results and stream events shared by the engine, the publisher and the listeners.

Everything here is plain data (dataclasses and TypedDicts) so that a request can cross the Celery
boundary as JSON and an event can cross the channel layer as msgpack. No Django, no torch.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict


class FinishReason(enum.StrEnum):
    """Why a generation ended (the names TGI and vLLM use, plus `deadline`)."""

    STOP = "stop"  # the constrained answer is complete
    LENGTH = "length"  # max_new_tokens ran out before the answer was complete
    CANCELLED = "cancelled"  # the client went away or pressed stop
    ERROR = "error"  # an exception inside generation
    DEADLINE = "deadline"  # time to first token or total time exceeded


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings.

    temperature 0 means greedy decoding. top_k 0 disables top-k; top_p 1.0 disables nucleus
    sampling. repetition_penalty follows the CTRL rule as in transformers'
    RepetitionPenaltyLogitsProcessor (arXiv:1909.05858): scores of tokens already in the
    prompt or completion are divided by it when positive, multiplied when negative.
    max_new_tokens bounds the completion in tokens. seed makes sampling reproducible; None
    draws a fresh one.
    """

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512
    seed: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One recommendation to generate, as the web process hands it to the GPU worker.

    messages: chat messages `[{"role": "system"|"user"|"assistant", "content": str}]`, rendered with
    the model's chat template by the worker (which owns the tokenizer).
    group: the channel-layer group every event of this request is sent to (one per session).
    schema: the JSON schema the completion is constrained to (xgrammar).
    default_category / category_labels: the server-side fields added to every challenge of the
    final answer (`category` code and Korean `label`).
    ttft_timeout_s / total_timeout_s: deadlines, in seconds from `created_at` (Unix time).
    history / history_budget_tokens: the session's recent turns as chat messages (oldest first);
        the worker puts the newest whole turns that fit the budget (tokens) between the system
        message and the last message (inference.history).
    challenge_cards: send a `chat.challenge` event as each challenge completes (a WebSocket client
    can draw cards; the SSE contract has no such event, so SSE requests skip the work).
    """

    request_id: str
    group: str
    messages: list[dict[str, str]]
    schema: dict[str, Any]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    default_category: str | None = None
    category_labels: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    ttft_timeout_s: float = 60.0
    total_timeout_s: float = 180.0
    challenge_cards: bool = False
    history: list[dict[str, str]] = field(default_factory=list)
    history_budget_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict for the Celery task arguments."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        """Inverse of `to_dict`. Raises TypeError on unknown or missing fields."""
        data = dict(data)
        data["sampling"] = SamplingParams(**data.get("sampling", {}))
        return cls(**data)


class Challenge(TypedDict):
    """One challenge of the close payload; `category` is the code (e.g. ZERO_WASTE), `label` its Korean name."""

    title: str
    description: str
    category: str
    label: str


class Answer(TypedDict):
    """The close payload's `data`: `{"recommend": str, "challenges": [Challenge, ...]}`."""

    recommend: str
    challenges: list[Challenge]


# Events on the channel layer. `type` names the listener's handler (`chat.token` -> `chat_token`).
# `seq` numbers the events of one request from 1, so listeners can drop duplicates and detect gaps.


class QueuedEvent(TypedDict):
    """The worker accepted the request; `worker` names it (for the heartbeat check)."""

    type: Literal["chat.queued"]
    request_id: str
    seq: int
    position: int
    worker: str  # the worker that took the request (its heartbeat key is the heartbeat prefix + worker)


class TokenEvent(TypedDict):
    """Coalesced answer text (a rendering delta)."""

    type: Literal["chat.token"]
    request_id: str
    seq: int
    text: str


class ChallengeEvent(TypedDict):
    """One challenge is complete (0-based `index`): the card the WebSocket widget draws before the
    answer ends. The same object as the close payload's `challenges[index]`."""

    type: Literal["chat.challenge"]
    request_id: str
    seq: int
    index: int
    challenge: Challenge


class DoneEvent(TypedDict):
    """Terminal success: the full answer, usage (tokens) and timings (seconds)."""

    type: Literal["chat.done"]
    request_id: str
    seq: int
    data: Answer
    finish_reason: str
    usage: dict[str, int]
    timings: dict[str, float]


class ErrorEvent(TypedDict):
    """Terminal failure: status, Korean message, finish reason."""

    type: Literal["chat.error"]
    request_id: str
    seq: int
    status: int
    message: str
    finish_reason: str


TERMINAL_TYPES = frozenset({"chat.done", "chat.error"})

# Every GPU worker's control channel joins this group; listeners send `engine.cancel` to it.
CONTROL_GROUP = "leafresh.engines"
