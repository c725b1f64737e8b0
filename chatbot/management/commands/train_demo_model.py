"""`python manage.py train_demo_model [--force] [--no-progress-bar]`: build the embedded demo model.

Skipped when LEAFRESH_MODEL is set (a real model is configured) or when the artefact under the
data dir was built from the same inputs (seed data, prompts, training config).
"""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from chatbot.demo_corpus import demo_examples
from inference.demo_model import DemoTrainingConfig, fingerprint, is_up_to_date, train_demo_model


class Command(BaseCommand):
    help = "Train the locally built demo model (a tiny Mistral) unless it is up to date."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
        parser.add_argument("--no-progress-bar", action="store_true", help="do not draw a progress bar")

    def handle(self, *args: object, **options: object) -> None:
        if settings.LEAFRESH_MODEL and not options["force"]:
            self.stdout.write(f"LEAFRESH_MODEL={settings.LEAFRESH_MODEL} is configured; the demo model is not needed")
            return
        out_dir = settings.LEAFRESH_DEMO_MODEL_DIR
        config = DemoTrainingConfig()
        examples = demo_examples(seed_value=config.seed)
        if not options["force"] and is_up_to_date(out_dir, fingerprint(examples, config)):
            self.stdout.write(f"demo model is up to date at {out_dir}")
            return
        self.stdout.write(f"training the demo model on {len(examples)} synthetic examples -> {out_dir}")
        train_demo_model(out_dir, examples, config=config, progress=not options["no_progress_bar"])
        self.stdout.write(self.style.SUCCESS(f"demo model saved to {out_dir}"))
