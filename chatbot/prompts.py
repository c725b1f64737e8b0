"""Turning a prompt template and validated request fields into chat messages.

The web process builds messages; the GPU worker renders them with the model's chat template
(it owns the tokenizer). Field values are user input: they are substituted as text, never
interpreted as template syntax.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence


class PromptTemplateError(ValueError):
    """A template names a placeholder the mode does not provide, or has broken `{}` syntax."""


def template_fields(user_template: str) -> set[str]:
    """The `{name}` placeholders of a template. Raises PromptTemplateError on broken syntax."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(user_template) if name}
    except ValueError as exc:
        raise PromptTemplateError(str(exc)) from exc


def build_messages(*, system: str, user_template: str, fields: Mapping[str, str]) -> list[dict[str, str]]:
    """`[{"role": "system", ...}, {"role": "user", ...}]` with `fields` substituted into the template.

    Raises PromptTemplateError if the template uses a placeholder missing from `fields`.
    """
    missing = template_fields(user_template) - set(fields)
    if missing:
        raise PromptTemplateError(f"template placeholders without a value: {sorted(missing)}")
    user = user_template.format_map(dict(fields))
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def rank_by_keywords(message: str, keyword_lists: Sequence[Sequence[str]]) -> list[int]:
    """Indices of `keyword_lists`, most keyword occurrences in `message` first (case-insensitive),
    ties in the given order."""
    lowered = message.lower()
    scores = [sum(lowered.count(str(k).lower()) for k in keywords if k) for keywords in keyword_lists]
    return sorted(range(len(keyword_lists)), key=lambda i: (-scores[i], i))


def category_list_text(categories: Sequence[tuple[str, str]]) -> str:
    """The free-text prompt's `{categories}` text from (code, label) pairs: the Korean labels, comma-separated.

    The codes stay out of the prompt: the grammar's enum offers only them where a category is
    written, and a small model given codes in the prompt copied them into its sentences.
    """
    return ", ".join(label for _, label in categories)
