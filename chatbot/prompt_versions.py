"""Prompt versions, as the admin edits them: a save makes a new version, one version per mode is
active, a version can be compared with the one before it, and an earlier version can be made
active again (rollback). The admin calls these; it holds no logic of its own.
"""

from __future__ import annotations

import difflib

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Max

from chatbot.models import PromptTemplate
from chatbot.prompts import PromptTemplateError, template_fields
from chatbot.selectors import config_cache_clear

# The placeholders each mode's user template may use (chatbot.services fills exactly these).
PLACEHOLDERS: dict[str, frozenset[str]] = {
    PromptTemplate.Mode.BASE_INFO: frozenset({"location", "workType", "category"}),
    PromptTemplate.Mode.FREE_TEXT: frozenset({"message", "categories"}),
}


def prompt_check(*, mode: str, user_template: str) -> None:
    """Raise ValidationError (on `user_template`) for broken `{}` syntax or a placeholder the mode
    does not fill."""
    try:
        used = template_fields(user_template)
    except PromptTemplateError as exc:
        raise ValidationError({"user_template": f"템플릿 문법 오류: {exc}"}) from None
    unknown = used - PLACEHOLDERS.get(mode, frozenset())
    if unknown:
        allowed = ", ".join("{" + name + "}" for name in sorted(PLACEHOLDERS.get(mode, ())))
        raise ValidationError({"user_template": f"이 모드에서 쓸 수 없는 자리표시자: {sorted(unknown)} (가능: {allowed})"})


@transaction.atomic
def prompt_save_version(*, mode: str, system: str, user_template: str, activate: bool = True) -> PromptTemplate:
    """A new version of the mode's prompt (the highest version + 1), active unless `activate` is
    False, in which case the active version stays. Raises ValidationError for a bad template."""
    prompt_check(mode=mode, user_template=user_template)
    current = PromptTemplate.objects.select_for_update().filter(mode=mode)
    version = (current.aggregate(top=Max("version"))["top"] or 0) + 1
    if activate:
        current.filter(is_active=True).update(is_active=False)
    return PromptTemplate.objects.create(
        mode=mode, version=version, system=system, user_template=user_template, is_active=activate
    )


@transaction.atomic
def prompt_activate(*, prompt: PromptTemplate) -> PromptTemplate:
    """Make this version the mode's active one (a rollback when it is an earlier version)."""
    PromptTemplate.objects.select_for_update().filter(mode=prompt.mode, is_active=True).exclude(pk=prompt.pk).update(
        is_active=False
    )
    PromptTemplate.objects.filter(pk=prompt.pk).update(is_active=True)
    # .update() sends no post_save: drop the cached active prompts here, and again after commit.
    config_cache_clear()
    transaction.on_commit(config_cache_clear)
    prompt.refresh_from_db()
    return prompt


def prompt_diff(*, prompt: PromptTemplate) -> str:
    """A unified diff of this version against the mode's previous version ("" for the first)."""
    previous = PromptTemplate.objects.filter(mode=prompt.mode, version__lt=prompt.version).order_by("-version").first()
    if previous is None:
        return ""

    def lines(p: PromptTemplate) -> list[str]:
        return [f"[system] {line}" for line in p.system.splitlines()] + [
            f"[user] {line}" for line in p.user_template.splitlines()
        ]

    return "\n".join(
        difflib.unified_diff(lines(previous), lines(prompt), f"v{previous.version}", f"v{prompt.version}", lineterm="")
    )
