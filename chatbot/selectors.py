"""Reads: categories, the active prompt of a mode, the generation settings and the moderation terms.

Every request needs them, so they are cached in the process for LEAFRESH_CONFIG_CACHE_S (Django's
cache framework): an editor's change applies to new requests within that time, without a restart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from django.conf import settings
from django.core.cache import cache

from chatbot.models import Category, GenerationSettings, ModerationTerm, PromptTemplate
from chatbot.prompts import hint_ranks, rank_by_keywords

T = TypeVar("T")


CONFIG_KEYS = ("categories", "prompt:base_info", "prompt:free_text", "generation", "moderation")


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


def category_get_active(*, label_or_code: str, categories: list[Category] | None = None) -> Category | None:
    """The active category whose Korean label or code equals the value (code case-insensitively);
    `categories`: the active categories when the caller has read them already."""
    for category in category_list_active() if categories is None else categories:
        if label_or_code == category.label or label_or_code.upper() == category.code:
            return category
    return None


def category_keyword_lists(categories: Sequence[Category]) -> list[list[str]]:
    """Each category's label and keywords: what a message is matched against."""
    return [[c.label, *(c.keywords or [])] for c in categories]


def categories_for_message(*, message: str, categories: list[Category], hints: Sequence[str] = ()) -> list[Category]:
    """`categories`, those whose label and keywords occur most often in the message first; ties go
    to the categories named in `hints` (codes, e.g. of the retrieved passages, earlier first), then
    to the given (display) order: the list a free-text prompt offers the model."""
    tiebreak = hint_ranks([c.code for c in categories], hints)
    order = rank_by_keywords(message, category_keyword_lists(categories), tiebreak)
    return [categories[i] for i in order]


def prompt_get_active(*, mode: str) -> PromptTemplate:
    """The active prompt version of a mode. Raises NotConfiguredError when there is none."""
    prompt = _cached(f"prompt:{mode}", lambda: PromptTemplate.objects.filter(mode=mode, is_active=True).first())
    if prompt is None:
        raise NotConfiguredError(f"no active prompt for mode {mode}")
    return prompt


def generation_settings_get() -> GenerationSettings:
    """The generation settings row, created with defaults on first use."""
    return _cached("generation", lambda: GenerationSettings.objects.get_or_create(pk=1)[0])


def moderation_terms() -> dict[str, list[str]]:
    """Active moderation terms by kind (`abuse`, `off_topic`), normalised: lowercase, single spaces."""

    def load() -> dict[str, list[str]]:
        terms: dict[str, list[str]] = {kind: [] for kind in ModerationTerm.Kind.values}
        for kind, term in ModerationTerm.objects.filter(is_active=True).values_list("kind", "term"):
            normalised = " ".join(term.lower().split())
            if normalised:
                terms[kind].append(normalised)
        return terms

    return _cached("moderation", load)
