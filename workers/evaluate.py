"""Retrieval and category quality on a user's own catalog (``lookalike eval``).

The catalog photos go into an in-memory exact inner-product index (``faiss.IndexFlatIP``, id =
file stem); every query photo goes through the worker's pipeline (decode -> segment -> embed -> classify)
and is searched in it. Labels come from a ``styles.csv``-like file (``id`` plus the
``masterCategory``, ``subCategory``, ``articleType`` columns).

precision@k counts each of the top k whose label is the query's, the query's own product
included: a different photo of the same product is a right answer, as in product retrieval
benchmarks (e.g. Liu et al., "DeepFashion", CVPR 2016, in-shop retrieval). A query file that is
byte for byte its product's catalog photo finds itself first; :func:`evaluate` warns when queries
are such self-matches (``--queries`` the catalog folder).
"""

from __future__ import annotations

import filecmp
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from schemas.settings import ModelSettings
from workers.classify import KNN_K, LEVELS, CategoryHeads
from workers.decode import decode_reduced
from workers.embed import DECODE_MIN_PX, Embedder
from workers.segment import Segmenter, segmented
from workers.errors import InvalidInput
from workers.train import MAX_PIXELS, load_cache, photos, read_photos, read_styles

log = logging.getLogger(__name__)


def pipeline(paths: list[Path], embedder: Embedder, classify: Callable[[np.ndarray, list[int]], list[dict]] | None,
             segment: bool = True, threads: int = 2, chunk: int = 256) -> tuple[list[Path], np.ndarray, list[dict]]:
    """Decode (reduced as the worker does, :func:`workers.decode.decode_reduced`, in a thread pool,
    ``chunk`` photos at a time), segment (unless ``segment`` is False), embed and classify, as the
    worker does. A photo that cannot be read or decoded is left out with a warning
    (:func:`workers.train.read_photos`).

    Args:
        classify: (float32 (n, 1280) vectors, their n product ids) -> n predictions (as
            :meth:`CategoryHeads.predict`); None: none.

    Returns:
        The N paths decoded, their float32 (N, 1280) L2-normalised vectors, and per photo
        ``{level: [(label, prob), ...]}`` (empty dicts without ``classify``).
    """
    kept, vectors, predicted = [], [np.zeros((0, embedder.dim), np.float32)], []
    embed = segmented(embedder.embed, Segmenter(embedder.device) if segment else None)
    with ThreadPoolExecutor(threads) as pool:
        for n in range(0, len(paths), chunk):
            part, pixels = read_photos(paths[n:n + chunk],
                                       lambda data: decode_reduced(data, MAX_PIXELS, DECODE_MIN_PX).pixels, pool)
            if not part:
                continue
            v = embed(pixels)
            kept += part
            vectors.append(v)
            predicted += classify(v, [int(p.stem) for p in part]) if classify is not None else [{} for _ in part]
    return kept, np.concatenate(vectors), predicted


def evaluate(catalog_images: Path, styles_csv: Path, queries: Path, k: int = 5,
             embedder: Embedder | None = None, heads: CategoryHeads | None = None,
             catalog_cache: Path | None = None, segment: bool = True, votes: bool = True) -> dict:
    """Search every query photo in the catalog's photos and score the results against the labels.

    Args:
        catalog_images, queries: Directories of ``<id>.<jpg|jpeg|png|webp>`` (:func:`workers.train.photos`).
        styles_csv: Labels of the catalog and the queries.
        k: Results per query.
        embedder: Default: the one the ``LOOKALIKE_*`` model settings describe, as a worker's
            (:class:`schemas.settings.ModelSettings`: device, threads, batch, bfloat16). heads: Default: the
            shipped heads.
        catalog_cache: Take the catalog's features from there where present (a folder of ``lookalike train
            --cache``, :func:`workers.train.extract_features`, made with the same ``segment``); the queries
            always run the whole pipeline.
        segment: Crop photos to the product before embedding, as a worker with ``LOOKALIKE_SEGMENT`` does.
        votes: Blend the heads with the labels of each query's nearest catalog photos, as a worker with
            ``LOOKALIKE_CATEGORY_VOTES`` does (:mod:`workers.classify`); False: the heads alone.

    Returns:
        ``precision_at_k``: ``{level: mean fraction of the top k with the query's label}``, the query's own
        product included when the catalog holds it (a self-match when it is the same file: warned);
        ``exact_recall_at_1`` / ``exact_recall_at_k``: fraction of queries whose id is in the catalog
        found first / in the top k (None when no query id is in the catalog);
        ``category_accuracy``: ``{level: top-1 accuracy of the category prediction}`` (with the catalog's
        votes unless ``votes`` is False; a query's own product never votes); ``category_accuracy_heads``:
        the same, heads alone; ``images_per_s``: query photos
        through decode + segment + embed + classify per second of wall time; ``n_queries``, ``n_catalog``
        (photos searched and indexed), ``k``; ``n_skipped``: photos left out because they could not be read.

    Raises:
        InvalidInput: A bad ``styles_csv`` or photo folder (:func:`workers.train.read_styles`,
            :func:`workers.train.photos`), checked before anything is embedded; no catalog or query photo
            could be read.
    """
    import faiss

    embedder = embedder or Embedder.from_settings(ModelSettings())
    heads = heads or CategoryHeads()
    labels = read_styles(styles_csv)
    catalog_paths = photos(catalog_images, labels)
    query_paths = photos(queries, labels)
    by_id = {int(p.stem): p for p in catalog_paths}
    same = sum(_same_file(p, by_id[int(p.stem)]) for p in query_paths if int(p.stem) in by_id)
    if same:
        log.warning("%s%d of the %d query files are their product's very file in the catalog: each finds itself "
                    "first, which precision@k and exact-product recall count as a hit",
                    "--queries is the catalog folder: " if queries.resolve() == catalog_images.resolve() else "",
                    same, len(query_paths))
    index = faiss.IndexIDMap(faiss.IndexFlatIP(embedder.dim))
    cached_ids, cached = load_cache(catalog_cache) if catalog_cache else (np.zeros(0, np.int64), None)
    keep = np.isin(cached_ids, list(by_id))
    if keep.any():
        index.add_with_ids(cached[keep], cached_ids[keep])
    catalog_ids = set(cached_ids[keep].tolist())
    missing = [p for i, p in by_id.items() if i not in catalog_ids]
    if missing:
        embedded, vectors, _ = pipeline(missing, embedder, None, segment)
        index.add_with_ids(vectors, np.array([int(p.stem) for p in embedded], dtype=np.int64))
        catalog_ids |= {int(p.stem) for p in embedded}
    if not catalog_ids:
        raise InvalidInput(f"none of the {len(catalog_paths)} catalog photos in {catalog_images} could be read")
    heads.load()
    embedder.load()

    def classify(vectors: np.ndarray, query_ids: list[int]) -> list[dict]:
        """The heads, and the votes of the catalog photos nearest each query other than its own product's
        (which would give away its label)."""
        if not votes:
            return heads.predict(vectors)
        scores, ids = index.search(vectors, KNN_K + 1)
        neighbours = [[(float(s), labels[int(i)]) for s, i in zip(ss, ii) if i not in (-1, q)]
                      for ss, ii, q in zip(scores, ids, query_ids)]
        return heads.predict(vectors, neighbours=neighbours)

    start = time.perf_counter()
    searched, vectors, predicted = pipeline(query_paths, embedder, classify, segment)
    images_per_s = len(searched) / max(time.perf_counter() - start, 1e-9)
    if not searched:
        raise InvalidInput(f"none of the {len(query_paths)} query photos in {queries} could be read")
    query_ids = [int(p.stem) for p in searched]
    heads_alone = heads.predict(vectors) if votes else predicted
    _, found = index.search(vectors, k)

    precision = {}
    for level in LEVELS:
        hits = [np.mean([labels.get(int(i), {}).get(level) == labels[q].get(level) for i in row])
                for q, row in zip(query_ids, found) if labels[q].get(level)]
        precision[level] = round(float(np.mean(hits)), 4) if hits else None
    exact = [row for q, row in zip(query_ids, found) if q in catalog_ids]
    exact_at_1 = [row[0] == q for q, row in zip(query_ids, found) if q in catalog_ids]
    exact_at_k = [q in row for q, row in zip(query_ids, found) if q in catalog_ids]
    return {"precision_at_k": precision,
            "exact_recall_at_1": round(float(np.mean(exact_at_1)), 4) if exact else None,
            "exact_recall_at_k": round(float(np.mean(exact_at_k)), 4) if exact else None,
            "category_accuracy": _accuracy(predicted, query_ids, labels),
            "category_accuracy_heads": _accuracy(heads_alone, query_ids, labels), "images_per_s": round(images_per_s, 1),
            "n_queries": len(query_ids), "n_catalog": len(catalog_ids), "k": k,
            "n_skipped": len(catalog_paths) - len(catalog_ids) + len(query_paths) - len(query_ids)}


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths hold the same bytes (False when either cannot be read: it is skipped later)."""
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _accuracy(predicted: list[dict], query_ids: list[int], labels: dict[int, dict[str, str]]) -> dict:
    """``{level: top-1 accuracy}`` over the queries labelled at that level (None where none is)."""
    out = {}
    for level in LEVELS:
        right = [p[level][0][0] == labels[q][level] for q, p in zip(query_ids, predicted)
                 if labels[q].get(level) and level in p]
        out[level] = round(float(np.mean(right)), 4) if right else None
    return out
