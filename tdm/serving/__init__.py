"""Online serving (the paper's Sec. 4): a behaviour store assembles each user's features, a
retrieval service runs Algorithm 1 on them, batching concurrent requests.

- ``tdm.serving.store``: ``BehaviorStore`` (interface), ``SqliteStore`` (SQLite, WAL), ``Event``.
- ``tdm.serving.batcher``: ``DynamicBatcher`` (requests gathered for a few ms into one call).
- ``tdm.serving.engine``: ``Engine`` (one loaded model answering batches), ``Query``, ``Answer``.
- ``tdm.serving.source``: model folders and ``models:/`` URIs (via ``tdm.model_sources``).
- ``tdm.serving.catalog``: item titles and category names (MovieLens movies files).
- ``tdm.serving.metrics``: Prometheus text.
- ``tdm.serving.app``: ``Service``, ``create_app`` (FastAPI), ``serve`` (``tdm serve``), and the
  demo page in ``static/``.

Only ``app`` needs FastAPI and uvicorn (``pip install tdm-flow[serve]``).
"""
