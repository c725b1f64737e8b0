"""Model loading, the generation engine, structured output, detokenisation and the event publisher.

Nothing in this package imports Django views; the GPU worker (celery_app) wires it together.
"""
