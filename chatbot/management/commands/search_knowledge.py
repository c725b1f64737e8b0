"""`python manage.py search_knowledge "<query>" [--k 3] [--category CODE] [--mode hybrid|dense|sparse] [--json]`.

Prints the top hits among active documents; with --json a JSON list of
`{"text", "category", "score"}` (category as the code, e.g. ZERO_WASTE).
"""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError, CommandParser

from chatbot.knowledge import KnowledgeUnavailableError
from chatbot.knowledge.indexing import knowledge_search


class Command(BaseCommand):
    help = "Search the knowledge base the way free-text requests do (hybrid dense + sparse)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("query")
        parser.add_argument("--k", type=int, default=3, help="how many hits (default 3)")
        parser.add_argument("--category", default=None, help="only this category code, e.g. ZERO_WASTE")
        parser.add_argument("--mode", choices=["hybrid", "dense", "sparse"], default="hybrid")
        parser.add_argument("--json", action="store_true", help="print a JSON list")

    def handle(self, *args: object, **options: object) -> None:
        k = int(options["k"])  # type: ignore[call-overload]
        if k < 1:
            raise CommandError("--k must be at least 1")
        try:
            hits = knowledge_search(str(options["query"]), k=k, category=options["category"], mode=options["mode"])  # type: ignore[arg-type]
        except KnowledgeUnavailableError as exc:
            raise CommandError(f"Qdrant is unavailable: {exc}") from None
        if options["json"]:
            rows = [{"text": h.text, "category": h.category, "score": round(h.score, 6)} for h in hits]
            self.stdout.write(json.dumps(rows, ensure_ascii=False))
            return
        for rank, hit in enumerate(hits, start=1):
            self.stdout.write(f"{rank}. [{hit.category}] {hit.score:.4f} {hit.title}\n   {hit.text}")
