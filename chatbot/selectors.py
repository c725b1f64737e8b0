"""Reads: categories, the active prompt of a mode, and the generation settings."""

from __future__ import annotations

from chatbot.models import Category, GenerationSettings, PromptTemplate


class NotConfiguredError(RuntimeError):
    """A mode has no active prompt, or no category is active (an editor's mistake)."""


def category_list_active() -> list[Category]:
    """Active categories in display order."""
    return list(Category.objects.filter(is_active=True).order_by("order", "code"))


def category_get_active(*, label_or_code: str) -> Category | None:
    """The active category whose Korean label or code equals the value (code case-insensitively)."""
    for category in category_list_active():
        if label_or_code == category.label or label_or_code.upper() == category.code:
            return category
    return None


def category_for_message(*, message: str) -> Category:
    """The active category whose keywords occur most often in a free-text message (first on ties).

    Raises NotConfiguredError when no category is active.
    """
    categories = category_list_active()
    if not categories:
        raise NotConfiguredError("no active category")
    lowered = message.lower()
    scores = [sum(lowered.count(str(k).lower()) for k in c.keywords or [] if k) for c in categories]
    return categories[max(range(len(categories)), key=lambda i: (scores[i], -i))]


def prompt_get_active(*, mode: str) -> PromptTemplate:
    """The active prompt version of a mode. Raises NotConfiguredError when there is none."""
    prompt = PromptTemplate.objects.filter(mode=mode, is_active=True).first()
    if prompt is None:
        raise NotConfiguredError(f"no active prompt for mode {mode}")
    return prompt


def generation_settings_get() -> GenerationSettings:
    """The generation settings row, created with defaults on first use."""
    settings_row, _ = GenerationSettings.objects.get_or_create(pk=1)
    return settings_row
