"""Retrieval on the sample catalog with and without segmentation (``python -m ops.measure_segment``).

Catalog: ``ops/sample/images`` (1,200 products). Queries: the 30 photos of ``ops/sample/queries``
(products not in the catalog): precision@k of the same masterCategory / subCategory / articleType.
Exact-product recall@1: every 4th catalog photo as it is, and as a "user photo" (shrunk to 60%
and pasted off-centre on a light-grey canvas, JPEG quality 80), searched against the catalog.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from workers.decode import decode
from workers.embed import Embedder
from workers.segment import Segmenter

LEVELS = ("masterCategory", "subCategory", "articleType")


def load(directory: Path, ids: list[int]) -> list[np.ndarray]:
    return [decode((directory / f"{i}.jpg").read_bytes(), 4096 * 4096) for i in ids]


def user_photo(pixels: np.ndarray) -> np.ndarray:
    """The product at 60% on a 1.6x light-grey canvas, off-centre, re-encoded as a JPEG."""
    h, w = pixels.shape[:2]
    canvas = Image.new("RGB", (int(w * 1.6), int(h * 1.6)), (228, 226, 222))
    canvas.paste(Image.fromarray(pixels).resize((int(w * 0.96), int(h * 0.96))), (int(w * 0.1), int(h * 0.5)))
    out = io.BytesIO()
    canvas.save(out, "JPEG", quality=80)
    return decode(out.getvalue(), 4096 * 4096)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sample", type=Path, default=Path("ops/sample"))
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    rows = {int(r["id"]): r for name in ("products.csv", "queries.csv")
            for r in csv.DictReader(open(args.sample / name, newline=""))}
    catalog_ids = [int(r["id"]) for r in csv.DictReader(open(args.sample / "products.csv", newline=""))]
    query_ids = [int(r["id"]) for r in csv.DictReader(open(args.sample / "queries.csv", newline=""))]
    catalog = load(args.sample / "images", catalog_ids)
    queries = load(args.sample / "queries", query_ids)
    exact_ids = catalog_ids[::4]
    as_is = catalog[::4]
    shifted = [user_photo(p) for p in as_is]
    embedder, segmenter = Embedder("measure", device="cpu", max_batch=16), Segmenter("cpu")
    report = {}
    for name, segment in (("whole image", False), ("segmented", True)):
        start = time.perf_counter()
        prep = (lambda images: [p for p, _ in segmenter.crop_all(images)]) if segment else (lambda images: images)
        index = embedder.embed(prep(catalog))
        ids = np.array(catalog_ids)
        top = ids[np.argsort(-embedder.embed(prep(queries)) @ index.T, axis=1)[:, :args.k]]
        precision = {level: float(np.mean([[rows[h][level] == rows[q][level] for h in hits]
                                           for q, hits in zip(query_ids, top)])) for level in LEVELS}
        recall = {}
        for label, photos in (("catalog photo", as_is), ("user photo", shifted)):
            best = ids[np.argmax(embedder.embed(prep(photos)) @ index.T, axis=1)]
            recall[label] = float(np.mean(best == np.array(exact_ids)))
        report[name] = {f"precision_at_{args.k}": precision, "exact_recall_at_1": recall,
                        "seconds": round(time.perf_counter() - start, 1)}
        print(name, json.dumps(report[name]), flush=True)
    confident = np.mean([s.confident for s in segmenter.segment(catalog)])
    print(json.dumps({"catalog_confident": float(confident), "n_catalog": len(catalog), "n_queries": len(queries),
                      "n_exact": len(exact_ids), **report}, indent=1))


if __name__ == "__main__":
    main()
