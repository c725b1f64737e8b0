"""Seed the eight categories, the two prompts (version 1, active) and the generation settings."""

from django.db import migrations

from chatbot import seed


def forwards(apps, schema_editor):
    Category = apps.get_model("chatbot", "Category")
    PromptTemplate = apps.get_model("chatbot", "PromptTemplate")
    GenerationSettings = apps.get_model("chatbot", "GenerationSettings")
    for order, item in enumerate(seed.CATEGORIES):
        Category.objects.get_or_create(
            code=item["code"], defaults={"label": item["label"], "keywords": item["keywords"], "order": order}
        )
    for item in seed.PROMPTS:
        if not PromptTemplate.objects.filter(mode=item["mode"]).exists():
            PromptTemplate.objects.create(
                mode=item["mode"], version=1, system=item["system"], user_template=item["user_template"], is_active=True
            )
    GenerationSettings.objects.get_or_create(pk=1)


class Migration(migrations.Migration):
    dependencies = [("chatbot", "0001_initial")]
    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]
