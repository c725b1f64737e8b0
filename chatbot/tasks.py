"""Celery tasks. `chatbot.generate` runs on the GPU worker (queue `gpu`).

The task hands the request to the engine and returns at once: it never holds the solo pool while
the request generates, so the engine sees every live request and batches them.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

from chatbot.runtime import runtime_get
from inference.types import GenerationRequest


@shared_task(name="chatbot.generate", ignore_result=True)
def generate(request: dict[str, Any]) -> None:
    """Submit one generation request (GenerationRequest.to_dict()) to this worker's engine."""
    engine = runtime_get().engine
    assert engine is not None
    engine.submit(GenerationRequest.from_dict(request))
