"""Celery tasks. `chatbot.generate` runs on the GPU worker (queue `gpu`); `chatbot.index_document`
on a CPU worker (queue `cpu`), which loads the embedding model but never the language model.

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


@shared_task(
    name="chatbot.index_document",
    ignore_result=True,
    autoretry_for=(Exception,),
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=8,
)
def index_document(document_id: int) -> str:
    """Re-index a saved knowledge document, or remove a deleted one's point (queue `cpu`).

    Retried with exponential backoff (up to 8 times, at most 60 s apart) while Qdrant is unreachable.
    """
    from chatbot.knowledge.indexing import index_document as index

    return index(document_id=document_id)
