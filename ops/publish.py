"""Catalog CSV (the columns of the dataset's ``styles.csv``) -> catalog events on Kafka."""

from __future__ import annotations

import base64
import csv
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from schemas.events import CatalogEvent, ImageRef
from workers import topics

COLUMNS = {"id": "product_id", "gender": "gender", "masterCategory": "master_category",
           "subCategory": "sub_category", "articleType": "article_type", "baseColour": "base_colour",
           "season": "season", "year": "year", "usage": "usage", "productDisplayName": "title"}


@dataclass(frozen=True)
class RowError:
    line: int
    product_id: str
    reason: str


def read_catalog(path: Path, images: Path, version: int | None = None
                 ) -> tuple[list[CatalogEvent], list[RowError]]:
    """One upsert event per CSV row, the photo ``images/<id>.jpg`` inlined as base64.

    Args:
        path: CSV with the header of styles.csv (id, gender, masterCategory, ..., productDisplayName).
        images: Directory of ``<id>.jpg`` photos.
        version: Version of every event; default: now in milliseconds, so a re-publish supersedes.

    Returns:
        ``(events, errors)``: a row that cannot become an event is reported with its line and reason.
    """
    version = int(time.time() * 1000) if version is None else version
    events, errors = [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path} lacks the columns {sorted(missing)}; expected the header of styles.csv: "
                             f"{','.join(COLUMNS)}")
        for row in reader:
            line, raw_id = reader.line_num, (row.get("id") or "").strip()
            photo = images / f"{raw_id}.jpg"
            if not photo.is_file():
                errors.append(RowError(line, raw_id, f"no photo {photo}"))
                continue
            fields = {COLUMNS[k]: (v.strip() or None) for k, v in row.items() if k in COLUMNS and v is not None}
            try:
                events.append(CatalogEvent(op="upsert", version=version, **fields,
                                           image=ImageRef(data=base64.b64encode(photo.read_bytes()).decode())))
            except ValidationError as exc:
                reason = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                errors.append(RowError(line, raw_id, reason))
    return events, errors


def publish(bootstrap: str, topic: str, events: Iterable[CatalogEvent],
            on_sent: Callable[[], None] = lambda: None) -> int:
    """Send events keyed by product id and wait until the broker has acknowledged all of them.

    Raises:
        kafka.errors.KafkaError: a send failed after the producer's retries.
    """
    producer = topics.producer(bootstrap)
    try:
        futures = []
        for event in events:
            futures.append(producer.send(topic, key=event.key(), value=event.model_dump_json().encode()))
            on_sent()
        producer.flush()
        for future in futures:
            future.get(timeout=60)
        return len(futures)
    finally:
        producer.close()
