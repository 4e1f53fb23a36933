"""FAISS shards: one id-mapped inner-product index per partition of ``catalog.products``.

Vectors are L2-normalised, so inner product = cosine similarity. FAISS indexes are
not safe for ``add``/``remove`` during ``search`` (faiss wiki, "Threads and
asynchronous calls"), so each shard guards its index with a lock; searches of
different shards do not block each other.

Index type by size (:class:`IndexPolicy`): up to ``exact_max`` vectors a shard is exact,
``IndexIDMap2(IndexFlatIP)``; past it the shard converts itself to ``IndexIVFFlat``
(inner product, k-means trained on a sample of its vectors, ``nlist`` about sqrt(n),
``nprobe`` lists searched). Why IVF-Flat and not HNSW: ``IndexHNSW`` cannot ``remove_ids``
in faiss 1.15, so HNSW would need a tombstone set and periodic rebuilds (and deleted
nodes would still cost search time and recall); ``IndexIVF`` stores the product ids in
its inverted lists itself, removes them (a hashtable direct map makes that O(1) per id
and allows ``reconstruct``), serializes with them, and applies an ``IDSelector`` on
product ids while it scans. The IVF shard is retrained (rebuilt) when it has grown
``retrain_growth`` times past the size it was trained at, and goes back to exact below
half of ``exact_max``. A rebuild (k-means training: seconds at 50k vectors) runs on a copy
outside the lock, in the writer's thread: searches keep using the old index meanwhile, and
the changes made during the rebuild are replayed onto the new index before it is swapped in.

Filtered search on an IVF shard: an ``allowed`` list is searched over every list
(``nprobe = nlist``); the selector is tested before any distance is computed, so that
costs one hash lookup per vector and is exact among the admitted ids, which a filter
needs (a narrow filter would otherwise find fewer than ``k`` in ``nprobe`` lists).
``excluded`` alone keeps ``nprobe``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import faiss
import numpy as np


@dataclass(frozen=True)
class IndexPolicy:
    """When a shard stops being exact, and how its IVF index is built and searched.

    Attributes:
        exact_max: Most vectors of an exact (flat) shard; past it the shard becomes IVF.
        nprobe: Inverted lists searched per query of an IVF shard (recall vs time).
        train_per_list: Training sample = this many vectors per list (capped at the shard size).
        retrain_growth: Rebuild an IVF shard once it holds this many times the vectors it was trained on.
    """

    exact_max: int = 50_000
    nprobe: int = 32
    train_per_list: int = 50
    retrain_growth: float = 4.0

    @classmethod
    def from_settings(cls, settings) -> IndexPolicy:
        """From ``settings.shard_exact_max`` and ``settings.shard_nprobe`` (:class:`schemas.settings.Settings`)."""
        return cls(exact_max=settings.shard_exact_max, nprobe=settings.shard_nprobe)

    def nlist(self, n: int) -> int:
        """Inverted lists for ``n`` vectors: about sqrt(n), at least 16."""
        return max(16, int(math.sqrt(n)))


def _ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    return faiss.try_extract_index_ivf(index) if not isinstance(index, faiss.IndexIDMap2) else None


class Shard:
    """One partition's vectors: exact (``IndexIDMap2(IndexFlatIP)``) or, when large, ``IndexIVFFlat``.

    Args:
        dim: Vector dimension.
        index: An index made by a shard (deserialized), or None for an empty exact one.
        policy: When to switch index type (:class:`IndexPolicy`); the default when None.
    """

    def __init__(self, dim: int, index: faiss.Index | None = None, policy: IndexPolicy | None = None) -> None:
        self.dim = dim
        self.policy = policy or IndexPolicy()
        self._index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._trained_at = self._index.ntotal  # the size an IVF index was trained at
        self._lock = threading.Lock()
        self._journal: list[tuple[np.ndarray, np.ndarray | None]] | None = None  # changes during a rebuild

    @classmethod
    def build(cls, dim: int, chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
              policy: IndexPolicy | None = None) -> Shard:
        """A shard of the ``(shards, ids, vectors)`` chunks of :func:`workers.catalog.load_vectors`;
        its index type is chosen once all vectors are in (one training at most)."""
        shard = cls(dim, policy=IndexPolicy(exact_max=2**62))  # exact while filling
        for _, ids, vectors in chunks:
            shard.upsert(ids, vectors)
        shard.policy = policy or IndexPolicy()
        shard._adapt()
        return shard

    @property
    def kind(self) -> str:
        """``flat`` (exact) or ``ivf``."""
        return "flat" if _ivf(self._index) is None else "ivf"

    def _contents(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, vectors)`` of every vector in the index (caller holds the lock)."""
        ivf = _ivf(self._index)
        if ivf is None:
            n = self._index.ntotal
            ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
            vectors = self._index.index.reconstruct_n(0, n) if n else np.zeros((0, self.dim), np.float32)
            return ids, vectors.reshape(n, self.dim)
        invlists = ivf.invlists
        all_ids, all_vectors = [], []
        for lst in range(ivf.nlist):
            size = invlists.list_size(lst)
            if size == 0:
                continue
            all_ids.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy())
            codes = faiss.rev_swig_ptr(invlists.get_codes(lst), size * invlists.code_size)
            all_vectors.append(np.frombuffer(codes.copy().tobytes(), dtype=np.float32).reshape(size, self.dim))
        if not all_ids:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return np.concatenate(all_ids).astype(np.int64), np.concatenate(all_vectors)

    def _wanted(self) -> str | None:
        """The index type the size calls for, if it is not the current one: ``ivf`` (also a
        retrain of a grown IVF shard), ``flat`` or None (caller holds the lock)."""
        n, policy = self._index.ntotal, self.policy
        ivf = _ivf(self._index)
        if ivf is None and n > policy.exact_max:
            return "ivf"
        if ivf is not None and n > policy.retrain_growth * max(self._trained_at, 1):
            return "ivf"
        if ivf is not None and n < policy.exact_max // 2:
            return "flat"
        return None

    def _adapt(self) -> None:
        """Rebuild the index as the type its size calls for, if needed. The build runs outside
        the lock on a copy of the contents; changes made meanwhile (:meth:`_change`) are
        journaled and replayed onto the new index, which is then swapped in. One rebuild at a
        time: a writer that finds one running leaves it to finish."""
        with self._lock:
            kind = self._wanted()
            if kind is None or self._journal is not None:
                return
            ids, vectors = self._contents()
            self._journal = []
        try:
            index, trained_at = self._build(kind, ids, vectors)
        except BaseException:
            with self._lock:
                self._journal = None
            raise
        with self._lock:
            for changed_ids, changed_vectors in self._journal:
                index.remove_ids(changed_ids)
                if changed_vectors is not None:
                    index.add_with_ids(changed_vectors, changed_ids)
            self._index, self._trained_at, self._journal = index, trained_at, None

    def _build(self, kind: str, ids: np.ndarray, vectors: np.ndarray) -> tuple[faiss.Index, int]:
        """A new ``kind`` index holding ``(ids, vectors)`` and the size it was trained at."""
        if kind == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
            index.add_with_ids(vectors, ids)
            return index, 0
        n = len(ids)
        nlist = self.policy.nlist(n)
        index = faiss.index_factory(self.dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        sample = min(n, nlist * self.policy.train_per_list)
        rows = np.sort(np.random.default_rng(0).choice(n, sample, replace=False)) if sample < n else slice(None)
        index.train(np.ascontiguousarray(vectors[rows]))
        ivf = faiss.extract_index_ivf(index)
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        index.add_with_ids(vectors, ids)
        return index, n

    def _change(self, ids: np.ndarray, vectors: np.ndarray | None) -> int:
        """Remove ``ids``, then add ``vectors`` under them unless None; journaled while a rebuild
        runs. Returns how many were removed (caller holds the lock)."""
        removed = self._index.remove_ids(ids)
        if vectors is not None:
            self._index.add_with_ids(vectors, ids)
        if self._journal is not None:
            self._journal.append((ids, vectors))
        return removed

    def to_bytes(self) -> bytes:
        """The index in FAISS's own serialization (``faiss.serialize_index``)."""
        with self._lock:
            return faiss.serialize_index(self._index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, policy: IndexPolicy | None = None) -> Shard:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        return cls(index.d, index, policy)

    def ids(self) -> np.ndarray:
        """Every id in the shard, int64 (ntotal,) (duplicates would show here); insertion order when exact."""
        with self._lock:
            if _ivf(self._index) is None:
                return faiss.vector_to_array(self._index.id_map).astype(np.int64)
            return self._contents()[0]

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
            self._change(ids, vectors)
        self._adapt()

    def remove(self, ids: np.ndarray) -> int:
        """Remove ids (absent ones are ignored). Returns how many were removed."""
        with self._lock:
            removed = self._change(np.ascontiguousarray(ids, dtype=np.int64), None)
        self._adapt()
        return removed

    def apply(self, changes: Iterable[tuple[int, np.ndarray | None]]) -> None:
        """Apply changes in their order: ``(product id, float32 (dim,) vector)`` puts the vector,
        ``(product id, None)`` removes the id. The shard ends as after :meth:`upsert` and
        :meth:`remove` one change at a time (only each id's last change counts), in one removal and
        one addition: on a flat shard every ``remove_ids`` scans and compacts the whole index (1.5 ms
        a call at 11,111 vectors on 2 cores), so a changelog replayed one change at a time held the
        lock, and a core, for seconds (README, "Micro-batching").

        Raises:
            ValueError: a vector is not of shape (dim,); nothing is applied.
        """
        last = dict(changes)  # a later change of an id replaces its earlier one
        if not last:
            return
        puts = {i: v for i, v in last.items() if v is not None}
        for product_id, vector in puts.items():
            if np.shape(vector) != (self.dim,):
                raise ValueError(f"product {product_id}: vector of shape {np.shape(vector)}, expected ({self.dim},)")
        removed = np.array([i for i, v in last.items() if v is None], dtype=np.int64)
        with self._lock:
            if len(removed):
                self._change(removed, None)
            if puts:
                self._change(np.fromiter(puts, np.int64, len(puts)),
                             np.stack(list(puts.values())).astype(np.float32, copy=False))
        self._adapt()

    def search(self, queries: np.ndarray, k: int, selector: faiss.IDSelector | None = None,
               exhaustive: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product among the ids ``selector`` admits (all when None): exact on a
        flat shard, over ``nprobe`` inverted lists on an IVF one (all of them with ``exhaustive``).

        Args:
            queries: float32 (Q, dim), L2-normalised.
            k: Neighbours per query.
            selector: Product ids to consider (see :func:`id_selector`).
            exhaustive: Scan every inverted list of an IVF shard (exact among admitted ids).

        Returns:
            ``(scores, ids)``: float32 (Q, k) descending and int64 (Q, k); id -1 pads when the
            shard holds fewer than ``k`` admitted vectors (or, on IVF, found in the lists scanned).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        with self._lock:
            ivf = _ivf(self._index)
            if ivf is None:
                params = None if selector is None else faiss.SearchParameters(sel=selector)
            else:
                params = faiss.SearchParametersIVF(nprobe=ivf.nlist if exhaustive else self.policy.nprobe)
                if selector is not None:
                    params.sel = selector
            return self._index.search(queries, k, params=params)


def id_selector(allowed: np.ndarray | None = None, excluded: np.ndarray | None = None
                ) -> faiss.IDSelector | None:
    """A FAISS selector for ``allowed`` ids (all when None) minus ``excluded`` ones (none when None).

    ``IndexIDMap2`` translates it to the inner index's positions, and a flat index applies it
    during the scan, so a filtered search stays exact and finds ``k`` whenever ``k`` ids qualify;
    an IVF shard holds product ids itself and applies it while scanning its lists.

    Args:
        allowed: int64 (N,) product ids, or None for every id.
        excluded: int64 (M,) product ids never to return, or None.

    Returns:
        A selector, or None when neither is given.
    """
    excluded = None if excluded is None or len(excluded) == 0 else np.asarray(excluded, dtype=np.int64)
    if allowed is not None:
        allowed = np.asarray(allowed, dtype=np.int64)
        if excluded is not None:
            allowed = np.setdiff1d(allowed, excluded)
        return faiss.IDSelectorBatch(np.ascontiguousarray(allowed))
    if excluded is None:
        return None
    inner = faiss.IDSelectorBatch(np.ascontiguousarray(excluded))
    selector = faiss.IDSelectorNot(inner)
    selector.referenced = inner  # the SWIG wrapper does not keep its argument alive
    return selector


# An exact search of Q queries scans with faiss's SIMD loop, the whole shard once per query, while Q x
# dim < faiss.cvar.distance_compute_blas_threshold, and with BLAS (sgemm by blocks: the shard once for
# all Q) from there (faiss/utils/distances.cpp). faiss 1.15's 128,000 means BLAS from 100 queries of
# 1280-d, tuned for many cores; on a worker's one OpenMP thread the 44,446-vector catalog cost
# 22-25 ms a query both ways at 1 and 2 queries but 10-13 against 20-25 at 4 and 5-6 against 20-22
# at 8 with BLAS (2-core AMD EPYC, 4 shards; a single query with BLAS: 40-46 ms). Filtered searches
# (an IDSelector) always take the loop.
BLAS_FROM_QUERIES = 4


def use_blas_from(queries: int, dim: int) -> None:
    """Make exact searches of ``queries`` or more ``dim``-d queries use BLAS (process-wide: a faiss global)."""
    faiss.cvar.distance_compute_blas_threshold = (queries - 1) * dim + 1


class ShardSet:
    """All shards of the catalog; searches every shard and merges the top-k. Sets faiss's BLAS
    threshold for ``dim`` (:data:`BLAS_FROM_QUERIES`, :func:`use_blas_from`).

    Args:
        n_shards, dim, policy: The shards (:class:`Shard`).
        threads: OpenMP threads of each search, set in the searching thread (0: leave it). An
            OpenMP thread count is per thread: a thread that never set one (a Celery worker's)
            uses one per core, whatever ``torch.set_num_threads`` said in the main thread.
    """

    def __init__(self, n_shards: int, dim: int, policy: IndexPolicy | None = None, threads: int = 0) -> None:
        self.shards = [Shard(dim, policy=policy) for _ in range(n_shards)]
        self.dim, self.threads = dim, threads
        use_blas_from(BLAS_FROM_QUERIES, dim)

    def replace(self, number: int, shard: Shard) -> None:
        """Swap in a rebuilt shard (searches see the old one or the new one, never half of either)."""
        self.shards[number] = shard

    @property
    def ntotal(self) -> int:
        return sum(shard.ntotal for shard in self.shards)

    def sizes(self) -> list[int]:
        return [shard.ntotal for shard in self.shards]

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
               excluded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` over all shards, merged, among ``allowed`` ids minus ``excluded`` ones (see
        :func:`id_selector`); same shapes and padding as :meth:`Shard.search`."""
        if self.threads:
            faiss.omp_set_num_threads(self.threads)  # this thread's, for this search and its next ones
        selector = id_selector(allowed, excluded)
        parts = [shard.search(queries, k, selector, exhaustive=allowed is not None) for shard in self.shards]
        scores = np.concatenate([s for s, _ in parts], axis=1)
        ids = np.concatenate([i for _, i in parts], axis=1)
        scores[ids < 0] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top_scores = np.take_along_axis(scores, order, axis=1)
        top_ids = np.take_along_axis(ids, order, axis=1)
        top_scores[top_ids < 0] = -1.0
        return top_scores.astype(np.float32), top_ids
