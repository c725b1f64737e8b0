"""Seed the moderation terms, and give free text the prompt that lists the categories to choose from.

A database seeded before the free-text answer carried a category gets the new prompt as a new,
active version (the old one stays, inactive, for rollback).
"""

from django.db import migrations

from chatbot import seed


def forwards(apps, schema_editor):
    ModerationTerm = apps.get_model("chatbot", "ModerationTerm")
    PromptTemplate = apps.get_model("chatbot", "PromptTemplate")
    for kind, terms in seed.MODERATION_TERMS.items():
        for term in terms:
            ModerationTerm.objects.get_or_create(kind=kind, term=term)
    active = PromptTemplate.objects.filter(mode="free_text", is_active=True).first()
    if active is not None and "{categories}" not in active.user_template:
        prompt = next(p for p in seed.PROMPTS if p["mode"] == "free_text")
        latest = PromptTemplate.objects.filter(mode="free_text").order_by("-version").first()
        active.is_active = False
        active.save(update_fields=["is_active"])
        PromptTemplate.objects.create(
            mode="free_text",
            version=latest.version + 1,
            system=prompt["system"],
            user_template=prompt["user_template"],
            is_active=True,
        )


class Migration(migrations.Migration):
    dependencies = [("chatbot", "0003_moderation_terms")]
    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]
