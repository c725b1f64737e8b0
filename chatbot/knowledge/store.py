"""Qdrant: the knowledge collection (named vectors `dense` and `sparse`) and the hybrid query.

With QDRANT_URL set, one client per process talks to that server (QDRANT_API_KEY, timeout
LEAFRESH_QDRANT_TIMEOUT_S). Otherwise the collection lives in Qdrant's embedded local mode under
LEAFRESH_QDRANT_PATH (default `var/qdrant`). Local mode lets one client at a time open the folder,
so a writer (`qdrant()`: the `cpu` worker, the commands) opens and closes it under a lock file and
then bumps a generation file beside it (`mark_changed`); a reader (`qdrant_reader()`: the web
processes) queries an in-memory copy of the collection, taken again only when the generation file
changed. Use a server in production.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from filelock import FileLock
from filelock import Timeout as LockTimeout
from qdrant_client import QdrantClient, models

from chatbot.knowledge import KnowledgeUnavailableError
from chatbot.knowledge.sparse import SparseVector

logger = logging.getLogger(__name__)
DENSE = "dense"
SPARSE = "sparse"
PREFETCH_LIMIT = 20  # candidates per vector kind before fusion


@dataclass(frozen=True)
class Hit:
    """A retrieved document: its id (the KnowledgeDocument pk), text, category code and fused score."""

    id: int
    title: str
    text: str
    category: str
    score: float


_server_client: QdrantClient | None = None
_process_lock = threading.Lock()


def collection_name() -> str:
    """The collection's name (LEAFRESH_QDRANT_COLLECTION)."""
    return settings.LEAFRESH_QDRANT_COLLECTION


def _generation_file() -> Path:
    return Path(str(settings.LEAFRESH_QDRANT_PATH) + ".generation")


def mark_changed() -> None:
    """Tell local-mode readers that the collection changed (replaces the generation file; no-op
    with a server, whose readers always see the latest data)."""
    if settings.QDRANT_URL:
        return
    target = _generation_file()
    temporary = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}")
    temporary.write_text(f"{time.time_ns()} {os.getpid()} {threading.get_ident()}\n")
    os.replace(temporary, target)


def _generation() -> str | None:
    try:
        return _generation_file().read_text()
    except FileNotFoundError:
        return None


@dataclass
class _Snapshot:
    path: Path
    generation: str | None
    client: QdrantClient


_snapshot: _Snapshot | None = None
_snapshot_lock = threading.Lock()


def _copy_collection(source: QdrantClient, target: QdrantClient) -> None:
    name = collection_name()
    if not source.collection_exists(name):
        return  # searching the copy reports the missing collection
    params = source.get_collection(name).config.params
    target.create_collection(name, vectors_config=params.vectors, sparse_vectors_config=params.sparse_vectors)
    offset = None
    while True:
        points, offset = source.scroll(name, limit=256, offset=offset, with_payload=True, with_vectors=True)
        if points:
            batch = [models.PointStruct(id=p.id, vector=p.vector, payload=p.payload) for p in points]  # type: ignore[arg-type]
            target.upsert(name, points=batch, wait=True)
        if offset is None:
            return


@contextmanager
def qdrant_reader() -> Iterator[QdrantClient]:
    """A client for searching. With a server, the server; in local mode this process's in-memory
    copy of the collection, refreshed when a writer marked a change. Raises
    KnowledgeUnavailableError when Qdrant cannot be reached."""
    global _snapshot
    if settings.QDRANT_URL:
        with qdrant() as client:
            yield client
        return
    path = settings.LEAFRESH_QDRANT_PATH
    generation = _generation()  # read before copying: a change during the copy is seen next time
    with _snapshot_lock:
        snapshot = _snapshot
        if snapshot is None or snapshot.path != path or snapshot.generation != generation:
            copy = QdrantClient(location=":memory:")
            try:
                with qdrant() as source:
                    _copy_collection(source, copy)
            except KnowledgeUnavailableError:
                if snapshot is None or snapshot.path != path:
                    raise
                # A writer holds the folder (a long build): the previous copy is better than an error.
                logger.warning("serving the previous copy of the knowledge index: the folder is busy")
            else:
                snapshot = _snapshot = _Snapshot(path=path, generation=generation, client=copy)
    try:
        yield snapshot.client
    except KnowledgeUnavailableError:
        raise
    except Exception as exc:
        raise KnowledgeUnavailableError(f"Qdrant failed: {type(exc).__name__}") from exc


@contextmanager
def qdrant() -> Iterator[QdrantClient]:
    """A client for one use (writers; in local mode it holds the folder's lock meanwhile). Raises
    KnowledgeUnavailableError when Qdrant cannot be reached."""
    global _server_client
    try:
        if settings.QDRANT_URL:
            with _process_lock:
                if _server_client is None:
                    _server_client = QdrantClient(
                        url=settings.QDRANT_URL,
                        api_key=settings.QDRANT_API_KEY or None,
                        timeout=settings.LEAFRESH_QDRANT_TIMEOUT_S,
                        # The version check is a request of its own, made on the first retrieval.
                        check_compatibility=False,
                    )
            yield _server_client
            return
        path = settings.LEAFRESH_QDRANT_PATH
        path.mkdir(parents=True, exist_ok=True)
        with _process_lock, FileLock(str(path) + ".lock", timeout=settings.LEAFRESH_QDRANT_TIMEOUT_S):
            client = QdrantClient(path=str(path))
            try:
                yield client
            finally:
                client.close()
    except KnowledgeUnavailableError:
        raise
    except LockTimeout as exc:
        raise KnowledgeUnavailableError(f"the local Qdrant folder stayed locked over {exc.lock_file}") from None
    except Exception as exc:  # qdrant-client raises httpx, grpc and its own errors for one cause
        raise KnowledgeUnavailableError(f"Qdrant failed: {type(exc).__name__}") from exc


def ensure_collection(client: QdrantClient, *, dimension: int, recreate: bool = False) -> bool:
    """Create the collection (dense cosine vectors of `dimension`, sparse vectors with Qdrant's IDF)
    unless it exists with that dimension; `recreate` drops it first. True when it was (re)created."""
    name = collection_name()
    if client.collection_exists(name):
        size = client.get_collection(name).config.params.vectors[DENSE].size  # type: ignore[index]
        if not recreate and size == dimension:
            return False
        logger.info("recreating collection %s (dimension %s -> %s)", name, size, dimension)
        client.delete_collection(name)
    client.create_collection(
        name,
        vectors_config={DENSE: models.VectorParams(size=dimension, distance=models.Distance.COSINE)},
        sparse_vectors_config={SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)},
    )
    if settings.QDRANT_URL:  # local mode scans payloads; a server filters faster with indexes
        for field, schema in (("is_active", models.PayloadSchemaType.BOOL), ("category", models.PayloadSchemaType.KEYWORD)):
            client.create_payload_index(name, field_name=field, field_schema=schema)
    return True


def point(*, id: int, dense: list[float], sparse: SparseVector, payload: dict[str, Any]) -> models.PointStruct:
    """A document's point: id = the document pk."""
    vector = {DENSE: dense, SPARSE: models.SparseVector(indices=sparse.indices, values=sparse.values)}
    return models.PointStruct(id=id, vector=vector, payload=payload)


def fingerprints(client: QdrantClient) -> dict[int, str]:
    """Every indexed point's id and stored `fingerprint` payload ({} when the collection is missing)."""
    name = collection_name()
    if not client.collection_exists(name):
        return {}
    found: dict[int, str] = {}
    offset = None
    while True:
        points, offset = client.scroll(name, limit=512, offset=offset, with_payload=["fingerprint"], with_vectors=False)
        found.update({int(p.id): str((p.payload or {}).get("fingerprint", "")) for p in points})
        if offset is None:
            return found


def search(
    client: QdrantClient,
    *,
    dense: list[float] | None,
    sparse: SparseVector | None,
    k: int,
    category: str | None = None,
) -> list[Hit]:
    """The top `k` active documents (of `category` when given): both vectors fused by weighted
    Reciprocal Rank Fusion (Cormack, Clarke & Buettcher, SIGIR 2009; Qdrant's `RrfQuery`, rank
    constant LEAFRESH_RETRIEVAL_RRF_K, the dense list weighted LEAFRESH_RETRIEVAL_DENSE_WEIGHT
    against the sparse list's 1), or one kind alone when the other is None. Raises
    KnowledgeUnavailableError when the collection is missing."""
    name = collection_name()
    if not client.collection_exists(name):
        raise KnowledgeUnavailableError(f"collection {name} is missing: run `python manage.py build_index`")
    conditions = [models.FieldCondition(key="is_active", match=models.MatchValue(value=True))]
    if category:
        conditions.append(models.FieldCondition(key="category", match=models.MatchValue(value=category)))
    where = models.Filter(must=conditions)
    queries: list[tuple[Any, str]] = []
    if dense is not None:
        queries.append((dense, DENSE))
    if sparse is not None and sparse.indices:
        queries.append((models.SparseVector(indices=sparse.indices, values=sparse.values), SPARSE))
    if not queries:
        return []
    if len(queries) == 1:
        query, using = queries[0]
        result = client.query_points(name, query=query, using=using, query_filter=where, limit=k, with_payload=True)
    else:
        prefetch = [models.Prefetch(query=q, using=u, filter=where, limit=max(PREFETCH_LIMIT, k)) for q, u in queries]
        weights = [settings.LEAFRESH_RETRIEVAL_DENSE_WEIGHT if u == DENSE else 1.0 for _, u in queries]
        fusion = models.RrfQuery(rrf=models.Rrf(k=settings.LEAFRESH_RETRIEVAL_RRF_K, weights=weights))
        result = client.query_points(name, prefetch=prefetch, query=fusion, limit=k, with_payload=True)
    return [
        Hit(
            id=int(p.id),
            title=str((p.payload or {}).get("title", "")),
            text=str((p.payload or {}).get("text", "")),
            category=str((p.payload or {}).get("category", "")),
            score=float(p.score),
        )
        for p in result.points
    ]
