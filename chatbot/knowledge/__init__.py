"""The knowledge base: documents embedded into Qdrant (dense + sparse vectors) and retrieved by a
hybrid query for the free-text prompt. `sparse` and `dense` encode, `store` talks to Qdrant,
`indexing` keeps the index in step with the database.
"""


class KnowledgeUnavailableError(RuntimeError):
    """Qdrant did not answer (server down or slow, local folder held too long), the embedding model
    failed, or the collection is missing (run `python manage.py build_index`). The message names the
    cause; it holds no secret. Defined here, away from qdrant-client, so importing it costs nothing."""
