"""Everything that computes: decoding, embedding, FAISS shards, the indexer and the Celery worker.

Modules are imported one by one (``from workers.embed import Embedder``) rather than
re-exported here, so that light users such as ``workers.catalog`` (imported by the CLI)
do not pull in torch and faiss.
"""
