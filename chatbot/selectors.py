"""Reads: categories, the active prompt of a mode, and the generation settings.

Every request needs them, so they are cached in the process for LEAFRESH_CONFIG_CACHE_S (Django's
cache framework): an editor's change applies to new requests within that time, without a restart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from django.conf import settings
from django.core.cache import cache

from chatbot.models import Category, GenerationSettings, PromptTemplate

T = TypeVar("T")


CONFIG_KEYS = ("categories", "prompt:base_info", "prompt:free_text", "generation")


def config_cache_clear() -> None:
    """Forget the cached configuration (called when an editor saves or deletes a row)."""
    cache.delete_many([f"leafresh:config:{key}" for key in CONFIG_KEYS])


def _cached(key: str, load: Callable[[], T]) -> T:
    if settings.LEAFRESH_CONFIG_CACHE_S <= 0:
        return load()
    return cache.get_or_set(f"leafresh:config:{key}", load, timeout=settings.LEAFRESH_CONFIG_CACHE_S)


class NotConfiguredError(RuntimeError):
    """A mode has no active prompt, or no category is active (an editor's mistake)."""


def category_list_active() -> list[Category]:
    """Active categories in display order."""
    return _cached("categories", lambda: list(Category.objects.filter(is_active=True).order_by("order", "code")))


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
    prompt = _cached(f"prompt:{mode}", lambda: PromptTemplate.objects.filter(mode=mode, is_active=True).first())
    if prompt is None:
        raise NotConfiguredError(f"no active prompt for mode {mode}")
    return prompt


def generation_settings_get() -> GenerationSettings:
    """The generation settings row, created with defaults on first use."""
    return _cached("generation", lambda: GenerationSettings.objects.get_or_create(pk=1)[0])
