"""`python manage.py build_index [--rebuild] [--batch-size N] [--no-progress-bar]`: index the
knowledge documents into Qdrant.

Incremental: only documents whose text, tags, active flag or embedding model changed are embedded
again, and points of deleted documents are removed. `--rebuild` drops the collection first.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from chatbot.knowledge import KnowledgeUnavailableError
from chatbot.knowledge.indexing import index_build
from chatbot.models import KnowledgeDocument


class Command(BaseCommand):
    help = "Embed the knowledge documents into Qdrant (dense + sparse vectors); only what changed."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--rebuild", action="store_true", help="drop the collection and embed every document")
        parser.add_argument("--batch-size", type=int, default=32, help="documents embedded and upserted together")
        parser.add_argument("--no-progress-bar", action="store_true", help="do not draw a progress bar")

    def handle(self, *args: object, **options: object) -> None:
        batch_size = int(options["batch_size"])  # type: ignore[call-overload]
        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1")
        total = KnowledgeDocument.objects.count()
        with tqdm(total=total, desc="indexing documents", unit="doc", disable=bool(options["no_progress_bar"])) as bar:
            try:
                report = index_build(rebuild=bool(options["rebuild"]), batch_size=batch_size, progress=bar.update)
            except KnowledgeUnavailableError as exc:
                raise CommandError(f"Qdrant is unavailable: {exc}") from None
        self.stdout.write(
            self.style.SUCCESS(
                f"knowledge index: {report.indexed} embedded, {report.unchanged} unchanged, {report.deleted} removed"
                + (" (collection created)" if report.recreated else "")
            )
        )
