"""The knowledge base: documents embedded into Qdrant (dense + sparse vectors) and retrieved by a
hybrid query for the free-text prompt. `sparse` and `dense` encode, `store` talks to Qdrant,
`indexing` keeps the index in step with the database.
"""
