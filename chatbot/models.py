"""The chatbot's data: categories, versioned prompt templates and generation settings.

Editors change these in the admin; requests read them at request time, so a change takes effect
without a restart.
"""

from __future__ import annotations

from typing import ClassVar

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models


class Category(models.Model):
    """A challenge category: `code` is the contract value (e.g. ZERO_WASTE), `label` the Korean name."""

    code = models.CharField(max_length=32, unique=True)
    label = models.CharField(max_length=32, unique=True)
    keywords = models.JSONField(
        default=list, blank=True, help_text="자유 대화 메시지에 이 낱말이 있으면 프롬프트의 카테고리 목록에서 앞에 둡니다"
    )
    order = models.PositiveIntegerField(default=0)
    is_active = models.BooleanField(default=True)

    class Meta:
        ordering: ClassVar = ["order", "code"]
        verbose_name_plural = "categories"

    def __str__(self) -> str:
        return f"{self.label} ({self.code})"


class PromptTemplate(models.Model):
    """One version of a mode's prompt. Exactly one version per mode is active."""

    class Mode(models.TextChoices):
        BASE_INFO = "base_info", "기본 정보 추천"
        FREE_TEXT = "free_text", "자유 대화 추천"

    mode = models.CharField(max_length=16, choices=Mode.choices)
    version = models.PositiveIntegerField()
    system = models.TextField()
    user_template = models.TextField(
        help_text="기본 정보: {location} {workType} {category}, 자유 대화: {message} {categories} 자리표시자를 씁니다"
    )
    is_active = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering: ClassVar = ["mode", "-version"]
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["mode", "version"], name="prompt_mode_version_unique"),
            models.UniqueConstraint(fields=["mode"], condition=models.Q(is_active=True), name="prompt_one_active_per_mode"),
        ]

    def __str__(self) -> str:
        return f"{self.get_mode_display()} v{self.version}{' (active)' if self.is_active else ''}"


class GenerationSettings(models.Model):
    """Sampling settings for every request (a single row, pk=1). Ranges follow transformers' checks."""

    temperature = models.FloatField(default=0.7, validators=[MinValueValidator(0.0), MaxValueValidator(2.0)])
    top_p = models.FloatField(default=0.9, validators=[MinValueValidator(0.01), MaxValueValidator(1.0)])
    top_k = models.PositiveIntegerField(default=50, validators=[MaxValueValidator(1000)])
    repetition_penalty = models.FloatField(default=1.0, validators=[MinValueValidator(1.0), MaxValueValidator(2.0)])
    max_new_tokens = models.PositiveIntegerField(default=512, validators=[MinValueValidator(16), MaxValueValidator(4096)])
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "generation settings"

    def __str__(self) -> str:
        return f"temperature={self.temperature} top_p={self.top_p} top_k={self.top_k} max_new_tokens={self.max_new_tokens}"


class ModerationTerm(models.Model):
    """A word that makes a free-text message get a polite reply instead of a recommendation.

    `kind` abuse (a request to keep the conversation respectful) or off_topic (a reminder of what the
    service is for). Matched as a substring of the message with spaces removed, case-insensitively.
    """

    class Kind(models.TextChoices):
        ABUSE = "abuse", "욕설·비하"
        OFF_TOPIC = "off_topic", "주제 밖"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    term = models.CharField(max_length=50)
    is_active = models.BooleanField(default=True)

    class Meta:
        ordering: ClassVar = ["kind", "term"]
        constraints: ClassVar = [models.UniqueConstraint(fields=["kind", "term"], name="moderation_kind_term_unique")]

    def __str__(self) -> str:
        return f"{self.get_kind_display()}: {self.term}"
