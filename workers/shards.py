"""FAISS shards: one id-mapped inner-product index per partition of ``catalog.products``.

Vectors are L2-normalised, so inner product = cosine similarity. FAISS indexes are
not safe for ``add``/``remove`` during ``search`` (faiss wiki, "Threads and
asynchronous calls"), so each shard guards its index with a lock; searches of
different shards do not block each other.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import faiss
import numpy as np


class Shard:
    """One partition's vectors: exact inner-product search (``IndexIDMap2(IndexFlatIP)``).

    Args:
        dim: Vector dimension.
    """

    def __init__(self, dim: int, index: faiss.Index | None = None) -> None:
        self.dim = dim
        self._index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._lock = threading.Lock()

    @classmethod
    def build(cls, dim: int, chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Shard:
        """A shard of the ``(shards, ids, vectors)`` chunks of :func:`workers.catalog.load_vectors`."""
        shard = cls(dim)
        for _, ids, vectors in chunks:
            shard.upsert(ids, vectors)
        return shard

    def to_bytes(self) -> bytes:
        """The index in FAISS's own serialization (``faiss.serialize_index``)."""
        with self._lock:
            return faiss.serialize_index(self._index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> Shard:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        return cls(index.d, index)

    def ids(self) -> np.ndarray:
        """Every id in the shard, int64 (ntotal,), in insertion order (duplicates would show here)."""
        with self._lock:
            return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    @property
    def ntotal(self) -> int:
        return self._index.ntotal

    def upsert(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Put vectors, replacing any with the same id.

        Args:
            ids: int64 (N,), unique.
            vectors: float32 (N, dim), L2-normalised.
        """
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(f"vectors have shape {vectors.shape}, expected ({len(ids)}, {self.dim})")
        with self._lock:
            self._index.remove_ids(ids)
            self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        """Remove ids (absent ones are ignored). Returns how many were removed."""
        with self._lock:
            return self._index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product.

        Args:
            queries: float32 (Q, dim), L2-normalised.
            k: Neighbours per query.

        Returns:
            ``(scores, ids)``: float32 (Q, k) descending and int64 (Q, k); id -1 pads when the
            shard holds fewer than ``k`` vectors.
        """
        with self._lock:
            return self._index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


class ShardSet:
    """All shards of the catalog; searches every shard and merges the top-k."""

    def __init__(self, n_shards: int, dim: int) -> None:
        self.shards = [Shard(dim) for _ in range(n_shards)]
        self.dim = dim

    def replace(self, number: int, shard: Shard) -> None:
        """Swap in a rebuilt shard (searches see the old one or the new one, never half of either)."""
        self.shards[number] = shard

    @property
    def ntotal(self) -> int:
        return sum(shard.ntotal for shard in self.shards)

    def sizes(self) -> list[int]:
        return [shard.ntotal for shard in self.shards]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` over all shards, merged; same shapes and padding as :meth:`Shard.search`."""
        parts = [shard.search(queries, k) for shard in self.shards]
        scores = np.concatenate([s for s, _ in parts], axis=1)
        ids = np.concatenate([i for _, i in parts], axis=1)
        scores[ids < 0] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top_scores = np.take_along_axis(scores, order, axis=1)
        top_ids = np.take_along_axis(ids, order, axis=1)
        top_scores[top_ids < 0] = -1.0
        return top_scores.astype(np.float32), top_ids
