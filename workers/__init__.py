"""Everything that computes: decoding, fetching image URLs, embedding, category prediction, FAISS
shards, the indexer and the Celery worker.

Modules are imported one by one (``from workers.embed import Embedder``) so that light users such
as ``workers.catalog`` (imported by the CLI) do not pull in torch and faiss; the names below are
also re-exported here, imported lazily on first access (PEP 562).
"""

from __future__ import annotations

import importlib

# Not ``train`` or ``evaluate``: those names are modules of this package.
_EXPORTS = {"CategoryHeads": "workers.classify", "auto_category": "workers.classify", "Embedder": "workers.embed"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
