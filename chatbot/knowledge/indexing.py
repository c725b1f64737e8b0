"""Keeping Qdrant in step with the KnowledgeDocument table, and searching it.

Points carry the document's pk as id and a `fingerprint` of everything indexed (texts, tags, active
flag, embedding model), so `index_build` re-embeds only what changed and removes what was deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from qdrant_client import models

from chatbot.knowledge import KnowledgeUnavailableError, dense, sparse, store
from chatbot.knowledge.store import Hit
from chatbot.models import KnowledgeDocument

logger = logging.getLogger(__name__)
Mode = Literal["hybrid", "dense", "sparse"]


def _indexed_text(doc: KnowledgeDocument) -> str:
    return f"{doc.title}\n{doc.text}"


def _lexical_text(doc: KnowledgeDocument) -> str:
    """What the sparse vector indexes: the document and its category's label and keywords (the
    category is a field of the document, indexed like a tag; editors' keywords widen its vocabulary)."""
    return "\n".join([_indexed_text(doc), doc.category.label, *map(str, doc.category.keywords or [])])


def _payload(doc: KnowledgeDocument) -> dict[str, object]:
    payload: dict[str, object] = {
        "title": doc.title,
        "text": doc.text,
        "category": doc.category.code,
        "label": doc.category.label,
        "location": doc.location,
        "work_type": doc.work_type,
        "is_active": doc.is_active,
        "keywords": list(doc.category.keywords or []),
    }
    key = json.dumps([payload, dense.model_name()], ensure_ascii=False, sort_keys=True)
    payload["fingerprint"] = hashlib.sha256(key.encode()).hexdigest()[:32]
    return payload


def _points(docs: Sequence[KnowledgeDocument], payloads: Sequence[dict[str, object]]) -> list[models.PointStruct]:
    """The documents' points (embeds them: done before opening Qdrant, so local mode's lock is short)."""
    vectors = dense.embed([_indexed_text(d) for d in docs])
    return [
        store.point(id=d.pk, dense=v, sparse=sparse.document_vector(_lexical_text(d)), payload=p)
        for d, v, p in zip(docs, vectors, payloads, strict=True)
    ]


@dataclass(frozen=True)
class BuildReport:
    """What `index_build` did: documents embedded and upserted, points deleted, unchanged ones kept."""

    indexed: int
    deleted: int
    unchanged: int
    recreated: bool


def index_build(*, rebuild: bool = False, batch_size: int = 32, progress: Callable[[int], None] | None = None) -> BuildReport:
    """Bring the collection up to date with the database; `rebuild` drops it and embeds everything.

    `progress(n)` is called after each batch of n documents. The embedding model is loaded only when
    something must be embedded. Raises KnowledgeUnavailableError when Qdrant cannot be reached.
    """
    docs = list(KnowledgeDocument.objects.select_related("category").order_by("id"))
    payloads = {d.pk: _payload(d) for d in docs}
    with store.qdrant() as client:
        indexed = {} if rebuild else store.fingerprints(client)
    stale = [d for d in docs if indexed.get(d.pk) != payloads[d.pk]["fingerprint"]]
    gone = sorted(set(indexed) - set(payloads))
    recreated = False
    if stale or rebuild or not indexed:
        dimension = dense.dimension()
        with store.qdrant() as client:
            recreated = store.ensure_collection(client, dimension=dimension, recreate=rebuild)
    for start in range(0, len(stale), batch_size):
        batch = stale[start : start + batch_size]
        points = _points(batch, [payloads[d.pk] for d in batch])
        with store.qdrant() as client:  # one batch at a time: other processes get their turn in local mode
            client.upsert(store.collection_name(), points=points, wait=True)
        if progress is not None:
            progress(len(batch))
    if gone:
        with store.qdrant() as client:
            client.delete(store.collection_name(), points_selector=models.PointIdsList(points=gone), wait=True)
    if stale or gone or recreated:
        store.mark_changed()
    return BuildReport(indexed=len(stale), deleted=len(gone), unchanged=len(docs) - len(stale), recreated=recreated)


def index_document(*, document_id: int) -> str:
    """Re-index one document after a save (`"indexed"`), or remove its point after a delete
    (`"deleted"`). Raises KnowledgeUnavailableError when Qdrant cannot be reached."""
    doc = KnowledgeDocument.objects.select_related("category").filter(pk=document_id).first()
    if doc is None:
        with store.qdrant() as client:
            if client.collection_exists(store.collection_name()):
                client.delete(store.collection_name(), points_selector=models.PointIdsList(points=[document_id]), wait=True)
        store.mark_changed()
        return "deleted"
    vector_size = dense.dimension()
    points = _points([doc], [_payload(doc)])
    with store.qdrant() as client:
        store.ensure_collection(client, dimension=vector_size)
        client.upsert(store.collection_name(), points=points, wait=True)
    store.mark_changed()
    return "indexed"


def knowledge_search(query: str, *, k: int = 3, category: str | None = None, mode: Mode = "hybrid") -> list[Hit]:
    """The top `k` active documents for `query` (of `category`, a code, when given).

    `mode` hybrid fuses dense and sparse vectors (RRF); dense or sparse uses one kind (for the
    evaluation). Blocking: embeds the query (milliseconds once the model is loaded) and queries
    Qdrant. Raises KnowledgeUnavailableError when Qdrant cannot be reached or the index is missing.
    """
    try:
        query_dense = dense.embed([query])[0] if mode in ("hybrid", "dense") else None
    except Exception as exc:  # e.g. a configured model that cannot be found offline
        raise KnowledgeUnavailableError(f"the embedding model failed: {type(exc).__name__}") from exc
    query_sparse = sparse.query_vector(query) if mode in ("hybrid", "sparse") else None
    with store.qdrant_reader() as client:
        return store.search(client, dense=query_dense, sparse=query_sparse, k=k, category=category)
