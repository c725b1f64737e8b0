"""Admin registrations for the editors (categories, prompts, generation settings, moderation terms,
knowledge documents)."""

from django.contrib import admin

from chatbot.models import Category, GenerationSettings, KnowledgeDocument, ModerationTerm, PromptTemplate


@admin.register(Category)
class CategoryAdmin(admin.ModelAdmin):
    list_display = ("label", "code", "order", "is_active")
    list_editable = ("order", "is_active")
    search_fields = ("label", "code")


@admin.register(PromptTemplate)
class PromptTemplateAdmin(admin.ModelAdmin):
    list_display = ("mode", "version", "is_active", "created_at")
    list_filter = ("mode", "is_active")


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
