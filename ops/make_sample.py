#!/usr/bin/env python3
"""Build the bundled sample catalog (ops/sample/) from the real product dataset.

The source is the Kaggle "Fashion Product Images" dataset by Param Aggarwal
(photos and labels from the Myntra catalog), kept outside the repository in
``../shared/data/fashion-product-images/`` (``styles.csv``, ``images-224.tar``,
``images-60x80.tar``).  It is demo/research data; the sample made from it is
for demos, tests and examples only.

What the script does, deterministically (``random.Random(seed)``, seed 0):

1. Parses ``styles.csv`` robustly: rows with more than 10 fields (unquoted
   commas inside ``productDisplayName``) are repaired by joining the extra
   fields back into the title (the same as splitting on the first 9 commas),
   rows with fewer fields are reported and dropped; the numbers are printed.
   A product is eligible only with a non-empty masterCategory, subCategory,
   articleType and a real title (placeholders such as ``NA``,
   ``RTV_LoadTest``, ``test dispName`` or a file name are rejected).
2. Reads the JPEGs straight out of the tar files with :mod:`tarfile` (nothing
   is extracted to disk) and prefers ``images-224.tar``.  Byte-identical
   photos filed under several ids are collapsed to the lowest id.
3. Picks ``--queries`` query photos from ``images-224.tar`` (spread over the
   masterCategories with at least 20 products there, one articleType at a
   time, only from photos with no identical copy under another id); they
   are never in the catalog.
4. Picks ``--n`` catalog products, stratified by masterCategory: in
   proportion to ``images-224.tar``, at least 10 per masterCategory where the
   data has that many, and up to 3 per articleType.  A masterCategory with
   fewer than 5 products in ``images-224.tar`` gets up to 20 products from
   ``images-60x80.tar``; one with 5-9 is topped up to 10 from there.
5. Re-encodes every photo with Pillow: RGB, at most 224 px on the longest side
   (never upscaled), baseline JPEG at ``--quality``, no metadata.  Refuses to
   write anything if the result would exceed ``--max-mb`` (default 12 MB).
6. Writes ``products.csv`` / ``queries.csv`` (the ``styles.csv`` columns, in
   order, via :mod:`csv`), ``images/<id>.jpg``, ``queries/<id>.jpg`` and a
   ``README.md`` with the counts.

Usage (needs Pillow)::

    python3 ops/make_sample.py [--data DIR] [--out DIR] [--n 1200]
                               [--queries 30] [--quality 75]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import random
import re
import shutil
import sys
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

try:
    from PIL import Image
except ImportError:  # pragma: no cover - environment problem
    sys.exit("make_sample.py needs Pillow: pip install pillow")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = (REPO_ROOT / ".." / "shared" / "data" / "fashion-product-images").resolve()
DEFAULT_OUT = REPO_ROOT / "ops" / "sample"

COLUMNS = [
    "id", "gender", "masterCategory", "subCategory", "articleType",
    "baseColour", "season", "year", "usage", "productDisplayName",
]
MAX_SIDE = 224
SEED = 0
MIN_PER_MASTER = 10          # at least this many per masterCategory (if the data has them)
PER_ARTICLE_TYPE = 3         # try to have this many of every articleType
SMALL_POOL = 5               # fewer than this in images-224 -> take from images-60x80
SMALL_POOL_EXTRA = 20        # ... up to this many
QUERY_MIN_POOL = 20          # masterCategories with at least this many get queries
QUERY_MIN_PER_MASTER = 3
QUERY_MIN_TYPE_COUNT = 10    # queries only from articleTypes well represented in the data

PLACEHOLDER_TITLES = {"", "na", "n/a", "null", "none", "productdisplayname"}
JUNK_TITLE_RE = re.compile(r"loadtest|^test\b|\.(?:jpe?g|png|gif)$", re.IGNORECASE)

_ID_RE = re.compile(r"(?:^|/)(\d+)\.jpe?g$", re.IGNORECASE)


# --------------------------------------------------------------------------- data
def parse_styles(path: Path) -> dict[str, list[str]]:
    """Return {id: row} for styles.csv, repairing rows with extra commas."""
    rows: dict[str, list[str]] = {}
    repaired: list[str] = []
    short: list[int] = []
    duplicates: list[str] = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        if [h.strip() for h in header] != COLUMNS:
            sys.exit(f"unexpected styles.csv header: {header}")
        for lineno, fields in enumerate(reader, start=2):
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) > len(COLUMNS):
                # unquoted commas in productDisplayName: keep the first 9 fields,
                # the rest is the title (== splitting the line on the first 9 commas)
                fields = fields[:9] + [",".join(fields[9:])]
                repaired.append(fields[0])
            elif len(fields) < len(COLUMNS):
                short.append(lineno)
                continue
            pid = fields[0].strip()
            if not pid.isdigit():
                short.append(lineno)
                continue
            if pid in rows:
                duplicates.append(pid)
                continue
            rows[pid] = [pid] + fields[1:]
    print(f"styles.csv: {len(rows)} products; repaired {len(repaired)} rows with extra "
          f"commas in productDisplayName{' ' + str(repaired[:10]) if repaired else ''}; "
          f"dropped {len(short)} short/invalid rows{' (lines ' + str(short[:10]) + ')' if short else ''}; "
          f"{len(duplicates)} duplicate ids")
    return rows


def bad_reason(row: list[str]) -> str | None:
    """Why a styles row cannot go into the sample (None if it can)."""
    for col in ("masterCategory", "subCategory", "articleType"):
        if not row[COLUMNS.index(col)].strip():
            return f"empty {col}"
    title = row[COLUMNS.index("productDisplayName")].strip()
    if title.lower() in PLACEHOLDER_TITLES or JUNK_TITLE_RE.search(title):
        return f"placeholder title {title!r}"
    return None


def tar_index(path: Path) -> dict[str, tarfile.TarInfo]:
    """{id: member} for the JPEG members of a tar file."""
    tf = tarfile.open(path)
    index = {}
    for m in tf.getmembers():
        if m.isfile():
            match = _ID_RE.search(m.name)
            if match:
                index[match.group(1)] = m
    tf.close()
    return index


def read_members(path: Path, index: dict[str, tarfile.TarInfo], ids) -> dict[str, bytes]:
    out = {}
    with tarfile.open(path) as tf:
        for pid in sorted(ids, key=int):
            fh = tf.extractfile(index[pid])
            out[pid] = fh.read()
    return out


# ------------------------------------------------------------------ selection
def largest_remainder(total: int, weights: dict[str, float]) -> dict[str, int]:
    wsum = sum(weights.values())
    if total <= 0 or wsum <= 0:
        return {k: 0 for k in weights}
    raw = {k: total * w / wsum for k, w in weights.items()}
    alloc = {k: int(v) for k, v in raw.items()}
    left = total - sum(alloc.values())
    for k in sorted(raw, key=lambda k: (-(raw[k] - alloc[k]), k))[:left]:
        alloc[k] += 1
    return alloc


def allocate(total: int, pools: dict[str, int], minimums: dict[str, int]) -> dict[str, int]:
    """Split `total` over groups in proportion to pool size, respecting
    per-group minimums and capping at the pool size (water filling)."""
    fixed: dict[str, int] = {}
    while True:
        free = {k: v for k, v in pools.items() if k not in fixed and v > 0}
        budget = total - sum(fixed.values())
        share = largest_remainder(budget, {k: float(v) for k, v in free.items()})
        changed = False
        for k in sorted(free):
            if share[k] < minimums.get(k, 0):
                fixed[k] = min(minimums[k], pools[k])
                changed = True
            elif share[k] > pools[k]:
                fixed[k] = pools[k]
                changed = True
        if not changed:
            result = {k: 0 for k in pools}
            result.update(share)
            result.update(fixed)
            return result


def pick_queries(rng: random.Random, candidates: dict[str, list[str]], rows, n: int) -> list[str]:
    """n query ids spread over masterCategories and, within each, articleTypes."""
    at_col = COLUMNS.index("articleType")
    pools = {mc: len(ids) for mc, ids in candidates.items() if len(ids) >= QUERY_MIN_POOL}
    per = min(QUERY_MIN_PER_MASTER, n // max(len(pools), 1))
    base = {mc: min(per, pools[mc]) for mc in pools}
    extra = largest_remainder(n - sum(base.values()), {mc: float(v) for mc, v in pools.items()})
    quota = {mc: base[mc] + extra[mc] for mc in pools}
    chosen: list[str] = []
    for mc in sorted(quota):
        by_type: dict[str, list[str]] = defaultdict(list)
        for pid in candidates[mc]:
            by_type[rows[pid][at_col]].append(pid)
        types = {t: ids for t, ids in by_type.items() if len(ids) >= QUERY_MIN_TYPE_COUNT} or by_type
        remaining: dict[str, list[str]] = {t: sorted(ids, key=int) for t, ids in types.items()}
        picked = 0
        while picked < quota[mc] and any(remaining.values()):
            # one articleType at a time, weighted by its size, all types before repeats
            round_types = sorted(t for t, ids in remaining.items() if ids)
            while round_types and picked < quota[mc]:
                weights = [len(remaining[t]) for t in round_types]
                t = rng.choices(round_types, weights=weights)[0]
                round_types.remove(t)
                pid = rng.choice(remaining[t])
                remaining[t].remove(pid)
                chosen.append(pid)
                picked += 1
    return chosen


def pick_catalog(rng: random.Random, pool: dict[str, list[str]], quota: dict[str, int], rows) -> list[str]:
    at_col = COLUMNS.index("articleType")
    chosen: list[str] = []
    for mc in sorted(pool):
        ids = sorted(pool[mc], key=int)
        k = quota.get(mc, 0)
        by_type: dict[str, list[str]] = defaultdict(list)
        for pid in ids:
            by_type[rows[pid][at_col]].append(pid)
        taken: list[str] = []
        for t in sorted(by_type):
            take = min(PER_ARTICLE_TYPE, len(by_type[t]))
            taken.extend(rng.sample(by_type[t], take))
        if len(taken) > k:  # quota below the articleType guarantee: keep a random subset
            taken = rng.sample(taken, k)
        rest = [pid for pid in ids if pid not in set(taken)]
        taken.extend(rng.sample(rest, min(k - len(taken), len(rest))))
        chosen.extend(taken)
    return chosen


# -------------------------------------------------------------------- encoding
def encode(data: bytes, quality: int) -> bytes:
    im = Image.open(io.BytesIO(data))
    im.load()
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        im = bg
    elif im.mode != "RGB":
        im = im.convert("RGB")
    if max(im.size) > MAX_SIDE:
        im.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    im.info = {}  # drop source comments/EXIF/ICC: Pillow would carry a JPEG comment over
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, optimize=True, progressive=False)
    return buf.getvalue()


def csv_bytes(rows: dict[str, list[str]], ids) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for pid in sorted(ids, key=int):
        w.writerow(rows[pid])
    return buf.getvalue().encode("utf-8")


def dir_size(path: Path) -> tuple[int, int]:
    """(sum of file sizes, disk usage in bytes) under path."""
    apparent = disk = 0
    for p in path.rglob("*"):
        if p.is_file():
            st = p.stat()
            apparent += st.st_size
            disk += getattr(st, "st_blocks", 0) * 512 or st.st_size
    return apparent, disk


def readme_text(args, rows, catalog, queries, source, quality, size_bytes) -> str:
    mc_col = COLUMNS.index("masterCategory")
    cat_mc = Counter(rows[p][mc_col] for p in catalog)
    q_mc = Counter(rows[p][mc_col] for p in queries)
    small = Counter(rows[p][mc_col] for p in catalog if source[p] == "60x80")
    n_types = len({rows[p][COLUMNS.index("articleType")] for p in catalog})
    lines = [
        "# Sample catalog",
        "",
        "A small, bundled slice of the Kaggle \"Fashion Product Images\" dataset by",
        "Param Aggarwal (product photos and labels from the Myntra catalog), for demos,",
        "tests and examples. Demo/research data: not ours, not for redistribution as a",
        "product catalog.",
        "",
        f"- `products.csv` + `images/<id>.jpg`: {len(catalog)} catalog products "
        f"({n_types} articleTypes); the `styles.csv` columns, in order.",
        f"- `queries.csv` + `queries/<id>.jpg`: {len(queries)} query photos of products "
        "that are *not* in the catalog, for demo searches.",
        f"- JPEG (baseline, RGB, quality {quality}), at most {MAX_SIDE} px on the longest side. "
        "Photos from `images-224.tar` are 224x224 (the dataset squashed them from 3:4); "
        f"the {sum(small.values())} taken from `images-60x80.tar` stay 60x80 "
        "(not upscaled). The source files are about quality-75 JPEGs, so re-encoding at 75",
        "reuses their quantisation and loses next to nothing.",
        f"- Total size: {size_bytes / 1e6:.1f} MB.",
        "",
        "| masterCategory | catalog | of which 60x80 | queries |",
        "|---|---:|---:|---:|",
    ]
    for mc in sorted(set(cat_mc) | set(q_mc), key=lambda m: (-cat_mc[m], m)):
        lines.append(f"| {mc} | {cat_mc[mc]} | {small[mc]} | {q_mc[mc]} |")
    lines.append(f"| **total** | **{len(catalog)}** | **{sum(small.values())}** | **{len(queries)}** |")
    cmd = "python3 ops/make_sample.py"
    opts = []
    if args.n != 1200:
        opts.append(f"--n {args.n}")
    if args.queries != 30:
        opts.append(f"--queries {args.queries}")
    opts.append(f"--quality {quality}")
    cmd += " " + " ".join(opts)
    lines += [
        "",
        "Regenerate (needs Pillow and the dataset in `../shared/data/fashion-product-images/`,",
        "or pass `--data DIR`); the selection is deterministic (seed 0):",
        "",
        "```",
        cmd,
        "```",
        "",
        "Selection: stratified by masterCategory in proportion to `images-224.tar`, at",
        f"least {MIN_PER_MASTER} per masterCategory where the data has that many, up to "
        f"{PER_ARTICLE_TYPE} of every articleType; masterCategories",
        f"with fewer than {SMALL_POOL} products in `images-224.tar` (or fewer than "
        f"{MIN_PER_MASTER}) are filled from `images-60x80.tar`.",
        "Rows with placeholder titles and byte-identical duplicate photos are left out.",
        "",
        "Attribution: Param Aggarwal, \"Fashion Product Images Dataset\", Kaggle",
        "(https://www.kaggle.com/datasets/paramaggarwal/fashion-product-images-dataset),",
        "images and metadata from Myntra.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help=f"dataset directory (default: {DEFAULT_DATA})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="output directory (default: ops/sample in the repo)")
    ap.add_argument("--n", type=int, default=1200, help="catalog products (default 1200)")
    ap.add_argument("--queries", type=int, default=30, help="query photos (default 30)")
    ap.add_argument("--quality", type=int, default=75,
                    help="JPEG quality (default 75: the source photos are ~q75 JPEGs, so re-encoding "
                         "with the same tables is nearly lossless; higher only adds bytes)")
    ap.add_argument("--max-mb", type=float, default=12.0,
                    help="fail if the output would be larger than this many MB (default 12)")
    args = ap.parse_args(argv)

    data: Path = args.data
    styles = data / "styles.csv"
    tar224 = data / "images-224.tar"
    tar60 = data / "images-60x80.tar"
    for p in (styles, tar224, tar60):
        if not p.is_file():
            sys.exit(f"missing {p}")
    if not 1 <= args.quality <= 95:
        sys.exit("--quality must be 1..95")

    rng = random.Random(SEED)
    rows = parse_styles(styles)
    mc_col = COLUMNS.index("masterCategory")
    bad = {pid: r for pid, row in rows.items() if (r := bad_reason(row))}
    if bad:
        print(f"ineligible styles rows: {len(bad)} "
              + ", ".join(f"{p} ({r})" for p, r in sorted(bad.items(), key=lambda x: int(x[0]))))

    idx224 = tar_index(tar224)
    idx60 = tar_index(tar60)
    for name, idx in (("images-224.tar", idx224), ("images-60x80.tar", idx60)):
        orphans = sorted(set(idx) - set(rows), key=int)
        print(f"{name}: {len(idx)} images, {len(orphans)} without a styles row"
              + (f" {orphans[:10]}" if orphans else ""))
    no_image = set(rows) - set(idx224) - set(idx60)
    print(f"styles rows with no image in either tar: {len(no_image)}")

    # ---- images-224 pool, de-duplicated by content
    eligible224 = [p for p in idx224 if p in rows and p not in bad]
    img224 = read_members(tar224, idx224, eligible224)
    by_hash: dict[str, list[str]] = defaultdict(list)
    for pid in sorted(img224, key=int):
        by_hash[hashlib.sha256(img224[pid]).hexdigest()].append(pid)
    dup_groups = [g for g in by_hash.values() if len(g) > 1]
    duplicated = {p for g in dup_groups for p in g}
    canonical = {g[0] for g in by_hash.values()}
    print(f"images-224.tar: {len(dup_groups)} groups of byte-identical photos under different ids "
          f"({len(duplicated)} ids; keeping the lowest id of each)")

    by_mc224: dict[str, list[str]] = defaultdict(list)
    for pid in canonical:
        by_mc224[rows[pid][mc_col]].append(pid)
    all_mc = sorted({row[mc_col] for pid, row in rows.items() if pid not in bad})
    print("masterCategories in styles.csv: "
          + ", ".join(f"{mc} ({sum(1 for r in rows.values() if r[mc_col] == mc)} rows, "
                      f"{len(by_mc224.get(mc, []))} distinct photos in images-224)" for mc in all_mc))

    # ---- queries (images-224 only, unique photos only)
    q_candidates = {mc: sorted((p for p in ids if p not in duplicated), key=int)
                    for mc, ids in by_mc224.items()}
    queries = pick_queries(rng, q_candidates, rows, args.queries)
    qset = set(queries)

    # ---- catalog
    pool224 = {mc: [p for p in ids if p not in qset] for mc, ids in by_mc224.items()}
    extra60: list[str] = []
    for mc in all_mc:
        have = len(pool224.get(mc, []))
        if have < SMALL_POOL:
            want = SMALL_POOL_EXTRA
        elif have < MIN_PER_MASTER:
            want = MIN_PER_MASTER - have
        else:
            continue
        cands = sorted((p for p, row in rows.items()
                        if row[mc_col] == mc and p in idx60 and p not in bad
                        and p not in img224 and p not in qset), key=int)
        imgs = read_members(tar60, idx60, cands)
        seen, uniq = set(), []
        for p in cands:
            h = hashlib.sha256(imgs[p]).hexdigest()
            if h not in seen:
                seen.add(h)
                uniq.append(p)
        take = rng.sample(uniq, min(want, len(uniq)))
        print(f"{mc}: {have} in images-224, adding {len(take)} of {len(uniq)} from images-60x80.tar")
        extra60.extend(take)

    at_col = COLUMNS.index("articleType")
    minimums = {}
    for mc, ids in pool224.items():
        types = Counter(rows[p][at_col] for p in ids)
        minimums[mc] = max(min(MIN_PER_MASTER, len(ids)),
                           sum(min(PER_ARTICLE_TYPE, c) for c in types.values()))
    quota = allocate(args.n - len(extra60), {mc: len(ids) for mc, ids in pool224.items()}, minimums)
    catalog = pick_catalog(rng, pool224, quota, rows) + extra60
    assert not set(catalog) & qset
    if len(catalog) < args.n:
        print(f"warning: only {len(catalog)} products available (asked for {args.n})")

    # ---- encode (in memory first, to check the size budget)
    source = {p: "224" for p in catalog + queries}
    source.update({p: "60x80" for p in extra60})
    raw = dict(img224)
    raw.update(read_members(tar60, idx60, extra60))
    encoded = {p: encode(raw[p], args.quality) for p in catalog + queries}
    csvs = {"products.csv": csv_bytes(rows, catalog), "queries.csv": csv_bytes(rows, queries)}
    planned = sum(map(len, encoded.values())) + sum(map(len, csvs.values())) + 4096  # + README
    if planned > args.max_mb * 1e6:
        print(f"error: the sample would be {planned / 1e6:.2f} MB, over --max-mb {args.max_mb}; "
              "use a lower --quality", file=sys.stderr)
        return 1

    out: Path = args.out.resolve()
    ours = {"images", "queries", "products.csv", "queries.csv", "README.md"}
    if out.exists() and (foreign := sorted(p.name for p in out.iterdir() if p.name not in ours)):
        print(f"error: {out} holds other files ({', '.join(foreign[:5])}); refusing to write there",
              file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    for name in ("images", "queries"):
        if (out / name).exists():
            shutil.rmtree(out / name)
        (out / name).mkdir()
    for name in ("products.csv", "queries.csv", "README.md"):
        if (out / name).exists():
            (out / name).unlink()
    for sub, ids in (("images", catalog), ("queries", queries)):
        for p in ids:
            (out / sub / f"{p}.jpg").write_bytes(encoded[p])
    for name, blob in csvs.items():
        (out / name).write_bytes(blob)

    size, _ = dir_size(out)
    text = readme_text(args, rows, catalog, queries, source, args.quality, size)
    text = readme_text(args, rows, catalog, queries, source, args.quality, size + len(text.encode()))
    (out / "README.md").write_text(text, encoding="utf-8")
    size, disk = dir_size(out)

    cat_mc = Counter(rows[p][mc_col] for p in catalog)
    q_mc = Counter(rows[p][mc_col] for p in queries)
    print(f"catalog: {len(catalog)} products, {len({rows[p][at_col] for p in catalog})} articleTypes: "
          + ", ".join(f"{mc} {c}" for mc, c in cat_mc.most_common()))
    print(f"queries: {len(queries)}: " + ", ".join(f"{mc} {c}" for mc, c in q_mc.most_common()))
    print(f"wrote {out}: {size / 1e6:.2f} MB ({size} bytes; {disk / 1e6:.2f} MB on disk), "
          f"JPEG quality {args.quality}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
