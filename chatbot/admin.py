"""Admin registrations for the editors: categories, versioned prompts (with a "try it" page per
version), generation settings, moderation terms, knowledge documents, and (read-only) sessions with
their turns.

Business rules live in services (chatbot.prompt_versions, chatbot.trial); the admin classes only
call them.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html

from chatbot import contract
from chatbot.auth import trial_permitted
from chatbot.models import Category, ChatSession, GenerationSettings, KnowledgeDocument, ModerationTerm, PromptTemplate, Turn
from chatbot.prompt_versions import prompt_activate, prompt_check, prompt_diff, prompt_save_version
from chatbot.seed import LOCATIONS, WORK_TYPES
from chatbot.selectors import category_list_active


@admin.register(Category)
class CategoryAdmin(admin.ModelAdmin):
    list_display = ("label", "code", "order", "is_active")
    list_editable = ("order", "is_active")
    search_fields = ("label", "code")


class PromptTemplateForm(forms.ModelForm):
    class Meta:
        model = PromptTemplate
        fields = ("mode", "system", "user_template")

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        mode = self.instance.mode if self.instance.pk else data.get("mode")
        if mode and data.get("user_template") is not None:
            prompt_check(mode=mode, user_template=data["user_template"])
        return data


@admin.register(PromptTemplate)
class PromptTemplateAdmin(admin.ModelAdmin):
    """Saving a prompt, new or edited, makes a new active version of its mode; older versions stay
    (each turn records the version it used). "Make active" on an older version rolls back."""

    form = PromptTemplateForm
    list_display = ("mode", "version", "is_active", "created_at", "try_link")
    list_filter = ("mode", "is_active")
    ordering = ("mode", "-version")
    actions = ("make_active",)

    def get_readonly_fields(self, request: HttpRequest, obj: PromptTemplate | None = None) -> tuple[str, ...]:
        base = ("version", "is_active", "created_at", "diff_from_previous")
        return ("mode", *base, "try_link") if obj is not None else base

    def get_urls(self) -> list[URLPattern]:
        from chatbot.views import prompt_trial_stream  # here: Django's start-up need not import the streaming stack

        own = [
            path("<int:prompt_id>/try/", self.admin_site.admin_view(self.try_view), name="chatbot_prompttemplate_try"),
            # An async view: it checks the staff permission itself (admin_view wraps sync views only).
            path("<int:prompt_id>/try/stream", prompt_trial_stream, name="chatbot_prompttemplate_try_stream"),
        ]
        return own + super().get_urls()

    @admin.display(description="시험해 보기")
    def try_link(self, obj: PromptTemplate) -> str:
        url = reverse("admin:chatbot_prompttemplate_try", args=[obj.pk])
        return format_html('<a href="{}" data-testid="prompt-try-link">이 버전으로 시험해 보기</a>', url)

    def try_view(self, request: HttpRequest, prompt_id: int) -> HttpResponse:
        """The "try it" page: the version's text, the mode's inputs, and the live answer with its
        structured result, time to first token and tokens/s (drawn from chatbot.trial's stream)."""
        if not trial_permitted(request.user):
            raise PermissionDenied
        prompt = get_object_or_404(PromptTemplate, pk=prompt_id)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"시험해 보기: {prompt}",
            "prompt": prompt,
            "stream_url": reverse("admin:chatbot_prompttemplate_try_stream", args=[prompt.pk]),
            "locations": LOCATIONS,
            "work_types": WORK_TYPES,
            "categories": category_list_active(),
            "message_max_chars": contract.LIMITS["message"],
        }
        return TemplateResponse(request, "admin/chatbot/prompttemplate/try.html", context)

    @admin.display(description="이전 버전과의 차이")
    def diff_from_previous(self, obj: PromptTemplate) -> str:
        diff = prompt_diff(prompt=obj) if obj.pk else ""
        return format_html("<pre style='white-space: pre-wrap'>{}</pre>", diff or "(첫 버전)")

    def save_model(self, request: HttpRequest, obj: PromptTemplate, form: forms.ModelForm, change: bool) -> None:
        # Never updated in place: the edited text becomes the next version (the old row is untouched).
        created = prompt_save_version(mode=obj.mode, system=obj.system, user_template=obj.user_template)
        obj.pk, obj.version, obj.is_active, obj.created_at = created.pk, created.version, created.is_active, created.created_at
        messages.info(request, f"{created.get_mode_display()} v{created.version}을(를) 새 버전으로 저장하고 활성화했습니다.")

    @admin.action(description="선택한 버전을 활성화 (롤백)")
    def make_active(self, request: HttpRequest, queryset: QuerySet[PromptTemplate]) -> None:
        chosen = list(queryset)
        if len({p.mode for p in chosen}) != len(chosen):
            self.message_user(request, "모드마다 한 버전만 고르세요.", level=messages.ERROR)
            return
        for prompt in chosen:
            prompt_activate(prompt=prompt)
            self.message_user(request, f"{prompt.get_mode_display()} v{prompt.version}을(를) 활성화했습니다.")

    def has_delete_permission(self, request: HttpRequest, obj: PromptTemplate | None = None) -> bool:
        return False  # versions are the history turns point to


@admin.register(GenerationSettings)
class GenerationSettingsAdmin(admin.ModelAdmin):
    list_display = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "updated_at")


@admin.register(ModerationTerm)
class ModerationTermAdmin(admin.ModelAdmin):
    list_display = ("term", "kind", "is_active")
    list_editable = ("is_active",)
    list_filter = ("kind", "is_active")
    search_fields = ("term",)


@admin.register(KnowledgeDocument)
class KnowledgeDocumentAdmin(admin.ModelAdmin):
    """Saving or deleting a document re-indexes it (a `cpu` queue task, after commit)."""

    list_display = ("title", "category", "location", "work_type", "is_active", "updated_at")
    list_editable = ("is_active",)
    list_filter = ("category", "location", "work_type", "is_active")
    search_fields = ("title", "text")


class ReadOnlyAdmin(admin.ModelAdmin):
    """Viewable and searchable, never added, changed or deleted here."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class TurnInline(admin.TabularInline):
    model = Turn
    fields = ("created_at", "mode", "user_text", "answer_text", "finish_reason", "prompt_version", "ttft_ms", "duration_ms")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(ChatSession)
class ChatSessionAdmin(ReadOnlyAdmin):
    list_display = ("session_id", "location", "work_type", "category", "turn_count", "updated_at")
    list_filter = ("category", "location", "updated_at")
    search_fields = ("session_id", "turns__user_text")
    inlines = (TurnInline,)

    def get_queryset(self, request: HttpRequest) -> QuerySet[ChatSession]:
        return super().get_queryset(request).annotate(turn_total=Count("turns"))

    @admin.display(description="턴 수", ordering="turn_total")
    def turn_count(self, obj: ChatSession) -> int:
        return obj.turn_total  # type: ignore[attr-defined]


class TurnCategoryFilter(admin.SimpleListFilter):
    """A turn's category: the one asked for (base-info) or the first challenge's (free text)."""

    title = "카테고리"
    parameter_name = "category"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [(c.code, c.label) for c in Category.objects.order_by("order", "code")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Turn]) -> QuerySet[Turn]:
        code = self.value()
        if not code:
            return queryset
        label = Category.objects.filter(code=code).values_list("label", flat=True).first() or code
        return queryset.filter(Q(answer__challenges__0__category=code) | Q(inputs__category=label))


@admin.register(Turn)
class TurnAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "session", "mode", "finish_reason", "prompt_version", "ttft_ms", "duration_ms", "user_text")
    list_filter = ("mode", TurnCategoryFilter, "finish_reason", "created_at")
    search_fields = ("session__session_id", "request_id", "user_text", "answer_text")
    date_hierarchy = "created_at"
    list_select_related = ("session",)
