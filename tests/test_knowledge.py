"""The knowledge base: Korean sparse vectors, the Qdrant index (embedded local mode, a real
collection built from the seeded documents), retrieval filters, and the commands."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatbot.knowledge import sparse
from chatbot.knowledge.indexing import index_build, index_document, knowledge_search
from chatbot.knowledge.store import KnowledgeUnavailableError
from chatbot.models import Category, KnowledgeDocument
from tests.stack import BIN, ROOT, free_port

SEED_INDEX = ROOT / "var" / "test" / "qdrant-seed"


def test_korean_words_match_whatever_particle_follows() -> None:
    assert {"텀", "텀블", "블러", "러를"} <= set(sparse.terms("텀블러를"))
    query, document = sparse.query_vector("텀블러"), sparse.document_vector("개인 텀블러를 챙겨요")
    shared = set(query.indices) & set(document.indices)
    assert {sparse.term_index("텀블"), sparse.term_index("블러")} <= shared
    # One-syllable stems still match: "책" and "책을".
    assert sparse.term_index("책") in set(sparse.document_vector("책을 나눠 읽어요").indices)
    assert sparse.query_vector("!!! ...").indices == []


def test_bm25_weights_saturate_with_term_frequency_and_shrink_with_length() -> None:
    once = dict(zip(*(lambda v: (v.indices, v.values))(sparse.document_vector("텀블러")), strict=True))
    many = dict(zip(*(lambda v: (v.indices, v.values))(sparse.document_vector("텀블러 " * 8)), strict=True))
    key = sparse.term_index("텀블")
    assert once[key] < many[key] < sparse.K1 + 1  # grows with tf, bounded by K1 + 1
    short = sparse.document_vector("텀블러 사용")
    long = sparse.document_vector("텀블러 사용 " + "가나다라마바사아자차카타파하 " * 10)
    assert dict(zip(short.indices, short.values, strict=True))[key] > dict(zip(long.indices, long.values, strict=True))[key]


def test_term_indices_are_stable_32_bit_numbers() -> None:
    assert sparse.term_index("텀블") == sparse.term_index("텀블") and 0 <= sparse.term_index("텀블") < 2**32
    assert sparse.term_index("텀블") != sparse.term_index("블러")


@pytest.fixture
def knowledge_index(settings, tmp_path: Path, django_db_blocker) -> Iterator[Path]:
    """A private copy of the seeded documents' index (built once under var/test/qdrant-seed)."""
    settings.LEAFRESH_QDRANT_PATH = SEED_INDEX
    index_build()  # incremental: nothing is embedded when the seed index is up to date
    path = tmp_path / "qdrant"
    shutil.copytree(SEED_INDEX, path)
    settings.LEAFRESH_QDRANT_PATH = path
    yield path


@pytest.mark.django_db
def test_build_index_is_incremental_and_removes_deleted_documents(knowledge_index: Path) -> None:
    assert index_build().indexed == 0
    doc = KnowledgeDocument.objects.order_by("id").first()
    doc.text += " 장바구니는 현관문 손잡이에 걸어 두세요."
    doc.save()
    report = index_build()
    assert (report.indexed, report.deleted, report.unchanged) == (1, 0, 239)
    doc.delete()
    assert index_build().deleted == 1


@pytest.mark.django_db
def test_retrieval_returns_active_documents_only_and_follows_edits(knowledge_index: Path) -> None:
    doc = KnowledgeDocument.objects.get(title="사무실 종이컵 대신 머그컵 쓰기")
    query = "사무실에서 종이컵 대신 머그컵을 쓰고 싶어요"
    assert knowledge_search(query, k=3)[0].id == doc.pk
    doc.is_active = False
    doc.save()
    index_document(document_id=doc.pk)
    hits = knowledge_search(query, k=10)
    assert doc.pk not in [h.id for h in hits] and len(hits) == 10
    assert all(KnowledgeDocument.objects.get(pk=h.id).is_active for h in hits)
    doc.is_active = True
    doc.text = "책상 서랍에 개인 머그컵을 두세요."
    doc.save()
    index_document(document_id=doc.pk)
    hit = knowledge_search(query, k=3)[0]
    assert hit.id == doc.pk and hit.text == "책상 서랍에 개인 머그컵을 두세요."
    doc_id = doc.pk
    doc.delete()
    assert index_document(document_id=doc_id) == "deleted"
    assert doc_id not in [h.id for h in knowledge_search(query, k=10)]


@pytest.mark.django_db
def test_a_category_filter_and_every_mode_return_that_many_hits(knowledge_index: Path) -> None:
    vegan = Category.objects.get(code="VEGAN")
    hits = knowledge_search("회사 점심을 어떻게 바꾸면 좋을까요", k=5, category="VEGAN")
    assert len(hits) == 5 and {h.category for h in hits} == {"VEGAN"} and vegan.documents.count() == 30
    for mode in ("dense", "sparse", "hybrid"):
        assert len(knowledge_search("자전거로 출근하기", k=3, mode=mode)) == 3


def _silent_server() -> tuple[socket.socket, int]:
    """A TCP server that accepts connections and never answers (a hung Qdrant)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.extend(iter(lambda: server.accept()[0], None)), daemon=True).start()
    return server, int(server.getsockname()[1])


def test_an_unreachable_or_silent_qdrant_server_raises_a_clear_error_fast(settings) -> None:
    from chatbot.knowledge import store

    settings.LEAFRESH_QDRANT_TIMEOUT_S = 1.0
    port = free_port()
    server, silent_port = _silent_server()
    try:
        for url in (f"http://127.0.0.1:{port}", f"http://127.0.0.1:{silent_port}"):
            settings.QDRANT_URL = url
            store._server_client = None
            started = time.monotonic()
            with pytest.raises(KnowledgeUnavailableError):
                knowledge_search("텀블러", k=3, mode="sparse")
            assert time.monotonic() - started < 5
    finally:
        server.close()
        store._server_client = None


def test_search_knowledge_prints_json_hits_with_category_codes(stack) -> None:
    """The command, run as an operator would, against the stack's index."""
    out = subprocess.run(
        [str(BIN / "python"), "manage.py", "search_knowledge", "일회용 컵 대신 텀블러", "--k", "3", "--json"],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout
    hits = json.loads(out)
    assert len(hits) == 3 and all(set(h) == {"text", "category", "score"} for h in hits)
    assert hits[0]["category"] == "ZERO_WASTE" and all(h["category"].isupper() for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
