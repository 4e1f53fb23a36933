"""Shard snapshots on disk: the indexer writes them, workers start from them.

A snapshot of shard ``p`` is one file holding the FAISS index and, in its name, the
``catalog.vectors`` offset it reflects (the next change to apply) and the timestamp of
the changelog record just before that offset::

    {directory}/{model_version}/p{p:03d}/{written_ms}-{offset}-{last_timestamp_ms}.faiss

It is written atomically: a temporary file in the same directory, fsync, rename, fsync of
the directory (the POSIX recipe; see e.g. SQLite's "atomic commit"). A reader checks the
record at ``offset - 1`` still has ``last_timestamp_ms``: if the broker lost its log (or
compaction removed that record) the snapshot's offsets mean nothing and the reader
rebuilds the shard from PostgreSQL instead.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from workers.shards import IndexPolicy, Shard


@dataclass(frozen=True)
class Snapshot:
    path: Path
    partition: int
    written_ms: int
    offset: int
    last_timestamp_ms: int

    def load(self, policy: IndexPolicy | None = None) -> Shard:
        return Shard.from_bytes(self.path.read_bytes(), policy)


def _dir(directory: Path, model_version: str, partition: int) -> Path:
    return Path(directory) / model_version / f"p{partition:03d}"


def write(directory: Path, model_version: str, partition: int, shard: Shard, offset: int,
          last_timestamp_ms: int, keep: int = 2) -> Snapshot:
    """Write a snapshot atomically, then delete all but the newest ``keep`` of this shard."""
    folder = _dir(directory, model_version, partition)
    folder.mkdir(parents=True, exist_ok=True)
    written_ms = int(time.time() * 1000)
    path = folder / f"{written_ms}-{offset}-{last_timestamp_ms}.faiss"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(shard.to_bytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in listing(directory, model_version, partition)[keep:]:
        old.path.unlink(missing_ok=True)
    return Snapshot(path, partition, written_ms, offset, last_timestamp_ms)


def listing(directory: Path, model_version: str, partition: int) -> list[Snapshot]:
    """This shard's snapshots, newest written first."""
    snapshots = []
    for path in _dir(directory, model_version, partition).glob("*.faiss"):
        try:
            written_ms, offset, last_ts = (int(x) for x in path.stem.split("-"))
        except ValueError:
            continue  # not ours
        snapshots.append(Snapshot(path, partition, written_ms, offset, last_ts))
    return sorted(snapshots, key=lambda s: s.written_ms, reverse=True)


def newest(directory: Path | None, model_version: str, partition: int) -> Snapshot | None:
    if directory is None:
        return None
    found = listing(directory, model_version, partition)
    return found[0] if found else None
