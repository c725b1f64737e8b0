"""The chatbot's data: categories, versioned prompt templates, generation settings, moderation
terms, knowledge documents, and the conversations (sessions and their turns).

Editors change the configuration in the admin; requests read it at request time, so a change
takes effect without a restart. Sessions and turns are written by the web process as answers end.
"""

from __future__ import annotations

from typing import ClassVar

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from chatbot.seed import LOCATIONS, WORK_TYPES


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
    service is for). Matched where a word of the message begins with it, case-insensitively
    (chatbot.services.moderation_verdict).
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


def _tag_choices(values: list[str]) -> list[tuple[str, str]]:
    return [("", "전체"), *((value, value) for value in values)]


class KnowledgeDocument(models.Model):
    """A short practice document the free-text answers are grounded in (retrieved from Qdrant).

    Saving or deleting one re-indexes it through a Celery task on the `cpu` queue, after commit.
    `location` and `work_type` are optional tags ("" = any). Inactive documents stay indexed but are
    never retrieved.
    """

    title = models.CharField(max_length=80)
    text = models.TextField(max_length=1000)
    category = models.ForeignKey(Category, on_delete=models.PROTECT, related_name="documents")
    # The places and work types of the seed data (chatbot.seed), or "" for any.
    location = models.CharField(max_length=8, choices=_tag_choices(LOCATIONS), blank=True, default="")
    work_type = models.CharField(max_length=8, choices=_tag_choices(WORK_TYPES), blank=True, default="")
    is_active = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering: ClassVar = ["category__order", "id"]

    def __str__(self) -> str:
        return self.title


class ChatSession(models.Model):
    """A conversation, keyed by the client's sessionId. Remembers the latest base-info it was given."""

    session_id = models.CharField(max_length=100, unique=True)
    location = models.CharField(max_length=50, blank=True, default="")
    work_type = models.CharField(max_length=50, blank=True, default="")
    category = models.CharField(max_length=32, blank=True, default="", help_text="카테고리 코드")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering: ClassVar = ["-updated_at"]

    def __str__(self) -> str:
        return self.session_id


class Turn(models.Model):
    """One request of a session and its answer.

    `user_text` is the free-text message, or the base-info request in words; `answer_text` what the
    person saw (the streamed text, also when stopped early); `answer` the close payload's data (None
    unless the answer completed). `finish_reason` as inference.types.FinishReason; `ttft_ms` and
    `duration_ms` are measured by the web process from the request's start.
    """

    session = models.ForeignKey(ChatSession, on_delete=models.CASCADE, related_name="turns")
    request_id = models.CharField(max_length=32, unique=True)
    mode = models.CharField(max_length=16, choices=PromptTemplate.Mode.choices)
    user_text = models.TextField()
    inputs = models.JSONField(default=dict, blank=True)
    answer_text = models.TextField(blank=True, default="")
    answer = models.JSONField(null=True, blank=True)
    prompt = models.ForeignKey(PromptTemplate, null=True, blank=True, on_delete=models.SET_NULL, related_name="turns")
    prompt_version = models.PositiveIntegerField(null=True, blank=True)
    model = models.CharField(max_length=200, blank=True, default="")
    finish_reason = models.CharField(max_length=16)
    error_status = models.PositiveIntegerField(null=True, blank=True)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    history_turns = models.PositiveIntegerField(null=True, blank=True, help_text="프롬프트에 들어간 이전 턴 수")
    ttft_ms = models.FloatField(null=True, blank=True)
    duration_ms = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(db_index=True)
    completed_at = models.DateTimeField()

    class Meta:
        ordering: ClassVar = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{self.session_id} {self.mode} {self.finish_reason}"
