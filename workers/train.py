"""Training the category heads on a catalog: backbone features (cached) -> one softmax head per level.

The split follows the issue: products with ``id % 10 == 0`` are the validation split and never
touch training; early stopping uses a held-out tenth of the training split (``id % 10 == 1``).
Features come from :class:`workers.embed.Embedder` (EfficientNet-Lite0, 1280-d GAP, L2-normalised),
so the heads see exactly what the worker computes. They are cached per directory in chunks of
``CHUNK`` images (``features-<chunk>.npz``), so an interrupted extraction resumes and retraining
costs seconds.

Inputs are checked before anything is embedded (:func:`read_styles`, :func:`photos`,
:func:`check_split`), and refused with :class:`workers.errors.InvalidInput`, whose message says
what to fix; a photo that cannot be read or decoded is left out with a warning (:func:`read_photos`).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Container
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from workers.classify import LEVELS, OTHER, CategoryHeads, HeadsNet
from workers.decode import decode
from workers.errors import ImageRejected, InvalidInput

log = logging.getLogger(__name__)

CHUNK = 1024
MAX_PIXELS = 1 << 26
# styles.csv column of each level (the catalog's own names; the API uses the snake_case keys).
COLUMNS = {"master_category": "masterCategory", "sub_category": "subCategory", "article_type": "articleType",
           "gender": "gender", "base_colour": "baseColour"}
REQUIRED = ("id", *(COLUMNS[level] for level in LEVELS))
SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def is_validation(product_id: int) -> bool:
    """The issue's validation split: ``id % 10 == 0``."""
    return product_id % 10 == 0


def is_early_stop(product_id: int) -> bool:
    """The held-out part of the training split used for early stopping: ``id % 10 == 1``."""
    return product_id % 10 == 1


def read_styles(path: Path) -> dict[int, dict[str, str]]:
    """``styles.csv`` -> ``{id: {level: label}}`` for every level in :data:`COLUMNS` (empty labels dropped).

    UTF-8 with or without a byte-order mark, any line ends. The columns of :data:`REQUIRED` must be
    there (``gender`` and ``baseColour`` are read when they are); other columns are ignored.

    Raises:
        InvalidInput: The file is empty or has no rows, lacks a column of :data:`REQUIRED`, or a row's
            id is not a whole number or repeats another row's (the message names the lines).
    """
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise InvalidInput(f"{path} is empty: it needs a header line ({','.join(REQUIRED)}) and a row per product")
        missing = [c for c in REQUIRED if c not in reader.fieldnames]
        if missing:
            raise InvalidInput(f"{path} line 1: no {', '.join(missing)} column in the header "
                               f"({','.join(reader.fieldnames)}); {','.join(REQUIRED)} are required")
        styles, lines = {}, {}
        for row in reader:
            value = (row["id"] or "").strip()
            if not (value.isdecimal() and value.isascii()):
                raise InvalidInput(f"{path} line {reader.line_num}: id {value!r} is not a whole number; the ids "
                                   "are the product ids the photos are named by (<id>.jpg)")
            product_id = int(value)
            if product_id in lines:
                raise InvalidInput(f"{path} lines {lines[product_id]} and {reader.line_num} both have id "
                                   f"{product_id}: keep one row per product")
            lines[product_id] = reader.line_num
            styles[product_id] = {level: row[col] for level, col in COLUMNS.items() if row.get(col)}
    if not styles:
        raise InvalidInput(f"{path} has a header but no rows: add a row per product")
    return styles


def photos(directory: Path, labelled: Container[int]) -> list[Path]:
    """The photos of ``directory`` whose id is in ``labelled``, sorted by id: the files named
    ``<id>.<jpg|jpeg|png|webp>`` (any case; ``id`` in ASCII digits), the names both ``train`` and
    ``eval`` take. Logs how many files were left out, and why.

    Raises:
        InvalidInput: Two files of one id (``10012.jpg`` and ``10012.jpeg``), or no photo with a row.
    """
    found: dict[int, Path] = {}
    unnamed = unlabelled = 0
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() not in SUFFIXES or not (path.stem.isdecimal() and path.stem.isascii()):
            unnamed += 1
        elif int(path.stem) not in labelled:
            unlabelled += 1
        elif int(path.stem) in found:
            raise InvalidInput(f"{found[int(path.stem)]} and {path} are both photos of product {int(path.stem)}: "
                               "keep one")
        else:
            found[int(path.stem)] = path
    log.info("%s: %d photos; left out %d without a row in styles.csv and %d not named <id>.<jpg|jpeg|png|webp>",
             directory, len(found), unlabelled, unnamed)
    if not found:
        raise InvalidInput(f"no <id>.jpg|jpeg|png|webp photos with a row in styles.csv in {directory}")
    return [found[i] for i in sorted(found)]


def read_photos(paths: list[Path], decode_file: Callable[[bytes], np.ndarray], pool: ThreadPoolExecutor
                ) -> tuple[list[Path], list[np.ndarray]]:
    """Read and decode photos in ``pool``; one that cannot be read (a broken link, a folder) or decoded
    (:class:`ImageRejected`) is left out, with a warning naming it and the reason.

    Returns:
        The paths decoded, in order, and their pixels as ``decode_file`` gives them (uint8 (H, W, 3) RGB).
    """
    def read(path: Path) -> np.ndarray | None:
        try:
            return decode_file(path.read_bytes())
        except (ImageRejected, OSError) as exc:
            log.warning("skipped %s: %s", path, exc)
            return None

    decoded = [(path, pixels) for path, pixels in zip(paths, pool.map(read, paths)) if pixels is not None]
    return [path for path, _ in decoded], [pixels for _, pixels in decoded]


def extract_features(paths: list[Path], cache: Path, embed: Callable[[list[np.ndarray]], np.ndarray],
                     threads: int = 2, chunk_size: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Features of photos, from the cache where present.

    Args:
        paths: ``<id>.<ext>`` photos of one folder, as :func:`photos` lists them.
        cache: Directory of ``features-<n>.npz`` chunks (created), one per ``chunk_size`` photos: the ids
            asked for (``asked``), the ids decoded (``ids``) and their features (``features``).
        embed: ``Embedder.embed``: N uint8 (H, W, 3) RGB -> float32 (N, 1280) L2-normalised.
        threads: Decoding threads, overlapping the model.
        chunk_size: Images per cached chunk (the unit of resuming).

    Returns:
        int64 (N,) ids and float32 (N, 1280) features of the photos that could be read (:func:`read_photos`).
        A photo left out when its chunk was cached stays out, with a warning, until that chunk is deleted.
    """
    by_id = {int(p.stem): p for p in paths}
    ids = list(by_id)
    cache.mkdir(parents=True, exist_ok=True)
    out_ids, out_features = [], []
    start, done = time.perf_counter(), 0
    with ThreadPoolExecutor(threads) as pool:
        for n in range(0, len(ids), chunk_size):
            chunk = np.array(ids[n:n + chunk_size], dtype=np.int64)
            path = cache / f"features-{n // chunk_size:04d}.npz"
            if path.exists():
                with np.load(path) as cached:
                    if np.array_equal(cached["asked"] if "asked" in cached else cached["ids"], chunk):
                        for i in np.setdiff1d(chunk, cached["ids"]):
                            log.warning("skipped %s: it could not be read when %s was made (delete that to retry)",
                                        by_id[int(i)], path)
                        out_ids.append(cached["ids"])
                        out_features.append(cached["features"])
                        continue
            kept, pixels = read_photos([by_id[int(i)] for i in chunk], lambda data: decode(data, MAX_PIXELS), pool)
            kept_ids = np.array([int(p.stem) for p in kept], dtype=np.int64)
            features = (embed(pixels) if pixels else np.zeros((0, 1280))).astype(np.float32)
            np.savez(path, asked=chunk, ids=kept_ids, features=features)
            out_ids.append(kept_ids)
            out_features.append(features)
            done += len(chunk)
            log.info("%s: %d/%d images, %.1f img/s", paths[0].parent, n + len(chunk), len(ids),
                     done / (time.perf_counter() - start))
    if not out_ids:
        return np.zeros(0, np.int64), np.zeros((0, 1280), np.float32)
    return np.concatenate(out_ids), np.concatenate(out_features)


def load_cache(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every chunk of a feature cache: int64 (N,) ids and float32 (N, 1280) features."""
    chunks = [np.load(p) for p in sorted(cache.glob("features-*.npz"))]
    if not chunks:
        return np.zeros(0, np.int64), np.zeros((0, 1280), np.float32)
    return np.concatenate([c["ids"] for c in chunks]), np.concatenate([c["features"] for c in chunks])


def check_split(ids: Collection[int], styles: dict[int, dict[str, str]], levels: tuple[str, ...] = LEVELS) -> None:
    """Check that the photos ``ids`` (those with a row in ``styles``) fill every split and give each level
    a training label, so that :func:`train` can fit, stop early and report validation accuracy.

    Raises:
        InvalidInput: A split without photos, or a level no training photo has a label for.
    """
    ids = [i for i in ids if i in styles]
    fit_ids = [i for i in ids if not is_validation(i) and not is_early_stop(i)]
    for name, rule, rows in (("training", "id % 10 from 2 to 9", fit_ids),
                             ("early-stopping", "id % 10 == 1", [i for i in ids if is_early_stop(i)]),
                             ("validation", "id % 10 == 0", [i for i in ids if is_validation(i)])):
        if not rows:
            raise InvalidInput(f"no photo in the {name} split ({rule}) among the {len(ids)} photos with a row in "
                               "styles.csv: add photos of that split")
    for level in levels:
        if not any(styles[i].get(level) for i in fit_ids):
            raise InvalidInput(f"none of the {len(fit_ids)} training photos has a {COLUMNS[level]} label in styles.csv")


def label_maps(styles: dict[int, dict[str, str]], train_ids: np.ndarray, levels: tuple[str, ...],
               min_count: int) -> dict[str, list[str]]:
    """Labels of each level with at least ``min_count`` training rows, sorted, plus :data:`OTHER` for the rest."""
    maps = {}
    for level in levels:
        counts = Counter(styles[int(i)].get(level) for i in train_ids)
        counts.pop(None, None)
        kept = sorted(label for label, n in counts.items() if n >= min_count)
        maps[level] = kept + ([OTHER] if len(kept) < len(counts) else [])
    return maps


def encode(styles: dict[int, dict[str, str]], ids: np.ndarray, names: list[str], level: str) -> np.ndarray:
    """int64 (N,) class index of each id at ``level``: its label, :data:`OTHER` if folded, -1 if unlabelled."""
    index = {name: j for j, name in enumerate(names)}
    other = index.get(OTHER, -1)
    return np.array([index.get(styles[int(i)].get(level), other) if styles[int(i)].get(level) else -1
                     for i in ids], dtype=np.int64)


def fit(x: np.ndarray, y: dict[str, np.ndarray], x_stop: np.ndarray, y_stop: dict[str, np.ndarray],
        classes: dict[str, int], hidden: int, dropout: float = 0.3, label_smoothing: float = 0.1,
        weight_decay: float = 1e-4, lr: float = 1e-3, batch: int = 256, max_epochs: int = 60,
        patience: int = 6, seed: int = 0) -> tuple[HeadsNet, dict]:
    """Train a :class:`HeadsNet` with AdamW on the summed cross-entropy of all levels (label smoothing,
    Szegedy et al. 2016), keeping the epoch with the best mean accuracy on ``x_stop`` (early stopping).

    Args:
        x: float32 (N, D) training features; ``y``: int64 (N,) class per level, -1 = no label.
        x_stop, y_stop: The early-stopping rows, same layout.

    Returns:
        The network (best epoch, eval mode) and ``{"epochs", "best_epoch", "stop_accuracy"}``.
    """
    torch.manual_seed(seed)
    net = HeadsNet(x.shape[1], classes, hidden, dropout)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max_epochs)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-1, label_smoothing=label_smoothing)
    xt, yt = torch.from_numpy(x), {level: torch.from_numpy(v) for level, v in y.items()}
    best, best_state, best_epoch, epoch = -1.0, None, 0, 0
    for epoch in range(1, max_epochs + 1):
        net.train()
        for rows in torch.randperm(len(xt)).split(batch):
            logits = net(xt[rows])
            loss = sum(loss_fn(logits[level], yt[level][rows]) for level in classes)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        score = float(np.mean(list(accuracy(net.eval(), x_stop, y_stop).values())))
        if score > best:
            best, best_epoch = score, epoch
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        log.info("epoch %d: early-stop accuracy %.4f (best %.4f at %d)", epoch, score, best, best_epoch)
        if epoch - best_epoch >= patience:
            break
    net.load_state_dict(best_state)
    return net.eval(), {"epochs": epoch, "best_epoch": best_epoch, "stop_accuracy": best}


def accuracy(net: torch.nn.Module, x: np.ndarray, y: dict[str, np.ndarray]) -> dict[str, float]:
    """Top-1 accuracy per level over the rows with a label (``y`` as from :func:`encode`: OTHER is a class)."""
    with torch.inference_mode():
        logits = net(torch.from_numpy(x))
    return {level: float((logits[level].argmax(1).numpy() == v)[v >= 0].mean()) for level, v in y.items()}


def train(sources: dict[str, tuple[np.ndarray, np.ndarray]], styles: dict[int, dict[str, str]], out: Path,
          levels: tuple[str, ...] = LEVELS, hidden: int = 1024, min_count: int = 10, segmented: bool = True,
          n_skipped: int = 0, **fit_args) -> dict:
    """Train heads on cached features and write them to ``out`` (read by :class:`CategoryHeads`).

    Args:
        sources: ``{name: (ids int64 (N,), features float32 (N, 1280))}``, e.g. ``{"224": ..., "60x80": ...}``;
            every source's training-split rows are pooled for training.
        styles: From :func:`read_styles`.
        out: Directory for ``heads.safetensors`` (float16), ``labels.json``, ``config.json``, ``metrics.json``.
        levels: Levels to train; labels with fewer than ``min_count`` training rows fold into :data:`OTHER`.
        hidden: Width of the shared hidden layer (0: linear heads).
        segmented: Whether the features were of photos cropped to the product (recorded in config.json).
        n_skipped: Photos left out because they could not be read (recorded in metrics.json).

    Returns:
        The metrics written: validation accuracy per source and level (strict: the true label, before
        folding, must be the top prediction), plus counts and the training run's figures.

    Raises:
        InvalidInput: The rows with a label leave a split empty (:func:`check_split`).
    """
    from safetensors.torch import save_file

    ids = np.concatenate([i for i, _ in sources.values()])
    x = np.concatenate([f for _, f in sources.values()]).astype(np.float32)
    known = np.array([int(i) in styles for i in ids])
    ids, x = ids[known], x[known]
    check_split(ids.tolist(), styles, levels)
    val = np.array([is_validation(int(i)) for i in ids])
    stop = np.array([is_early_stop(int(i)) for i in ids])
    fit_rows = ~val & ~stop
    labels = label_maps(styles, ids[fit_rows], levels, min_count)
    ys = {level: encode(styles, ids, names, level) for level, names in labels.items()}
    start = time.perf_counter()
    net, run = fit(x[fit_rows], {k: v[fit_rows] for k, v in ys.items()}, x[stop], {k: v[stop] for k, v in ys.items()},
                   {level: len(names) for level, names in labels.items()}, hidden, **fit_args)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in net.state_dict().items()}, out / "heads.safetensors")
    (out / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")
    (out / "config.json").write_text(json.dumps({"dim": int(x.shape[1]), "hidden": hidden, "min_count": min_count,
                                                 "backbone": "efficientnet-lite0 imagenet, GAP 1280-d, L2-normalised",
                                                 "segmented": segmented,
                                                 "fit": fit_args}, indent=1) + "\n")
    heads = CategoryHeads(out)  # measure what was written (float16 weights), not the net in memory
    metrics = {"validation": {}, "train_rows": int(fit_rows.sum()), "early_stop_rows": int(stop.sum()),
               "n_skipped": n_skipped,
               "train_seconds": round(time.perf_counter() - start, 1), **run,
               "classes": {level: len(names) for level, names in labels.items()},
               "split": "validation: id % 10 == 0; early stopping: id % 10 == 1; training: the rest"}
    for name, (src_ids, src_x) in sources.items():
        rows = np.array([is_validation(int(i)) and int(i) in styles for i in src_ids], dtype=bool)
        if rows.any():
            metrics["validation"][name] = {"n": int(rows.sum()),
                                           **validation_accuracy(heads, src_ids[rows], src_x[rows], styles)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def validation_accuracy(heads: CategoryHeads, ids: np.ndarray, features: np.ndarray,
                        styles: dict[int, dict[str, str]]) -> dict[str, float]:
    """Top-1 accuracy per level of ``heads`` against the catalog's labels (rows without a label skipped)."""
    probs = heads.probabilities(features)
    result = {}
    for level, p in probs.items():
        names = np.array(heads.labels[level])[p.argmax(1)]
        truth = [styles[int(i)].get(level) for i in ids]
        pairs = [(n, t) for n, t in zip(names, truth) if t]
        result[level] = round(sum(n == t for n, t in pairs) / max(1, len(pairs)), 4)
    return result
