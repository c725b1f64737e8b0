"""The conversation window: which past turns fit a free-text prompt's token budget.

The web process sends a session's recent turns with the request; the GPU worker, which owns the
tokenizer, keeps the newest whole turns whose tokens fit `history_budget_tokens` and drops the
oldest first. A turn is a user message and the assistant's answer to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]
TEMPLATE_OVERHEAD_TOKENS = 4  # per message, when the chat template cannot render a lone turn


@dataclass(frozen=True)
class HistoryWindow:
    """The kept turns' messages (oldest first), their token count, and how many turns were kept."""

    messages: list[Message] = field(default_factory=list)
    tokens: int = 0
    turns: int = 0


def turns_of(history: Sequence[Message]) -> list[list[Message]]:
    """Group messages into turns: each user message with the assistant messages that follow it.
    Assistant messages before the first user message are dropped."""
    turns: list[list[Message]] = []
    for message in history:
        if message.get("role") == "user":
            turns.append([message])
        elif turns:
            turns[-1].append(message)
    return turns


def history_window(history: Sequence[Message], *, budget: int, count: Callable[[list[Message]], int]) -> HistoryWindow:
    """The newest whole turns of `history` whose `count`ed tokens add up to at most `budget`.

    `count(messages)` is the token count of a turn's messages. A turn that does not fit ends the
    window, even if an older, shorter one would: the kept turns are always the most recent ones,
    without gaps. `budget` <= 0 keeps nothing.
    """
    kept: list[list[Message]] = []
    used = 0
    for turn in reversed(turns_of(history)):
        cost = count(turn)
        if used + cost > budget:
            break
        kept.append(turn)
        used += cost
    kept.reverse()
    return HistoryWindow(messages=[m for turn in kept for m in turn], tokens=used, turns=len(kept))


def prompt_messages(messages: Sequence[Message], history: HistoryWindow) -> list[Message]:
    """A request's chat messages with the kept history turns between the system message (when the
    first message is one) and the rest."""
    split = 1 if messages and messages[0].get("role") == "system" else 0
    return [*messages[:split], *history.messages, *messages[split:]]


def chat_token_counter(tokenizer: Any) -> Callable[[list[Message]], int]:
    """`count(messages)`: tokens of the messages as the tokenizer's chat template renders them
    (without a generation prompt). Falls back to the contents' tokens plus
    TEMPLATE_OVERHEAD_TOKENS per message for a template that refuses a conversation fragment."""

    def count(messages: list[Message]) -> int:
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # noqa: BLE001 - e.g. a template that insists on a system message first
            contents = [len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) for m in messages]
            return sum(contents) + TEMPLATE_OVERHEAD_TOKENS * len(messages)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count
