"""Seed the knowledge base with the project's own 240 practice documents (30 per category).

The documents are frozen beside this migration (0006_knowledge_documents.json): later edits happen
in the admin, and the demo model's training reads the same file (chatbot.seed.knowledge_documents).
"""

import json
from pathlib import Path

from django.db import migrations

DOCUMENTS = Path(__file__).with_name("0006_knowledge_documents.json")


def seed(apps, schema_editor):
    Category = apps.get_model("chatbot", "Category")
    KnowledgeDocument = apps.get_model("chatbot", "KnowledgeDocument")
    categories = {c.code: c for c in Category.objects.all()}
    rows = [
        KnowledgeDocument(
            title=d["title"],
            text=d["text"],
            category=categories[d["category"]],
            location=d["location"],
            work_type=d["work_type"],
        )
        for d in json.loads(DOCUMENTS.read_text(encoding="utf-8"))
        if d["category"] in categories  # an editor may have deleted a category before this ran
    ]
    KnowledgeDocument.objects.bulk_create(rows)


def unseed(apps, schema_editor):
    apps.get_model("chatbot", "KnowledgeDocument").objects.all().delete()


class Migration(migrations.Migration):
    dependencies = [("chatbot", "0005_sessions_turns_knowledge")]
    operations = [migrations.RunPython(seed, unseed)]
