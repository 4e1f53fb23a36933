"""``lookalike bench ingest``: ingest throughput, embedding rate, freshness, shard overhead, memory.

Measured in one run, medians and ratios (never a timed test):

- *embedding alone*: :class:`workers.embed.Embedder` on the same decoded images, in this process,
  before the system starts (so nothing else competes for the cores); and segmentation plus
  embedding, the indexer's whole vector function when the model version segments;
- *end to end*: ``n`` real products published at once to ``catalog.products``, through the
  indexer (decode, embed, Postgres, changelog) to a worker's replica, until the replica holds
  them all; products/s = n / (last searchable - first publish);
- *freshness*: then ``trickle_n`` more products at ``rate`` per second, one at a time; each one's
  publish time → the moment the worker's replica status in Redis (reported every 50 ms for the
  bench) first counts it. The count is per replica, not per id, so with several products in
  flight it credits them in publish order; at 10/s with sub-second freshness that is at most a
  product or two;
- *shard search vs raw FAISS*: :meth:`Shard.search` vs ``index.search`` on the same index
  (single 1280-d queries, exact shard of ``search_n`` vectors), median of each;
- *memory per 100k vectors*: the serialized size of exact and IVF shards, per 100k vectors.
"""

from __future__ import annotations

import contextlib
import csv
import statistics
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA = Path("/work/shared/data/fashion-product-images")


@dataclass
class Figures:
    n: int
    embed_per_s: float
    segment_embed_per_s: float
    ingest_per_s: float
    freshness_ms: list[float]
    shard_search_ms: float
    raw_search_ms: float
    flat_bytes_per_100k: float
    ivf_bytes_per_100k: float

    def rows(self) -> list[tuple[str, str]]:
        q = np.percentile(self.freshness_ms, [50, 95, 99]) if self.freshness_ms else [float("nan")] * 3
        return [
            ("products indexed end to end", f"{self.ingest_per_s:.1f} /s ({self.n} products)"),
            ("embedding alone (same images)", f"{self.embed_per_s:.1f} /s"),
            ("ingest / embedding", f"{self.ingest_per_s / self.embed_per_s:.2f}"),
            ("segmentation + embedding (same images)", f"{self.segment_embed_per_s:.1f} /s"),
            ("ingest / (segmentation + embedding)", f"{self.ingest_per_s / self.segment_embed_per_s:.2f}"),
            ("freshness p50 / p95 / p99", f"{q[0]:.0f} / {q[1]:.0f} / {q[2]:.0f} ms "
                                          f"({len(self.freshness_ms)} products at a trickle)"),
            ("shard search / raw FAISS", f"{self.shard_search_ms:.3f} / {self.raw_search_ms:.3f} ms = "
                                         f"{self.shard_search_ms / self.raw_search_ms:.3f}"),
            ("memory per 100k vectors", f"exact {self.flat_bytes_per_100k / 2**20:.0f} MiB, "
                                        f"IVF {self.ivf_bytes_per_100k / 2**20:.0f} MiB"),
        ]


def extract(n: int, into: Path) -> Path:
    """The first ``n`` products of styles.csv that have a 224 px photo: ``into/catalog.csv`` and
    ``into/images/<id>.jpg``. Returns the CSV."""
    images = into / "images"
    images.mkdir(parents=True)
    with tarfile.open(DATA / "images-224.tar") as tar:
        names = {Path(m.name).stem: m for m in tar.getmembers() if m.name.endswith(".jpg")}
        rows = []
        with open(DATA / "styles.csv", newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames
            for row in reader:
                if row["id"] in names:
                    rows.append(row)
                    if len(rows) == n:
                        break
        for row in rows:
            member = names[row["id"]]
            (images / f"{row['id']}.jpg").write_bytes(tar.extractfile(member).read())
    path = into / "catalog.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return path


def embedding_rate(images: Path, ids: list[int], settings) -> tuple[float, float]:
    """Images/s of :meth:`Embedder.embed` alone on decoded images, and of segmentation plus
    embedding (the vector function of a ``segment`` model version), medians of 3 runs."""
    from workers.decode import decode
    from workers.embed import Embedder
    from workers.segment import Segmenter

    embedder = Embedder.from_settings(settings)
    embedder.load()
    segmenter = Segmenter(embedder.device)
    pixels = [decode((images / f"{i}.jpg").read_bytes(), settings.max_pixels, 10 * 2**20) for i in ids]
    embedder.embed([crop for crop, _ in segmenter.crop_all(pixels[:16])])  # warm up
    alone, segmented = [], []
    for _ in range(3):
        start = time.perf_counter()
        embedder.embed(pixels)
        alone.append(len(pixels) / (time.perf_counter() - start))
        start = time.perf_counter()
        for i in range(0, len(pixels), 32):  # as the indexer: a micro-batch at a time
            embedder.embed([crop for crop, _ in segmenter.crop_all(pixels[i:i + 32])])
        segmented.append(len(pixels) / (time.perf_counter() - start))
    return statistics.median(alone), statistics.median(segmented)


def shard_figures(search_n: int = 20_000, queries: int = 200) -> tuple[float, float, float, float]:
    """(shard search ms, raw FAISS ms, exact bytes per 100k, IVF bytes per 100k)."""
    from workers.embed import DIM
    from workers.shards import IndexPolicy, Shard

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((search_n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(search_n, dtype=np.int64)
    shard = Shard.build(DIM, [(None, ids, vectors)])
    raw = shard._index
    qs = vectors[rng.choice(search_n, queries)]
    shard_ms, raw_ms = [], []
    for q in qs:  # interleaved, so load on the machine hits both alike
        t = time.perf_counter()
        shard.search(q[None, :], 10)
        shard_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        raw.search(q[None, :], 10)
        raw_ms.append((time.perf_counter() - t) * 1000)
    flat = len(shard.to_bytes()) / search_n * 100_000
    ivf = Shard.build(DIM, [(None, ids, vectors)], IndexPolicy(exact_max=1000))
    ivf_bytes = len(ivf.to_bytes()) / search_n * 100_000
    return statistics.median(shard_ms), statistics.median(raw_ms), flat, ivf_bytes


def ingest(n: int, trickle_n: int, rate: float, state_dir: Path, console) -> Figures:
    """The figures above, with services of the bench's own under ``state_dir`` (wiped first: a
    product already indexed there would not count as new). Not a temporary directory: PostgreSQL
    started as an unprivileged user (when run as root) cannot enter one."""
    import os
    import shutil

    import redis

    from ops.cli import running_system
    from ops.publish import publish, read_catalog
    from schemas.jobs import JobStore
    from schemas.settings import WorkerSettings
    from workers import topics

    with tempfile.TemporaryDirectory(prefix="lookalike-bench-") as tmp:
        tmp = Path(tmp)
        console.print(f"extracting {n + trickle_n} products from {DATA}")
        events, errors = read_catalog(extract(n + trickle_n, tmp), tmp / "images")
        assert not errors, errors[:3]
        bulk, trickle = events[:n], events[n:]
        settings = WorkerSettings()
        console.print("embedding alone ...")
        embed_rate, segment_embed_rate = embedding_rate(tmp / "images", [e.product_id for e in bulk[:min(n, 256)]],
                                                        settings)
        console.print(f"  {embed_rate:.1f} img/s; with segmentation {segment_embed_rate:.1f} img/s")
        console.print("shard search vs raw FAISS, memory ...")
        shard_ms, raw_ms, flat_bytes, ivf_bytes = shard_figures()

        os.environ["LOOKALIKE_REPLICA_STATUS_INTERVAL_S"] = "0.05"
        shutil.rmtree(state_dir, ignore_errors=True)
        with running_system(state_dir, ["worker", "indexer"]), contextlib.ExitStack() as stack:
            settings = WorkerSettings()
            store = JobStore(redis.Redis.from_url(settings.redis_url), settings.job_ttl_s)

            def held() -> int:
                replicas = [r for r in store.replicas() if r.model_version == settings.model_version]
                return max((r.ntotal for r in replicas), default=-1)

            console.print("waiting for a worker's replica ...")
            while held() < 0:
                time.sleep(0.2)
            time.sleep(2.0)
            base = held()
            console.print(f"publishing {n} products at once (replica holds {base})")
            start = time.time()
            publish(settings.kafka_bootstrap, settings.products_topic, bulk)
            while held() < base + n:
                time.sleep(0.05)
            ingest_rate = n / (time.time() - start)
            console.print(f"  {ingest_rate:.1f} products/s end to end")

            console.print(f"trickle: {len(trickle)} products at {rate}/s")
            base = held()
            sent_at: list[float] = []
            seen_at: list[float | None] = [None] * len(trickle)
            producer = topics.producer(settings.kafka_bootstrap)
            stack.callback(producer.close)
            next_send = time.time()
            while None in seen_at:
                now = time.time()
                if len(sent_at) < len(trickle) and now >= next_send:
                    event = trickle[len(sent_at)]
                    sent = producer.send(settings.products_topic, key=event.key(),
                                         value=event.model_dump_json().encode()).get(timeout=30)
                    sent_at.append(sent.timestamp / 1000)  # the record's publish time
                    next_send += 1 / rate
                count = held() - base
                for i in range(min(count, len(sent_at))):
                    if seen_at[i] is None:
                        seen_at[i] = time.time()
                if sent_at and time.time() - sent_at[-1] > 60:
                    break
                time.sleep(0.01)
            freshness = [(s - p) * 1000 for p, s in zip(sent_at, seen_at) if s is not None]
    return Figures(n, embed_rate, segment_embed_rate, ingest_rate, freshness, shard_ms, raw_ms, flat_bytes, ivf_bytes)
